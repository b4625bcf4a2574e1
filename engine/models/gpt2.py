"""GPT-2 and GPTBigCode (StarCoder, SantaCoder) — one implementation, variants by config.

Both are pre-LayerNorm decoders with learned absolute position embeddings, one fused c_attn
projection and a plain GELU MLP (c_fc, c_proj). What differs:
- GPT-2 stores its projections as Conv1D, weight [in, out]: transposed on load.
- GPTBigCode with multi_query=True has one K/V head after all query heads in c_attn
  ([q | k | v]); with multi_query=False c_attn is laid out per head ([q_h | k_h | v_h] for
  each head h). GPT-2's c_attn is [q | k | v] over all heads.
- GPT-2 may scale scores by 1 / (layer_idx + 1) (scale_attn_by_inverse_layer_idx).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from engine.layers.activation import get_act_fn
from engine.layers.attention import Attention, AttentionMetadata
from engine.layers.norm import LayerNorm
from engine.models.utils import load_weights

# GPT-2's Conv1D weights, stored transposed.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPT2Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int, multi_query: bool):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.num_kv_heads = 1 if multi_query else self.num_heads
        # GPTBigCode without multi-query interleaves q, k, v head by head.
        self.per_head_layout = not multi_query and config.model_type == "gpt_bigcode"
        self.kv_size = self.num_kv_heads * self.head_dim
        self.c_attn = nn.Linear(hidden, hidden + 2 * self.kv_size)
        self.c_proj = nn.Linear(hidden, hidden)
        scale = self.head_dim ** -0.5 if config.scale_attn_weights else 1.0
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        self.attn = Attention(self.num_heads, self.head_dim, scale, self.num_kv_heads)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.c_attn(x)
        if self.per_head_layout:
            q, k, v = (t.reshape(x.shape[0], -1) for t in qkv.view(-1, self.num_heads, 3, self.head_dim).unbind(2))
        else:
            q, k, v = qkv.split([self.num_heads * self.head_dim, self.kv_size, self.kv_size], dim=-1)
        return self.c_proj(self.attn(q, k, v, meta))


class GPT2MLP(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        inner = config.n_inner or 4 * config.hidden_size
        self.c_fc = nn.Linear(config.hidden_size, inner)
        self.act = get_act_fn(config.activation_function)
        self.c_proj = nn.Linear(inner, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int, multi_query: bool):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = LayerNorm(config.hidden_size, eps)
        self.attn = GPT2Attention(config, layer_idx, multi_query)
        self.ln_2 = LayerNorm(config.hidden_size, eps)
        self.mlp = GPT2MLP(config)

    def forward(self, positions, x, residual, meta):
        if residual is None:
            residual = x
            x = self.ln_1(x)
        else:
            x, residual = self.ln_1(x, residual)
        x = self.attn(positions, x, meta)
        x, residual = self.ln_2(x, residual)
        return self.mlp(x), residual


class GPT2Model(nn.Module):
    def __init__(self, config: PretrainedConfig, multi_query: bool):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config, i, multi_query) for i in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(config.hidden_size, config.layer_norm_epsilon)

    def forward(self, input_ids, positions, meta):
        x = self.wte(input_ids) + self.wpe(positions)
        residual = None
        for block in self.h:
            x, residual = block(positions, x, residual, meta)
        x, _ = self.ln_f(x, residual)
        return x


class GPT2LMHeadModel(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        if getattr(config, "add_cross_attention", False):
            raise NotImplementedError(f"{type(self).__name__} with add_cross_attention=True is not supported")
        self.config = config
        self.conv1d_weights = config.model_type == "gpt2"
        self.transformer = GPT2Model(config, multi_query=bool(getattr(config, "multi_query", False)))
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.transformer(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # Old GPT-2 checkpoints still carry causal-mask buffers (attn.bias): no parameter takes
        # them, so load_weights passes over them.
        load_weights(self, weights, skip=("lm_head.",) if self.tie_word_embeddings else (),
                     transposed=_CONV1D if self.conv1d_weights else ())


class GPTBigCodeForCausalLM(GPT2LMHeadModel):
    pass
