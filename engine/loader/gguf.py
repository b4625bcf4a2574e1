"""Streaming dequantized GGUF tensors under their Hugging Face parameter names."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

from engine.loader.resolve import WeightsError


def iter_gguf_weights(gguf_file: Path, config: PretrainedConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """float32 tensors equal to what `from_pretrained(..., gguf_file=...)` puts in its state dict.

    Transformers' own name map and per-architecture processors (e.g. Llama's q/k un-permutation)
    are reused, so both paths agree by construction; unlike `load_gguf_checkpoint`, one tensor is
    dequantized at a time instead of the whole model at once.
    """
    from gguf import GGUFReader, dequantize

    reader = _open(Path(gguf_file), GGUFReader)
    architecture = _architecture(reader, gguf_file)
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
    name_map = _hf_name_map(config, processor)
    # Processors that merge several GGUF tensors into one (MoE experts) write into this dict.
    merged: dict[str, dict[str, torch.Tensor]] = {"tensors": {}}
    for tensor in reader.tensors:
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=name_map, parsed_parameters=merged
        )
        # Tensors HF has no parameter for (e.g. rope_freqs, recomputed from the config) are skipped,
        # as from_pretrained skips them.
        if result.name in name_map:
            yield name_map[result.name], _to_float32(result.weights)
    for name, tensor in merged["tensors"].items():
        yield name, tensor.to(torch.float32)


def _open(gguf_file: Path, reader_cls):
    try:
        return reader_cls(gguf_file)
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise WeightsError(f"cannot read GGUF file {gguf_file}: {exc}") from exc


def _architecture(reader, gguf_file: Path) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise WeightsError(f"GGUF file {gguf_file} has no general.architecture")
    return bytes(field.parts[field.data[0]]).decode()


def _hf_name_map(config: PretrainedConfig, processor: TensorProcessor) -> dict[str, str]:
    # Only the parameter names are needed, so the model is built on the meta device (no memory).
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return get_gguf_hf_weights_map(model, processor)


def _to_float32(weights: np.ndarray) -> torch.Tensor:
    # Always a copy: unquantized tensors come back as read-only views of the memory-mapped file.
    return torch.from_numpy(np.array(weights, dtype=np.float32, order="C"))
