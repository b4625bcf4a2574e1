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

A gated MLP's [gate | up] projection marked `gated_projection` (GatedActivation with a kernel for
its activation marks it) is packed for the GEMM that stores act(gate) * up itself
(PackedLinear.gated).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from litmus_kernels import cpu, ops

PACKED_DTYPES = (torch.float32, torch.bfloat16)
# Each weight tensor carries its pack as (its version counter when packed, the layout it was
# packed in: "gemm", "gated" or "onednn", the packed copy): a pure function of the weight's
# values, so a weight replaced and later put back (a planted fault undone) still has it, a
# discarded weight's pack goes with it, and finding it is one attribute read (decode steps ask
# ~120 times a step; a weak-keyed memo's lookup cost ~2 us of the ~8 around each product).
_PACK = "_litmus_pack"

_PACKERS = {
    "gemm": ops.pack_linear_weight,
    "gated": ops.pack_gated_linear_weight,
    "onednn": lambda w: torch.ops.mkldnn._reorder_linear_weight(w, None),
}


def packed_weight(weight: torch.Tensor, layout: str) -> torch.Tensor:
    """weight [out, in] packed in `layout`: for kernels/cpu's GEMM ("gemm"), its gated form
    ("gated") or oneDNN ("onednn"); packed again after any in-place edit."""
    entry = getattr(weight, _PACK, None)
    if torch.compiler.is_compiling() and entry is not None and entry[1] == layout:
        # A traced graph reads the pack a weight holds when each step runs: ModelRunner brings
        # edited weights' packs up to date (refresh_packs) before every compiled step.
        return entry[2]
    if entry is None or entry[0] != weight._version or entry[1] != layout:
        entry = (weight._version, layout, _PACKERS[layout](weight.detach()))
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
        if self._autograd(x):
            return super().forward(x)
        flat = _rows(x)
        if ops.cpu_gemm(x):
            out = ops.linear(flat, packed_weight(self.weight, "gemm"), self.bias, self.out_features)
        elif flat.shape[0] == 1 and x.dtype == torch.float32 and mkl_runs_single_rows():
            return F.linear(x, self.weight, self.bias)
        else:
            out = torch.ops.mkldnn._linear_pointwise(flat, packed_weight(self.weight, "onednn"), self.bias,
                                                     "none", [], "")
        return _shaped(out, x)

    def gated(self, x: torch.Tensor, act: str) -> torch.Tensor | None:
        """act(gate) * up of this [gate | up] projection of x ("silu", "gelu" or "gelu_tanh"), the
        GEMM applying it as it stores; None where that GEMM does not run (the caller then applies
        act to forward's output)."""
        if not ops.cpu_gemm(x) or self._autograd(x):
            return None
        out = ops.gated_linear(_rows(x), packed_weight(self.weight, "gated"), self.bias, self.out_features // 2, act)
        return _shaped(out, x)

    def _autograd(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)


# Decode steps call ~120 linear layers a step, products of a few microseconds each: rows already
# flat skip the reshape and the view back.
def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, x.shape[-1]).contiguous()


def _shaped(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])


def _layout(module: nn.Linear) -> str:
    if not ops.cpu_gemm(module.weight):
        return "onednn"
    return "gated" if getattr(module, "gated_projection", False) else "gemm"


def refresh_packs(linears: list[PackedLinear]) -> None:
    """Packs again each of these layers' weights replaced or edited in place since it was packed,
    in the layout it was last packed in."""
    for module in linears:
        entry = getattr(module.weight, _PACK, None)
        packed_weight(module.weight, _layout(module) if entry is None else entry[1])


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
            packed_weight(module.weight, _layout(module))
            count += 1
    return count
