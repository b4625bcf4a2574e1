from __future__ import annotations

import torch
from torch import nn

from kernels import ops


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as HF does), optionally fusing the residual add before it."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """x alone -> normalised x; with residual -> (normalised x + residual, x + residual)."""
        return ops.rms_norm(x, self.weight, self.eps, residual)
