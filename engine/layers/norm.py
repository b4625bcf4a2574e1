from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from litmus_kernels import ops


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as HF does), optionally fusing the residual add before it."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x alone -> normalised x; with residual -> (normalised x + residual, x + residual)."""
        return ops.rms_norm(x, self.weight, self.eps, residual)


class GemmaRMSNorm(RMSNorm):
    """RMSNorm whose checkpoint weight is an offset from 1 (Gemma: a zero weight is the identity)."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return ops.rms_norm(x, 1.0 + self.weight, self.eps, residual)


class LayerNorm(nn.Module):
    """LayerNorm over the last dim, computed in float32, with RMSNorm's optional fused residual add.

    shape may be (heads, head_dim): one weight per head, each head normalised on its own (Cohere's
    q/k norms); the input is then [tokens, heads * head_dim]. bias=False drops the bias (Cohere,
    MPT), affine=False every parameter (OLMo); weight_offset=1 stores the weight as an offset
    from 1 (Nemotron's LayerNorm1P).
    """

    def __init__(self, shape: int | tuple[int, ...], eps: float = 1e-5, bias: bool = True, affine: bool = True,
                 weight_offset: float = 0.0):
        super().__init__()
        self.shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.eps = eps
        self.weight_offset = weight_offset
        self.weight = nn.Parameter(torch.full(self.shape, 1.0 - weight_offset)) if affine else None
        self.bias = nn.Parameter(torch.zeros(self.shape)) if affine and bias else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x alone -> normalised x; with residual -> (normalised x + residual, x + residual)."""
        if residual is not None:
            x = x + residual
            residual = x
        h = x.float().reshape(-1, *self.shape)
        if len(self.shape) == 1:
            weight = None if self.weight is None else self.weight.float() + self.weight_offset
            bias = None if self.bias is None else self.bias.float()
            h = F.layer_norm(h, self.shape, weight, bias, self.eps)
        else:
            h = F.layer_norm(h, self.shape[-1:], None, None, self.eps)
            if self.weight is not None:
                h = h * (self.weight.float() + self.weight_offset)
            if self.bias is not None:
                h = h + self.bias.float()
        out = h.reshape(x.shape).to(x.dtype)
        return out if residual is None else (out, residual)
