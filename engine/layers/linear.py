"""nn.Linear on CPU through oneDNN, with each weight reordered once into oneDNN's blocked layout.

torch's CPU matmul for float32 is MKL, which on AMD CPUs runs a slower code path; oneDNN uses
AVX-512 there, and a weight packed ahead of time is not re-packed on every call. Measured on
this project's 2-core AMD EPYC with SmolLM2-135M's shapes (weights streamed from memory, one
thread): float32 2-4x faster at every batch size from 1 to 2048; bfloat16 1.9x at batch 1,
1.15x at 64, even from 512 on.

On Intel CPUs MKL takes its fast path, and one case goes the other way: a float32 product of a
single row (batch-1 decode), which MKL runs as a matrix-vector product. Measured on a 2-core Xeon
with SmolLM2-135M's shapes, 2 threads, weights streamed from memory: MKL 1.4-1.9x faster for the
q/k/v, o and down projections at one row, level on the MLP's up projection; oneDNN ahead from
4 rows on (1.1-1.9x) and for bfloat16 at any batch (1.4-3x). So on Intel a float32 single row
goes to torch's matmul.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

PACKED_DTYPES = (torch.float32, torch.bfloat16)
# weight -> (its version counter when packed, the packed copy). A memo of a pure function of
# the weight's values, kept beside the modules: a weight replaced and later put back (a planted
# fault undone) finds its pack again, and a discarded weight's pack goes with it.
_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] reordered for oneDNN, packed again after any in-place edit."""
    entry = _PACKED.get(weight)
    if entry is None or entry[0] != weight._version:
        entry = (weight._version, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
        _PACKED[weight] = entry
    return entry[1]


@functools.cache
def mkl_runs_single_rows() -> bool:
    """Whether this CPU is Intel's, where MKL beats oneDNN on float32 single-row products."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "GenuineIntel" in cpuinfo and torch.backends.mkl.is_available()


class OneDnnLinear(nn.Linear):
    """An nn.Linear whose forward multiplies by the oneDNN-packed copy of its current weight
    (packed_weight), so a replaced or edited weight (a planted fault, LLM.apply_model) takes
    effect. Where autograd would need to flow it is a plain nn.Linear.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return super().forward(x)
        flat = x.reshape(-1, x.shape[-1]).contiguous()
        if flat.shape[0] == 1 and x.dtype == torch.float32 and mkl_runs_single_rows():
            return F.linear(x, self.weight, self.bias)
        out = torch.ops.mkldnn._linear_pointwise(flat, packed_weight(self.weight), self.bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])


def pack_linears(model: nn.Module) -> int:
    """Turns every CPU nn.Linear of model with a float32 / bfloat16 weight into a OneDnnLinear,
    in place (same module objects and parameters, so ties and references stay valid), packing
    the weights now. Returns how many; 0 when this torch has no oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype in PACKED_DTYPES and module.weight.device.type == "cpu":
            module.__class__ = OneDnnLinear
            packed_weight(module.weight)
            count += 1
    return count
