"""Falcon (7B-style multi-query, 40B/180B-style new decoder architecture, RW-style sequential).

The fused query_key_value is grouped by K/V head: each of the num_kv groups holds its queries,
then one key, then one value. That one layout covers every variant: the new architecture
(num_kv_heads groups), multi_query (one group of all heads) and plain multi-head attention (one
group per head, i.e. [q_h | k_h | v_h] per head). Attention and MLP run in parallel on the layer
input (parallel_attn, always for the new architecture), from one LayerNorm or, with
num_ln_in_parallel_attn=2, one each (ln_attn, ln_mlp); otherwise they run one after the other.
Rope rotates whole heads (neox style). ALiBi Falcons are not supported: Transformers rounds
their ALiBi to bfloat16, which the engine's attention cannot reproduce.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from engine.layers.activation import get_act_fn
from engine.layers.attention import Attention, AttentionMetadata
from engine.layers.norm import LayerNorm
from engine.layers.rotary import RotaryEmbedding, get_rope
from engine.models.utils import load_weights


def num_kv_heads_of(config: PretrainedConfig) -> int:
    if config.new_decoder_architecture:
        return config.num_kv_heads
    return 1 if config.multi_query else config.num_attention_heads


class FalconAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, rotary_emb: RotaryEmbedding):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = num_kv_heads_of(config)
        self.head_dim = hidden // self.num_heads
        self.query_key_value = nn.Linear(hidden, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
                                         bias=config.bias)
        self.dense = nn.Linear(hidden, hidden, bias=config.bias)
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_kv_heads)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        group = self.num_heads // self.num_kv_heads
        qkv = self.query_key_value(x).view(-1, self.num_kv_heads, group + 2, self.head_dim)
        q, k, v = (t.reshape(x.shape[0], -1) for t in qkv.split([group, 1, 1], dim=2))
        q, k = self.rotary_emb(positions, q, k)
        return self.dense(self.attn(q, k, v, meta))


class FalconMLP(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        inner = config.ffn_hidden_size or 4 * config.hidden_size
        self.dense_h_to_4h = nn.Linear(config.hidden_size, inner, bias=config.bias)
        self.act = get_act_fn(config.activation)
        self.dense_4h_to_h = nn.Linear(inner, config.hidden_size, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class FalconDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, rotary_emb: RotaryEmbedding):
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_epsilon
        self.self_attention = FalconAttention(config, rotary_emb)
        self.mlp = FalconMLP(config)
        self.parallel = bool(config.new_decoder_architecture or config.parallel_attn)
        # Transformers gives the new architecture two norms unless the config says one.
        self.two_norms = bool(config.new_decoder_architecture) and (config.num_ln_in_parallel_attn or 2) == 2
        if self.two_norms:
            self.ln_attn = LayerNorm(hidden, eps)
            self.ln_mlp = LayerNorm(hidden, eps)
        else:
            self.input_layernorm = LayerNorm(hidden, eps)
            if not self.parallel:
                self.post_attention_layernorm = LayerNorm(hidden, eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        attn_in = self.ln_attn(x) if self.two_norms else self.input_layernorm(x)
        attn = self.self_attention(positions, attn_in, meta)
        if not self.parallel:
            x = x + attn
            return x + self.mlp(self.post_attention_layernorm(x))
        mlp_in = self.ln_mlp(x) if self.two_norms else attn_in
        return x + (self.mlp(mlp_in) + attn)


class FalconModel(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        head_dim = config.hidden_size // config.num_attention_heads
        rotary_emb = get_rope(head_dim, config.max_position_embeddings, config.rope_parameters)
        self.h = nn.ModuleList(FalconDecoderLayer(config, rotary_emb) for _ in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(config.hidden_size, config.layer_norm_epsilon)

    def forward(self, input_ids, positions, meta):
        x = self.word_embeddings(input_ids)
        for layer in self.h:
            x = layer(positions, x, meta)
        return self.ln_f(x)


class FalconForCausalLM(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        if config.alibi:
            raise NotImplementedError(
                "FalconForCausalLM with alibi=True is not supported: Transformers rounds Falcon's ALiBi "
                "biases to bfloat16, which the engine's attention does not reproduce"
            )
        self.config = config
        self.transformer = FalconModel(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.transformer.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.transformer(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_weights(self, weights, skip=("lm_head.",) if self.tie_word_embeddings else ())
