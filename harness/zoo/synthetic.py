"""Tiny seeded checkpoints built from Transformers config classes, with SmolLM2's real tokenizer."""
from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.zoo import smollm2

# Bump when _draw changes: the cache key must change with the weights it produces.
INIT_SCHEME = 2
# The SmolLM2 tokenizer's facts every recipe relies on (checked against the real tokenizer at build).
VOCAB_SIZE, BOS_ID, EOS_ID = 49152, 1, 2
# Attention and MLP outputs are scaled up so they, not the input embedding, dominate the residual
# stream: otherwise tied-embedding models mostly predict their input token again, and a broken
# attention would leave greedy output unchanged.
_BRANCH_OUTPUT_GAIN = 3.0
# Mean gap between the two largest logits a build must exceed, so greedy picks are not near-ties
# that float noise between two correct implementations could flip.
MIN_TOP1_TOP2_GAP = 0.5
_GAP_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n",
)

_COMMON = {
    "vocab_size": VOCAB_SIZE,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": EOS_ID,
    "max_position_embeddings": 2048,
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
}

# The Llama-style _COMMON fields that older config classes have no field for.
_NOT_LLAMA = ("intermediate_size", "num_key_value_heads", "rms_norm_eps")


@dataclass(frozen=True)
class Recipe:
    config_class: str  # a transformers config class name, e.g. "LlamaConfig"
    config: Mapping[str, Any]
    seed: int
    # _COMMON keys the config class has no field for (GPT-2 has no num_key_value_heads): left
    # out, so config.json does not claim a field the model ignores.
    omit: tuple[str, ...] = ()
    # Name suffix -> factor on that parameter's draw, for architectures that rescale a tensor
    # themselves (Gemma multiplies its embeddings by sqrt(hidden_size)).
    scales: Mapping[str, float] = field(default_factory=dict)

    def config_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in _COMMON.items() if k not in self.omit}, **self.config}

    def hf_config(self):
        import transformers

        return getattr(transformers, self.config_class)(**self.config_dict())

    def as_dict(self) -> dict[str, Any]:
        scales = {"scales": dict(self.scales)} if self.scales else {}
        return {
            "config_class": self.config_class, "config": self.config_dict(), "seed": self.seed,
            "init_scheme": INIT_SCHEME, **scales,
        }


