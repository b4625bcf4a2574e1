"""MPT.

ALiBi instead of position embeddings, LayerNorms without biases, no linear biases, one fused
Wqkv ([q | k | v]) optionally clamped to +-clip_qkv, a 4 * hidden exact-GELU MLP. Like
Transformers, ALiBi is always on with alibi_bias_max 8 (MPT's slope formula then gives BLOOM's
slopes for every head count) and qk_ln is not applied.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from engine.layers.attention import Attention, AttentionMetadata, get_alibi_slopes
from engine.layers.norm import LayerNorm
from engine.models.utils import load_weights


class MptAttention(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.n_heads
        self.head_dim = hidden // self.num_heads
        attn_config = config.attn_config
        self.clip_qkv = attn_config.clip_qkv
        self.Wqkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out_proj = nn.Linear(hidden, hidden, bias=False)
        scale = attn_config.softmax_scale or self.head_dim ** -0.5
        self.attn = Attention(self.num_heads, self.head_dim, scale, self.num_heads,
                              alibi_slopes=get_alibi_slopes(self.num_heads))

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.Wqkv(x)
        if self.clip_qkv:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q, k, v = qkv.chunk(3, dim=-1)
        return self.out_proj(self.attn(q, k, v, meta))


class MptMLP(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, 4 * config.hidden_size, bias=False)
        self.act = nn.GELU(approximate="none")
        self.down_proj = nn.Linear(4 * config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class MptBlock(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.norm_1 = LayerNorm(config.hidden_size, eps, bias=False)
        self.attn = MptAttention(config)
        self.norm_2 = LayerNorm(config.hidden_size, eps, bias=False)
        self.ffn = MptMLP(config)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.attn(self.norm_1(x), meta) + x
        return self.ffn(self.norm_2(x)) + x


class MptModel(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(MptBlock(config) for _ in range(config.n_layers))
        self.norm_f = LayerNorm(config.hidden_size, config.layer_norm_epsilon, bias=False)

    def forward(self, input_ids, positions, meta):
        x = self.wte(input_ids)
        for block in self.blocks:
            x = block(x, meta)
        return self.norm_f(x)


class MptForCausalLM(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        self.transformer = MptModel(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.transformer(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_weights(self, weights, skip=("lm_head.",) if self.tie_word_embeddings else ())
