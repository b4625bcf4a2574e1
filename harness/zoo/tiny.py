"""A tiny seeded checkpoint of any architecture Transformers defines, made from its config class.

The smoke tier needs every registered architecture to load and run, including those the zoo has
no hand-tuned recipe for (harness/zoo/synthetic.py). These checkpoints only have to be well
formed: Transformers' own seeded initialisation, the config class's defaults shrunk to a few
small layers, and SmolLM2's real tokenizer. They are cached like zoo models, keyed by a hash of
everything the files depend on (the full config, so a Transformers upgrade that changes a
default rebuilds them).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import transformers

from harness.zoo import smollm2
from harness.zoo.store import build_atomically, zoo_dir
from harness.zoo.synthetic import BOS_ID, EOS_ID, VOCAB_SIZE

# Set only where the config class has the field: names differ between families, and a derived
# field (Falcon's head_dim is a property) cannot be set at all. The expert counts keep MoE models
# tiny; everything else keeps the class's defaults, which is the variant Transformers ships.
_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 2048,
    "num_local_experts": 4,
    "num_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 64,
}
_TOKENS = {"vocab_size": VOCAB_SIZE, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID}


class NotInTransformersError(ValueError):
    pass


def model_class(architecture: str) -> type[transformers.PreTrainedModel]:
    cls = getattr(transformers, architecture, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise NotInTransformersError(
            f"{architecture} is not a model class of Transformers {transformers.__version__}, so no tiny "
            f"checkpoint can be made from its config class"
        )
    return cls


def tiny_config(architecture: str) -> transformers.PretrainedConfig:
    config_class = model_class(architecture).config_class
    defaults = config_class()
    settable = {
        name: value for name, value in _SIZES.items()
        if hasattr(defaults, name) and not isinstance(getattr(config_class, name, None), property)
    }
    config = config_class(**settable, **_TOKENS)
    config.architectures = [architecture]
    return config


def fingerprint(architecture: str, seed: int) -> str:
    key = {
        "architecture": architecture, "config": tiny_config(architecture).to_dict(), "seed": seed,
        "tokenizer_sha256": smollm2.gguf_sha256(),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def tiny_model_path(architecture: str, seed: int = 0) -> Path:
    """The checkpoint's HF directory, built on first use."""
    directory = zoo_dir() / f"tiny-{architecture}-{fingerprint(architecture, seed)}"
    return build_atomically(directory, lambda tmp: _build(architecture, seed, tmp))


def _build(architecture: str, seed: int, directory: Path) -> dict[str, Any]:
    config = tiny_config(architecture)
    # HF's init draws from the global RNG; forking keeps the caller's random state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(architecture)(config)
    model.save_pretrained(directory)
    smollm2.tokenizer().save_pretrained(directory)
    return {
        "name": f"tiny-{architecture}", "architecture": architecture, "kind": "synthetic", "trained": False,
        "config_class": type(config).__name__, "seed": seed, "init": "transformers default",
        "transformers_version": transformers.__version__, "torch_version": torch.__version__,
        "tokenizer_source": smollm2.source_provenance(),
    }
