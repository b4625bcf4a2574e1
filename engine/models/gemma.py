"""The Gemma family: Gemma, Gemma 2, Gemma 3 (text) — one implementation, variants by architecture.

What all three share: RMSNorm weights stored as offsets from 1, input embeddings scaled by
sqrt(hidden_size), a gated GELU MLP, head_dim set apart from hidden_size, tied embeddings.
- Gemma 2 adds a norm after attention and around the MLP (four per layer), tanh soft caps on
  attention scores and on the final logits, a query scale from `query_pre_attn_scalar`, and
  sliding-window layers alternating with global ones (`layer_types`).
- Gemma 3 keeps the four norms and the layer alternation, normalises each head's q and k
  (RMSNorm over head_dim), and takes a rope base per layer type (`rope_parameters` keyed by
  "sliding_attention" / "full_attention": local and global rope). Transformers applies no
  attention soft cap to it, whatever the config says.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from engine.layers.activation import GatedActivation
from engine.layers.attention import Attention, AttentionMetadata
from engine.layers.norm import GemmaRMSNorm
from engine.layers.rotary import RotaryEmbedding, get_rope
from engine.models.llama import PACKED, head_dim_of, sliding_window_of
from engine.models.utils import fused_linear, load_weights


@dataclass(frozen=True)
class GemmaVariant:
    post_norms: bool  # Gemma 2 / 3: norms after attention and after the MLP too
    attn_soft_cap: bool  # Gemma 2: config.attn_logit_softcapping applies
    qk_norm: bool  # Gemma 3


def rope_parameters_of(config: PretrainedConfig, layer_type: str | None) -> dict:
    """Gemma 3 nests one rope_parameters dict per layer type; the others have one for all layers."""
    params = config.rope_parameters
    return params[layer_type] if layer_type in params else params


class GemmaAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int, variant: GemmaVariant, rotary_emb: RotaryEmbedding):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = bool(config.attention_bias)
        self.qkv_proj = fused_linear(config.hidden_size, [self.q_size, self.kv_size, self.kv_size], bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=bias)
        self.qk_norm = variant.qk_norm
        if self.qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary_emb = rotary_emb
        query_scalar = getattr(config, "query_pre_attn_scalar", None) or self.head_dim
        self.attn = Attention(
            self.num_heads, self.head_dim, query_scalar ** -0.5, self.num_kv_heads,
            sliding_window=sliding_window_of(config, layer_idx),
            logits_soft_cap=config.attn_logit_softcapping if variant.attn_soft_cap else None,
        )

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            q = self.q_norm(q.reshape(-1, self.num_heads, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.num_kv_heads, self.head_dim)).view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, meta))


class GemmaMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, act: str):
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = fused_linear(config.hidden_size, [inter, inter], False)
        self.act = GatedActivation(act, self.gate_up_proj)
        self.down_proj = nn.Linear(inter, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act.project(self.gate_up_proj, x))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int, variant: GemmaVariant,
                 rotary_emb: RotaryEmbedding):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = GemmaAttention(config, layer_idx, variant, rotary_emb)
        # Gemma reads `hidden_act`; Gemma 2 and 3 read `hidden_activation`.
        self.mlp = GemmaMLP(config, config.hidden_activation if variant.post_norms else config.hidden_act)
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_norms = variant.post_norms
        if self.post_norms:
            self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
            self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(self, positions, x, residual, meta):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        if not self.post_norms:
            x, residual = self.post_attention_layernorm(x, residual)
            return self.mlp(x), residual
        x = self.post_attention_layernorm(x)
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class GemmaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, variant: GemmaVariant):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        layer_types = getattr(config, "layer_types", None) or [None] * config.num_hidden_layers
        # One rope table per distinct rope_parameters, shared by the layers that use it.
        ropes = {
            t: get_rope(head_dim_of(config), config.max_position_embeddings, rope_parameters_of(config, t))
            for t in sorted(set(layer_types), key=str)
        }
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(config, i, variant, ropes[t]) for i, t in enumerate(layer_types)
        )
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions, meta):
        x = self.embed_tokens(input_ids)
        # The normaliser is rounded to the model's dtype first, as Transformers does.
        x = x * torch.tensor(self.hidden_size ** 0.5, dtype=x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x


class GemmaForCausalLM(nn.Module):
    variant = GemmaVariant(post_norms=False, attn_soft_cap=False, qk_norm=False)

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        if getattr(config, "use_bidirectional_attention", False):
            raise NotImplementedError(f"{type(self).__name__} with use_bidirectional_attention=True is not supported")
        self.config = config
        self.model = GemmaModel(config, self.variant)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.final_soft_cap = getattr(config, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.final_soft_cap is not None:
            logits = torch.tanh(logits / self.final_soft_cap) * self.final_soft_cap
        return logits.float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        skip = ("rotary_emb.",) + (("lm_head.",) if self.tie_word_embeddings else ())
        load_weights(self, weights, PACKED, skip=skip)


class Gemma2ForCausalLM(GemmaForCausalLM):
    variant = GemmaVariant(post_norms=True, attn_soft_cap=True, qk_norm=False)


class Gemma3ForCausalLM(GemmaForCausalLM):
    variant = GemmaVariant(post_norms=True, attn_soft_cap=False, qk_norm=True)
