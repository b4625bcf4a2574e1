"""nn.Linear on the CPU with each weight packed once for the kernel that multiplies by it.

float32 runs kernels/cpu's GEMM (litmus_kernels.ops.cpu_gemm): every row's result is computed the same
way whatever the batch, so a sequence's logits do not depend on its partners. Measured on this
project's 2-core Xeon with SmolLM2-135M's shapes (weights streamed from memory, as in a decode
step, interleaved runs): 10-17 % faster than oneDNN at 64 rows, ~10-15 % faster than MKL at one row
(where MKL had been the fastest), 14-16 % behind oneDNN at 2048 rows (prefill). Without the C++
kernels (LITMUS_KERNELS=torch, no compiler) float32 falls back to oneDNN, except a single row
on Intel CPUs, which MKL multiplies 1.4-1.9x faster.

bfloat16 runs oneDNN with a weight reordered ahead of time into its blocked layout (not
re-packed on every call): on the 2-core AMD EPYC 1.9x faster than torch's matmul at batch 1,
1.15x at 64, even from 512 on; on the Xeon 1.4-3x.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from litmus_kernels import cpu, ops

PACKED_DTYPES = (torch.float32, torch.bfloat16)
# Each weight tensor carries its pack as (its version counter when packed, which kernel it was
# packed for, the packed copy): a pure function of the weight's values, so a weight replaced and
# later put back (a planted fault undone) still has it, a discarded weight's pack goes with it,
# and finding it is one attribute read (decode steps ask ~120 times a step; a weak-keyed memo's
# lookup cost ~2 us of the ~8 around each product).
_PACK = "_litmus_pack"


def packed_weight(weight: torch.Tensor, gemm: bool) -> torch.Tensor:
    """weight [out, in] packed for kernels/cpu's GEMM (gemm) or reordered for oneDNN, packed
    again after any in-place edit."""
    entry = getattr(weight, _PACK, None)
    if entry is None or entry[0] != weight._version or entry[1] != gemm:
        w = weight.detach()
        packed = ops.pack_linear_weight(w) if gemm else torch.ops.mkldnn._reorder_linear_weight(w, None)
        entry = (weight._version, gemm, packed)
        setattr(weight, _PACK, entry)
    return entry[2]


@functools.cache
def mkl_runs_single_rows() -> bool:
    """Whether this CPU is Intel's, where MKL beats oneDNN on float32 single-row products."""
    return "GenuineIntel" in cpu.cpuinfo() and torch.backends.mkl.is_available()


class PackedLinear(nn.Linear):
    """An nn.Linear whose forward multiplies by the packed copy of its current weight
    (packed_weight), so a replaced or edited weight (a planted fault, LLM.apply_model) takes
    effect. Where autograd would need to flow it is a plain nn.Linear.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return super().forward(x)
        # Decode steps call ~120 of these per step for products of a few microseconds each: rows
        # already flat skip the reshape and the view back.
        flat = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, x.shape[-1]).contiguous()
        if ops.cpu_gemm(x):
            out = ops.linear(flat, packed_weight(self.weight, gemm=True), self.bias, self.out_features)
        elif flat.shape[0] == 1 and x.dtype == torch.float32 and mkl_runs_single_rows():
            return F.linear(x, self.weight, self.bias)
        else:
            out = torch.ops.mkldnn._linear_pointwise(flat, packed_weight(self.weight, gemm=False), self.bias,
                                                     "none", [], "")
        return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])


def pack_linears(model: nn.Module) -> int:
    """Turns every CPU nn.Linear of model with a float32 / bfloat16 weight into a PackedLinear,
    in place (same module objects and parameters, so ties and references stay valid), packing
    the weights now. Returns how many; 0 when this torch has no oneDNN."""
    if not torch.backends.mkldnn.is_available():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype in PACKED_DTYPES and module.weight.device.type == "cpu":
            module.__class__ = PackedLinear
            packed_weight(module.weight, gemm=ops.cpu_gemm(module.weight))
            count += 1
    return count
