"""Per-architecture documentation metadata: the rows of vLLM's supported-models pages.

The data is ``architectures.json`` beside this module, produced from the captured pages by
``scripts/extract_architectures.py`` (re-run it when the reference changes; its ``source``
block records the sha256 of the pages it was made from).

One :class:`ArchitectureInfo` per (architecture, section, subsection) row: the same
architecture can appear under several sections (``LlamaForCausalLM`` is listed for text
generation, embedding and reward), so lookups return a list.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

ARCHITECTURES_JSON = Path(__file__).with_name("architectures.json")

SECTIONS = ("text_generation", "embedding", "classification", "reward", "score", "multimodal")
SUBSECTIONS = ("generative", "pooling")
TASKS = ("generate", "embed", "classify", "reward", "score")


@dataclass(frozen=True)
class ArchitectureInfo:
    architecture: str  # exact name as in the docs, e.g. "OLMoForCausalLM"
    display_name: str | None  # "Models" column; None where the table has none
    example_hf_models: tuple[str, ...]
    section: str  # one of SECTIONS
    subsection: str  # "generative" | "pooling": how the pages divide the tables
    tasks: tuple[str, ...]  # subset of TASKS
    inputs: tuple[str, ...]  # modalities: "T", "I", "IE+", "V+", "A", ... (("T",) for text-only rows)
    inputs_raw: tuple[str, ...]  # the modality cells as written ("T / I" keeps the "/" meaning)
    # feature column (as named in the table header: LoRA, PP, V1) -> supported
    feature_columns: Mapping[str, bool] = field(hash=False)
    # the raw cell per feature column ("✅", "*", "🚧" or "")
    feature_marks: Mapping[str, str] = field(hash=False)
    # True when the capture lost the empty cells of this row and the placement was inferred
    feature_columns_inferred: bool = False
    hf_transformers_class: str | None = None  # class name in transformers, exact or case alias
    sources: tuple[str, ...] = ()

    @property
    def is_multimodal(self) -> bool:
        return self.section == "multimodal"

    @classmethod
    def from_json(cls, d: dict) -> "ArchitectureInfo":
        return cls(
            architecture=d["architecture"],
            display_name=d["display_name"],
            example_hf_models=tuple(d["example_hf_models"]),
            section=d["section"],
            subsection=d["subsection"],
            tasks=tuple(d["tasks"]),
            inputs=tuple(d["inputs"]),
            inputs_raw=tuple(d.get("inputs_raw", ())),
            feature_columns=MappingProxyType(dict(d["feature_columns"])),
            feature_marks=MappingProxyType(dict(d.get("feature_marks", {}))),
            feature_columns_inferred=bool(d.get("feature_columns_inferred", False)),
            hf_transformers_class=d.get("hf_transformers_class"),
            sources=tuple(d.get("sources", ())),
        )


@lru_cache(maxsize=1)
def _load_document() -> dict:
    with ARCHITECTURES_JSON.open(encoding="utf-8") as f:
        return json.load(f)


@lru_cache(maxsize=1)
def _load() -> tuple[ArchitectureInfo, ...]:
    return tuple(ArchitectureInfo.from_json(d) for d in _load_document()["architectures"])


@lru_cache(maxsize=1)
def _index() -> dict[str, tuple[ArchitectureInfo, ...]]:
    idx: dict[str, list[ArchitectureInfo]] = {}
    for info in _load():
        keys = {info.architecture.lower()}
        if info.hf_transformers_class:
            keys.add(info.hf_transformers_class.lower())
        for k in keys:
            idx.setdefault(k, []).append(info)
    return {k: tuple(v) for k, v in idx.items()}


def load_architectures() -> list[ArchitectureInfo]:
    """Every (architecture, section, subsection) row, in the JSON's order (cached)."""
    return list(_load())


def get_architecture_info(name: str) -> list[ArchitectureInfo]:
    """All rows for ``name`` -- the vLLM name or its transformers alias, case-insensitive.

    ``get_architecture_info("OlmoForCausalLM")`` finds vLLM's ``OLMoForCausalLM``.
    Returns an empty list for a name the pages do not list.
    """
    return list(_index().get(name.strip().lower(), ()))


def all_architecture_names() -> list[str]:
    """The distinct architecture names (as spelled in the docs), sorted."""
    return sorted({info.architecture for info in _load()})


def source_files() -> dict[str, str]:
    """Reference file name -> sha256 the JSON was extracted from (for staleness checks)."""
    return {name: meta["sha256"] for name, meta in _load_document()["source"]["files"].items()}
