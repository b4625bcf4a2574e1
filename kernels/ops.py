"""The one dispatch point between the Triton kernels, the C++ CPU kernels and the torch references.

Each op runs its Triton kernel when the tensors are on CUDA and triton imports. On the CPU the
backend is "cpp": kernels/cpu's C++ kernels (built on first use; if they can't be built, a
warning and the references) for decode and prefill attention, the KV cache write, RMSNorm, rotary
embedding, the gated activations and float32 linear layers (cpu_gemm); top-k/top-p runs its torch
reference, there a few large torch calls. LITMUS_KERNELS=triton|cpp|torch
forces one: forcing triton with no GPU runs the kernels through Triton's interpreter (slow: for
tests), forcing cpp makes a failed build an error, forcing torch runs only the references (and
torch's own matmul for the linear layers).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from types import ModuleType

import torch

from litmus_kernels import cpu, reference

_ENV = "LITMUS_KERNELS"


BACKENDS = ("triton", "cpp", "torch")


def backend(x: torch.Tensor) -> str:
    """"triton", "cpp" or "torch": which implementation an op on tensor x runs."""
    return _selected(x.device.type)[0]


def _selected(device_type: str) -> tuple[str, bool]:
    """The backend for tensors on device_type, and whether LITMUS_KERNELS forced it. Read from
    the environment on every call (tests set it per test); parsed once per value, since every op
    of every layer asks."""
    forced = _forced(os.environ.get(_ENV, ""))
    if forced:
        return forced, True
    if device_type == "cuda" and triton_available():
        return "triton", False
    return ("cpp" if device_type == "cpu" else "torch"), False


@functools.lru_cache(maxsize=8)
def _forced(value: str) -> str:
    name = value.strip().lower()
    if name and name not in BACKENDS:
        raise ValueError(f"{_ENV}={name!r}: expected one of {', '.join(BACKENDS)}")
    return name


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def triton_kernels() -> ModuleType:
    """litmus_kernels.triton, imported on first use.

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
    return importlib.import_module("litmus_kernels.triton")


def triton_interpreted() -> bool:
    """Whether the imported triton runs through its interpreter (decided at its import)."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


def _cpp(x: torch.Tensor) -> bool:
    """Whether an op on x runs its C++ CPU kernel."""
    return _cpp_on(x.device.type)


# torch.compile takes the answer as a constant of the graph it traces (its build and environment
# checks are not traceable): a compiled model keeps the backend it was compiled with.
@torch.compiler.assume_constant_result
def _cpp_on(device_type: str) -> bool:
    name, forced = _selected(device_type)
    return name == "cpp" and cpu.available(required=forced)


def _impl(x: torch.Tensor) -> ModuleType:
    return triton_kernels() if backend(x) == "triton" else reference


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    if _cpp(k):
        torch.ops.litmus.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    else:
        _impl(k).write_kv_cache(k, v, k_cache, v_cache, slot_mapping)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, *, sliding_window: int | None = None,
                     soft_cap: float | None = None, alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    if _cpp(q):
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
    if _cpp(q):
        return torch.ops.litmus.prefill_attention(q, k_cache, v_cache, query_start_loc, num_computed, block_tables,
                                                  scale, sliding_window or 0, soft_cap or 0.0, alibi_slopes)
    if backend(q) == "triton":
        return triton_kernels().prefill_attention(q, k_cache, v_cache, query_start_loc, num_computed, block_tables,
                                                  max_query_len, scale, sliding_window, soft_cap, alibi_slopes)
    return reference.prefill_attention(q, k_cache, v_cache, query_start_loc, num_computed, block_tables,
                                       scale, sliding_window, soft_cap, alibi_slopes)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    if weight.dtype == x.dtype and _cpp(x):
        out, summed = torch.ops.litmus.rms_norm(x, weight, eps, residual)
        return out if residual is None else (out, summed)
    return _impl(x).rms_norm(x, weight, eps, residual)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor, head_dim: int, is_neox_style: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if cos_cache.dtype == torch.float32 and _cpp(q):
        q_out, k_out = torch.ops.litmus.rotary_embedding(positions, q.reshape(len(q), -1), k.reshape(len(k), -1),
                                                         cos_cache, sin_cache, head_dim, is_neox_style)
        return q_out.view(q.shape), k_out.view(k.shape)
    return _impl(q).rotary_embedding(positions, q, k, cos_cache, sin_cache, head_dim, is_neox_style)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if _cpp(x):
        return torch.ops.litmus.silu_and_mul(x)
    return _impl(x).silu_and_mul(x)


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    if _cpp(x):
        return torch.ops.litmus.gelu_and_mul(x, approximate)
    return _impl(x).gelu_and_mul(x, approximate)


def cpu_gemm(x: torch.Tensor) -> bool:
    """Whether a float32 linear layer on x runs kernels/cpu's GEMM (its weight packed by
    pack_linear_weight); otherwise torch's own matmul multiplies it (engine/layers/linear.py)."""
    return x.dtype == torch.float32 and _cpp(x)


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """float32 weight [out, in] -> the panels ops.linear multiplies by."""
    return torch.ops.litmus.pack_linear_weight(weight)


def linear(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    """x [rows, in] @ W^T + bias, W packed by pack_linear_weight."""
    return torch.ops.litmus.linear(x, packed_weight, bias, out_features)


def pack_gated_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """float32 weight [2 * d, in] = [gate | up] -> the panels gated_linear multiplies by."""
    return torch.ops.litmus.pack_gated_linear_weight(weight)


def gated_linear(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None, d: int,
                 act: str) -> torch.Tensor:
    """act(gate) * up of [gate | up] = x [rows, in] @ W^T + bias, W packed by pack_gated_linear_weight:
    the same bits as linear followed by silu_and_mul / gelu_and_mul. act: silu, gelu, gelu_tanh."""
    return torch.ops.litmus.gated_linear(x, packed_weight, bias, d, act)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, V] -> [N] int64: torch.argmax(dim=-1)'s answer (first maximum; NaN is the maximum)."""
    if logits.dtype == torch.float32 and logits.dim() == 2 and logits.shape[1] and _cpp(logits):
        return torch.ops.litmus.argmax_rows(logits)
    return logits.argmax(dim=-1)


def top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    return _impl(logits).top_k_top_p(logits, top_k, top_p)
