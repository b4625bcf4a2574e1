from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from litmus_kernels import ops

_ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    # Squared ReLU (Persimmon, Nemotron).
    "relu2": lambda x: F.relu(x).square(),
}


def get_act_fn(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise NotImplementedError(f"activation {name!r} is not implemented by the engine") from None


# Gated activations with a fused kernel; any other activation runs as act(gate) * up.
_FUSED_GATED = {
    "silu": ops.silu_and_mul,
    "swish": ops.silu_and_mul,
    "gelu": ops.gelu_and_mul,
    "gelu_pytorch_tanh": lambda x: ops.gelu_and_mul(x, approximate="tanh"),
    "gelu_new": lambda x: ops.gelu_and_mul(x, approximate="tanh"),
}


class GatedActivation(nn.Module):
    """act(gate) * up over a fused [gate | up] projection output."""

    def __init__(self, act: str):
        super().__init__()
        self.act = get_act_fn(act)
        self.fused = _FUSED_GATED.get(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(x)
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up
