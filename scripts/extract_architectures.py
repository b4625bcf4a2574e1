#!/usr/bin/env python3
"""Extract engine/models/architectures.json from the captured vLLM supported-models pages.

The reference pages live outside the repository (CI checks them out beside the clone):

    <repo>/../shared/reference/000_*.txt   overview (no tables; names LlamaForCausalLM in prose)
    <repo>/../shared/reference/001_*.txt   the full tables (text generation, the four pooling
                                           tables, multimodal generation + embedding)
    <repo>/../shared/reference/002_*.txt   the newer multimodal page (OCR, audio, video, omni)

Usage:
    python scripts/extract_architectures.py            # (re)write engine/models/architectures.json
    python scripts/extract_architectures.py --check    # exit 1 if the committed JSON is stale
    python scripts/extract_architectures.py --print    # also print one line per parsed table row

The output is deterministic: same reference files + same transformers version -> same bytes.

What the capture looks like, and how it is read
------------------------------------------------
001 is a text dump of MyST ``list-table`` blocks.  Each table starts with a line
``:::{list-table} :widths: ... :header-rows: 1`` and ends with ``:::`` (alone or at the end of
the last cell's line).  The header row itself was lost in the capture, and so were the
section headings ("Text Generation", "Text Embedding", ...).  A row starts with a line that is
exactly ``-``; the first cell (architecture names, continuation lines start with ``,``) follows
without a dash; every other cell starts with ``- `` -- either at the start of a line or glued
after ``etc.`` / ``.`` / ``)`` (``etc.- ✅︎``).  A cell's first line is the cell; lines under it
(without a dash) are the next, dash-less cell: the "Example HF Models" list.  EMPTY CELLS WERE
DROPPED, so a row with fewer ✅︎ marks than feature columns does not say which column a mark
was in -- see ``_assign_marks``.

002 is a text dump of HTML tables whose cells were concatenated with no separator at all
(``LlavaForConditionalGenerationLLaVA-1.5T + IE+llava-hf/llava-1.5-7b-hf``).  The header line
(e.g. ``ArchitectureModelsModalitiesExample``) gives the columns; rows are split with a
modality grammar, an HF-id grammar and a shared-prefix rule between the architecture and the
display name (see ``_parse_002_row``).  Every split is printed by ``--print`` and was checked
by hand against the page.

This script holds no data copied from elsewhere except what the capture lost and the docs
define: the feature-column header names (``LoRA``, ``PP``, ``V1``; the capture keeps only the
column count via ``:widths:``) and three mark placements (``_PLACEMENT_HINTS``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REFERENCE_DIR = REPO_ROOT.parent / "shared" / "reference"
DEFAULT_OUTPUT = REPO_ROOT / "engine" / "models" / "architectures.json"

CHECK = "\u2705"  # ✅ (the capture writes it followed by U+FE0E)

SECTIONS = ("text_generation", "embedding", "classification", "reward", "score", "multimodal")
TASK_OF_TABLE = {
    "text_generation": "generate",
    "embedding": "embed",
    "reward": "reward",
    "classification": "classify",
    "score": "score",
}

# Header names of the feature columns.  The capture dropped the header rows; the column
# COUNT survives in ``:widths:`` and is checked against these lists.
TEXT_FEATURES = ("LoRA", "PP")
MM_GENERATIVE_FEATURES = ("LoRA", "PP", "V1")
MM_POOLING_FEATURES = ("LoRA", "PP")

# When a row has fewer marks than feature columns (the capture dropped the empty cells), the
# marks are given to the columns in this order of preference (and then laid out left to right).
# Rationale: in these tables PP is the near-universal column, V1 next, LoRA the rarest; every
# text-table row upstream with a single mark has it under PP.
FILL_PRIORITY = {
    TEXT_FEATURES: ("PP", "LoRA"),
    MM_GENERATIVE_FEATURES: ("PP", "V1", "LoRA"),
}

# Rows where that preference is known to be wrong.  Source: the upstream markdown of this page
# (vllm docs/source/models/supported_models.md) shortly after this capture, where the cell
# left empty is the one named here -- and support in a column is not withdrawn between
# releases, so in the captured (older) version the same cell was empty too.  Keyed by
# (table key, architecture); the value is the columns that hold the captured marks.  The mark
# count is checked, so a changed reference fails loudly instead of being mis-assigned.
_PLACEMENT_HINTS: dict[tuple[str, str], tuple[str, ...]] = {
    ("multimodal/generative", "MiniCPMO"): ("LoRA", "PP"),  # upstream: V1 empty
    ("multimodal/generative", "MiniCPMV"): ("LoRA", "PP"),  # upstream: V1 empty
    ("multimodal/generative", "Idefics3ForConditionalGeneration"): ("LoRA", "V1"),  # PP empty
}

# Marks that count as "supported".  "*" (H2OVL, V1: "will be available in V1 once ...") and
# "🚧" (planned) are recorded raw in feature_marks but are not support.
SUPPORTED_MARKS = {CHECK}
KNOWN_MARKS = {CHECK, "*", "\U0001f6a7", "\u26a0"}  # ✅ * 🚧 ⚠

# Names matching the architecture-token pattern in the pages that are NOT architectures of
# any table, with the reason.  The self-check below fails on any unexplained token.
EXCLUSIONS = {
    "TransformersModel": "001 prose: class name of vLLM's Transformers fallback wrapper, not a model architecture",
    "MyModel": "001 prose: placeholder class in a code example",
    "PreTrainedModel": "001 prose: transformers base class in a code example",
    "MantisForConditionalGeneration": (
        "001 note only: the --hf_overrides value for the example TIGER-Lab/Mantis-8B-siglip-llama3, "
        "which the table lists under LlavaForConditionalGeneration; not a row of any table"
    ),
    "CohereForAI": "an HF organisation in example ids (CohereForAI/c4ai-command-r-v01), not an architecture",
    "ArchitectureModel": "002: glued table header 'ArchitectureModels...Example', not an architecture",
}
ARCH_TOKEN_RE = re.compile(r"[A-Z][A-Za-z0-9_]+(?:For[A-Za-z]+|Model|LMHeadModel)")

HF_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?$")
IDENT_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
MODALITY_ITEM = r"[TIVA]E?\+?"
MODALITY_RE = re.compile(rf"{MODALITY_ITEM}(?: [+/] {MODALITY_ITEM})*")


# --------------------------------------------------------------------------------------------
# data model of one parsed table row


@dataclass
class Row:
    architectures: list[str]  # one row can name several (``LlamaModel, LlamaForCausalLM, ...``)
    display_name: str | None
    examples: list[str]
    section: str
    subsection: str  # "generative" | "pooling" (how the pages divide the tables)
    task: str
    inputs_raw: str | None
    feature_columns: dict[str, bool]
    feature_marks: dict[str, str]
    feature_columns_inferred: bool
    source: str


# --------------------------------------------------------------------------------------------
# small helpers


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def normalise_mark(cell: str) -> str:
    # drop variation selectors (U+FE0E/U+FE0F) and surrounding space
    return "".join(ch for ch in cell if unicodedata.category(ch) != "Mn" and ch not in "\ufe0e\ufe0f").strip()


def split_inputs(*raws: str) -> list[str]:
    """Modality strings -> one item per modality, in T, I, V, A order.

    'T + IE+ + VE+' -> ['T', 'IE+', 'VE+'];  'T / I' -> ['T', 'I'] (the raw string keeps + vs /).
    Several strings (the same architecture on both pages) are merged per modality: the
    superscripts E (embeddings accepted) and + (several items per prompt) are OR-ed.
    """
    flags: dict[str, set[str]] = {}
    for raw in raws:
        for it in re.findall(MODALITY_ITEM, raw or ""):
            flags.setdefault(it[0], set()).update(it[1:])
    return [m + ("E" if "E" in flags[m] else "") + ("+" if "+" in flags[m] else "") for m in "TIVA" if m in flags]


def clean_examples(text: str) -> list[str]:
    """The "Example HF Models" cell -> list of ids, without ', etc.', '(see note)' or a trailing '.'."""
    out: list[str] = []
    for part in text.split(","):
        part = part.replace("(see note)", " ")
        part = re.sub(r"\betc\.", " ", part)
        part = part.strip().rstrip(".").strip()
        if not part:
            continue
        if not HF_ID_RE.match(part):
            raise ValueError(f"unexpected text in an Example HF Models cell: {part!r} (cell {text!r})")
        if part not in out:  # 001 lists sentence-transformers/all-roberta-large-v1 twice
            out.append(part)
    return out


def norm_alnum(s: str) -> str:
    return "".join(ch for ch in s.lower() if ch.isalnum())


def common_prefix_len(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prefix_covering(s: str, n_alnum: int) -> str:
    """Shortest prefix of ``s`` that contains ``n_alnum`` alphanumeric characters."""
    if n_alnum == 0:
        return ""
    seen = 0
    for i, ch in enumerate(s):
        if ch.isalnum():
            seen += 1
            if seen == n_alnum:
                return s[: i + 1]
    return s


# --------------------------------------------------------------------------------------------
# 001: MyST list-tables


@dataclass
class RawTable:
    index: int
    ncols: int
    body: list[str]
    before: str
    after: str = ""


def _find_tables_001(lines: list[str]) -> list[RawTable]:
    tables: list[RawTable] = []
    i = 0
    prev_end = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith(":::{list-table}"):
            m = re.search(r":widths:\s*([\d ]+?)\s*:header-rows:", line)
            if not m:
                raise ValueError(f"list-table without :widths: at line {i + 1}")
            ncols = len(m.group(1).split())
            body: list[str] = []
            j = i + 1
            while j < len(lines):
                cur = lines[j]
                if cur.strip() == ":::":
                    break
                if cur.rstrip().endswith(" :::"):
                    body.append(cur.rstrip()[: -len(" :::")])
                    break
                body.append(cur)
                j += 1
            else:
                raise ValueError(f"list-table starting at line {i + 1} never ends")
            before = "\n".join(lines[prev_end:i])
            if tables:
                tables[-1].after = before
            tables.append(RawTable(len(tables), ncols, body, before))
            prev_end = j + 1
            i = j + 1
            continue
        i += 1
    if tables:
        tables[-1].after = "\n".join(lines[prev_end:])
    return tables


def _classify_tables_001(text: str, tables: list[RawTable]) -> list[tuple[str, str]]:
    """(section, subsection) per table, from the prose the capture kept around each table."""
    anchor = "(supported-mm-models)="
    if anchor not in text:
        raise ValueError("001: multimodal anchor '(supported-mm-models)=' not found")
    # the tables before the anchor are the text-only ones: everything up to the anchor is in
    # some table's ``after`` text; find which table it follows
    text_only: list[RawTable] = []
    multimodal: list[RawTable] = []
    seen_anchor = False
    for t in tables:
        (multimodal if seen_anchor else text_only).append(t)
        if anchor in t.after:
            seen_anchor = True
    kinds: dict[int, tuple[str, str]] = {}
    pooling_order = ("embedding", "reward", "classification", "score")
    adapter_cue = {
        "embedding": "as_embedding_model",
        "reward": "as_reward_model",
        "classification": "as_classification_model",
    }
    pooling_seen: list[RawTable] = []
    for t in text_only:
        if "use generative models" in t.before:
            kinds[t.index] = ("text_generation", "generative")
        else:
            pooling_seen.append(t)
    if len(pooling_seen) != len(pooling_order):
        raise ValueError(f"001: expected {len(pooling_order)} text pooling tables, found {len(pooling_seen)}")
    for t, name in zip(pooling_seen, pooling_order):
        cue = adapter_cue.get(name)
        if cue is not None and cue not in t.after:
            raise ValueError(f"001: table {t.index} expected to be {name} (cue {cue!r} missing after it)")
        if cue is None and any(c in t.after for c in adapter_cue.values()):
            raise ValueError(f"001: table {t.index} expected to be {name} but is followed by an adapter note")
        kinds[t.index] = (name, "pooling")
    for t in multimodal:
        if "use generative models" in t.before:
            kinds[t.index] = ("multimodal", "generative")
        elif "use pooling models" in t.before:
            kinds[t.index] = ("multimodal", "pooling")
        else:
            raise ValueError(f"001: cannot tell whether multimodal table {t.index} is generative or pooling")
    return [kinds[t.index] for t in tables]


def _split_cells(row_lines: list[str]) -> tuple[str, list[tuple[str, list[str]]]]:
    """A row's lines -> (architecture cell text, [(cell first line, continuation lines), ...])."""
    text = "\n".join(row_lines)
    # a cell glued after "etc." / "." / ")" starts a new line
    text = re.sub(r"(?<=[.)])- ", "\n- ", text)
    arch_lines: list[str] = []
    cells: list[tuple[str, list[str]]] = []
    for line in text.split("\n"):
        if line.startswith("- "):
            cells.append((line[2:].strip(), []))
        elif line.strip() == "" and not cells:
            continue
        elif not cells:
            arch_lines.append(line.strip())
        else:
            cells[-1][1].append(line.strip())
    return "".join(arch_lines), cells


