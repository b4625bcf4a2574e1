"""engine.models.metadata and architectures.json against the captured vLLM pages.

The reference pages live outside the repository, at ``<repo>/../shared/reference`` (CI checks
them out beside the clone).  Tests that read them skip, with the reason, when they are absent.
The expected rows are counted here by simple line rules, independently of the extractor's
parser (scripts/extract_architectures.py).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest

from engine.models import metadata
from engine.models.metadata import (
    ArchitectureInfo,
    all_architecture_names,
    get_architecture_info,
    load_architectures,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(os.environ.get("LITMUS_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference"))

needs_reference = pytest.mark.skipif(
    not REFERENCE_DIR.is_dir(),
    reason=f"reference pages not found at {REFERENCE_DIR} (expected ../shared/reference beside the repo)",
)


def _page(prefix: str) -> str:
    (path,) = sorted(REFERENCE_DIR.glob(f"{prefix}_*.txt"))
    return path.read_text(encoding="utf-8")


def _doc() -> dict:
    return json.loads(metadata.ARCHITECTURES_JSON.read_text(encoding="utf-8"))


def _names(section: str, subsection: str | None = None) -> set[str]:
    return {
        i.architecture
        for i in load_architectures()
        if i.section == section and (subsection is None or i.subsection == subsection)
    }


# --------------------------------------------------------------------------------------------
# the independent count: simple line rules over the raw text

# 001: a table runs from ":::{list-table}" to a line that is ":::" or ends with " :::".  Inside,
# the architecture cell's lines are the only lines that are a bare identifier starting with an
# upper-case letter, possibly after a leading "," (",Cohere2ForCausalLM").
_001_TABLE_ORDER = [
    ("text_generation", "generative"),
    ("embedding", "pooling"),
    ("reward", "pooling"),
    ("classification", "pooling"),
    ("score", "pooling"),
    ("multimodal", "generative"),
    ("multimodal", "pooling"),
]


def _tables_001() -> list[set[str]]:
    tables: list[set[str]] = []
    current: set[str] | None = None
    for line in _page("001").split("\n"):
        if line.startswith(":::{list-table}"):
            current = set()
            continue
        if current is None:
            continue
        m = re.fullmatch(r",?([A-Z][A-Za-z0-9_]*)", line.strip())
        if m:
            current.add(m.group(1))
        if line.strip() == ":::" or line.rstrip().endswith(" :::"):
            tables.append(current)
            current = None
    return tables


# 002: rows are the lines under a header line that begins with "Architecture", up to a blank
# line.  Cells are glued; the architecture ends where its display name begins, which repeats
# the architecture's first three letters (LlavaFor...LLaVA-1.5, MiniCPMOMiniCPM-O).  The one
# table without a Models column (Llama 4) is followed directly by its modality "T + ...".
def _architectures_002() -> list[str]:
    out: list[str] = []
    header: str | None = None
    for line in _page("002").split("\n"):
        s = line.strip()
        if re.fullmatch(r"(Architecture|Models?|Modalities|Example)+", s):
            header = s if s.startswith("Architecture") else None
            continue
        if not s:
            header = None
            continue
        if header is None or " indicates " in s:
            continue
        if "Model" not in header.removeprefix("Architecture"):
            out.append(re.match(r"(\w+?)T \+ ", s).group(1))
            continue
        run = re.match(r"[A-Za-z0-9_]+", s).group(0)
        second = run.lower().find(run[:3].lower(), 1)
        assert second > 0, f"cannot find the display name in {s!r}"
        out.append(run[:second])
    return out


@needs_reference
def test_001_has_the_seven_tables():
    tables = _tables_001()
    assert len(tables) == len(_001_TABLE_ORDER)
    assert all(tables), "an empty table"


@needs_reference
@pytest.mark.parametrize("position", range(len(_001_TABLE_ORDER)))
def test_001_table_rows_match_the_json(position):
    section, subsection = _001_TABLE_ORDER[position]
    expected = _tables_001()[position]
    if section == "multimodal" and subsection == "generative":
        expected = expected | set(_architectures_002())
    assert _names(section, subsection) == expected
    # and one entry per (architecture, section, subsection)
    rows = [i for i in load_architectures() if (i.section, i.subsection) == (section, subsection)]
    assert len(rows) == len(expected)


@needs_reference
def test_counts_per_section():
    tables = _tables_001()
    expected: dict[str, int] = {}
    for (section, subsection), names in zip(_001_TABLE_ORDER, tables):
        if (section, subsection) == ("multimodal", "generative"):
            names = names | set(_architectures_002())
        key = section if section != "multimodal" else f"multimodal/{subsection}"
        expected[key] = len(names)
    got: dict[str, int] = {}
    for i in load_architectures():
        key = i.section if i.section != "multimodal" else f"multimodal/{i.subsection}"
        got[key] = got.get(key, 0) + 1
    assert got == expected
    # the JSON's own summary agrees with its rows
    assert _doc()["counts"] == got


@needs_reference
def test_002_rows_all_land_in_multimodal():
    archs = _architectures_002()
    # 21 glued rows under Architecture headers (3 LLaVA, 2 Llama 4, 5 OCR, 5 audio, 4 video,
    # 2 omni); Llama 4 is listed twice
    assert len(archs) == 21 and len(set(archs)) == 20
    assert "Llama4ForConditionalGeneration" in archs and "Ovis2_5" in archs and "MiniCPMO" in archs
    assert set(archs) <= _names("multimodal", "generative")


# Names on the pages that look like architectures but are not rows of any table.
EXPECTED_EXCLUSIONS = {
    "TransformersModel",
    "MyModel",
    "PreTrainedModel",
    "MantisForConditionalGeneration",
    "CohereForAI",
    "ArchitectureModel",
}


@needs_reference
def test_every_architecture_named_on_the_pages_is_present_or_excluded():
    names = set(all_architecture_names())
    excluded = _doc()["excluded_names"]
    assert set(excluded) == EXPECTED_EXCLUSIONS
    assert all(reason.strip() for reason in excluded.values())
    assert not names & set(excluded)
    token = re.compile(r"[A-Z][A-Za-z0-9_]+(?:For[A-Za-z]+|Model|LMHeadModel)")
    missing = []
    for prefix in ("000", "001", "002"):
        for tok in set(token.findall(_page(prefix))):
            if tok in names or tok in excluded:
                continue
            # 002 glues the display name to the architecture: LlavaForConditionalGenerationLLaVA
            if prefix == "002" and any(tok.startswith(n) for n in names):
                continue
            missing.append((prefix, tok))
    assert not missing
    # names the token pattern cannot see (no For/Model suffix) come from the table rules
    for table in _tables_001():
        assert table <= names
    assert set(_architectures_002()) <= names
    assert {"GritLM", "MiniCPMO", "MiniCPMV", "Ovis2_5", "NVLM_D_Model"} <= names


@needs_reference
def test_recorded_sha256_matches_the_reference():
    recorded = metadata.source_files()
    assert sorted(recorded) == sorted(p.name for p in REFERENCE_DIR.glob("*.txt"))
    for name, digest in recorded.items():
        assert hashlib.sha256((REFERENCE_DIR / name).read_bytes()).hexdigest() == digest, (
            f"{name} changed: re-run scripts/extract_architectures.py"
        )


@needs_reference
def test_extractor_reproduces_the_json():
    spec = importlib.util.spec_from_file_location("extract_architectures",
                                                  REPO_ROOT / "scripts" / "extract_architectures.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(spec.name, None)
    data = mod.build(REFERENCE_DIR)
    if data["source"]["transformers_version"] != _doc()["source"]["transformers_version"]:
        pytest.skip("the JSON's hf_transformers_class column was made with another transformers version")
    assert mod.render(data) == metadata.ARCHITECTURES_JSON.read_text(encoding="utf-8"), (
        "architectures.json is stale: re-run scripts/extract_architectures.py"
    )


# --------------------------------------------------------------------------------------------
# the JSON and the API (no reference needed)


def test_rows_are_well_formed():
    rows = load_architectures()
    assert rows and all(isinstance(r, ArchitectureInfo) for r in rows)
    keys = [(r.architecture, r.section, r.subsection) for r in rows]
    assert len(keys) == len(set(keys)), "one entry per (architecture, section, subsection)"
    for r in rows:
        assert r.section in metadata.SECTIONS
        assert r.subsection in metadata.SUBSECTIONS
        assert r.tasks and set(r.tasks) <= set(metadata.TASKS)
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", r.architecture)
        for ex in r.example_hf_models:
            assert re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", ex), ex
            assert "etc" not in ex
        assert all(isinstance(v, bool) for v in r.feature_columns.values())
        assert set(r.feature_marks) == set(r.feature_columns)
        if r.section == "multimodal":
            assert all(re.fullmatch(r"[TIVA]E?\+?", m) for m in r.inputs)
        else:
            assert r.inputs == ("T",)
            assert set(r.feature_columns) == {"LoRA", "PP"}
    # tasks follow the section
    task_of = {"text_generation": "generate", "embedding": "embed", "reward": "reward", "classification": "classify",
               "score": "score"}
    for r in rows:
        if r.section in task_of:
            assert r.tasks == (task_of[r.section],)
        else:
            assert r.tasks == (("generate",) if r.subsection == "generative" else ("embed",))


def test_llama():
    rows = {r.section: r for r in get_architecture_info("LlamaForCausalLM")}
    assert set(rows) == {"text_generation", "embedding", "reward"}
    gen = rows["text_generation"]
    assert gen.display_name == "Llama 3.1, Llama 3, Llama 2, LLaMA, Yi"
    assert gen.example_hf_models == (
        "meta-llama/Meta-Llama-3.1-405B-Instruct",
        "meta-llama/Meta-Llama-3.1-70B",
        "meta-llama/Meta-Llama-3-70B-Instruct",
        "meta-llama/Llama-2-70b-hf",
        "01-ai/Yi-34B",
    )
    assert gen.tasks == ("generate",) and gen.inputs == ("T",)
    assert dict(gen.feature_columns) == {"LoRA": True, "PP": True}
    assert gen.hf_transformers_class == "LlamaForCausalLM"
    assert rows["embedding"].display_name == "Llama-based"
    assert rows["embedding"].example_hf_models == ("intfloat/e5-mistral-7b-instruct",)
    assert rows["reward"].example_hf_models == ("peiyi9979/math-shepherd-mistral-7b-prm",)
    assert rows["reward"].tasks == ("reward",)


@pytest.mark.parametrize(
    "alias, vllm_name",
    [
        ("OlmoForCausalLM", "OLMoForCausalLM"),
        ("MptForCausalLM", "MPTForCausalLM"),
        ("PhimoeForCausalLM", "PhiMoEForCausalLM"),
        ("OlmoeForCausalLM", "OLMoEForCausalLM"),
        ("Olmo2ForCausalLM", "OLMo2ForCausalLM"),
        ("LightOnOcrForConditionalGeneration", "LightOnOCRForConditionalGeneration"),
        ("olmoforcausallm", "OLMoForCausalLM"),  # case-insensitive
        ("OLMoForCausalLM", "OLMoForCausalLM"),  # the vLLM name itself
        ("  llamaforcausallm ", "LlamaForCausalLM"),
    ],
)
def test_alias_lookup(alias, vllm_name):
    rows = get_architecture_info(alias)
    assert rows and {r.architecture for r in rows} == {vllm_name}


def test_alias_columns():
    (olmo,) = get_architecture_info("OLMoForCausalLM")
    assert olmo.hf_transformers_class == "OlmoForCausalLM"
    assert get_architecture_info("MPTForCausalLM")[0].hf_transformers_class == "MptForCausalLM"
    assert get_architecture_info("PhiMoEForCausalLM")[0].hf_transformers_class == "PhimoeForCausalLM"
    assert get_architecture_info("OLMoEForCausalLM")[0].hf_transformers_class == "OlmoeForCausalLM"
    # architectures that transformers does not have
    for name in ("QWenLMHeadModel", "GritLM", "MiniCPMO", "InternVLChatModel", "JAISLMHeadModel"):
        assert all(r.hf_transformers_class is None for r in get_architecture_info(name))


def test_unknown_name():
    assert get_architecture_info("NoSuchModelForCausalLM") == []
    assert get_architecture_info("MantisForConditionalGeneration") == []  # excluded, see the JSON


def test_hf_classes_match_installed_transformers():
    import transformers

    if transformers.__version__ != _doc()["source"]["transformers_version"]:
        made_with = _doc()["source"]["transformers_version"]
        pytest.skip(f"JSON made with transformers {made_with}, installed {transformers.__version__}")
    lower = {n.lower(): n for n in dir(transformers)}
    for name in all_architecture_names():
        rows = get_architecture_info(name)
        classes = {r.hf_transformers_class for r in rows if r.architecture == name}
        assert len(classes) == 1
        (cls,) = classes
        assert cls == lower.get(name.lower()), name
        if cls is not None:
            assert hasattr(transformers, cls)


def test_multiple_sections_and_multimodal():
    gritlm = {r.section for r in get_architecture_info("GritLM")}
    assert gritlm == {"text_generation", "embedding"}
    llava_next = {(r.section, r.subsection): r for r in get_architecture_info("LlavaNextForConditionalGeneration")}
    assert set(llava_next) == {("multimodal", "generative"), ("multimodal", "pooling")}
    assert llava_next[("multimodal", "pooling")].inputs_raw == ("T / I",)
    assert llava_next[("multimodal", "pooling")].tasks == ("embed",)
    (minicpmo,) = get_architecture_info("MiniCPMO")
    assert minicpmo.inputs == ("T", "IE+", "VE+", "AE+")
    (whisper,) = get_architecture_info("WhisperForConditionalGeneration")
    assert whisper.inputs == ("A",) and whisper.display_name == "Whisper"
    (llama4,) = get_architecture_info("Llama4ForConditionalGeneration")
    assert llama4.example_hf_models == (
        "meta-llama/Llama-4-Scout-17B-16E-Instruct",
        "meta-llama/Llama-4-Maverick-17B-128E-Instruct",
    )
    assert llama4.display_name is None  # its table has no Models column
    (h2ovl,) = get_architecture_info("H2OVLChatModel")
    assert h2ovl.feature_marks["V1"] == "*" and h2ovl.feature_columns["V1"] is False


def test_all_architecture_names():
    names = all_architecture_names()
    assert names == sorted(set(names))
    assert {"LlamaForCausalLM", "OLMoForCausalLM", "BertModel", "UltravoxModel"} <= set(names)
    assert load_architectures() is not load_architectures()  # a fresh list each call ...
    assert load_architectures()[0] is load_architectures()[0]  # ... of the cached objects
