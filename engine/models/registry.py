"""HF architecture name -> engine implementation (imported lazily), with the docs metadata."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelImpl:
    module: str  # engine.models.<module>
    class_name: str
    tasks: tuple[str, ...] = ("generate",)

    def load_class(self) -> type[nn.Module]:
        return getattr(importlib.import_module(f"engine.models.{self.module}"), self.class_name)


_NATIVE: dict[str, ModelImpl] = {
    "LlamaForCausalLM": ModelImpl("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ModelImpl("llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ModelImpl("llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ModelImpl("llama", "Qwen3ForCausalLM"),
}


# How LLM(model_impl=...) chooses: "auto" takes the native implementation when there is one,
# else the Transformers backend (engine/models/transformers_backend.py).
MODEL_IMPLS = ("auto", "native", "transformers")


class UnsupportedArchitectureError(ValueError):
    pass


def supported_architectures() -> list[str]:
    return sorted(_NATIVE)


def get_model_impl(architectures: list[str] | None) -> tuple[str, ModelImpl]:
    """The first of a config's architectures that the engine implements."""
    for arch in architectures or []:
        if arch in _NATIVE:
            return arch, _NATIVE[arch]
    raise UnsupportedArchitectureError(
        f"architecture {architectures!r} is not supported by the engine; "
        f"supported: {', '.join(supported_architectures())}"
    )


def check_model_impl(model_impl: str) -> None:
    if model_impl not in MODEL_IMPLS:
        raise ValueError(f"model_impl={model_impl!r} is invalid; use one of {', '.join(MODEL_IMPLS)}")


def resolve_model_impl(architectures: list[str] | None, model_impl: str) -> str:
    """Which implementation runs the model: "native" or "transformers"."""
    check_model_impl(model_impl)
    if model_impl == "transformers":
        return "transformers"
    if any(arch in _NATIVE for arch in architectures or []):
        return "native"
    if model_impl == "auto":
        return "transformers"
    raise UnsupportedArchitectureError(
        f"architecture {architectures!r} has no native implementation in the engine (native: "
        f"{', '.join(supported_architectures())}); model_impl='transformers' or 'auto' runs it through the "
        f"Transformers backend"
    )
