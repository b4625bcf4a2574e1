"""Paged attention kernels: writing k/v into the cache, decode, and varlen prefill.

Both attention kernels read keys and values from the paged cache token by token (the block
table maps a token index to its block), so a key tile does not have to line up with cache
blocks and any block size works. They keep an online softmax in float32 (running max,
running sum, rescaled accumulator), as flash attention does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from litmus_kernels.triton._common import MIN_DOT, block_for, tanh

# Keys per inner-loop step.
BLOCK_N = 32
# Query tokens per prefill program.
BLOCK_M = 32


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache, v_cache, slot_mapping,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
                     head_dim, BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    head = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    dmask = d < head_dim
    # The cache is [blocks, block_size, heads, D] with contiguous blocks, so slot s sits at s * stride_cs.
    dst = tl.load(slot_mapping + token) * stride_cs + head * stride_ch + d
    k = tl.load(k_ptr + token * stride_kt + head * stride_kh + d, mask=dmask)
    v = tl.load(v_ptr + token * stride_vt + head * stride_vh + d, mask=dmask)
    tl.store(k_cache + dst, k, mask=dmask)
    tl.store(v_cache + dst, v, mask=dmask)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    _check_cache(k_cache, v_cache)
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens, num_heads)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(1), k_cache.stride(2),
        head_dim, BLOCK_D=block_for(head_dim),
    )


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    # The kernels address the cache with its strides but assume the last dim is contiguous.
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must share one layout with a contiguous head_dim")
    if k_cache.stride(0) != k_cache.shape[1] * k_cache.stride(1):
        raise ValueError("the KV cache's blocks must be contiguous (slot = block * block_size + offset)")


@triton.jit
def _scores(q, k, scale, soft_cap, slopes, q_pos, k_pos, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """[M, N] float32 scores: scale, then soft cap, then ALiBi (as the reference orders them)."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    if HAS_SOFTCAP:
        s = soft_cap * tanh(s / soft_cap)
    if HAS_ALIBI:
        s += slopes[:, None] * (k_pos[None, :] - q_pos[:, None]).to(tl.float32)
    return s


@triton.jit
def _softmax_step(s, m, denom, acc, v):
    """Folds one key tile (masked scores s [M, N], values v [N, D]) into the running state."""
    m_new = tl.maximum(m, tl.max(s, 1))
    # A row that has seen only masked keys keeps m = -inf; subtracting 0 then avoids inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m - m_safe)
    denom = denom * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, denom, acc