def _assign_marks(table_key: str, arch: str, features: tuple[str, ...],
                  marks: list[str]) -> tuple[dict[str, bool], dict[str, str], bool]:
    for m in marks:
        if m not in KNOWN_MARKS:
            raise ValueError(f"{table_key} {arch}: unknown feature mark {m!r}")
    if len(marks) > len(features):
        raise ValueError(f"{table_key} {arch}: {len(marks)} marks for {len(features)} feature columns")
    inferred = 0 < len(marks) < len(features)
    if len(marks) == len(features):
        cols = list(features)
    elif (table_key, arch) in _PLACEMENT_HINTS:
        cols = list(_PLACEMENT_HINTS[(table_key, arch)])
        if len(cols) != len(marks):
            raise ValueError(f"{table_key} {arch}: placement hint {cols} no longer matches {len(marks)} captured marks")
    else:
        priority = FILL_PRIORITY.get(features, features[::-1])
        chosen = set(priority[: len(marks)])
        cols = [f for f in features if f in chosen]
    raw = {f: "" for f in features}
    for col, mark in zip(cols, marks):
        raw[col] = mark
    supported = {f: raw[f] in SUPPORTED_MARKS for f in features}
    return supported, raw, inferred


def parse_001(path: Path) -> list[Row]:
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    tables = _find_tables_001(lines)
    kinds = _classify_tables_001(text, tables)
    rows: list[Row] = []
    for t, (section, subsection) in zip(tables, kinds):
        multimodal = section == "multimodal"
        mm_features = MM_GENERATIVE_FEATURES if subsection == "generative" else MM_POOLING_FEATURES
        features = mm_features if multimodal else TEXT_FEATURES
        leading = 4 if multimodal else 3  # Architecture, Models, [Inputs,] Example HF Models
        if leading + len(features) != t.ncols:
            raise ValueError(f"001 table {t.index}: :widths: has {t.ncols} columns, expected {leading + len(features)}")
        table_key = f"{section}/{subsection}" if multimodal else section
        task = "generate" if subsection == "generative" else ("embed" if multimodal else TASK_OF_TABLE[section])
        # rows
        starts = [k for k, line in enumerate(t.body) if line.strip() == "-"]
        if not starts or any(line.strip() for line in t.body[: starts[0]]):
            raise ValueError(f"001 table {t.index}: text before the first row")
        for n, s in enumerate(starts):
            e = starts[n + 1] if n + 1 < len(starts) else len(t.body)
            arch_text, cells = _split_cells(t.body[s + 1 : e])
            archs = [a.strip() for a in arch_text.split(",")]
            archs = [a for a in archs if a and a != "etc."]
            for a in archs:
                if not IDENT_RE.match(a):
                    raise ValueError(f"001 table {t.index}: bad architecture name {a!r}")
            if not cells:
                raise ValueError(f"001 table {t.index}: row {archs} has no cells")
            display, after_display = cells[0]
            if multimodal:
                if len(cells) < 2 or after_display:
                    raise ValueError(f"001 table {t.index}: row {archs}: cannot find the Inputs cell")
                inputs_raw, example_lines = cells[1]
                mark_cells = cells[2:]
                if not MODALITY_RE.fullmatch(inputs_raw):
                    raise ValueError(f"001 table {t.index}: row {archs}: bad Inputs {inputs_raw!r}")
            else:
                inputs_raw, example_lines = None, after_display
                mark_cells = cells[1:]
            if not example_lines:
                raise ValueError(f"001 table {t.index}: row {archs}: no Example HF Models")
            marks = []
            for first, cont in mark_cells:
                if cont:
                    raise ValueError(f"001 table {t.index}: row {archs}: text under a feature cell: {cont}")
                marks.append(normalise_mark(first))
            examples = clean_examples(" ".join(example_lines))
            source = f"{path.name}: table {t.index + 1} ({table_key})"
            for a in archs:
                supported, raw, inferred = _assign_marks(table_key, a, features, marks)
                rows.append(
                    Row(
                        architectures=[a],
                        display_name=display,
                        examples=list(examples),
                        section=section,
                        subsection=subsection,
                        task=task,
                        inputs_raw=inputs_raw,
                        feature_columns=supported,
                        feature_marks=raw,
                        feature_columns_inferred=inferred,
                        source=source,
                    )
                )
    return rows


