"""The one dispatch point between the Triton kernels, the C++ CPU kernels and the torch references.

Each op runs its Triton kernel when the tensors are on CUDA and triton imports. On the CPU the
backend is "cpp": decode attention runs kernels/cpu's C++ kernel (built on first use; if it
can't be built, a warning and the reference), every other op its torch reference, which on the
CPU is already one or a few fused torch calls. LITMUS_KERNELS=triton|cpp|torch forces one;
forcing triton with no GPU runs the kernels through Triton's interpreter (slow: for tests),
forcing cpp makes a failed build an error, forcing torch runs only the references.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from types import ModuleType

import torch

from kernels import cpu, reference

_ENV = "LITMUS_KERNELS"


BACKENDS = ("triton", "cpp", "torch")


def backend(x: torch.Tensor) -> str:
    """"triton", "cpp" or "torch": which implementation an op on tensor x runs."""
    forced = os.environ.get(_ENV, "").strip().lower()
    if forced in BACKENDS:
        return forced
    if forced:
        raise ValueError(f"{_ENV}={forced!r}: expected one of {', '.join(BACKENDS)}")
    if x.is_cuda and triton_available():
        return "triton"
    return "cpp" if x.device.type == "cpu" else "torch"


def _forced() -> bool:
    return bool(os.environ.get(_ENV, "").strip())


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def triton_kernels() -> ModuleType:
    """kernels.triton, imported on first use.

    With no GPU, Triton can only run its interpreter, and @triton.jit picks interpreted or
    compiled when each kernel is defined: for triton's own library (tl.sum, tl.max...) that is
    when triton is first imported, which torch may already have done. So TRITON_INTERPRET=1 is
    set here if triton is not imported yet (and left set), and otherwise must have been set
    before the process imported triton.
    """
    if not triton_available():
        raise RuntimeError(f"{_ENV}=triton, but triton is not installed "
                           "(pip install triton==3.9.0, the release torch 2.13.0 pairs with)")
    if not torch.cuda.is_available():
        if "triton" not in sys.modules:
            os.environ["TRITON_INTERPRET"] = "1"
        if not triton_interpreted():
            raise RuntimeError(
                "the Triton kernels need a GPU or Triton's interpreter, and this process imported triton "
                "before TRITON_INTERPRET=1 was set: set it in the environment before starting Python"
            )
    return importlib.import_module("kernels.triton")


def triton_interpreted() -> bool:
    """Whether the imported triton runs through its interpreter (decided at its import)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


def _impl(x: torch.Tensor) -> ModuleType:
    return triton_kernels() if backend(x) == "triton" else reference


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    _impl(k).write_kv_cache(k, v, k_cache, v_cache, slot_mapping)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, *, sliding_window: int | None = None,
                     soft_cap: float | None = None, alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    if backend(q) == "cpp" and cpu.available(required=_forced()):
        return torch.ops.litmus.decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                                 sliding_window or 0, soft_cap or 0.0, alibi_slopes)
    return _impl(q).decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale,
                                     sliding_window, soft_cap, alibi_slopes)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      query_start_loc: torch.Tensor, num_computed: torch.Tensor, block_tables: torch.Tensor,
                      max_query_len: int, scale: float, *, sliding_window: int | None = None,
                      soft_cap: float | None = None, alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """See reference.prefill_attention; max_query_len (longest chunk) sizes the kernel's grid
    without reading the lengths back from the GPU."""
    if backend(q) == "triton":
        return triton_kernels().prefill_attention(q, k_cache, v_cache, query_start_loc, num_computed, block_tables,
                                                  max_query_len, scale, sliding_window, soft_cap, alibi_slopes)
    return reference.prefill_attention(q, k_cache, v_cache, query_start_loc, num_computed, block_tables,
                                       scale, sliding_window, soft_cap, alibi_slopes)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    return _impl(x).rms_norm(x, weight, eps, residual)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor, head_dim: int, is_neox_style: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(q).rotary_embedding(positions, q, k, cos_cache, sin_cache, head_dim, is_neox_style)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _impl(x).silu_and_mul(x)


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return _impl(x).gelu_and_mul(x, approximate)


def top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    return _impl(logits).top_k_top_p(logits, top_k, top_p)