@triton.jit
def _decode_kernel(q_ptr, k_cache, v_cache, block_tables, context_lens, slopes_ptr, out_ptr,
                   scale, soft_cap, window,
                   stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch, stride_bt,
                   block_size, head_dim, group,
                   BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    # One program per (sequence, KV head): its `group` query heads share every loaded key tile.
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * group + g
    qmask = (g < group)[:, None] & (d < head_dim)[None, :]
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=qmask, other=0.0)
    context_len = tl.load(context_lens + seq)
    q_pos = tl.zeros([BLOCK_G], dtype=tl.int64) + context_len - 1
    slopes = tl.load(slopes_ptr + heads, mask=g < group, other=0.0) if HAS_ALIBI else None
    start = tl.maximum(context_len - window, 0) if HAS_WINDOW else 0

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, context_len, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < context_len
        block = tl.load(block_tables + seq * stride_bt + n // block_size, mask=nmask, other=0)
        kv_off = block * stride_cb + (n % block_size) * stride_cs + kv_head * stride_ch
        kvmask = nmask[:, None] & (d < head_dim)[None, :]
        k = tl.load(k_cache + kv_off[:, None] + d[None, :], mask=kvmask, other=0.0)
        v = tl.load(v_cache + kv_off[:, None] + d[None, :], mask=kvmask, other=0.0)
        s = _scores(q, k, scale, soft_cap, slopes, q_pos, n, HAS_SOFTCAP, HAS_ALIBI)
        s = tl.where(nmask[None, :], s, float("-inf"))
        m, denom, acc = _softmax_step(s, m, denom, acc, v)
    out = acc / denom[:, None]
    tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :], out, mask=qmask)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, sliding_window: int | None = None,
                     soft_cap: float | None = None, alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    _check_cache(k_cache, v_cache)
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    _decode_kernel[(num_seqs, num_kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, _slopes_arg(alibi_slopes, q), out,
        scale, soft_cap or 0.0, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        k_cache.shape[1], head_dim, group,
        BLOCK_G=block_for(group, MIN_DOT), BLOCK_N=BLOCK_N, BLOCK_D=block_for(head_dim, MIN_DOT),
        HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=soft_cap is not None, HAS_ALIBI=alibi_slopes is not None,
    )
    return out


@triton.jit
def _prefill_kernel(q_ptr, k_cache, v_cache, block_tables, query_start_loc, num_computed, slopes_ptr, out_ptr,
                    scale, soft_cap, window,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_cs, stride_ch, stride_bt,
                    block_size, head_dim, group,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    # One program per (chunk, tile of BLOCK_M of its query tokens, query head).
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_loc + seq)
    q_len = tl.load(query_start_loc + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:  # the grid is sized for the longest chunk
        return
    computed = tl.load(num_computed + seq)
    kv_head = head // group
    i = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    qmask = (i < q_len)[:, None] & (d < head_dim)[None, :]
    q_rows = (q_start + i)[:, None] * stride_qt + head * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_rows, mask=qmask, other=0.0)
    q_pos = computed + i
    slopes = tl.zeros([BLOCK_M], tl.float32) + tl.load(slopes_ptr + head) if HAS_ALIBI else None
    # Keys this tile can see: up to its last query (causal), from its first query's window.
    end = computed + tl.minimum(q_len, (tile + 1) * BLOCK_M)
    start = tl.maximum(computed + tile * BLOCK_M - window + 1, 0) if HAS_WINDOW else 0

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        block = tl.load(block_tables + seq * stride_bt + n // block_size, mask=nmask, other=0)
        kv_off = block * stride_cb + (n % block_size) * stride_cs + kv_head * stride_ch
        kvmask = nmask[:, None] & (d < head_dim)[None, :]
        k = tl.load(k_cache + kv_off[:, None] + d[None, :], mask=kvmask, other=0.0)
        v = tl.load(v_cache + kv_off[:, None] + d[None, :], mask=kvmask, other=0.0)
        s = _scores(q, k, scale, soft_cap, slopes, q_pos, n, HAS_SOFTCAP, HAS_ALIBI)
        visible = nmask[None, :] & (n[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            visible &= n[None, :] > q_pos[:, None] - window
        s = tl.where(visible, s, float("-inf"))
        m, denom, acc = _softmax_step(s, m, denom, acc, v)
    # Rows past the chunk's end saw no key (denom = 0); they are not stored.
    out = acc / tl.where(denom == 0.0, 1.0, denom)[:, None]
    tl.store(out_ptr + (q_start + i)[:, None] * stride_ot + head * stride_oh + d[None, :], out, mask=qmask)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      query_start_loc: torch.Tensor, num_computed: torch.Tensor, block_tables: torch.Tensor,
                      max_query_len: int, scale: float, sliding_window: int | None = None,
                      soft_cap: float | None = None, alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    _check_cache(k_cache, v_cache)
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = num_computed.shape[0]
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    grid = (num_seqs, triton.cdiv(max_query_len, BLOCK_M), num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, num_computed, _slopes_arg(alibi_slopes, q), out,
        scale, soft_cap or 0.0, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        k_cache.shape[1], head_dim, num_heads // k_cache.shape[2],
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_for(head_dim, MIN_DOT),
        HAS_WINDOW=sliding_window is not None, HAS_SOFTCAP=soft_cap is not None, HAS_ALIBI=alibi_slopes is not None,
    )
    return out


def _slopes_arg(alibi_slopes: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    # The kernel reads the slopes only when HAS_ALIBI; without them it still needs a pointer.
    return q if alibi_slopes is None else alibi_slopes.float().contiguous()
