"""Row-wise kernels: RMSNorm (with fused residual add), rotary embedding, gated activations.

They compute in float32 and round once on store; the references round after each torch op,
so in half precision the two can differ by an ulp.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from litmus_kernels.triton._common import block_for, tanh

# Features per gated-activation program.
BLOCK_ACT = 1024


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    # One program per row; rows are contiguous (the wrapper makes them so).
    row = tl.program_id(0).to(tl.int64) * n_cols
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # Added in the input dtype, as the reference's x + residual is.
        x = x + tl.load(res_ptr + row + cols, mask=mask, other=0.0)
        tl.store(res_out_ptr + row + cols, x, mask=mask)
    h = x.to(tl.float32)
    h = h * tl.math.rsqrt(tl.sum(h * h, 0) / n_cols + eps)
    # The reference rounds the normalised row to the input dtype before the weight multiply.
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row + cols, w * h.to(x.dtype).to(tl.float32), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    x = x.contiguous()
    n_cols = x.shape[-1]
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    res_out = torch.empty_like(x) if residual is not None else None
    rows = x.numel() // n_cols
    if rows:
        res_in = residual.contiguous() if residual is not None else x
        _rms_norm_kernel[(rows,)](
            x, res_in, weight, out, res_out if res_out is not None else x, n_cols, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block_for(n_cols),
        )
    return out if residual is None else (out, res_out)


@triton.jit
def _rotary_kernel(x_ptr, out_ptr, positions, cos_cache, sin_cache, stride_xt, stride_ot, stride_cache,
                   head_dim, half,
                   IS_NEOX: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (token, head).
    token = tl.program_id(0)
    head = tl.program_id(1)
    src = x_ptr + token * stride_xt + head * head_dim
    dst = out_ptr + token * stride_ot + head * head_dim
    pos = tl.load(positions + token)
    j = tl.arange(0, BLOCK_HALF)
    jmask = j < half
    cos = tl.load(cos_cache + pos * stride_cache + j, mask=jmask, other=0.0).to(tl.float32)
    sin = tl.load(sin_cache + pos * stride_cache + j, mask=jmask, other=0.0).to(tl.float32)
    # Pair j: neox pairs feature j with j + half, gpt-j pairs 2j with 2j + 1.
    i1 = j if IS_NEOX else 2 * j
    i2 = j + half if IS_NEOX else 2 * j + 1
    x1 = tl.load(src + i1, mask=jmask, other=0.0).to(tl.float32)
    x2 = tl.load(src + i2, mask=jmask, other=0.0).to(tl.float32)
    tl.store(dst + i1, x1 * cos - x2 * sin, mask=jmask)
    tl.store(dst + i2, x2 * cos + x1 * sin, mask=jmask)
    # Features past rotary_dim pass through (disjoint from the stores above).
    d = tl.arange(0, BLOCK_D)
    rest = (d >= 2 * half) & (d < head_dim)
    tl.store(dst + d, tl.load(src + d, mask=rest), mask=rest)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor, head_dim: int, is_neox_style: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if cos_cache.stride() != sin_cache.stride() or cos_cache.stride(-1) != 1:
        raise ValueError("cos and sin caches must share one layout with contiguous rows")
    return (_rotate(positions, q, cos_cache, sin_cache, head_dim, is_neox_style),
            _rotate(positions, k, cos_cache, sin_cache, head_dim, is_neox_style))


def _rotate(positions: torch.Tensor, x: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
            head_dim: int, is_neox_style: bool) -> torch.Tensor:
    # x may be a column slice of a fused qkv output: rows strided, features contiguous.
    flat = x.view(x.shape[0], -1)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    out = torch.empty(flat.shape, dtype=x.dtype, device=x.device)
    num_tokens, num_heads = flat.shape[0], flat.shape[1] // head_dim
    half = cos_cache.shape[1]
    if num_tokens:
        _rotary_kernel[(num_tokens, num_heads)](
            flat, out, positions, cos_cache, sin_cache, flat.stride(0), out.stride(0), cos_cache.stride(0),
            head_dim, half,
            IS_NEOX=is_neox_style, BLOCK_HALF=block_for(half), BLOCK_D=block_for(head_dim),
        )
    return out.view(x.shape)


@triton.jit
def _gated_kernel(x_ptr, out_ptr, stride_xt, d, ACT: tl.constexpr, BLOCK: tl.constexpr):
    # One program per (row, BLOCK features): out = act(x[:d]) * x[d:2d].
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_xt + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_xt + d + cols, mask=mask, other=0.0).to(tl.float32)
    if ACT == "silu":
        act = gate / (1.0 + tl.exp(-gate))
    elif ACT == "gelu":
        act = 0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))
    else:  # gelu with the tanh approximation; the constant is sqrt(2 / pi)
        act = 0.5 * gate * (1.0 + tanh(0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)))
    tl.store(out_ptr + row * d + cols, act * up, mask=mask)


def _gated(x: torch.Tensor, act: str) -> torch.Tensor:
    d = x.shape[-1] // 2
    flat = x.reshape(-1, 2 * d)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    rows = flat.shape[0]
    if rows and d:
        block = min(block_for(d), BLOCK_ACT)
        _gated_kernel[(rows, triton.cdiv(d, block))](flat, out, flat.stride(0), d, ACT=act, BLOCK=block)
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _gated(x, "silu")


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate={approximate!r}: expected 'none' or 'tanh'")
    return _gated(x, "gelu" if approximate == "none" else "gelu_tanh")
