"""The Llama family: Llama, Mistral, Qwen2, Qwen3, Granite, Phi-3, GLM, Nemotron, OLMo, OLMo 2,
Starcoder2, and the sparse-MoE Mixtral, Qwen2-MoE, OLMoE, PhiMoE and GraniteMoE — one
implementation, variants by config.

What differs between them:
- Qwen2 has biases on q/k/v (not o); GLM's `attention_bias` covers q/k/v only; Llama's all four
  (Starcoder2 calls it `use_bias`, and it covers the MLP too).
- Qwen3 normalises each head's q and k (RMSNorm over head_dim) before rope; OLMo 2 normalises
  the whole q and k projections (RMSNorm over all heads at once).
- Norms: RMSNorm, except Nemotron's LayerNorm1P (weight stored as an offset from 1), OLMo's
  LayerNorm without parameters and Starcoder2's LayerNorm with biases.
- OLMo 2 puts its norms after attention and after the MLP instead of before them.
- OLMo clamps q, k and v to +-clip_qkv when the config sets it.
- Nemotron's MLP is ungated (up_proj, squared ReLU, down_proj); Starcoder2's too (c_fc, c_proj,
  renamed on load).
- Sliding window: per layer from `layer_types` when the config has it (Qwen2, Qwen3),
  otherwise on every layer when `sliding_window` is set (Mistral, Phi-3).
- Granite scales embeddings, branch outputs, attention scores and logits by the config's
  embedding_multiplier, residual_multiplier, attention_multiplier and logits_scaling.
- Phi-3 checkpoints store q/k/v and gate/up already fused; GLM's store gate/up fused.
- GLM rotates interleaved pairs (gpt-j style) on half of each head; Phi-3 may rotate part of it
  (partial_rotary_factor).
- The MoE variants swap the MLP for engine/layers/moe.py's FusedMoE: Mixtral and PhiMoE are
  Mistral-shaped (PhiMoE with LayerNorms, biases and sparsemixer routing), Qwen2-MoE adds a gated
  shared expert and may keep some layers dense, OLMoE normalises q and k like OLMo 2 and clips
  after that, GraniteMoE keeps Granite's multipliers.
- Tied embeddings, rope scaling (`rope_parameters`), MLP bias: straight from the config.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from engine.layers.activation import GatedActivation, get_act_fn
from engine.layers.attention import Attention, AttentionMetadata
from engine.layers.moe import FusedMoE, stack_experts
from engine.layers.norm import LayerNorm, RMSNorm
from engine.layers.rotary import get_rope
from engine.models.utils import Packed, fused_linear, load_weights

QKV_PACKED = [Packed("qkv_proj", "q_proj", 0), Packed("qkv_proj", "k_proj", 1), Packed("qkv_proj", "v_proj", 2)]
GATE_UP_PACKED = [Packed("gate_up_proj", "gate_proj", 0), Packed("gate_up_proj", "up_proj", 1)]
PACKED = QKV_PACKED + GATE_UP_PACKED


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window_of(config: PretrainedConfig, layer_idx: int) -> int | None:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window


MOE_ARCHS = (
    "MixtralForCausalLM", "Qwen2MoeForCausalLM", "OlmoeForCausalLM", "PhimoeForCausalLM", "GraniteMoeForCausalLM",
)


def num_experts_of(config: PretrainedConfig) -> int:
    return getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0


def norm_factory(config: PretrainedConfig, arch: str) -> Callable[[int], nn.Module]:
    """The norm a variant uses, as a function of its size."""
    if arch == "NemotronForCausalLM":
        return lambda size: LayerNorm(size, config.norm_eps, weight_offset=1.0)
    if arch == "OlmoForCausalLM":
        # Transformers fixes this norm's eps at 1e-5, whatever the config says.
        return lambda size: LayerNorm(size, 1e-5, affine=False)
    if arch == "Starcoder2ForCausalLM":
        return lambda size: LayerNorm(size, config.norm_epsilon)
    if arch == "PhimoeForCausalLM":
        return lambda size: LayerNorm(size, config.rms_norm_eps)
    return lambda size: RMSNorm(size, config.rms_norm_eps)


def bias_of(config: PretrainedConfig, field: str) -> bool:
    """attention_bias / mlp_bias, or Starcoder2's use_bias covering both."""
    value = getattr(config, field, None)
    return bool(value if value is not None else getattr(config, "use_bias", False))


class LlamaAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int, arch: str):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_size, self.kv_size = q_size, kv_size
        bias = bias_of(config, "attention_bias")
        qkv_bias = True if arch == "Qwen2ForCausalLM" else bool(getattr(config, "qkv_bias", bias))
        o_bias = False if arch in ("Qwen2ForCausalLM", "GlmForCausalLM") else bias
        self.qkv_proj = fused_linear(config.hidden_size, [q_size, kv_size, kv_size], qkv_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=o_bias)
        self.qk_norm = {
            "Qwen3ForCausalLM": "per_head", "Olmo2ForCausalLM": "full", "OlmoeForCausalLM": "full",
        }.get(arch)
        if self.qk_norm is not None:
            per_head = self.qk_norm == "per_head"
            self.q_norm = RMSNorm(self.head_dim if per_head else q_size, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim if per_head else kv_size, config.rms_norm_eps)
        self.clip_qkv = getattr(config, "clip_qkv", None)
        # OLMoE clips the normed q and k; OLMo clips the raw projections.
        self.clip_after_norm = arch == "OlmoeForCausalLM"
        self.rotary_emb = get_rope(self.head_dim, config.max_position_embeddings, config.rope_parameters,
                                   is_neox_style=arch != "GlmForCausalLM")
        scale = getattr(config, "attention_multiplier", None) or self.head_dim ** -0.5
        self.attn = Attention(
            self.num_heads, self.head_dim, scale, self.num_kv_heads,
            sliding_window=sliding_window_of(config, layer_idx),
        )

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if self.clip_qkv is not None and not self.clip_after_norm:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm == "per_head":
            q = self.q_norm(q.reshape(-1, self.num_heads, self.head_dim)).view(q.shape)
            k = self.k_norm(k.reshape(-1, self.num_kv_heads, self.head_dim)).view(k.shape)
        elif self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None and self.clip_after_norm:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, meta))


class LlamaMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, arch: str, intermediate_size: int | None = None):
        super().__init__()
        bias = bias_of(config, "mlp_bias")
        inter = intermediate_size or config.intermediate_size
        self.gated = arch not in ("NemotronForCausalLM", "Starcoder2ForCausalLM")
        if self.gated:
            self.gate_up_proj = fused_linear(config.hidden_size, [inter, inter], bias)
            self.act = GatedActivation(config.hidden_act, self.gate_up_proj)
        else:
            self.up_proj = nn.Linear(config.hidden_size, inter, bias=bias)
            self.act = get_act_fn(config.hidden_act)
        self.down_proj = nn.Linear(inter, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act.project(self.gate_up_proj, x) if self.gated else self.act(self.up_proj(x)))


def is_moe_layer(config: PretrainedConfig, layer_idx: int, arch: str) -> bool:
    if arch not in MOE_ARCHS or num_experts_of(config) == 0:
        return False
    # Qwen2-MoE may keep listed layers, or all but every n-th one, dense.
    if layer_idx in (getattr(config, "mlp_only_layers", None) or []):
        return False
    return (layer_idx + 1) % (getattr(config, "decoder_sparse_step", None) or 1) == 0


def moe_mlp(config: PretrainedConfig, arch: str) -> FusedMoE:
    shared_size = getattr(config, "shared_expert_intermediate_size", None)
    return FusedMoE(
        config.hidden_size, getattr(config, "moe_intermediate_size", None) or config.intermediate_size,
        num_experts_of(config), config.num_experts_per_tok, config.hidden_act,
        scoring={"GraniteMoeForCausalLM": "topk_softmax", "PhimoeForCausalLM": "sparsemixer"}.get(arch, "softmax"),
        renormalize=arch == "MixtralForCausalLM" or bool(getattr(config, "norm_topk_prob", False)),
        jitter_eps=float(getattr(config, "router_jitter_noise", 0.0) or 0.0),
        shared_expert=LlamaMLP(config, arch, shared_size) if shared_size else None,
    )


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_idx: int, arch: str):
        super().__init__()
        self.self_attn = self.make_attention(config, layer_idx, arch)
        self.mlp = self.make_mlp(config, layer_idx, arch)
        norm = norm_factory(config, arch)
        self.post_norms = arch == "Olmo2ForCausalLM"
        if self.post_norms:
            self.post_feedforward_layernorm = norm(config.hidden_size)
        else:
            self.input_layernorm = norm(config.hidden_size)
        self.post_attention_layernorm = norm(config.hidden_size)
        self.residual_multiplier = float(getattr(config, "residual_multiplier", 1.0))

    # A family with Llama's residual stream and norms but its own attention or MLP (DeepSeek) overrides these.
    def make_attention(self, config: PretrainedConfig, layer_idx: int, arch: str) -> nn.Module:
        return LlamaAttention(config, layer_idx, arch)

    def make_mlp(self, config: PretrainedConfig, layer_idx: int, arch: str) -> nn.Module:
        return moe_mlp(config, arch) if is_moe_layer(config, layer_idx, arch) else LlamaMLP(config, arch)

    def forward(self, positions, x, residual, meta):
        if self.post_norms:
            return self._forward_post_norms(positions, x, residual, meta)
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        if self.residual_multiplier != 1.0:
            x = x * self.residual_multiplier
        x, residual = self.post_attention_layernorm(x, residual)
        x = self.mlp(x)
        if self.residual_multiplier != 1.0:
            x = x * self.residual_multiplier
        return x, residual

    def _forward_post_norms(self, positions, x, residual, meta):
        # The attention reads the residual stream itself, so the pending add happens first.
        if residual is not None:
            x = x + residual
        x = x + self.post_attention_layernorm(self.self_attn(positions, x, meta))
        return self.post_feedforward_layernorm(self.mlp(x)), x