RECIPES: dict[str, Recipe] = {
    # llama3 rope with original_max_position_embeddings=256 puts head_dim 16's frequencies in all
    # three regimes (kept, interpolated, divided by factor).
    "tiny-llama": Recipe("LlamaConfig", {
        "num_hidden_layers": 2, "tie_word_embeddings": False,
        "rope_parameters": {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256,
        },
    }, seed=0),
    # A 32-token window is crossed by ordinary test prompts, so the window is really exercised.
    "tiny-mistral": Recipe("MistralConfig", {
        "num_hidden_layers": 2, "tie_word_embeddings": False, "sliding_window": 32,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }, seed=1),
    "tiny-qwen2": Recipe("Qwen2Config", {
        "num_hidden_layers": 2, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    }, seed=2),
    # head_dim 32 != hidden_size / heads (16): an engine deriving head_dim from hidden_size breaks here.
    "tiny-qwen3": Recipe("Qwen3Config", {
        "num_hidden_layers": 3, "tie_word_embeddings": True, "head_dim": 32,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    }, seed=3),
    "tiny-gemma": Recipe("GemmaConfig", {
        "num_hidden_layers": 2, "head_dim": 16, "hidden_act": "gelu_pytorch_tanh",
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }, seed=4),
    # Caps low enough to bend real scores and logits; a 32-token window on the sliding layers;
    # query_pre_attn_scalar != head_dim, head_dim != hidden_size / heads. Embeddings drawn at
    # 1 / sqrt(hidden_size) cancel Gemma's scaling by sqrt(hidden_size): at unit scale they would
    # swamp the normed branch outputs and the model would only repeat its input token.
    "tiny-gemma2": Recipe("Gemma2Config", {
        "num_hidden_layers": 3, "head_dim": 32, "query_pre_attn_scalar": 24, "sliding_window": 32,
        "attn_logit_softcapping": 5.0, "final_logit_softcapping": 60.0, "tie_word_embeddings": False,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }, seed=5, scales={"embed_tokens.weight": 0.125}),
    # Local and global layers with different rope bases, the global one linearly scaled (as in
    # the larger Gemma 3 models). Embeddings shrunk as for tiny-gemma2, less so: they are also
    # the (tied) LM head.
    "tiny-gemma3": Recipe("Gemma3TextConfig", {
        "num_hidden_layers": 3, "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 32,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
        },
    }, seed=6, scales={"embed_tokens.weight": 0.25}),
    # GPT-2 stores Conv1D weights [in, out]; scale_attn_by_inverse_layer_idx makes each layer's
    # score scale differ.
    "tiny-gpt2": Recipe("GPT2Config", {
        "num_hidden_layers": 2, "n_inner": 192, "activation_function": "gelu_new",
        "scale_attn_by_inverse_layer_idx": True,
    }, seed=7, omit=_NOT_LLAMA),
    "tiny-gpt-bigcode": Recipe("GPTBigCodeConfig", {
        "num_hidden_layers": 2, "n_inner": 192, "multi_query": True,
    }, seed=8, omit=_NOT_LLAMA),
    # Rope on a quarter of each head (Pythia's rotary_pct), attention and MLP in parallel.
    "tiny-gpt-neox": Recipe("GPTNeoXConfig", {
        "num_hidden_layers": 2, "use_parallel_residual": True, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    }, seed=9, omit=("num_key_value_heads", "rms_norm_eps")),
    "tiny-persimmon": Recipe("PersimmonConfig", {
        "num_hidden_layers": 2, "qk_layernorm": True, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 25000.0, "partial_rotary_factor": 0.5},
    }, seed=10, omit=("num_key_value_heads", "rms_norm_eps")),
    # Every Granite multiplier away from 1 (and the attention one away from 1/sqrt(head_dim)).
    "tiny-granite": Recipe("GraniteConfig", {
        "num_hidden_layers": 2, "tie_word_embeddings": False, "embedding_multiplier": 0.5,
        "residual_multiplier": 0.5, "attention_multiplier": 0.1, "logits_scaling": 1.25,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }, seed=11),
    # Fused qkv / gate_up checkpoint tensors, rope on 3/4 of each head, a 32-token window.
    "tiny-phi3": Recipe("Phi3Config", {
        "num_hidden_layers": 2, "tie_word_embeddings": False, "sliding_window": 32,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
    }, seed=12),
    # Interleaved (gpt-j style) rope on half of each head, q/k/v biases, fused gate_up tensors.
    "tiny-glm": Recipe("GlmConfig", {
        "num_hidden_layers": 2, "tie_word_embeddings": False, "head_dim": 16, "attention_bias": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    }, seed=13),
    # LayerNorm1P, squared-ReLU ungated MLP, rope on half of each head.
    "tiny-nemotron": Recipe("NemotronConfig", {
        "num_hidden_layers": 2, "tie_word_embeddings": False, "head_dim": 16, "norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    }, seed=14, omit=("rms_norm_eps",)),
    # Parameter-free LayerNorm; clip_qkv low enough to clamp unit-scale projections.
    "tiny-olmo": Recipe("OlmoConfig", {
        "num_hidden_layers": 2, "tie_word_embeddings": False, "clip_qkv": 1.5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }, seed=15, omit=("rms_norm_eps",)),
    # Norms after attention and MLP, RMSNorm over the whole q and k projections.
    "tiny-olmo2": Recipe("Olmo2Config", {
        "num_hidden_layers": 2, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    }, seed=16),
    "tiny-starcoder2": Recipe("Starcoder2Config", {
        "num_hidden_layers": 2, "sliding_window": 32, "use_bias": True, "norm_epsilon": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
    }, seed=217, omit=("rms_norm_eps",)),
    # Per-head q/k LayerNorm weights; logit_scale away from 1.
    "tiny-cohere": Recipe("CohereConfig", {
        "num_hidden_layers": 2, "use_qk_norm": True, "logit_scale": 0.5, "layer_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }, seed=18, omit=("rms_norm_eps",)),
    # Sliding layers with rope around a global layer without any.
    "tiny-cohere2": Recipe("Cohere2Config", {
        "num_hidden_layers": 3, "logit_scale": 0.5, "layer_norm_eps": 1e-5, "sliding_window": 32,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }, seed=19, omit=("rms_norm_eps",)),
    # Attention and MLP in parallel, q/k LayerNorm, rope on 40% of each head.
    "tiny-phi": Recipe("PhiConfig", {
        "num_hidden_layers": 2, "qk_layernorm": True, "layer_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.4},
    }, seed=20, omit=("rms_norm_eps",)),
    # Interleaved rope on 8 of each head's 16 features.
    "tiny-gptj": Recipe("GPTJConfig", {
        "num_hidden_layers": 2, "n_inner": 192, "rotary_dim": 8,
    }, seed=21, omit=_NOT_LLAMA),
    # Separate LayerNorm weights for every q and k head, q/k/v biases, rope on a quarter.
    "tiny-stablelm": Recipe("StableLmConfig", {
        "num_hidden_layers": 2, "qk_layernorm": True, "use_qkv_bias": True, "layer_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    }, seed=22, omit=("rms_norm_eps",)),
    # OPT-350m's shape: LayerNorm after each sublayer, embeddings narrower than the model.
    "tiny-opt": Recipe("OPTConfig", {
        "num_hidden_layers": 2, "ffn_dim": 192, "word_embed_proj_dim": 32, "do_layer_norm_before": False,
    }, seed=23, omit=_NOT_LLAMA),
    # Six heads: the ALiBi slopes of a head count that is not a power of two.
    "tiny-bloom": Recipe("BloomConfig", {
        "num_hidden_layers": 2, "hidden_size": 96, "num_attention_heads": 6,
    }, seed=124, omit=_NOT_LLAMA),
    # The new decoder architecture: grouped K/V heads, parallel attention and MLP with a norm each.
    "tiny-falcon": Recipe("FalconConfig", {
        "num_hidden_layers": 2, "new_decoder_architecture": True, "num_kv_heads": 2, "ffn_hidden_size": 192,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }, seed=225, omit=_NOT_LLAMA),
    # Six heads (ALiBi slopes past the largest power of two), clip_qkv low enough to clamp.
    "tiny-mpt": Recipe("MptConfig", {
        "num_hidden_layers": 2, "hidden_size": 96, "num_attention_heads": 6, "attn_config": {"clip_qkv": 1.5},
    }, seed=226, omit=_NOT_LLAMA),
    # Sparse MoE (engine/layers/moe.py): 4 experts, top-2, each recipe with its own routing.
    "tiny-mixtral": Recipe("MixtralConfig", {
        "num_hidden_layers": 2, "tie_word_embeddings": False, "num_local_experts": 4, "num_experts_per_tok": 2,
        "sliding_window": 32, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    }, seed=27),
    # Un-renormalised top-2 weights, a gated shared expert, the second layer dense (mlp_only_layers).
    "tiny-qwen2-moe": Recipe("Qwen2MoeConfig", {
        "num_hidden_layers": 2, "tie_word_embeddings": False, "num_experts": 4, "num_experts_per_tok": 2,
        "moe_intermediate_size": 96, "shared_expert_intermediate_size": 128, "norm_topk_prob": False,
        "mlp_only_layers": [1], "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    }, seed=128),
    # q/k RMSNorm over all heads, then clipping low enough to clamp; renormalised top-2.
    "tiny-olmoe": Recipe("OlmoeConfig", {
        "num_hidden_layers": 2, "tie_word_embeddings": False, "num_experts": 4, "num_experts_per_tok": 2,
        "norm_topk_prob": True, "clip_qkv": 1.5, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }, seed=29),
    # Sparsemixer routing with a jitter threshold wide enough to mask some experts out of the softmax;
    # LayerNorms with biases, attention and LM-head biases.
    "tiny-phimoe": Recipe("PhimoeConfig", {
        "num_hidden_layers": 2, "tie_word_embeddings": False, "num_local_experts": 4, "num_experts_per_tok": 2,
        "router_jitter_noise": 0.1, "attention_bias": True, "lm_head_bias": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    }, seed=30),
    # Softmax over the top-2 logits; every Granite multiplier away from 1.
    "tiny-granitemoe": Recipe("GraniteMoeConfig", {
        "num_hidden_layers": 2, "tie_word_embeddings": False, "num_local_experts": 4, "num_experts_per_tok": 2,
        "embedding_multiplier": 0.5, "residual_multiplier": 0.5, "attention_multiplier": 0.1, "logits_scaling": 1.25,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }, seed=31),
    # DBRX names its sizes its own way; clip_qkv low enough to clamp, renormalised top-2 of 4 experts.
    "tiny-dbrx": Recipe("DbrxConfig", {
        "d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 2048, "tie_word_embeddings": False,
        "attn_config": {"kv_n_heads": 2, "clip_qkv": 1.5, "rope_theta": 10000.0},
        "ffn_config": {"ffn_hidden_size": 96, "moe_num_experts": 4, "moe_top_k": 2},
    }, seed=232, omit=_NOT_LLAMA + ("hidden_size", "num_attention_heads", "max_position_embeddings")),
    # Multi-head latent attention (q through its low-rank bottleneck, v_head_dim 12 below the 24 of
    # q/k heads), yarn rope on 8 of each head's features with the softmax scale's mscale, 8 experts
    # in 4 groups of which the best 2 are routable, top-3 (so the group limit can bind), 2 shared experts.
    "tiny-deepseek-v2": Recipe("DeepseekV2Config", {
        "num_hidden_layers": 2, "tie_word_embeddings": False, "num_key_value_heads": 4,
        "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12,
        "n_routed_experts": 8, "num_experts_per_tok": 3, "n_group": 4, "topk_group": 2,
        "topk_method": "group_limited_greedy", "n_shared_experts": 2, "moe_intermediate_size": 32,
        "routed_scaling_factor": 1.5,
        "rope_parameters": {
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 512,
            "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
        },
    }, seed=33),
    # The same attention with interleaved rope pairs de-interleaved, a dense first layer, sigmoid
    # routing steered by a score correction bias (drawn, not zero), renormalised and scaled weights.
    "tiny-deepseek-v3": Recipe("DeepseekV3Config", {
        "num_hidden_layers": 3, "tie_word_embeddings": False, "num_key_value_heads": 4,
        "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "norm_topk_prob": True,
        "n_shared_experts": 1, "moe_intermediate_size": 32, "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 1, "rope_interleave": True,
        "rope_parameters": {
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 256,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8,
        },
    }, seed=34),
    # --- Architectures the engine runs only through the Transformers backend ---
    # MLA attention like DeepSeek's but with plain (non-interleaved) rope, values narrower than
    # queries and keys, embeddings scaled by scale_emb (drawn at 1 / scale_emb, so untied), logits
    # by dim_model_base / hidden and each residual branch by scale_depth / sqrt(layers).
    "tiny-minicpm3": Recipe("MiniCPM3Config", {
        "num_hidden_layers": 2, "num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 32,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12, "scale_emb": 12, "scale_depth": 1.4,
        "dim_model_base": 32, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }, seed=35, scales={"embed_tokens.weight": 1 / 12}),
    # Squared-ReLU MLP without a gate.
    "tiny-arcee": Recipe("ArceeConfig", {
        "num_hidden_layers": 2, "head_dim": 16, "hidden_act": "relu2", "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }, seed=36),
    # Every second layer without rope (NoPE).
    "tiny-smollm3": Recipe("SmolLM3Config", {
        "num_hidden_layers": 4, "no_rope_layer_interval": 2, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 2000000.0},
    }, seed=37),
    "tiny-helium": Recipe("HeliumConfig", {
        "num_hidden_layers": 2, "head_dim": 16, "rms_norm_eps": 1e-8, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
    }, seed=38),
    # OLMo 2's norms with sliding-window layers (window 32) before a global one.
    "tiny-olmo3": Recipe("Olmo3Config", {
        "num_hidden_layers": 3, "sliding_window": 32, "tie_word_embeddings": False,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 500000.0},
        },
    }, seed=39),
    # Post-attention and post-MLP norms, q/k/v bias, interleaved rope on half of each head.
    "tiny-glm4": Recipe("Glm4Config", {
        "num_hidden_layers": 2, "head_dim": 16, "attention_bias": True, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    }, seed=40),
    # Qwen3 attention (q/k norm) with 4 experts top-2, renormalised, on every layer.
    "tiny-qwen3-moe": Recipe("Qwen3MoeConfig", {
        "num_hidden_layers": 2, "head_dim": 32, "num_experts": 4, "num_experts_per_tok": 2,
        "moe_intermediate_size": 32, "norm_topk_prob": True, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    }, seed=41),
    # Post-norms and q/k norm, sliding-window layers (window 32) around a global one without rope.
    "tiny-exaone4": Recipe("Exaone4Config", {
        "num_hidden_layers": 3, "sliding_window": 32, "sliding_window_pattern": 3, "tie_word_embeddings": False,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }, seed=42),
    # q/k/v bias without an output-projection bias.
    "tiny-seed-oss": Recipe("SeedOssConfig", {
        "num_hidden_layers": 2, "head_dim": 16, "attention_bias": True, "attention_out_bias": False,
        "tie_word_embeddings": False, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }, seed=43),
    # Interleaved (gpt-j style) rope pairs, tied embeddings.
    "tiny-ernie4_5": Recipe("Ernie4_5Config", {
        "num_hidden_layers": 2, "head_dim": 16, "use_bias": False, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    }, seed=44),
}


def fingerprint(recipe: Recipe) -> str:
    key = {**recipe.as_dict(), "tokenizer_sha256": smollm2.gguf_sha256()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def build(recipe: Recipe, directory: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    tokenizer = smollm2.tokenizer()
    _check_tokenizer(tokenizer)
    config = recipe.hf_config()
    # HF's init draws from the global RNG; forking keeps the caller's random state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _reinitialise(model, torch.Generator().manual_seed(recipe.seed), recipe.scales)
    gap = mean_top1_top2_gap(model.eval(), tokenizer)
    if gap <= MIN_TOP1_TOP2_GAP:
        raise RuntimeError(f"recipe {recipe.config_class} seed {recipe.seed}: mean top1-top2 logit gap {gap:.3f}"
                           f" <= {MIN_TOP1_TOP2_GAP}; greedy decoding would be fragile")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return {
        "recipe": recipe.as_dict(),
        "recipe_fingerprint": fingerprint(recipe),
        "tokenizer_source": smollm2.source_provenance(),
        "mean_top1_top2_gap": round(gap, 4),
    }


@torch.no_grad()
def mean_top1_top2_gap(model, tokenizer) -> float:
    gaps = []
    for prompt in _GAP_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        top2 = model(input_ids=ids).logits[0].topk(2, dim=-1).values
        gaps.append(top2[:, 0] - top2[:, 1])
    return torch.cat(gaps).mean().item()


def _check_tokenizer(tokenizer) -> None:
    found = (len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    if found != (VOCAB_SIZE, BOS_ID, EOS_ID):
        raise RuntimeError(f"the SmolLM2 tokenizer has (vocab, bos, eos) = {found}, the recipes assume "
                           f"{(VOCAB_SIZE, BOS_ID, EOS_ID)}")


def _reinitialise(model: torch.nn.Module, generator: torch.Generator, scales: Mapping[str, float]) -> None:
    # Sorted names: the draw order, hence the bytes, must not depend on module registration order.
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            draw = _draw(name, param.shape, generator)
            scale = next((factor for suffix, factor in scales.items() if name.endswith(suffix)), None)
            param.copy_(draw if scale is None else scale * draw)
        # Learned constants kept as buffers (DeepSeek-V3's router score correction bias): drawn too,
        # or a model ignoring them would pass.
        for name, buffer in sorted(model.named_buffers()):
            if name.endswith(_LEARNED_BUFFERS):
                buffer.copy_(_draw(name, buffer.shape, generator))


# Parameter names per role across the families' Transformers classes (the Llama-style names first,
# which the original rules matched: their draws are unchanged).
_NORM_WEIGHT = re.compile(r"(norm|norm_\w+|ln_\w+|norms\.\d+|LayerNorm)\.weight$")
_EMBEDDINGS = (
    "embed_tokens.weight", "lm_head.weight", "wte.weight", "wpe.weight", "word_embeddings.weight",
    "embed_in.weight", "embed_out.weight", "embed_positions.weight",
)
# The projections writing into the residual stream, scaled by _BRANCH_OUTPUT_GAIN.
_BRANCH_OUTPUTS = (
    "o_proj.weight", "down_proj.weight", "c_proj.weight", "dense.weight", "dense_4h_to_h.weight",
    "out_proj.weight", "fc2.weight", "fc_out.weight",
)


_LEARNED_BUFFERS = ("e_score_correction_bias",)


def is_norm_weight(name: str) -> bool:
    return _NORM_WEIGHT.search(name) is not None


def _draw(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Weights far from HF's tiny init: logits spread wide, and every norm weight differs from 1."""
    if is_norm_weight(name):
        return 0.75 + 0.5 * torch.rand(shape, generator=generator)
    if name.endswith((".bias",) + _LEARNED_BUFFERS):
        return 0.2 * torch.randn(shape, generator=generator)
    if name.endswith(_EMBEDDINGS):
        # Unit scale against an RMS-normed hidden state gives logits with std ~ sqrt(hidden_size).
        return torch.randn(shape, generator=generator)
    if len(shape) == 2:
        # 1/sqrt(fan_in) keeps activations at unit scale through every projection.
        scale = _BRANCH_OUTPUT_GAIN if name.endswith(_BRANCH_OUTPUTS) else 1.0
        return scale * torch.randn(shape, generator=generator) / math.sqrt(shape[1])
    if len(shape) == 3:
        # Stacked MoE experts [experts, out, in] (Transformers' fused gate_up_proj / down_proj):
        # each expert drawn like a 2-D projection.
        scale = _BRANCH_OUTPUT_GAIN if name.endswith("down_proj") else 1.0
        return scale * torch.randn(shape, generator=generator) / math.sqrt(shape[2])
    raise ValueError(f"no initialisation rule for parameter {name} of shape {tuple(shape)}")
