"""Attention over the paged KV cache.

One flattened batch mixes decodes (one query token each, attended together over their block
tables) and prefill chunks (attended together over the cache, which holds each chunk's cached
prefix and, once written, the chunk itself). The math is in kernels/: a Triton kernel on GPU,
its torch reference otherwise (litmus_kernels.ops picks).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from litmus_kernels import ops
from litmus_kernels.reference import attend


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

    @cached_property
    def prefill_batch(self) -> PrefillBatch:
        """The prefill chunks packed for the kernels; built once per step, shared by all layers."""
        return PrefillBatch.pack(self.prefills, self.slot_mapping.device)


@dataclass
class PrefillBatch:
    token_idx: torch.Tensor  # [num_prefill_tokens] rows of the prefill tokens in the batch
    query_start_loc: torch.Tensor  # [num_chunks + 1] chunk boundaries within those rows
    num_computed: torch.Tensor  # [num_chunks]
    block_tables: torch.Tensor  # [num_chunks, max_blocks] int64 (padded with 0)
    max_query_len: int

    @classmethod
    def pack(cls, chunks: list[PrefillChunk], device: torch.device) -> PrefillBatch:
        lens = [c.query_end - c.query_start for c in chunks]
        width = max((c.block_table.numel() for c in chunks), default=0)
        tables = torch.zeros(len(chunks), width, dtype=torch.long, device=device)
        for row, c in enumerate(chunks):
            tables[row, :c.block_table.numel()] = c.block_table
        return cls(
            token_idx=torch.tensor([i for c in chunks for i in range(c.query_start, c.query_end)],
                                   dtype=torch.long, device=device),
            query_start_loc=torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.long, device=device),
            num_computed=torch.tensor([c.num_computed for c in chunks], dtype=torch.long, device=device),
            block_tables=tables,
            max_query_len=max(lens, default=0),
        )


class Attention(nn.Module):
    """Holds one layer's KV cache, bound by the model runner once the cache is allocated.

    alibi_slopes [num_heads] (BLOOM, MPT) adds slope[h] * (key_pos - query_pos) to the scores.
    It is kept in float32 outside the module's buffers, so casting the model leaves it alone;
    create it on the model's device.

    causal=False (encoders: BERT, RoBERTa) lets each prompt attend to all of itself. Such a
    layer keeps no KV cache: its prompts run whole in one step, prefill only.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        scale: float,
        num_kv_heads: int,
        sliding_window: int | None = None,
        logits_soft_cap: float | None = None,
        alibi_slopes: torch.Tensor | None = None,
        causal: bool = True,
    ):
        super().__init__()
        if not causal and (sliding_window is not None or alibi_slopes is not None):
            raise ValueError("bidirectional attention takes no sliding window and no ALiBi")
        if alibi_slopes is not None and alibi_slopes.shape != (num_heads,):
            raise ValueError(f"alibi_slopes has shape {tuple(alibi_slopes.shape)}, expected ({num_heads},)")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        self.alibi_slopes = None if alibi_slopes is None else alibi_slopes.float()
        self.causal = causal
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if not self.causal:
            return self._forward_bidirectional(q, k, v, meta)
        ops.write_kv_cache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        options = dict(sliding_window=self.sliding_window, soft_cap=self.logits_soft_cap,
                       alibi_slopes=self.alibi_slopes)
        if not meta.prefills:  # decodes only, the batch's rows in order: no scatter into place
            out = ops.decode_attention(q.contiguous(), self.k_cache, self.v_cache, meta.decode_block_tables,
                                       meta.decode_context_lens, self.scale, **options)
            return out.reshape(-1, self.num_heads * self.head_dim)
        out = torch.empty_like(q)
        if meta.decode_token_idx.numel():
            idx = meta.decode_token_idx
            out[idx] = ops.decode_attention(q[idx], self.k_cache, self.v_cache, meta.decode_block_tables,
                                            meta.decode_context_lens, self.scale, **options)
        if meta.prefills:
            p = meta.prefill_batch
            out[p.token_idx] = ops.prefill_attention(
                q[p.token_idx], self.k_cache, self.v_cache, p.query_start_loc, p.num_computed, p.block_tables,
                p.max_query_len, self.scale, **options,
            )
        return out.view(-1, self.num_heads * self.head_dim)

    def _forward_bidirectional(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               meta: AttentionMetadata) -> torch.Tensor:
        if meta.decode_token_idx.numel() or any(c.num_computed for c in meta.prefills):
            raise RuntimeError("bidirectional attention needs every prompt whole in one step: no decodes, "
                               "no chunked prefill")
        out = torch.empty_like(q)
        for c in meta.prefills:
            s, e = c.query_start, c.query_end
            keep = torch.ones(e - s, e - s, dtype=torch.bool, device=q.device)
            out[s:e] = attend(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), keep,
                              self.scale, self.logits_soft_cap).transpose(0, 1)
        return out.view(-1, self.num_heads * self.head_dim)


def get_alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi paper's head slopes: a geometric sequence 2^(-8/n), 2^(-16/n), ... for n the
    largest power of two <= num_heads; further heads take every other slope of the 2n sequence."""
    n = 2 ** math.floor(math.log2(num_heads))
    slopes = [2 ** (-8 * i / n) for i in range(1, n + 1)]
    slopes += [2 ** (-8 * i / (2 * n)) for i in range(1, 2 * (num_heads - n), 2)]
    return torch.tensor(slopes, dtype=torch.float32)
