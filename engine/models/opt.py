"""OPT.

Learned absolute positions offset by 2 (OPT reserves the first two rows), LayerNorm before
(do_layer_norm_before) or after (OPT-350m) each sublayer, a ReLU MLP (fc1, fc2), and, when
word_embed_proj_dim differs from hidden_size, projections from the embedding size into the
model (project_in) and back out before the tied LM head (project_out).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from engine.layers.activation import get_act_fn
from engine.layers.attention import Attention, AttentionMetadata
from engine.layers.norm import LayerNorm
from engine.models.llama import QKV_PACKED
from engine.models.utils import fused_linear, load_weights

# OPT's learned position embedding table starts 2 rows in.
POSITION_OFFSET = 2


def _layer_norm(config: PretrainedConfig) -> LayerNorm:
    return LayerNorm(config.hidden_size, affine=config.layer_norm_elementwise_affine)


class OPTAttention(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.qkv_proj = fused_linear(hidden, [hidden, hidden, hidden], config.enable_bias)
        self.out_proj = nn.Linear(hidden, hidden, bias=config.enable_bias)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_heads)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        return self.out_proj(self.attn(q, k, v, meta))


class OPTDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.do_layer_norm_before = config.do_layer_norm_before
        self.self_attn = OPTAttention(config)
        self.self_attn_layer_norm = _layer_norm(config)
        self.fc1 = nn.Linear(config.hidden_size, config.ffn_dim, bias=config.enable_bias)
        self.act = get_act_fn(config.activation_function)
        self.fc2 = nn.Linear(config.ffn_dim, config.hidden_size, bias=config.enable_bias)
        self.final_layer_norm = _layer_norm(config)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        pre = self.do_layer_norm_before
        h = self.self_attn(self.self_attn_layer_norm(x) if pre else x, meta)
        x = x + h
        if not pre:
            x = self.self_attn_layer_norm(x)
        h = self.fc2(self.act(self.fc1(self.final_layer_norm(x) if pre else x)))
        x = x + h
        return x if pre else self.final_layer_norm(x)


class OPTDecoder(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        embed_dim, hidden = config.word_embed_proj_dim, config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, embed_dim)
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, hidden)
        self.project_in = nn.Linear(embed_dim, hidden, bias=False) if embed_dim != hidden else None
        self.project_out = nn.Linear(hidden, embed_dim, bias=False) if embed_dim != hidden else None
        has_final_norm = config.do_layer_norm_before and not config._remove_final_layer_norm
        self.final_layer_norm = _layer_norm(config) if has_final_norm else None
        self.layers = nn.ModuleList(OPTDecoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, input_ids, positions, meta):
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + POSITION_OFFSET)
        for layer in self.layers:
            x = layer(x, meta)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        return x if self.project_out is None else self.project_out(x)


class OPTModel(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.decoder = OPTDecoder(config)


class OPTForCausalLM(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        self.model = OPTModel(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.lm_head = nn.Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model.decoder(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_weights(self, weights, QKV_PACKED, skip=("lm_head.",) if self.tie_word_embeddings else ())
