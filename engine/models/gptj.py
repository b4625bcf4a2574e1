"""GPT-J.

Attention and the MLP run in parallel on one LayerNorm of the layer input; q, k, v and the
attention output have no biases; rope rotates interleaved pairs (gpt-j style) over the first
rotary_dim features of each head (all of them when rotary_dim is None), base 10000; the LM head
has a bias.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from engine.layers.activation import get_act_fn
from engine.layers.attention import Attention, AttentionMetadata
from engine.layers.norm import LayerNorm
from engine.layers.rotary import RotaryEmbedding
from engine.models.llama import QKV_PACKED
from engine.models.utils import fused_linear, load_weights


class GPTJAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, rotary_emb: RotaryEmbedding):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.qkv_proj = fused_linear(hidden, [hidden, hidden, hidden], False)
        self.out_proj = nn.Linear(hidden, hidden, bias=False)
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_heads)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return self.out_proj(self.attn(q, k, v, meta))


class GPTJMLP(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        inner = config.n_inner or 4 * config.hidden_size
        self.fc_in = nn.Linear(config.hidden_size, inner)
        self.act = get_act_fn(config.activation_function)
        self.fc_out = nn.Linear(inner, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class GPTJBlock(nn.Module):
    def __init__(self, config: PretrainedConfig, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.ln_1 = LayerNorm(config.hidden_size, config.layer_norm_epsilon)
        self.attn = GPTJAttention(config, rotary_emb)
        self.mlp = GPTJMLP(config)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h = self.ln_1(x)
        return self.attn(positions, h, meta) + self.mlp(h) + x


class GPTJModel(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        head_dim = config.hidden_size // config.num_attention_heads
        rotary_emb = RotaryEmbedding(head_dim, config.rotary_dim or head_dim, config.max_position_embeddings,
                                     {"rope_type": "default", "rope_theta": 10000.0}, is_neox_style=False)
        self.h = nn.ModuleList(GPTJBlock(config, rotary_emb) for _ in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(config.hidden_size, config.layer_norm_epsilon)

    def forward(self, input_ids, positions, meta):
        x = self.wte(input_ids)
        for block in self.h:
            x = block(positions, x, meta)
        return self.ln_f(x)


class GPTJForCausalLM(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        self.transformer = GPTJModel(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.transformer(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # A tied head shares only its weight: the bias is still the checkpoint's own.
        load_weights(self, weights, QKV_PACKED, skip=("lm_head.weight",) if self.tie_word_embeddings else ())
