"""Finding a model on local disk and reading its HF config and tokenizer, never touching a hub."""
from __future__ import annotations

import copy
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

HfOverrides = dict[str, Any] | Callable[[PretrainedConfig], PretrainedConfig]


class ModelNotFoundError(FileNotFoundError, ValueError):
    """The model string is neither a local checkpoint nor a repository in the local HF cache."""


class WeightsError(ValueError):
    """A checkpoint's weights are absent, unreadable, or do not fit the model."""


@dataclass(frozen=True)
class ModelSource:
    path: Path  # directory holding config/tokenizer files
    gguf_file: Path | None = None


ModelRef = ModelSource | str | os.PathLike[str]


def resolve_model(model: str | os.PathLike[str], revision: str | None = None) -> ModelSource:
    """A local HF directory, a local .gguf file, or a hub id already in the local HF cache."""
    source = _locate(model, revision)
    if source.gguf_file is None and not (source.path / "config.json").is_file():
        raise ModelNotFoundError(
            f"model {str(model)!r}: directory {source.path} has no config.json, so it is not a Hugging Face "
            f"model directory"
        )
    return source


def load_hf_config(
    source: ModelRef, *, trust_remote_code: bool = False, revision: str | None = None,
    hf_overrides: HfOverrides | None = None,
) -> PretrainedConfig:
    source = _as_source(source, revision)
    if source.gguf_file is not None:
        config = _gguf_config(source.gguf_file)
    else:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    config = _apply_overrides(config, hf_overrides)
    if not getattr(config, "architectures", None):
        raise ValueError(
            f"the config of {source.gguf_file or source.path} names no architectures, so the model class "
            f"cannot be chosen; add \"architectures\": [\"<Class>ForCausalLM\"] to config.json or pass "
            f"hf_overrides={{'architectures': [...]}}"
        )
    return config


def load_tokenizer(source: ModelRef, *, trust_remote_code: bool = False, revision: str | None = None):
    # A separate tokenizer may live in a directory with no config.json, so no config check here.
    if not isinstance(source, ModelSource):
        source = _locate(source, revision)
    if source.gguf_file is not None:
        return AutoTokenizer.from_pretrained(source.gguf_file.parent, gguf_file=source.gguf_file.name)
    return AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)


def hf_cache_dir() -> Path:
    """Read at call time, not import time, so HF_HUB_CACHE / HF_HOME set later still count."""
    if cache := os.environ.get("HF_HUB_CACHE"):
        return Path(cache).expanduser()
    if home := os.environ.get("HF_HOME"):
        return Path(home).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _as_source(source: ModelRef, revision: str | None) -> ModelSource:
    return source if isinstance(source, ModelSource) else resolve_model(source, revision)


def _locate(model: str | os.PathLike[str], revision: str | None) -> ModelSource:
    if not str(model):
        raise ModelNotFoundError("model is an empty string; give a zoo name, a local path or a hub id")
    path = Path(model).expanduser()
    if path.is_dir():
        return ModelSource(path.resolve())
    if path.is_file() and path.suffix == ".gguf":
        path = path.resolve()
        return ModelSource(path.parent, gguf_file=path)
    snapshot = _cached_snapshot(str(model), revision)
    if snapshot is None:
        at = f" at revision {revision!r}" if revision else ""
        raise ModelNotFoundError(
            f"model {str(model)!r} not found: it is not a local directory, not a .gguf file, and not in the "
            f"Hugging Face cache{at} at {hf_cache_dir()} (set HF_HUB_CACHE or HF_HOME to use another cache; "
            f"models are never downloaded from a hub)"
        )
    return ModelSource(snapshot)


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        found = snapshot_download(
            repo_id, revision=revision, cache_dir=hf_cache_dir(), local_files_only=True
        )
    except (HFValidationError, LocalEntryNotFoundError):
        return None
    return Path(found)


def _gguf_config(gguf_file: Path) -> PretrainedConfig:
    stat = gguf_file.stat()
    # Parsing GGUF metadata takes seconds (tens of thousands of vocabulary strings) and the engine
    # asks twice: once for its config, once to name the weights. The cache is keyed by size and
    # mtime too, so a replaced file is parsed afresh; copies keep callers independent.
    return copy.deepcopy(_parsed_gguf_config(gguf_file, stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _parsed_gguf_config(gguf_file: Path, size: int, mtime_ns: int) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    # GGUF metadata records the model type but never the HF class; the causal-LM class is what
    # from_pretrained(gguf_file=...) would build.
    if not getattr(config, "architectures", None):
        causal_lm = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
        if causal_lm is not None:
            config.architectures = [causal_lm]
    return config


def _apply_overrides(config: PretrainedConfig, overrides: HfOverrides | None) -> PretrainedConfig:
    if overrides is None:
        return config
    if callable(overrides):
        return overrides(config)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config
