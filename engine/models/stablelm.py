"""StableLM (StableLM 2, StableLM-3B-4E1T, StableCode).

Llama-like (gated SiLU MLP, GQA) but with LayerNorms (with biases), rope on the first
partial_rotary_factor of each head (neox style), optional q/k/v biases (use_qkv_bias), optional
per-head q/k LayerNorms with a separate weight per head (qk_layernorm), and optionally attention
and MLP in parallel on one norm of the layer input (use_parallel_residual).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from engine.layers.attention import Attention, AttentionMetadata
from engine.layers.norm import LayerNorm
from engine.layers.rotary import RotaryEmbedding, get_rope
from engine.models.llama import PACKED, LlamaMLP
from engine.models.utils import fused_linear, load_weights


class StableLmLayerNormPerHead(nn.Module):
    """One LayerNorm (no bias) per head, over [tokens, heads * head_dim]."""

    def __init__(self, head_dim: int, num_heads: int, eps: float):
        super().__init__()
        self.norms = nn.ModuleList(LayerNorm(head_dim, eps, bias=False) for _ in range(num_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads = x.view(x.shape[0], len(self.norms), -1).unbind(1)
        return torch.cat([norm(h) for norm, h in zip(self.norms, heads)], dim=-1)


class StableLmAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = fused_linear(config.hidden_size, [self.q_size, self.kv_size, self.kv_size],
                                     bool(config.use_qkv_bias))
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.qk_layernorm = bool(config.qk_layernorm)
        if self.qk_layernorm:
            self.q_layernorm = StableLmLayerNormPerHead(self.head_dim, self.num_heads, config.layer_norm_eps)
            self.k_layernorm = StableLmLayerNormPerHead(self.head_dim, self.num_kv_heads, config.layer_norm_eps)
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_kv_heads)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, meta))


class StableLmDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.use_parallel_residual = bool(config.use_parallel_residual)
        self.input_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        if not self.use_parallel_residual:
            self.post_attention_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.self_attn = StableLmAttention(config, rotary_emb)
        self.mlp = LlamaMLP(config, "StableLmForCausalLM")

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h = self.input_layernorm(x)
        attn = self.self_attn(positions, h, meta)
        if self.use_parallel_residual:
            return x + attn + self.mlp(h)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class StableLmModel(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        head_dim = config.hidden_size // config.num_attention_heads
        rotary_emb = get_rope(head_dim, config.max_position_embeddings, config.rope_parameters)
        self.layers = nn.ModuleList(StableLmDecoderLayer(config, rotary_emb) for _ in range(config.num_hidden_layers))
        self.norm = LayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, input_ids, positions, meta):
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(positions, x, meta)
        return self.norm(x)


class StableLmForCausalLM(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        self.model = StableLmModel(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_weights(self, weights, PACKED, skip=("lm_head.",) if self.tie_word_embeddings else ())
