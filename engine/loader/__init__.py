"""Model loading: locate a checkpoint on local disk, read its config and tokenizer, stream its weights."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from engine.loader.gguf import iter_gguf_weights
from engine.loader.resolve import (
    ModelNotFoundError,
    ModelSource,
    WeightsError,
    load_hf_config,
    load_tokenizer,
    resolve_model,
)
from engine.loader.safetensors import iter_safetensors_weights

__all__ = [
    "ModelNotFoundError", "ModelSource", "WeightsError", "iter_gguf_weights", "iter_safetensors_weights",
    "iter_weights", "load_hf_config", "load_tokenizer", "resolve_model",
]


def iter_weights(source: ModelSource) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF parameter name, tensor) pairs of the checkpoint, one tensor in memory at a time."""
    if source.gguf_file is not None:
        return iter_gguf_weights(source.gguf_file, load_hf_config(source))
    return iter_safetensors_weights(source.path)
