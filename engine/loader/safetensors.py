"""Streaming tensors out of a directory of safetensors files, single-file or sharded."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from engine.loader.resolve import WeightsError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def iter_safetensors_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint in `path`, one at a time, as stored (dtype untouched)."""
    for file, expected in _checkpoint_files(Path(path)):
        yield from _iter_file(file, expected)


def _checkpoint_files(directory: Path) -> list[tuple[Path, set[str] | None]]:
    """Each file to read, with the tensor names the index promises it holds (None: no promise)."""
    index = directory / INDEX_FILE
    if index.is_file():
        return _shards_from_index(index)
    single = directory / SINGLE_FILE
    if single.is_file():
        return [(single, None)]
    # Some repositories name their single file otherwise (e.g. consolidated.safetensors).
    others = sorted(directory.glob("*.safetensors"))
    if others:
        return [(file, None) for file in others]
    bins = sorted(p.name for p in directory.glob("*.bin"))
    hint = f" (found {', '.join(bins)}: .bin weights are not supported, convert them to safetensors)" if bins else ""
    raise WeightsError(f"no safetensors weights in {directory}{hint}")


def _shards_from_index(index: Path) -> list[tuple[Path, set[str] | None]]:
    try:
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WeightsError(f"cannot read the shard index {index}: {exc}") from exc
    by_shard: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, set()).add(name)
    # Checked before any tensor is yielded, so a broken checkpoint never half-loads a model.
    missing = [shard for shard in by_shard if not (index.parent / shard).is_file()]
    if missing:
        raise WeightsError(f"the shard index {index} names shard files that do not exist: {', '.join(missing)}")
    return [(index.parent / shard, names) for shard, names in by_shard.items()]


def _iter_file(file: Path, expected: set[str] | None) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with safe_open(file, framework="pt") as handle:
            names = list(handle.keys())
            if expected is not None and (absent := expected - set(names)):
                raise WeightsError(
                    f"{file} lacks tensors its index assigns to it: {', '.join(sorted(absent)[:8])}"
                )
            for name in names:
                yield name, handle.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise WeightsError(f"corrupt or truncated safetensors file {file}: {exc}") from exc