class LlamaModel(nn.Module):
    # A family with the same residual stream and its own layers (DeepSeek) swaps this.
    layer_class: type[nn.Module] = LlamaDecoderLayer

    def __init__(self, config: PretrainedConfig, arch: str):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            self.layer_class(config, i, arch) for i in range(config.num_hidden_layers)
        )
        self.norm = norm_factory(config, arch)(config.hidden_size)
        self.embedding_multiplier = float(getattr(config, "embedding_multiplier", 1.0))

    def forward(self, input_ids, positions, meta):
        x = self.embed_tokens(input_ids)
        if self.embedding_multiplier != 1.0:
            x = x * self.embedding_multiplier
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    # The fused parameters the checkpoint stores split.
    packed: list[Packed] = PACKED
    # (checkpoint, engine) module name pieces, for a variant whose checkpoint names differ.
    renames: list[tuple[str, str]] = []
    # MoE variants: per-expert checkpoint part -> (stacked parameter, shard) (engine/layers/moe.py).
    expert_parts: dict[str, tuple[str, int]] = {}
    model_class: type[LlamaModel] = LlamaModel

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.config = config
        self.model = self.model_class(config, type(self).__name__)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        lm_head_bias = bool(getattr(config, "lm_head_bias", False))  # PhiMoE
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=lm_head_bias)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.logits_scaling = float(getattr(config, "logits_scaling", 1.0))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.logits_scaling != 1.0:
            logits = logits / self.logits_scaling
        return logits.float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        skip = ("rotary_emb.inv_freq",) + (("lm_head.",) if self.tie_word_embeddings else ())
        if self.expert_parts:
            weights = stack_experts(weights, self.expert_parts, num_experts_of(self.config))
        load_weights(self, weights, self.packed, skip=skip, renames=self.renames)


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass


class Qwen3ForCausalLM(LlamaForCausalLM):
    pass


class GraniteForCausalLM(LlamaForCausalLM):
    pass


class Phi3ForCausalLM(LlamaForCausalLM):
    packed = []


class GlmForCausalLM(LlamaForCausalLM):
    packed = QKV_PACKED


class NemotronForCausalLM(LlamaForCausalLM):
    packed = QKV_PACKED


class OlmoForCausalLM(LlamaForCausalLM):
    pass


class Olmo2ForCausalLM(LlamaForCausalLM):
    pass


class Starcoder2ForCausalLM(LlamaForCausalLM):
    packed = QKV_PACKED
    renames = [(".mlp.c_fc.", ".mlp.up_proj."), (".mlp.c_proj.", ".mlp.down_proj.")]


MIXTRAL_EXPERTS = {"w1": ("w13", 0), "w3": ("w13", 1), "w2": ("w2", 0)}
LLAMA_EXPERTS = {"gate_proj": ("w13", 0), "up_proj": ("w13", 1), "down_proj": ("w2", 0)}


class MixtralForCausalLM(LlamaForCausalLM):
    renames = [(".block_sparse_moe.", ".mlp.")]
    expert_parts = MIXTRAL_EXPERTS


class PhimoeForCausalLM(LlamaForCausalLM):
    renames = [(".block_sparse_moe.", ".mlp.")]
    expert_parts = MIXTRAL_EXPERTS


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    expert_parts = LLAMA_EXPERTS


class OlmoeForCausalLM(LlamaForCausalLM):
    expert_parts = LLAMA_EXPERTS


class GraniteMoeForCausalLM(LlamaForCausalLM):
    # The checkpoint already stacks its experts, [gate | up] in input_linear.
    renames = [
        (".block_sparse_moe.input_linear.weight", ".mlp.experts.w13"),
        (".block_sparse_moe.output_linear.weight", ".mlp.experts.w2"),
        (".block_sparse_moe.router.layer.", ".mlp.gate."),
    ]
