"""DeepSeek-V2 and DeepSeek-V3: Llama's pre-norm residual stream with multi-head latent attention
(MLA) and a DeepSeek MoE — one implementation, variants by config.

MLA: q comes from hidden directly (q_proj) or through a low-rank bottleneck (q_lora_rank:
q_a_proj, RMSNorm, q_b_proj). K and V come from one compressed latent per token (kv_a_proj_with_mqa
-> kv_lora_rank features, RMSNorm, kv_b_proj -> every head's k_nope and v) plus one rope key part
shared by all heads. Rope covers each head's last qk_rope_head_dim features only. The paged cache
holds the expanded per-head K and V (V zero-padded to K's head size, so the engine's one-head-size
attention serves both); caching the latent instead would save memory, not change a number.

Rope layout: V2 rotates interleaved pairs; V3 too when rope_interleave is set (Transformers then
returns the pairs de-interleaved, but q and k alike, which leaves every score the same), else
the halves (neox). With yarn, the softmax scale qk_head_dim^-0.5 is multiplied by
yarn_mscale(factor, mscale_all_dim)^2, as Transformers does.

MoE (engine/layers/moe.py): layers from first_k_dense_replace on (Transformers 5 ignores
moe_layer_freq); routed experts plus an ungated shared MLP of n_shared_experts * moe_intermediate_size.
V2 routes by softmax, grouped when topk_method is "group_limited_greedy", weights not renormalised
(Transformers' V2 ignores norm_topk_prob); V3 by sigmoid with the score correction bias, always
grouped, renormalised by norm_topk_prob. Both scale the weights by routed_scaling_factor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from engine.layers.attention import Attention, AttentionMetadata
from engine.layers.moe import FusedMoE, GroupedTopK
from engine.layers.norm import RMSNorm
from engine.layers.rotary import get_rope, yarn_mscale
from engine.models.llama import (
    GATE_UP_PACKED,
    LLAMA_EXPERTS,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
)

# Transformers builds the MLA bottleneck norms with RMSNorm's default eps, not the config's.
LATENT_NORM_EPS = 1e-6
V2_TOPK_METHODS = ("greedy", "group_limited_greedy")


def softmax_scale(config: PretrainedConfig, qk_head_dim: int) -> float:
    scale = qk_head_dim ** -0.5
    params = config.rope_parameters
    mscale_all_dim = params.get("mscale_all_dim")
    if params.get("rope_type", "default") != "default" and mscale_all_dim:
        scale *= yarn_mscale(params["factor"], mscale_all_dim) ** 2
    return scale


class DeepseekAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, arch: str):
        super().__init__()
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.num_heads = heads
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        bias = bool(config.attention_bias)
        self.q_lora_rank = config.q_lora_rank
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(heads * self.v_dim, hidden, bias=bias)
        interleaved = arch == "DeepseekV2ForCausalLM" or bool(getattr(config, "rope_interleave", False))
        self.rotary_emb = get_rope(self.rope_dim, config.max_position_embeddings, config.rope_parameters,
                                   is_neox_style=not interleaved)
        self.head_dim = max(qk_dim, self.v_dim)
        self.attn = Attention(heads, self.head_dim, softmax_scale(config, qk_dim), heads)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        tokens, heads = x.shape[0], self.num_heads
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(tokens, heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_nope, v = self.kv_b_proj(self.kv_a_layernorm(latent)).view(tokens, heads, -1).split(
            [self.nope_dim, self.v_dim], dim=-1)
        q_pe, k_pe = self.rotary_emb(positions, q_pe.reshape(tokens, -1), k_pe.contiguous())
        q = torch.cat([q_nope, q_pe.view(tokens, heads, -1)], dim=-1)
        k = torch.cat([k_nope, k_pe.view(tokens, 1, -1).expand(-1, heads, -1)], dim=-1)
        q, k, v = (self._pad(t) for t in (q, k, v))
        out = self.attn(q, k, v, meta).view(tokens, heads, self.head_dim)[..., :self.v_dim]
        return self.o_proj(out.reshape(tokens, -1))

    def _pad(self, t: torch.Tensor) -> torch.Tensor:
        """[tokens, heads, d] -> [tokens, heads * head_dim], zeros after d (no effect on any score or output)."""
        return F.pad(t, (0, self.head_dim - t.shape[-1])).reshape(t.shape[0], -1)


def deepseek_moe(config: PretrainedConfig, arch: str) -> FusedMoE:
    v3 = arch == "DeepseekV3ForCausalLM"
    if not v3 and config.topk_method not in V2_TOPK_METHODS:
        raise NotImplementedError(f"DeepSeek-V2 topk_method={config.topk_method!r} is not supported by the engine "
                                  f"(only {', '.join(V2_TOPK_METHODS)})")
    grouped_routing = v3 or config.topk_method == "group_limited_greedy"
    grouped = GroupedTopK(
        num_groups=config.n_group if grouped_routing else 1,
        topk_groups=config.topk_group if grouped_routing else 1,
        routed_scaling_factor=float(config.routed_scaling_factor),
    )
    return FusedMoE(
        config.hidden_size, config.moe_intermediate_size, config.n_routed_experts, config.num_experts_per_tok,
        config.hidden_act, scoring="sigmoid" if v3 else "softmax", renormalize=v3 and bool(config.norm_topk_prob),
        shared_expert=LlamaMLP(config, arch, config.moe_intermediate_size * config.n_shared_experts),
        grouped=grouped, score_bias=v3, shared_expert_gate=False,
    )


class DeepseekDecoderLayer(LlamaDecoderLayer):
    """Llama's pre-norm layer around MLA and, past the first dense layers, the MoE."""

    def make_attention(self, config: PretrainedConfig, layer_idx: int, arch: str) -> nn.Module:
        return DeepseekAttention(config, arch)

    def make_mlp(self, config: PretrainedConfig, layer_idx: int, arch: str) -> nn.Module:
        dense = layer_idx < (config.first_k_dense_replace or 0)
        return LlamaMLP(config, arch) if dense else deepseek_moe(config, arch)


class DeepseekModel(LlamaModel):
    layer_class = DeepseekDecoderLayer


class DeepseekV2ForCausalLM(LlamaForCausalLM):
    model_class = DeepseekModel
    packed = GATE_UP_PACKED
    renames = [(".mlp.shared_experts.", ".mlp.shared_expert."),
               (".mlp.gate.e_score_correction_bias", ".mlp.score_bias")]
    expert_parts = LLAMA_EXPERTS


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    pass
