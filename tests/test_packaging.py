"""The distribution's import names against the environment it is installed in.

Run from the repository root (`python -m pytest`, the matrix's workers, `python -m
engine.entrypoints.cli`), the root is first on sys.path, so a top-level package of ours hides any
installed one of the same name. transformers 5.25 came to depend on Hugging Face's `kernels` and
imports it with every model class; this project's kernels/ directory, then the package `kernels`,
broke every model load started from the root. It is now imported as litmus_kernels and has no
__init__.py of its own (pyproject.toml).
"""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_no_top_level_package_shadows_an_installed_one():
    # The installed names, and every regular package the root itself puts on sys.path.
    ours = {name.split(".")[0] for name in SETUPTOOLS["packages"]} | {p.parent.name for p in ROOT.glob("*/__init__.py")}
    provided = importlib.metadata.packages_distributions()
    clashes = {name: others for name in sorted(ours) if (others := sorted(set(provided.get(name, [])) - {"litmus"}))}
    assert not clashes, f"top-level packages also installed by other distributions: {clashes}"


def test_every_package_directory_is_listed():
    # pyproject.toml lists the packages by hand (a directory installed under another name rules
    # out setuptools' discovery), so a new subpackage must be added there or wheels lack it.
    found = set()
    for top in {name.split(".")[0] for name in SETUPTOOLS["packages"]}:
        directory = ROOT / SETUPTOOLS["package-dir"].get(top, top)
        for module in directory.rglob("*.py"):
            parts = module.parent.relative_to(directory).parts
            found.add(".".join((top, *parts)))
    assert found == set(SETUPTOOLS["packages"])


def test_transformers_models_import_from_the_repository_root():
    # What a worker started in the root does first: a model class pulls in transformers'
    # integrations (hub kernels among them).
    code = "import transformers; transformers.LlamaForCausalLM; from engine import LLM; import litmus_kernels.ops"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