# --------------------------------------------------------------------------------------------
# 002: HTML tables with glued cells

_HEADER_TOKENS = ("Architecture", "Modalities", "Example", "Models", "Model")


def _parse_header(line: str) -> list[str] | None:
    s = line.strip()
    if not s or not (s.startswith("Architecture") or s.startswith("Model")) or not s.endswith("Example"):
        return None
    cols: list[str] = []
    while s:
        for tok in _HEADER_TOKENS:
            if s.startswith(tok):
                cols.append(tok)
                s = s[len(tok) :]
                break
        else:
            return None
    return cols


def _split_arch_display(head: str) -> tuple[str, str]:
    """'LlavaForConditionalGenerationLLaVA-1.5' -> ('LlavaForConditionalGeneration', 'LLaVA-1.5').

    The display name almost always begins like the architecture (case and punctuation aside):
    choose the split whose two halves share the longest normalised prefix; ties go to the split
    whose left part ends like an architecture, then to the longer left part.
    """
    best: tuple[tuple[int, int, int], int] | None = None
    for i in range(1, len(head)):
        left, right = head[:i], head[i:]
        if not IDENT_RE.match(left):
            continue
        score = common_prefix_len(norm_alnum(left), norm_alnum(right))
        suffix_ok = int(bool(re.search(r"(For[A-Z][A-Za-z]+|Model)$", left)))
        key = (score, suffix_ok, i)
        if best is None or key > best[0]:
            best = (key, i)
    if best is None or best[0][0] == 0:
        raise ValueError(f"002: cannot split architecture from display name in {head!r}")
    i = best[1]
    return head[:i], head[i:]


