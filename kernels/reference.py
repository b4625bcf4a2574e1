"""Torch reference of every kernel op: what the engine runs off-GPU, and what each Triton
kernel is tested against.

Layouts shared with the kernels:
- KV cache: [num_blocks, block_size, num_kv_heads, head_dim]; token slot s lives at
  block s // block_size, offset s % block_size.
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
    k_cache.view(num_slots, *k_cache.shape[2:])[slot_mapping] = k
    v_cache.view(num_slots, *v_cache.shape[2:])[slot_mapping] = v


def gather_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
              context_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first context_len tokens' k/v [context_len, Hkv, D] of one sequence."""
    block_size = k_cache.shape[1]
    blocks = block_table[:-(-context_len // block_size)]
    shape = (-1, *k_cache.shape[2:])
    return k_cache[blocks].reshape(shape)[:context_len], v_cache[blocks].reshape(shape)[:context_len]


# ---------------------------------------------------------------- attention


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Boolean [q, k] keep-mask: causal, and within the window when there is one."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
    return mask


def alibi_bias(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """[H, q, k] float32: slope[h] * (key position - query position)."""
    distance = (k_pos[None, :] - q_pos[:, None]).float()
    return slopes.float()[:, None, None] * distance[None]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
           soft_cap: float | None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """q [n, Hq, D], k/v [L, Hkv, D] (Hq a multiple of Hkv) -> [n, Hq, D].

    mask [n, L] is a boolean keep-mask; None means plain causal attention with n == L.
    bias [Hq, n, L] (ALiBi) is added after the soft cap; it needs a mask.
    """
    if soft_cap is None:
        attn_mask = mask if bias is None else bias.to(q.dtype).masked_fill(~mask[None], float("-inf"))
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=attn_mask, is_causal=mask is None, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
        )
        return out.transpose(0, 1)
    if mask is None:
        mask = attention_mask(torch.arange(q.shape[0]), torch.arange(k.shape[0]), None)
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k).float() * scale
    scores = torch.tanh(scores / soft_cap) * soft_cap
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~mask[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.einsum("hqk,khd->qhd", probs, v)


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
    for i, computed in enumerate(num_computed.tolist()):
        s, e = starts[i], starts[i + 1]
        context_len = computed + e - s
        k, v = gather_kv(k_cache, v_cache, block_tables[i], context_len)
        if computed == 0 and sliding_window is None and alibi_slopes is None:
            out[s:e] = attend(q[s:e], k, v, None, scale, soft_cap)
            continue
        q_pos = torch.arange(computed, context_len)
        k_pos = torch.arange(context_len)
        mask = attention_mask(q_pos, k_pos, sliding_window)
        bias = None if alibi_slopes is None else alibi_bias(alibi_slopes, q_pos, k_pos)
        out[s:e] = attend(q[s:e], k, v, mask, scale, soft_cap, bias)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, sliding_window: int | None = None,
                     soft_cap: float | None = None, alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per sequence (its last position), attended with a single gather.

    q [B, Hq, D]; block_tables [B, max_blocks] (rows padded); context_lens [B] counts the
    query token. Returns [B, Hq, D].
    """
    num_seqs, max_blocks = block_tables.shape
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    length = max_blocks * block_size
    k = k_cache[block_tables].view(num_seqs, length, num_kv_heads, head_dim)
    v = v_cache[block_tables].view(num_seqs, length, num_kv_heads, head_dim)
    q_pos = (context_lens - 1).unsqueeze(1)  # [B, 1]
    k_pos = torch.arange(length, device=q.device).unsqueeze(0)  # [1, L]
    valid = k_pos <= q_pos
    if sliding_window is not None:
        valid &= k_pos > q_pos - sliding_window
    g = q.shape[1] // num_kv_heads
    qg = q.view(num_seqs, num_kv_heads, g, head_dim)
    scores = torch.einsum("bhgd,blhd->bhgl", qg, k).float() * scale
    if soft_cap is not None:
        scores = torch.tanh(scores / soft_cap) * soft_cap
    if alibi_slopes is not None:
        distance = (k_pos - q_pos).float()  # [B, L]
        scores = scores + alibi_slopes.float().view(num_kv_heads, g)[None, :, :, None] * distance[:, None, None, :]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    out = torch.einsum("bhgl,blhd->bhgd", probs, v)
    return out.reshape(num_seqs, q.shape[1], head_dim)


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
    cos = cos_cache[positions].unsqueeze(1)  # [T, 1, rotary_dim / 2]
    sin = sin_cache[positions].unsqueeze(1)
    return _rotate(q, cos, sin, head_dim, is_neox_style), _rotate(k, cos, sin, head_dim, is_neox_style)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int, is_neox_style: bool) -> torch.Tensor:
    # neox style rotates the two halves against each other, gpt-j style interleaved pairs.
    shape = x.shape
    rotary_dim = cos.shape[-1] * 2
    x = x.view(shape[0], -1, head_dim)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if is_neox_style:
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, rest), dim=-1).view(shape)


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
