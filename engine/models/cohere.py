"""Cohere (Command-R) and Cohere2 (Command-R7B) — one implementation, variants by config.

Both run attention and the gated MLP in parallel on one LayerNorm (no bias) of the layer input,
rotate interleaved pairs (gpt-j style) and multiply the logits by `logit_scale`.
- Cohere may LayerNorm each head's q and k with a weight per head (use_qk_norm).
- Cohere2 alternates sliding-window and global layers (layer_types), and only the sliding ones
  use rope: the global layers have no position encoding at all.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from engine.layers.attention import Attention, AttentionMetadata
from engine.layers.norm import LayerNorm
from engine.layers.rotary import RotaryEmbedding, get_rope
from engine.models.llama import PACKED, LlamaMLP, head_dim_of, sliding_window_of
from engine.models.utils import fused_linear, load_weights


class CohereAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int, rotary_emb: RotaryEmbedding | None):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = bool(config.attention_bias)
        self.qkv_proj = fused_linear(config.hidden_size, [self.q_size, self.kv_size, self.kv_size], bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=bias)
        self.use_qk_norm = bool(getattr(config, "use_qk_norm", False))
        if self.use_qk_norm:
            eps = config.layer_norm_eps
            self.q_norm = LayerNorm((self.num_heads, self.head_dim), eps, bias=False)
            self.k_norm = LayerNorm((self.num_kv_heads, self.head_dim), eps, bias=False)
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_kv_heads,
                              sliding_window=sliding_window_of(config, layer_idx))

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary_emb is not None:
            q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, meta))


class CohereDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int, rotary_emb: RotaryEmbedding | None):
        super().__init__()
        self.input_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps, bias=False)
        self.self_attn = CohereAttention(config, layer_idx, rotary_emb)
        self.mlp = LlamaMLP(config, "CohereForCausalLM")

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h = self.input_layernorm(x)
        return x + self.self_attn(positions, h, meta) + self.mlp(h)


class CohereModel(nn.Module):
    def __init__(self, config: PretrainedConfig, rope_on_global_layers: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        rotary_emb = get_rope(head_dim_of(config), config.max_position_embeddings, config.rope_parameters,
                              is_neox_style=False)
        self.layers = nn.ModuleList(
            CohereDecoderLayer(
                config, i,
                rotary_emb if rope_on_global_layers or sliding_window_of(config, i) is not None else None,
            )
            for i in range(config.num_hidden_layers)
        )
        self.norm = LayerNorm(config.hidden_size, config.layer_norm_eps, bias=False)

    def forward(self, input_ids, positions, meta):
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(positions, x, meta)
        return self.norm(x)


class CohereForCausalLM(nn.Module):
    rope_on_global_layers = True

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        self.model = CohereModel(config, self.rope_on_global_layers)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.logit_scale = float(config.logit_scale)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return (self.lm_head(hidden) * self.logit_scale).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_weights(self, weights, PACKED, skip=("lm_head.",) if self.tie_word_embeddings else ())


class Cohere2ForCausalLM(CohereForCausalLM):
    rope_on_global_layers = False
