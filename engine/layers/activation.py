from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.linear import PackedLinear
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


# Gated activations with C++ / Triton kernels, by the name those kernels give them; any other
# activation runs as act(gate) * up.
_KERNELS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


class GatedActivation(nn.Module):
    """act(gate) * up over a fused [gate | up] projection output.

    Built with that projection (an nn.Linear), it marks it `gated_projection` when act has a
    kernel, so the CPU GEMM packs it to store act(gate) * up itself: project(x) then runs both in
    one pass.
    """

    def __init__(self, act: str, projection: nn.Linear | None = None):
        super().__init__()
        self.act = get_act_fn(act)
        self.kernel = _KERNELS.get(act)
        if projection is not None and self.kernel is not None:
            projection.gated_projection = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "silu":
            return ops.silu_and_mul(x)
        if self.kernel is not None:
            return ops.gelu_and_mul(x, approximate="tanh" if self.kernel == "gelu_tanh" else "none")
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up

    def project(self, projection: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """self(projection(x)), with the activation applied by the GEMM where it can be."""
        out = None
        if self.kernel is not None and isinstance(projection, PackedLinear):
            out = projection.gated(x, self.kernel)
        return out if out is not None else self(projection(x))