def _split_display_org(arch: str, glued: str, repo: str) -> tuple[str, str]:
    """'dots.ocrrednote-hilab' (display name glued to the id's organisation) -> ('dots.ocr', 'rednote-hilab').

    Candidates for the display name: the part that matches the architecture's beginning
    (normalised), and the id's repository name when the glued text starts with it.  The
    longest candidate that leaves a valid organisation name wins.
    """
    cands = []
    n = common_prefix_len(norm_alnum(arch), norm_alnum(glued))
    if n:
        cands.append(prefix_covering(glued, n))
    if glued.startswith(repo):
        cands.append(repo)
    cands = [c for c in cands if c and c != glued and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", glued[len(c) :])]
    if not cands:
        raise ValueError(f"002: cannot split display name from organisation in {glued!r}")
    disp = max(cands, key=len)
    return disp, glued[len(disp) :]


@dataclass
class Row002:
    architecture: str | None
    display_name: str | None
    inputs_raw: str | None
    examples: list[str]
    heading: str
    notes: list[str]


def _parse_002_row(cols: list[str], line: str, heading: str) -> Row002:
    s = line.strip()
    notes: list[str] = []
    if "Modalities" in cols:
        m = re.fullmatch(rf"(?P<head>.*?)(?P<mod>{MODALITY_RE.pattern})"
                         r"(?P<ex>[A-Za-z0-9][\w.-]*/[\w.-]+|Various [\w ]+)", s)
        if not m:
            raise ValueError(f"002: cannot parse row {s!r}")
        head, inputs_raw, ex = m.group("head"), m.group("mod"), m.group("ex")
        if ex.startswith("Various "):
            notes.append(f"example cell is not an HF id: {ex!r}")
            examples: list[str] = []
        else:
            examples = [ex]
        if cols[0] == "Architecture" and ("Models" in cols or "Model" in cols):
            arch, display = _split_arch_display(head)
        elif cols[0] == "Architecture":
            arch, display = head, None
        else:
            arch, display = None, head
    else:
        # Architecture, Model, Example -- no modality column to anchor on
        if cols != ["Architecture", "Model", "Example"]:
            raise ValueError(f"002: unexpected columns {cols}")
        left, _, repo = s.rpartition("/")
        if not left or not repo:
            raise ValueError(f"002: no HF id in row {s!r}")
        arch, rest = _split_arch_display(left)
        display, org = _split_display_org(arch, rest, repo)
        examples = [f"{org}/{repo}"]
        inputs_raw = None
        notes.append("the table has no modality column")
    if arch is not None and not IDENT_RE.match(arch):
        raise ValueError(f"002: bad architecture {arch!r} in {s!r}")
    for ex_id in examples:
        if not HF_ID_RE.match(ex_id):
            raise ValueError(f"002: bad example id {ex_id!r} in {s!r}")
    return Row002(arch, display.strip() if display else None, inputs_raw, examples, heading, notes)


def _is_title(lines: list[str], k: int) -> bool:
    return (
        0 < k < len(lines) - 1
        and lines[k].strip() != ""
        and lines[k - 1].strip() == ""
        and lines[k + 1].strip() == ""
        and len(lines[k]) < 60
        and not lines[k].lstrip().startswith(("•", "-"))
    )


def parse_002(path: Path) -> tuple[list[Row002], list[str]]:
    lines = path.read_text(encoding="utf-8").split("\n")
    out: list[Row002] = []
    footnotes: list[str] = []
    heading = ""
    k = 0
    while k < len(lines):
        if _is_title(lines, k):
            heading = lines[k].strip()
        cols = _parse_header(lines[k])
        if cols is None:
            k += 1
            continue
        k += 1
        while k < len(lines) and lines[k].strip() and _parse_header(lines[k]) is None:
            line = lines[k]
            if re.match(r"^[A-Z]E?\+? indicates ", line.strip()):
                footnotes.append(line.strip())
            else:
                out.append(_parse_002_row(cols, line, heading))
            k += 1
    return out, footnotes


# --------------------------------------------------------------------------------------------
# transformers class names


def transformers_lookup() -> tuple[str, Callable[[str], str | None]]:
    import transformers

    names = [n for n in dir(transformers) if not n.startswith("_")]
    by_lower: dict[str, list[str]] = {}
    for n in names:
        by_lower.setdefault(n.lower(), []).append(n)

    def find(arch: str) -> str | None:
        if arch in names and hasattr(transformers, arch):
            return arch
        cands = sorted(by_lower.get(arch.lower(), []))
        if len(cands) > 1:
            raise ValueError(f"{arch}: several case-insensitive matches in transformers: {cands}")
        if cands and hasattr(transformers, cands[0]):
            return cands[0]
        return None

    return transformers.__version__, find


# --------------------------------------------------------------------------------------------
# assembling the JSON


def _merge_into(entry: dict, *, display: str | None, examples: list[str], inputs_raw: str | None, source: str) -> None:
    if display:
        if entry["display_name"] is None:
            entry["display_name"] = display
        else:
            have = [d.strip() for d in entry["display_name"].split(",")]
            for d in (x.strip() for x in display.split(",")):
                if d not in have:
                    have.append(d)
            entry["display_name"] = ", ".join(have)
    for ex in examples:
        if ex not in entry["example_hf_models"]:
            entry["example_hf_models"].append(ex)
    if inputs_raw and inputs_raw not in entry["inputs_raw"]:
        entry["inputs_raw"].append(inputs_raw)
        entry["inputs"] = split_inputs(*entry["inputs_raw"])
    if source not in entry["sources"]:
        entry["sources"].append(source)


def build(reference_dir: Path, verbose: bool = False) -> dict:
    files = sorted(p for p in reference_dir.glob("*.txt"))
    by_prefix = {p.name[:3]: p for p in files}
    for pre in ("000", "001", "002"):
        if pre not in by_prefix:
            raise FileNotFoundError(f"{reference_dir}: no {pre}_*.txt")
    p000, p001, p002 = by_prefix["000"], by_prefix["001"], by_prefix["002"]

    tf_version, find_hf = transformers_lookup()

    entries: dict[tuple[str, str, str], dict] = {}

    def new_entry(arch: str, section: str, subsection: str, task: str) -> dict:
        return {
            "architecture": arch,
            "display_name": None,
            "example_hf_models": [],
            "section": section,
            "subsection": subsection,
            "tasks": [task],
            "inputs": [] if section == "multimodal" else ["T"],
            "inputs_raw": [],
            "feature_columns": {},
            "feature_marks": {},
            "feature_columns_inferred": False,
            "hf_transformers_class": find_hf(arch),
            "sources": [],
        }

    # 001
    rows001 = parse_001(p001)
    for r in rows001:
        (arch,) = r.architectures
        key = (arch, r.section, r.subsection)
        if key in entries:
            raise ValueError(f"001: {key} appears twice")
        e = entries[key] = new_entry(arch, r.section, r.subsection, r.task)
        e["feature_columns"] = r.feature_columns
        e["feature_marks"] = r.feature_marks
        e["feature_columns_inferred"] = r.feature_columns_inferred
        _merge_into(e, display=r.display_name, examples=r.examples, inputs_raw=r.inputs_raw, source=r.source)
        if verbose:
            print(f"001 {r.source.split(': ')[1]:<32} {arch:<44} | {r.display_name} | {r.inputs_raw or ''} "
                  f"| {r.examples} | {r.feature_marks}")

    # 002 (all its tables are multimodal generative models)
    rows002, footnotes = parse_002(p002)
    unnamed: list[dict] = []
    row_notes: list[str] = []
    for r in rows002:
        source = f"{p002.name}: {r.heading}"
        row_notes += [f"002 {r.architecture or r.display_name} ({r.heading}): {n}" for n in r.notes]
        if verbose:
            print(f"002 {r.heading:<32} {str(r.architecture):<44} | {r.display_name} | {r.inputs_raw} | {r.examples}")
        if r.architecture is None:
            # a "Model" table: no architecture named.  Link it only when its example id is
            # already listed under exactly one multimodal generative architecture.
            owners = sorted(
                {k for k, e in entries.items()
                 if k[1:] == ("multimodal", "generative") and set(r.examples) & set(e["example_hf_models"])}
            )
            if len(owners) == 1:
                _merge_into(entries[owners[0]], display=None, examples=r.examples, inputs_raw=r.inputs_raw,
                            source=source)
                linked = owners[0][0]
            else:
                linked = None
            unnamed.append(
                {
                    "display_name": r.display_name,
                    "inputs": split_inputs(r.inputs_raw or ""),
                    "inputs_raw": r.inputs_raw,
                    "example_hf_models": r.examples,
                    "source": source,
                    "linked_architecture": linked,
                    "reason": (
                        "the table has a Model column but no Architecture column"
                        + (f"; its example id is listed under {linked}" if linked
                           else "; the page names no architecture for it")
                    ),
                }
            )
            continue
        key = (r.architecture, "multimodal", "generative")
        e = entries.get(key) or entries.setdefault(
            key, new_entry(r.architecture, "multimodal", "generative", "generate"))
        _merge_into(e, display=r.display_name, examples=r.examples, inputs_raw=r.inputs_raw, source=source)

    entry_list = sorted(entries.values(),
                        key=lambda e: (SECTIONS.index(e["section"]), e["subsection"], e["architecture"].lower()))

    # self-check: every architecture-looking token of the three pages is accounted for
    names = {e["architecture"] for e in entry_list}
    for p in (p000, p001, p002):
        for tok in sorted(set(ARCH_TOKEN_RE.findall(p.read_text(encoding="utf-8")))):
            if tok in names or tok in EXCLUSIONS:
                continue
            # 002 glues cells: 'LlavaForConditionalGenerationLLaVA' = name + display name
            if any(tok.startswith(n) and len(tok) > len(n) for n in names):
                continue
            raise ValueError(f"{p.name}: token {tok!r} is neither extracted nor excluded")

    counts: dict[str, int] = {}
    for e in entry_list:
        k = e["section"] if e["section"] != "multimodal" else f"multimodal/{e['subsection']}"
        counts[k] = counts.get(k, 0) + 1

    return {
        "schema_version": 1,
        "generated_by": "scripts/extract_architectures.py",
        "source": {
            "reference_dir": "../shared/reference (relative to the repository root)",
            "files": {p.name: {"sha256": sha256_of(p), "bytes": p.stat().st_size} for p in (p000, p001, p002)},
            "transformers_version": tf_version,
        },
        "notes": [
            "One entry per (architecture, section, subsection). subsection is how the pages divide the "
            "tables: 'generative' (text generation) or 'pooling' (embedding, reward, classification, score); "
            "the multimodal section has both.",
            "The capture dropped the tables' header rows: the feature column names (LoRA, PP, V1) come from "
            "the upstream docs; the column count is checked against :widths:.",
            "The capture dropped empty cells: where a row has fewer marks than feature columns the placement "
            "is inferred (feature_columns_inferred=true); see FILL_PRIORITY and _PLACEMENT_HINTS in the script.",
            "feature_marks keeps the raw cell ('*' and '\U0001f6a7' are recorded there but are not support).",
            "002 tables have no feature columns; their rows are merged into the multimodal/generative entry "
            "of the same architecture. display_name is null where the table has no Models column.",
            "inputs is empty where the table has no modality column (002 'Document understanding').",
            "Footnotes in 002: " + "; ".join(footnotes),
            *sorted(set(row_notes)),
        ],
        "counts": counts,
        "excluded_names": EXCLUSIONS,
        "unnamed_rows": unnamed,
        "architectures": entry_list,
    }


def render(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference-dir", type=Path, default=DEFAULT_REFERENCE_DIR)
    ap.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    ap.add_argument("--check", action="store_true", help="do not write; exit 1 if the output would change")
    ap.add_argument("--print", dest="verbose", action="store_true", help="print every parsed row")
    args = ap.parse_args(argv)

    data = build(args.reference_dir, verbose=args.verbose)
    text = render(data)
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale: re-run scripts/extract_architectures.py", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.write_text(text, encoding="utf-8")
    archs = data["architectures"]
    distinct = len({e["architecture"] for e in archs})
    print(f"wrote {args.output}: {len(archs)} entries, {distinct} distinct architectures")
    for k, v in data["counts"].items():
        print(f"  {k:<24} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
