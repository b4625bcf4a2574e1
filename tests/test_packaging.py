"""The distribution's import names against the environment it is installed in.

Run from the repository root (`python -m pytest`, the matrix's workers, `python -m
engine.entrypoints.cli`), the root is first on sys.path, so a top-level package of ours hides any
installed one of the same name. transformers 5.25 came to depend on Hugging Face's `kernels` and
imports it with every model class; this project's kernels package, then named `kernels`, broke
every model load started from the root.
"""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _our_packages() -> list[str]:
    return sorted(path.parent.name for path in ROOT.glob("*/__init__.py"))


def test_no_top_level_package_shadows_an_installed_one():
    provided = importlib.metadata.packages_distributions()
    clashes = {name: others for name in _our_packages()
               if (others := sorted(set(provided.get(name, [])) - {"litmus"}))}
    assert not clashes, f"top-level packages also installed by other distributions: {clashes}"


def test_transformers_models_import_from_the_repository_root():
    # What a worker started in the root does first: a model class pulls in transformers'
    # integrations (hub kernels among them).
    code = "import transformers; transformers.LlamaForCausalLM; from engine import LLM"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
