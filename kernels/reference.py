"""Torch reference of every kernel op: what the engine runs off-GPU, and what each Triton
kernel is tested against.

Layouts shared with the kernels:
- KV cache: [num_blocks, block_size, num_kv_heads, head_dim]; token slot s lives at
  block s // block_size, offset s % block_size. Any strides with blocks contiguous and
  head_dim innermost; the engine stores it head-major (see gather_kv).
- Attention q/k/v are token-major: [tokens, heads, head_dim]; query head h reads KV head
  h // (num_heads // num_kv_heads) (GQA).
- Masking follows HF: causal, and a sliding window W lets a token see itself and the W - 1
  tokens before it. ALiBi adds slope[h] * (key_pos - query_pos) to the (soft-capped) scores.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------- KV cache


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Stores each token's k/v [T, Hkv, D] at its cache slot (slot_mapping [T] int64)."""
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    k_cache.view(num_slots, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(num_slots, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
              length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Head-major k/v [Hkv, ..., length, D] of the blocks block_tables [..., num_blocks] lists,
    in order; length (default: all of them) cuts the tokens past it.

    Fastest when the cache is stored head-major ([Hkv, blocks, block_size, D] permuted to the
    logical layout, as the model runner allocates it): each head's blocks are then copied whole,
    and the result needs no transpose before a matmul.
    """
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    flat = block_tables.reshape(-1)
    shape = (num_kv_heads, *block_tables.shape[:-1], block_tables.shape[-1] * block_size, head_dim)
    # index_select copies block by block; indexing (cache[:, flat]) is ~3x slower on CPU.
    k = k_cache.permute(2, 0, 1, 3).index_select(1, flat).view(shape)
    v = v_cache.permute(2, 0, 1, 3).index_select(1, flat).view(shape)
    return (k, v) if length is None else (k[..., :length, :], v[..., :length, :])


# ---------------------------------------------------------------- attention


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Boolean [..., q, k] keep-mask: causal, and within the window when there is one."""
    mask = k_pos.unsqueeze(-2) <= q_pos.unsqueeze(-1)
    if sliding_window is not None:
        mask &= k_pos.unsqueeze(-2) > q_pos.unsqueeze(-1) - sliding_window
    return mask


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """[..., H, q, k] float32: slope[h] * (key position - query position)."""
    distance = (k_pos.unsqueeze(-2) - q_pos.unsqueeze(-1)).float().unsqueeze(-3)
    return slopes.float()[:, None, None] * distance


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None, scale: float,
           soft_cap: float | None, bias: torch.Tensor | None = None, explicit: bool = False) -> torch.Tensor:
    """Head-major attention: q [..., Hq, n, D], k/v [..., Hkv, L, D] (Hq a multiple of Hkv) -> [..., Hq, n, D].

    keep is a boolean mask broadcastable to [..., Hq, n, L]; None means plain causal attention
    with n == L. bias (ALiBi, broadcastable likewise) is added after the soft cap; it needs keep.
    Without a soft cap this is SDPA unless explicit. Explicit scores and softmax are float32
    (as SDPA's are); the probabilities are rounded to v's dtype for the product with v.
    """
    gqa = q.shape[-3] != k.shape[-3]
    if soft_cap is None and not explicit:
        attn_mask = keep if bias is None else bias.to(q.dtype).masked_fill(~keep, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=keep is None, scale=scale,
                                              enable_gqa=gqa)
    if keep is None:
        positions = torch.arange(q.shape[-2], device=q.device)
        keep = attention_mask(positions, positions, None)
    if gqa:
        g = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(g, dim=-3), v.repeat_interleave(g, dim=-3)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if soft_cap is not None:
        scores = torch.tanh(scores / soft_cap) * soft_cap
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      query_start_loc: torch.Tensor, num_computed: torch.Tensor, block_tables: torch.Tensor,
                      scale: float, sliding_window: int | None = None, soft_cap: float | None = None,
                      alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of packed prefill chunks over the cache, which already holds their own k/v.

    q [T, Hq, D] packs the chunks: chunk i is rows query_start_loc[i]:query_start_loc[i + 1]
    at positions num_computed[i] onwards (the tokens before it are its cached prefix);
    block_tables [S, max_blocks] (rows padded). Returns [T, Hq, D].
    """
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    block_size = k_cache.shape[1]
    for i, computed in enumerate(num_computed.tolist()):
        s, e = starts[i], starts[i + 1]
        context_len = computed + e - s
        k, v = gather_kv(k_cache, v_cache, block_tables[i, :-(-context_len // block_size)], context_len)  # [Hkv, L, D]
        keep = bias = None
        if computed or sliding_window is not None or alibi_slopes is not None:
            q_pos = torch.arange(computed, context_len, device=q.device)
            k_pos = torch.arange(context_len, device=q.device)
            keep = attention_mask(q_pos, k_pos, sliding_window)
            bias = None if alibi_slopes is None else alibi_bias(alibi_slopes, q_pos, k_pos)
        out[s:e] = attend(q[s:e].transpose(0, 1), k, v, keep, scale, soft_cap, bias).transpose(0, 1)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, sliding_window: int | None = None,
                     soft_cap: float | None = None, alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence (its last position), the whole batch in one gather and one
    attention call over its padded block tables.

    q [B, Hq, D]; block_tables [B, max_blocks] (rows padded); context_lens [B] counts the
    query token. Returns [B, Hq, D].
    """
    k, v = gather_kv(k_cache, v_cache, block_tables)  # [Hkv, B, L, D], L = max_blocks * block_size
    num_kv_heads, num_seqs, length, head_dim = k.shape
    group = q.shape[1] // num_kv_heads
    q_pos = (context_lens - 1).unsqueeze(1)  # [B, 1]
    k_pos = torch.arange(length, device=q.device)
    keep = attention_mask(q_pos, k_pos, sliding_window)  # [B, 1, L]
    bias = None
    if alibi_slopes is not None:
        bias = alibi_bias(alibi_slopes, q_pos, k_pos).view(num_seqs, num_kv_heads, group, length)
    # The query heads sharing a KV head all sit at one position, so they attend as that head's
    # `group` query rows, batched [Hkv, B]: one bmm over the gathered K/V as they lie. SDPA
    # here was 15-30% slower, float32 and bfloat16 alike (batch 64, 2 cores).
    rows = q.view(num_seqs, num_kv_heads, group, head_dim).transpose(0, 1)
    out = attend(rows, k, v, keep, scale, soft_cap, None if bias is None else bias.transpose(0, 1), explicit=True)
    return out.transpose(0, 1).reshape(q.shape)


# ---------------------------------------------------------------- norm, rope, activations


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm over the last dim, computed in float32 (as HF does). With a residual, normalises
    x + residual and returns (normalised, x + residual)."""
    if residual is not None:
        x = x + residual
        residual = x
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(dtype)
    return out if residual is None else (out, residual)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor, head_dim: int, is_neox_style: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates the first rotary_dim features of each head of q/k [T, heads * head_dim];
    cos/sin caches are [max_position, rotary_dim / 2]. Returns new tensors."""
    cos = cos_cache[positions].unsqueeze(1).to(q.dtype)  # [T, 1, rotary_dim / 2]
    sin = sin_cache[positions].unsqueeze(1).to(q.dtype)
    if is_neox_style:
        # Built once for q and k: the halves (x1, x2) become x * [cos, cos] + [x2, x1] * [-sin, sin],
        # the same products and sums as x1 * cos - x2 * sin, x2 * cos + x1 * sin in fewer ops.
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
    return _rotate(q, cos, sin, head_dim, is_neox_style), _rotate(k, cos, sin, head_dim, is_neox_style)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int, is_neox_style: bool) -> torch.Tensor:
    # neox style rotates the two halves against each other, gpt-j style interleaved pairs.
    shape = x.shape
    x = x.view(shape[0], -1, head_dim)
    if is_neox_style:
        rotary_dim = cos.shape[-1]
        rot = x[..., :rotary_dim]
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = rot * cos + torch.cat((x2, x1), dim=-1) * sin
    else:
        rotary_dim = cos.shape[-1] * 2
        x1, x2 = x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    if rotary_dim == head_dim:
        return rotated.view(shape)
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1).view(shape)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up over x = [gate | up] on the last dim."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_and_mul(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """gelu(gate) * up over x = [gate | up]; approximate is "none" (erf) or "tanh"."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate=approximate) * up


# ---------------------------------------------------------------- sampling


def top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Masks (to -inf) what top-k, then top-p, exclude; rows with top_k 0 / top_p 1 are untouched.

    Top-k keeps every token tied with the k-th largest logit; top-p keeps the smallest set of
    most likely tokens whose probability reaches p (always at least the top one).
    """
    vocab = logits.shape[1]
    if bool((top_k > 0).any()):
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
        kth = logits.topk(int(k.max()), dim=1).values.gather(1, (k - 1).view(-1, 1))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if bool((top_p < 1).any()):
        sorted_logits, order = logits.sort(dim=1, descending=True)
        probs = sorted_logits.softmax(dim=1)
        mass_before = probs.cumsum(dim=1) - probs
        # Rows with top_p = 1 are left alone: their float32 cumsum can reach 1 before the tail.
        drop_sorted = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1).unsqueeze(1)
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits
