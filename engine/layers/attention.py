"""Attention over the paged KV cache (the torch path; kernels/ holds the Triton fast path).

One flattened batch mixes decodes (one query token each, attended together with a single
gather over their block tables) and prefill chunks (attended one sequence at a time, each
against its cached prefix plus the chunk itself).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PrefillChunk:
    query_start: int
    query_end: int
    num_computed: int  # tokens already in the cache before this chunk
    block_table: torch.Tensor  # [num_blocks] int64

    @property
    def context_len(self) -> int:
        return self.num_computed + self.query_end - self.query_start


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: cache slot each new token's K/V goes to
    prefills: list[PrefillChunk]
    decode_token_idx: torch.Tensor  # [num_decodes] positions of decode tokens in the batch
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int64 (padded with 0)
    decode_context_lens: torch.Tensor  # [num_decodes] int64
    block_size: int


class Attention(nn.Module):
    """Holds one layer's KV cache, bound by the model runner once the cache is allocated."""

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scale: float,
        num_kv_heads: int,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        write_kv_cache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        if meta.decode_token_idx.numel():
            out[meta.decode_token_idx] = self._decode(q[meta.decode_token_idx], meta)
        for chunk in meta.prefills:
            s, e = chunk.query_start, chunk.query_end
            out[s:e] = self._prefill(q[s:e], k[s:e], v[s:e], chunk)
        return out.view(-1, self.num_heads * self.head_dim)

    def _prefill(self, q, k, v, chunk: PrefillChunk) -> torch.Tensor:
        if chunk.num_computed == 0 and self.sliding_window is None:
            return attend(q, k, v, None, self.scale, self.logits_soft_cap)
        if chunk.num_computed:
            k, v = gather_kv(self.k_cache, self.v_cache, chunk.block_table, chunk.context_len)
        q_pos = torch.arange(chunk.num_computed, chunk.context_len)
        k_pos = torch.arange(chunk.context_len)
        mask = attention_mask(q_pos, k_pos, self.sliding_window)
        return attend(q, k, v, mask, self.scale, self.logits_soft_cap)

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        num_seqs, max_blocks = meta.decode_block_tables.shape
        bs = meta.block_size
        k = self.k_cache[meta.decode_block_tables].view(num_seqs, max_blocks * bs, self.num_kv_heads, self.head_dim)
        v = self.v_cache[meta.decode_block_tables].view(num_seqs, max_blocks * bs, self.num_kv_heads, self.head_dim)
        q_pos = (meta.decode_context_lens - 1).unsqueeze(1)  # [B, 1]
        k_pos = torch.arange(max_blocks * bs).unsqueeze(0)  # [1, L]
        valid = k_pos <= q_pos
        if self.sliding_window is not None:
            valid &= k_pos > q_pos - self.sliding_window
        g = self.num_heads // self.num_kv_heads
        qg = q.view(num_seqs, self.num_kv_heads, g, self.head_dim)
        scores = torch.einsum("bhgd,blhd->bhgl", qg, k).float() * self.scale
        if self.logits_soft_cap is not None:
            scores = torch.tanh(scores / self.logits_soft_cap) * self.logits_soft_cap
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.einsum("bhgl,blhd->bhgd", probs, v)
        return out.reshape(num_seqs, self.num_heads, self.head_dim)


def write_kv_cache(k, v, k_cache, v_cache, slot_mapping: torch.Tensor) -> None:
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    k_cache.view(num_slots, *k_cache.shape[2:])[slot_mapping] = k
    v_cache.view(num_slots, *v_cache.shape[2:])[slot_mapping] = v


def gather_kv(k_cache, v_cache, block_table: torch.Tensor, context_len: int):
    shape = (-1, *k_cache.shape[2:])
    k = k_cache[block_table].reshape(shape)[:context_len]
    v = v_cache[block_table].reshape(shape)[:context_len]
    return k, v


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Boolean [q, k] mask: causal, and within the window when there is one (HF's convention:
    a window of W lets a token see itself and the W - 1 before it)."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - sliding_window
    return mask


def attend(q, k, v, mask: torch.Tensor | None, scale: float, soft_cap: float | None) -> torch.Tensor:
    """q [n, Hq, D], k/v [L, Hkv, D] (Hq a multiple of Hkv) -> [n, Hq, D].

    mask [n, L] is a boolean keep-mask; None means plain causal attention with n == L.
    """
    if soft_cap is None:
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
        )
        return out.transpose(0, 1)
    if mask is None:
        mask = attention_mask(torch.arange(q.shape[0]), torch.arange(k.shape[0]), None)
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k).float() * scale
    scores = torch.tanh(scores / soft_cap) * soft_cap
    scores = scores.masked_fill(~mask[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.einsum("hqk,khd->qhd", probs, v)
