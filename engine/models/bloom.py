"""BLOOM.

Position information comes only from ALiBi (no position embeddings); the embeddings are
LayerNormed before the first layer; q, k, v are fused head by head ([q_h | k_h | v_h] per head);
the MLP is 4 * hidden with tanh GELU; with apply_residual_connection_post_layernorm the residual
branches start from the normed input instead of the input.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from engine.layers.activation import get_act_fn
from engine.layers.attention import Attention, AttentionMetadata, get_alibi_slopes
from engine.layers.norm import LayerNorm
from engine.models.utils import load_weights


class BloomAttention(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.query_key_value = nn.Linear(hidden, 3 * hidden)
        self.dense = nn.Linear(hidden, hidden)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_heads,
                              alibi_slopes=get_alibi_slopes(self.num_heads))

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.query_key_value(x).view(-1, self.num_heads, 3, self.head_dim).unbind(2)
        q, k, v = (t.reshape(x.shape[0], -1) for t in (q, k, v))
        return self.dense(self.attn(q, k, v, meta))


class BloomMLP(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 4 * config.hidden_size)
        # BLOOM's own GELU is the tanh approximation.
        self.act = get_act_fn("gelu_pytorch_tanh")
        self.dense_4h_to_h = nn.Linear(4 * config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class BloomBlock(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.input_layernorm = LayerNorm(config.hidden_size, eps)
        self.self_attention = BloomAttention(config)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps)
        self.mlp = BloomMLP(config)
        self.residual_from_norm = bool(config.apply_residual_connection_post_layernorm)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = (h if self.residual_from_norm else x) + self.self_attention(h, meta)
        h = self.post_attention_layernorm(x)
        return (h if self.residual_from_norm else x) + self.mlp(h)


class BloomModel(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.word_embeddings_layernorm = LayerNorm(config.hidden_size, config.layer_norm_epsilon)
        self.h = nn.ModuleList(BloomBlock(config) for _ in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(config.hidden_size, config.layer_norm_epsilon)

    def forward(self, input_ids, positions, meta):
        x = self.word_embeddings_layernorm(self.word_embeddings(input_ids))
        for block in self.h:
            x = block(x, meta)
        return self.ln_f(x)


class BloomForCausalLM(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        self.transformer = BloomModel(config)
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
