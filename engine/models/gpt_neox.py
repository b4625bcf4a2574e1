"""GPT-NeoX (Pythia) and Persimmon — one implementation, variants by config.

Both fuse q, k, v into one projection laid out head by head ([q_h | k_h | v_h] per head), rotate
only the first partial_rotary_factor of each head (neox style), and use LayerNorm with biases
and a plain MLP (dense_h_to_4h, dense_4h_to_h). What differs:
- GPT-NeoX may run attention and MLP in parallel on the layer input (use_parallel_residual).
- Persimmon LayerNorms each head's q and k (one norm shared by all heads, qk_layernorm), uses
  squared ReLU, and names its modules Llama-style (model.layers.N.self_attn...): renamed on load.
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

# Persimmon checkpoint names -> this implementation's (GPT-NeoX's) names.
_PERSIMMON_RENAMES = [
    ("model.embed_tokens.", "gpt_neox.embed_in."),
    ("model.final_layernorm.", "gpt_neox.final_layer_norm."),
    ("model.layers.", "gpt_neox.layers."),
    (".self_attn.", ".attention."),
    ("lm_head.", "embed_out."),
]


class GPTNeoXAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, rotary_emb: RotaryEmbedding):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        # Persimmon's projections always have biases; GPT-NeoX's follow attention_bias.
        bias = bool(getattr(config, "attention_bias", True))
        self.query_key_value = nn.Linear(hidden, 3 * hidden, bias=bias)
        self.dense = nn.Linear(hidden, hidden, bias=bias)
        self.qk_layernorm = bool(getattr(config, "qk_layernorm", False))
        if self.qk_layernorm:
            self.q_layernorm = LayerNorm(self.head_dim, config.layer_norm_eps)
            self.k_layernorm = LayerNorm(self.head_dim, config.layer_norm_eps)
        self.rotary_emb = rotary_emb
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim ** -0.5, self.num_heads)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.query_key_value(x).view(-1, self.num_heads, 3, self.head_dim).unbind(2)
        if self.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k, v = (t.reshape(x.shape[0], -1) for t in (q, k, v))
        q, k = self.rotary_emb(positions, q, k)
        return self.dense(self.attn(q, k, v, meta))


class GPTNeoXMLP(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = get_act_fn(config.hidden_act)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.use_parallel_residual = bool(getattr(config, "use_parallel_residual", False))
        self.input_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.attention = GPTNeoXAttention(config, rotary_emb)
        self.mlp = GPTNeoXMLP(config)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        attn = self.attention(positions, self.input_layernorm(x), meta)
        if self.use_parallel_residual:
            return self.mlp(self.post_attention_layernorm(x)) + attn + x
        x = attn + x
        return self.mlp(self.post_attention_layernorm(x)) + x


class GPTNeoXModel(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        head_dim = config.hidden_size // config.num_attention_heads
        rotary_emb = get_rope(head_dim, config.max_position_embeddings, config.rope_parameters)
        self.layers = nn.ModuleList(GPTNeoXLayer(config, rotary_emb) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = LayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, input_ids, positions, meta):
        x = self.embed_in(input_ids)
        for layer in self.layers:
            x = layer(positions, x, meta)
        return self.final_layer_norm(x)


class GPTNeoXForCausalLM(nn.Module):
    renames: list[tuple[str, str]] = []

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        self.gpt_neox = GPTNeoXModel(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if self.tie_word_embeddings:
            self.embed_out.weight = self.gpt_neox.embed_in.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.gpt_neox(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.embed_out(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        head = "lm_head." if self.renames else "embed_out."
        skip = (head,) if self.tie_word_embeddings else ()
        load_weights(self, weights, skip=skip, renames=self.renames)


class PersimmonForCausalLM(GPTNeoXForCausalLM):
    renames = _PERSIMMON_RENAMES
