"""Tiny seeded checkpoints built from Transformers config classes, with SmolLM2's real tokenizer."""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Recipe:
    config_class: str  # a transformers config class name, e.g. "LlamaConfig"
    config: Mapping[str, Any]
    seed: int

    def hf_config(self):
        import transformers

        return getattr(transformers, self.config_class)(**_COMMON, **self.config)

    def as_dict(self) -> dict[str, Any]:
        return {
            "config_class": self.config_class, "config": {**_COMMON, **self.config}, "seed": self.seed,
            "init_scheme": INIT_SCHEME,
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
    _reinitialise(model, torch.Generator().manual_seed(recipe.seed))
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


def _reinitialise(model: torch.nn.Module, generator: torch.Generator) -> None:
    # Sorted names: the draw order, hence the bytes, must not depend on module registration order.
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            param.copy_(_draw(name, param.shape, generator))


def _draw(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Weights far from HF's tiny init: logits spread wide, and every norm weight differs from 1."""
    if name.endswith("norm.weight"):
        return 0.75 + 0.5 * torch.rand(shape, generator=generator)
    if name.endswith(".bias"):
        return 0.2 * torch.randn(shape, generator=generator)
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        # Unit scale against an RMS-normed hidden state gives logits with std ~ sqrt(hidden_size).
        return torch.randn(shape, generator=generator)
    if len(shape) == 2:
        # 1/sqrt(fan_in) keeps activations at unit scale through every projection.
        scale = _BRANCH_OUTPUT_GAIN if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
        return scale * torch.randn(shape, generator=generator) / math.sqrt(shape[1])
    raise ValueError(f"no initialisation rule for parameter {name} of shape {tuple(shape)}")
