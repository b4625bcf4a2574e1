"""The supported-models matrix: result records -> one row per documented architecture, per tier.

Also everything around it: the `litmus matrix` runner (one pytest run over the tier suites into
a run directory), merging shard results, and diffs between runs. The matrix is computed from
result records only; the shape of matrix.json is documented in docs/matrix_format.md.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from engine.models.metadata import SECTIONS, ArchitectureInfo, get_architecture_info, load_architectures
from harness.cli import CommandError
from harness.results import LEVELS, RECORDS_FILE, TIERS, ResultRecord, append_record, environment, read_records

REPO_ROOT = Path(__file__).resolve().parent.parent
SUITES_DIR = REPO_ROOT / "suites"
SCHEMA_VERSION = 1
STATUSES = ("pass", "fail", "error", "skip", "untested")
FAILING = ("fail", "error")
NOT_IMPLEMENTED = "not implemented by the engine"
NO_RECORDS = "no result records"
UNLISTED = "unlisted"  # the section of rows for architectures vLLM's pages do not list
UNKNOWN_ARCHITECTURE = "(unknown)"  # the row of records that name no architecture
MATRIX_JSON = "matrix.json"
MATRIX_CSV = "matrix.csv"
DOCS_FILE = "supported_models.md"
DIFF_FILE = "diff.md"
LATEST = "latest"
PYTEST_LOG = "pytest.log"


# --------------------------------------------------------------------------- the data model

@dataclass
class ModelResult:
    status: str
    reason: str
    checks: dict[str, str]  # check name -> status


@dataclass
class TierResult:
    status: str
    reason: str
    models: dict[str, ModelResult]


@dataclass
class Row:
    # Field order is the key order in matrix.json: the documented fields first.
    architecture: str
    task: str | None
    family: str
    models: list[str]
    example_hf_models: list[str]
    inputs: list[str]
    tiers: dict[str, TierResult]
    level: str | None
    section: str
    subsection: str
    display_name: str | None
    implemented: bool
    # The engine implementations its checks ran ("native", "transformers"); a skipped check ran none.
    model_impls: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, str, str]:
        """Unique per row: one architecture can be listed under several sections and tasks."""
        return (self.architecture, self.section, self.subsection, self.task or "")

    @property
    def label(self) -> str:
        return f"{self.architecture} [{self.section}/{self.task or 'any task'}]"

    @classmethod
    def from_dict(cls, d: dict) -> Row:
        tiers = {
            tier: TierResult(t["status"], t["reason"], {m: ModelResult(**r) for m, r in t["models"].items()})
            for tier, t in d["tiers"].items()
        }
        return cls(**{**d, "tiers": tiers})


@dataclass
class RunInfo:
    id: str
    started: str
    finished: str
    engine_version: str
    git_sha: str
    transformers: str
    torch: str
    device: str

    @classmethod
    def for_records(cls, run_id: str, started: str, finished: str, records: Sequence[ResultRecord]) -> RunInfo:
        """Versions as the records state them (they may come from other machines), else this process's."""
        env = environment()
        provenance = {}
        for key in ("engine_version", "git_sha", "transformers", "torch", "device"):
            values = sorted({getattr(r, key) for r in records})
            provenance[key] = ", ".join(values) if values else env[key]
        return cls(id=run_id, started=started, finished=finished, **provenance)


@dataclass
class Matrix:
    run: RunInfo
    rows: list[Row]

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "run": asdict(self.run), "rows": [asdict(r) for r in self.rows]}

    @classmethod
    def from_dict(cls, d: dict) -> Matrix:
        if d.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"matrix schema_version {d.get('schema_version')!r}, expected {SCHEMA_VERSION}")
        return cls(RunInfo(**d["run"]), [Row.from_dict(r) for r in d["rows"]])


# --------------------------------------------------------------------------- building it

def build_matrix(records: Iterable[ResultRecord], run: RunInfo) -> Matrix:
    """Every documented architecture row, each tier aggregated from the records mapped to it."""
    rows = {row.key: row for row in map(_catalogue_row, load_architectures())}
    grouped: dict[tuple, list[ResultRecord]] = defaultdict(list)
    for record in records:
        if record.tier not in TIERS:
            raise ValueError(f"record of {record.model} {record.check}: unknown tier {record.tier!r}")
        row = _row_for_record(record, rows)
        grouped[row.key].append(record)
    for row in rows.values():
        _fill(row, grouped[row.key])
    return Matrix(run, sorted(rows.values(), key=_row_order))


def aggregate(records: Sequence[ResultRecord]) -> tuple[str, str]:
    """(status, reason): any error -> error, else any fail -> fail, else any pass -> pass,
    else (all skipped) skip; no records -> untested. The reason joins the distinct reasons
    of the records that decided the status (none for pass)."""
    outcomes = {r.outcome for r in records}
    for status in ("error", "fail", "pass", "skip"):
        if status in outcomes:
            reasons = sorted({r.reason for r in records if r.outcome == status and r.reason})
            return status, "" if status == "pass" else "; ".join(reasons)
    return "untested", ""


def level_of(tiers: dict[str, TierResult]) -> str | None:
    """The highest tier passed with every lower tier passed too (a skip does not count as a pass)."""
    reached = None
    for tier in LEVELS:
        if tiers[tier].status != "pass":
            break
        reached = tier
    return reached


def family_of(display_name: str | None, architecture: str) -> str:
    """The model family: the first word of the display name that begins the architecture name
    ("QwQ, Qwen2" for Qwen2ForCausalLM -> "Qwen"), else of the first display name, else the
    architecture name's stem ("Llama4ForConditionalGeneration" -> "Llama")."""
    words = [_family_word(name) for name in (display_name or "").split(",") if name.strip()]
    for word in words:
        if architecture.lower().startswith(word.lower()):
            return word
    if words:
        return words[0]
    return re.match(r"(.*?)(?=\d|For[A-Z]|Model|LMHead|$)", architecture).group(1) or architecture


def _family_word(name: str) -> str:
    # "Llama 3.1" -> "Llama", "Qwen2-based" -> "Qwen", "Ovis2.5" -> "Ovis": versions are not families.
    word = re.split(r"[\s.\-]", name.strip())[0]
    return word.rstrip("0123456789") or word


def _task(info: ArchitectureInfo) -> str | None:
    return info.tasks[0] if info.tasks else None  # every listed row has exactly one task


def _info_key(info: ArchitectureInfo) -> tuple[str, str, str, str]:
    return (info.architecture, info.section, info.subsection, _task(info) or "")


def _catalogue_row(info: ArchitectureInfo) -> Row:
    task = _task(info)
    return Row(
        architecture=info.architecture, task=task, family=family_of(info.display_name, info.architecture),
        models=[], example_hf_models=list(info.example_hf_models), inputs=_inputs(info), tiers={}, level=None,
        section=info.section, subsection=info.subsection, display_name=info.display_name,
        implemented=_implemented([info.architecture, info.hf_transformers_class], task),
    )


def _inputs(info: ArchitectureInfo) -> list[str]:
    # The modality cells as the docs write them; text-only tables have no such column.
    return list(info.inputs_raw) or list(info.inputs)


def _unlisted_row(architecture: str | None, task: str | None) -> Row:
    name = architecture or UNKNOWN_ARCHITECTURE
    return Row(
        architecture=name, task=task, family=family_of(None, name), models=[], example_hf_models=[], inputs=[],
        tiers={}, level=None, section=UNLISTED, subsection="", display_name=None,
        implemented=architecture is not None and _implemented([architecture], task),
    )


def _implemented(names: list[str | None], task: str | None) -> bool:
    """Whether the engine runs the architecture for the task: natively, or (generation only)
    through the Transformers backend, which needs a Transformers class that takes custom
    attention. A model may still be refused when it loads (its config says more); the
    tiers' records tell."""
    # Imported here: the registry imports torch, and `litmus --help` should not wait for it.
    from engine.models.registry import UnsupportedArchitectureError, get_model_impl, supported_tasks

    names = [n for n in names if n]
    try:
        _, impl = get_model_impl(names)
    except UnsupportedArchitectureError:
        return task in (None, "generate") and any(map(_backend_can_run, names))
    return task is None or task in supported_tasks(impl)


def _backend_can_run(architecture: str) -> bool:
    import transformers
    from transformers import GenerationMixin, PreTrainedModel

    cls = getattr(transformers, architecture, None)
    return (isinstance(cls, type) and issubclass(cls, PreTrainedModel) and issubclass(cls, GenerationMixin)
            and cls.is_backend_compatible())


def _row_for_record(record: ResultRecord, rows: dict[tuple, Row]) -> Row:
    """The row a record belongs to, by architecture (vLLM or transformers spelling) and task.

    A record without a task belongs to the architecture's generate row if it has one. Where
    two rows share architecture and task (ChatGLMModel is both a text and a multimodal
    generate row) the text row wins: the records say nothing about modality, and the suites'
    checks are text-only. Records of architectures (or tasks) the pages do not list get a
    row of their own, so no verdict is ever dropped.
    """
    infos = get_architecture_info(record.architecture) if record.architecture else []
    if record.task is not None:
        infos = [i for i in infos if record.task in i.tasks]
    if infos:
        info = min(infos, key=lambda i: (record.task is None and "generate" not in i.tasks, i.is_multimodal))
        return rows[_info_key(info)]
    row = _unlisted_row(record.architecture, record.task)
    return rows.setdefault(row.key, row)


def _fill(row: Row, records: list[ResultRecord]) -> None:
    row.models = sorted({r.model for r in records})
    row.model_impls = sorted({r.model_impl for r in records if r.model_impl and r.outcome != "skip"})
    for tier in TIERS:
        in_tier = [r for r in records if r.tier == tier]
        status, reason = aggregate(in_tier)
        if status == "untested":
            reason = NO_RECORDS if row.implemented else NOT_IMPLEMENTED
        models = {m: _model_result([r for r in in_tier if r.model == m]) for m in sorted({r.model for r in in_tier})}
        row.tiers[tier] = TierResult(status, reason, models)
    row.level = level_of(row.tiers)


def _model_result(records: list[ResultRecord]) -> ModelResult:
    status, reason = aggregate(records)
    checks = {c: aggregate([r for r in records if r.check == c])[0] for c in sorted({r.check for r in records})}
    return ModelResult(status, reason, checks)


def _row_order(row: Row) -> tuple:
    section = SECTIONS.index(row.section) if row.section in SECTIONS else len(SECTIONS)
    return (section, row.subsection, row.architecture.lower(), row.architecture, row.task or "")


# --------------------------------------------------------------------------- files

def load_matrix(path: Path) -> Matrix:
    """A matrix from a matrix.json file or a run directory holding one."""
    path = Path(path)
    file = path / MATRIX_JSON if path.is_dir() else path
    if not file.is_file():
        raise CommandError(f"no matrix at {file}")
    return Matrix.from_dict(json.loads(file.read_text(encoding="utf-8")))


def write_matrix_json(matrix: Matrix, path: Path) -> None:
    path.write_text(json.dumps(matrix.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_matrix_csv(matrix: Matrix, path: Path) -> None:
    """One line per row x tier; `models` are those with records in that tier."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["architecture", "task", "section", "subsection", "family", "tier", "status", "reason",
                         "models", "level"])
        for row in matrix.rows:
            for tier in TIERS:
                result = row.tiers[tier]
                writer.writerow([row.architecture, row.task or "", row.section, row.subsection, row.family, tier,
                                 result.status, result.reason, ";".join(result.models), row.level or ""])


# --------------------------------------------------------------------------- diff

ABSENT = "absent"  # the status of a row or model one of the two matrices does not have
CHANGE_KINDS = ("regression", "newly failing", "newly passing", "changed")


@dataclass(frozen=True)
class Change:
    row: str  # Row.label
    model: str | None  # None: the row's aggregated status
    tier: str
    old: str
    new: str

    @property
    def kind(self) -> str:
        if self.old == "pass" and self.new in FAILING:
            return "regression"
        if self.new in FAILING and self.old not in FAILING:
            return "newly failing"
        if self.new == "pass":
            return "newly passing"
        return "changed"


@dataclass
class MatrixDiff:
    old_id: str
    new_id: str
    changes: list[Change]

    def of_kind(self, kind: str) -> list[Change]:
        return [c for c in self.changes if c.kind == kind]

    @property
    def regressions(self) -> list[Change]:
        return self.of_kind("regression")


def diff_matrices(old: Matrix, new: Matrix) -> MatrixDiff:
    """Status changes per row x tier and per model x row x tier (rows in the new matrix's order)."""
    old_rows = {r.key: r for r in old.rows}
    new_rows = {r.key: r for r in new.rows}
    keys = list(new_rows) + [k for k in old_rows if k not in new_rows]
    changes = []
    for key in keys:
        before, after = old_rows.get(key), new_rows.get(key)
        label = (after or before).label
        for tier in TIERS:
            changes += _tier_changes(label, tier, before.tiers[tier] if before else None,
                                     after.tiers[tier] if after else None)
    return MatrixDiff(old.run.id, new.run.id, changes)


def _tier_changes(label: str, tier: str, before: TierResult | None, after: TierResult | None) -> list[Change]:
    def status(result: TierResult | ModelResult | None) -> str:
        return result.status if result else ABSENT

    changes = []
    if status(before) != status(after):
        changes.append(Change(label, None, tier, status(before), status(after)))
    old_models = before.models if before else {}
    new_models = after.models if after else {}
    for model in sorted(old_models.keys() | new_models.keys()):
        old, new = status(old_models.get(model)), status(new_models.get(model))
        if old != new:
            changes.append(Change(label, model, tier, old, new))
    return changes


def render_diff_markdown(diff: MatrixDiff) -> str:
    counts = ", ".join(f"{len(diff.of_kind(kind))} {kind}" for kind in CHANGE_KINDS)
    lines = [f"# Matrix diff: `{diff.old_id}` → `{diff.new_id}`", "", counts + "."]
    for kind in CHANGE_KINDS:
        lines += ["", f"## {kind.capitalize()}", ""]
        changes = diff.of_kind(kind)
        if not changes:
            lines.append("None.")
            continue
        lines += ["| Row | Model | Tier | Old | New |", "|---|---|---|---|---|"]
        lines += [f"| {c.row} | {c.model or '(all models)'} | {c.tier} | {c.old} | {c.new} |" for c in changes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- merge

class MergeConflictError(ValueError):
    pass


def merge_records(sources: Sequence[Path]) -> list[ResultRecord]:
    """The union of the sources' records, identical ones once.

    Two different records for the same model, tier and check from different sources mean the
    same model ran in two shards: which verdict holds is unknowable, so that is an error.
    """
    merged: list[ResultRecord] = []
    seen: set[str] = set()
    owner: dict[tuple[str, str, str], Path] = {}
    conflicts = []
    for source in sources:
        records = read_records(source)
        if not records:
            raise CommandError(f"no result records in {source}")
        for record in records:
            line = record.to_json()
            if line in seen:
                continue
            seen.add(line)
            first = owner.setdefault((record.model, record.tier, record.check), source)
            if first != source:
                conflicts.append(f"{record.model} {record.tier}/{record.check}: in {first} and in {source}")
            merged.append(record)
    if conflicts:
        raise MergeConflictError("conflicting records for the same model/tier/check from different shards:\n  "
                                 + "\n  ".join(sorted(set(conflicts))))
    return merged


# --------------------------------------------------------------------------- the runner

@dataclass(frozen=True)
class Shard:
    index: int  # 0-based
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
        if not match or not 0 <= int(match[1]) < int(match[2]):
            raise argparse.ArgumentTypeError(f"shard {text!r} is not i/n with 0 <= i < n")
        return cls(int(match[1]), int(match[2]))

    def select(self, models: Iterable[str]) -> list[str]:
        """Model k of the sorted list goes to shard k mod n: every model in exactly one shard."""
        return [m for k, m in enumerate(sorted(set(models))) if k % self.count == self.index]


@dataclass
class RunOptions:
    models: list[str]
    tiers: list[str] = field(default_factory=lambda: list(TIERS))
    workers: str = "1"
    shard: Shard | None = None
    reports_dir: Path = Path("reports")
    timeout: float | None = None  # per test (pytest-timeout)
    global_timeout: float | None = None  # the whole pytest run
    run_id: str | None = None
    suites_dir: Path = SUITES_DIR
    # Everything before the arguments; tests put a stand-in script here.
    pytest_command: tuple[str, ...] = (sys.executable, "-m", "pytest")


@dataclass
class PytestOutcome:
    returncode: int | None  # None: killed for exceeding the global timeout
    last_error: str  # the line of pytest's output that best says why it stopped

    def missing_reason(self, global_timeout: float | None) -> str:
        if self.returncode is None:
            return f"the run exceeded its global timeout of {global_timeout:g} s before this model recorded a result"
        tail = f": {self.last_error}" if self.last_error else ""
        return f"pytest exited with code {self.returncode} without a result record for this model{tail}"


def run_matrix(options: RunOptions) -> Path:
    """Runs the suites over the models (one pytest run) and writes the run directory."""
    models = (options.shard or Shard(0, 1)).select(options.models)
    suites = {tier: options.suites_dir / tier for tier in options.tiers if (options.suites_dir / tier).is_dir()}
    if not suites:
        raise CommandError(f"no suite directory for tiers {', '.join(options.tiers)} under {options.suites_dir}")
    for tier in sorted(set(options.tiers) - suites.keys()):
        print(f"litmus matrix: no suite for tier {tier} ({options.suites_dir / tier}); it stays untested",
              file=sys.stderr)
    run_id = options.run_id or _new_run_id(options.reports_dir, options.shard)
    run_dir = options.reports_dir / run_id
    run_dir.mkdir(parents=True, exist_ok=False)
    results = run_dir / RECORDS_FILE
    started = _now()
    if models:
        print(f"litmus matrix: {len(models)} models, tiers {', '.join(suites)}; pytest output in "
              f"{run_dir / PYTEST_LOG}", file=sys.stderr)
        outcome = _run_pytest(_pytest_args(options, models, list(suites.values()), run_dir), run_dir,
                              options.global_timeout)
        for record in _missing_records(models, list(suites), _read(results), outcome, options.global_timeout):
            append_record(results, record)
    records = _read(results)
    run = RunInfo.for_records(run_id, started, _now(), records)
    # A shard's matrix lacks the other shards' models: publishing or diffing it would mislead.
    write_reports(run_dir, records, run, options.reports_dir, publish=options.shard is None)
    return run_dir


def _pytest_args(options: RunOptions, models: list[str], suites: list[Path], run_dir: Path) -> list[str]:
    args = [*options.pytest_command, *map(str, suites), "-n", options.workers, "--dist", "loadgroup",
            "--results-dir", str(run_dir)]
    if options.timeout is not None:
        args += ["--timeout", f"{options.timeout:g}"]
    for model in models:
        args += ["--model", model]
    return args


def _run_pytest(args: list[str], run_dir: Path, global_timeout: float | None) -> PytestOutcome:
    log_path = run_dir / PYTEST_LOG
    deadline = time.monotonic() + global_timeout if global_timeout else math.inf
    with log_path.open("wb") as log, _Progress(run_dir / RECORDS_FILE, log_path) as progress:
        # Its own session, so that on a timeout the xdist workers are killed with it. The caller's
        # working directory, so relative model paths mean what they meant to the caller; pytest
        # still finds the repository's configuration from the (absolute) suite paths.
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while process.poll() is None and time.monotonic() < deadline:
                progress.update()
                time.sleep(0.5)
        finally:
            timed_out = process.poll() is None
            if timed_out:
                _kill(process)
        progress.update()
    return PytestOutcome(None if timed_out else process.returncode, _last_error(log_path))


def _kill(process: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=10)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
    process.wait()


class _Progress:
    """A tqdm bar over result records as the plugin appends them (one per test); the total is
    read from pytest's collection line ("collected N items" / "N workers [N items]")."""

    _COLLECTED = re.compile(rb"(?:collected |\[)(\d+) items?")

    def __init__(self, results: Path, log: Path) -> None:
        from tqdm import tqdm

        self._results, self._log = results, log
        self._results_offset = self._log_offset = 0
        self._bar = tqdm(desc="checks", unit="test", disable=None)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()

    def update(self) -> None:
        if self._bar.total is None:
            log, self._log_offset = _read_from(self._log, self._log_offset)
            if match := self._COLLECTED.search(log):
                self._bar.total = int(match[1])
                self._bar.refresh()
        new, self._results_offset = _read_from(self._results, self._results_offset)
        self._bar.update(new.count(b"\n"))


def _read_from(path: Path, offset: int) -> tuple[bytes, int]:
    """The whole lines written since offset (a line being written is read next time)."""
    if not path.exists():
        return b"", offset
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    return data[:end], offset + end


def _last_error(log: Path) -> str:
    """The last line mentioning an error (pytest ends usage errors with its rootdir), else the last line."""
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or [""])[-1][:300]


def _missing_records(models: list[str], tiers: list[str], records: list[ResultRecord], outcome: PytestOutcome,
                     global_timeout: float | None) -> list[ResultRecord]:
    """An `error` record for every (model, tier) with no record when pytest died, hung or stopped
    early. A run that ended with every test run (exit 0, or 1: some failed) recorded all there is:
    a tier without a check for a model (the community tier, for a model nobody has reported on)
    stays untested."""
    if outcome.returncode in (0, 1):
        return []
    have = {(r.model, r.tier) for r in records}
    known = {r.model: (r.architecture, r.task) for r in records}
    reason = outcome.missing_reason(global_timeout)
    missing = []
    for model in models:
        architecture, task = known.get(model, (_architecture_of(model), None))
        missing += [ResultRecord(model=model, architecture=architecture, task=task, tier=tier, check="run",
                                 outcome="error", reason=reason)
                    for tier in tiers if (model, tier) not in have]
    return missing


def _architecture_of(model: str) -> str | None:
    """The zoo spec's or the local config's architecture, without building or loading anything."""
    from harness.zoo import describe

    return describe(model).architecture


def _read(results: Path) -> list[ResultRecord]:
    return read_records(results) if results.exists() else []


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _new_run_id(reports_dir: Path, shard: Shard | None, prefix: str = "") -> str:
    """Sortable by time; a shard's id names the shard; a clash within a second gets a suffix."""
    base = prefix + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    if shard:
        base += f"-shard{shard.index}of{shard.count}"
    run_id, n = base, 1
    while (reports_dir / run_id).exists():
        run_id, n = f"{base}-{n}", n + 1
    return run_id


def write_reports(run_dir: Path, records: list[ResultRecord], run: RunInfo, reports_dir: Path,
                  publish: bool) -> Matrix:
    """matrix.json/.csv, the docs table, heatmap, diff against the previous published run and
    index.html into run_dir; when publishing, also move reports/latest and the committed table."""
    # Imported here: both modules import this one for the data model.
    from harness import docs, report_html

    matrix = build_matrix(records, run)
    write_matrix_json(matrix, run_dir / MATRIX_JSON)
    write_matrix_csv(matrix, run_dir / MATRIX_CSV)
    (run_dir / DOCS_FILE).write_text(docs.render(matrix, "markdown"), encoding="utf-8")
    heatmap = report_html.write_heatmap(matrix, run_dir / report_html.HEATMAP_FILE)
    diff = _diff_with_previous(reports_dir / LATEST / MATRIX_JSON, matrix) if publish else None
    if diff:
        (run_dir / DIFF_FILE).write_text(render_diff_markdown(diff), encoding="utf-8")
    files = sorted(f.name for f in run_dir.iterdir() if f.is_file() and f.name != report_html.INDEX_FILE)
    (run_dir / report_html.INDEX_FILE).write_text(report_html.render_index(matrix, diff, heatmap, files),
                                                  encoding="utf-8")
    if publish:
        _publish(run_dir, reports_dir)
    return matrix


def _diff_with_previous(previous: Path, matrix: Matrix) -> MatrixDiff | None:
    if not previous.is_file():
        return None
    try:
        return diff_matrices(load_matrix(previous), matrix)
    except (ValueError, KeyError, TypeError) as e:
        # An unreadable old matrix must not cost the new run its report.
        print(f"litmus matrix: no diff, {previous} is not a readable matrix: {e}", file=sys.stderr)
        return None


def _publish(run_dir: Path, reports_dir: Path) -> None:
    """reports/latest -> the run (a relative symlink, swapped atomically); the docs table copied."""
    temporary = reports_dir / f".{LATEST}.tmp"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(run_dir.name, target_is_directory=True)
    os.replace(temporary, reports_dir / LATEST)
    shutil.copyfile(run_dir / DOCS_FILE, reports_dir / DOCS_FILE)


def merge_runs(sources: Sequence[Path], out: Path | None, reports_dir: Path) -> Path:
    """Joins shard run directories into one run directory (published when it is in reports_dir)."""
    try:
        records = merge_records(sources)
    except MergeConflictError as e:
        raise CommandError(str(e)) from None
    out = out or reports_dir / _new_run_id(reports_dir, None, prefix="merged-")
    if (out / RECORDS_FILE).exists():
        raise CommandError(f"{out / RECORDS_FILE} exists; merge into a new directory")
    out.mkdir(parents=True, exist_ok=True)
    for record in records:
        append_record(out / RECORDS_FILE, record)
    times = sorted(r.timestamp for r in records)
    run = RunInfo.for_records(out.name, times[0], times[-1], records)
    publish = out.resolve().parent == reports_dir.resolve()
    write_reports(out, records, run, reports_dir, publish=publish)
    return out


# --------------------------------------------------------------------------- CLI

def register_matrix_cli(subparsers: argparse._SubParsersAction) -> None:
    """`litmus matrix` (run), `litmus matrix merge`, `litmus matrix diff`."""
    parser = subparsers.add_parser("matrix", help="run the tier suites over models and build the supported-models "
                                                  "matrix and report")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--zoo", action="store_true", help="every zoo model (the default)")
    chosen.add_argument("--model", action="append", dest="models", metavar="NAME|PATH",
                        help="a model to check (repeatable)")
    chosen.add_argument("--models-file", type=Path, metavar="FILE", help="models, one a line ('#' comments)")
    parser.add_argument("--tiers", type=_tier_list, default=list(TIERS), metavar="T1,T2",
                        help=f"tiers to run (default: {','.join(TIERS)}; tiers without a suite stay untested)")
    parser.add_argument("-n", "--workers", default="1", type=workers_arg,
                        help="pytest-xdist workers: a number, 'auto' or 'logical' (default 1)")
    parser.add_argument("--shard", type=Shard.parse, metavar="i/n",
                        help="run only model k of the sorted list with k mod n == i (0-based)")
    parser.add_argument("--reports-dir", type=Path, default=Path("reports"), help="default: reports")
    parser.add_argument("--timeout", type=float, metavar="S", help="per-test timeout in seconds (pytest-timeout)")
    parser.add_argument("--global-timeout", type=float, metavar="S", help="timeout of the whole pytest run")
    parser.add_argument("--run-id", help="name of the run directory (default: UTC time, plus the shard)")
    parser.set_defaults(run=_cmd_run)

    actions = parser.add_subparsers(title="matrix commands (none: run)", metavar="[merge|diff]")
    merge = actions.add_parser("merge", help="join shard runs' records into one matrix")
    merge.add_argument("sources", nargs="+", type=Path, metavar="DIR")
    merge.add_argument("--out", type=Path, metavar="DIR", help="default: a new run directory in --reports-dir")
    # SUPPRESS: given before `merge`, the option belongs to the matrix parser and must not be reset here.
    merge.add_argument("--reports-dir", type=Path, default=argparse.SUPPRESS, help="default: reports")
    merge.set_defaults(run=_cmd_merge)
    diff = actions.add_parser("diff", help="status changes between two matrices (run dirs or matrix.json files)")
    diff.add_argument("old", type=Path, metavar="OLD")
    diff.add_argument("new", type=Path, metavar="NEW")
    diff.add_argument("--fail-on-regression", action="store_true",
                      help="exit 1 when a row or model that passed a tier now fails or errors in it")
    diff.set_defaults(run=_cmd_diff)


def _tier_list(text: str) -> list[str]:
    tiers = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tiers if t not in TIERS]
    if unknown or not tiers:
        raise argparse.ArgumentTypeError(f"unknown tiers {unknown}; choose from {','.join(TIERS)}")
    return tiers


def workers_arg(text: str) -> str:
    if text in ("auto", "logical") or text.isdigit():
        return text
    raise argparse.ArgumentTypeError(f"workers must be a number, 'auto' or 'logical', not {text!r}")


def _selected_models(args: argparse.Namespace) -> list[str]:
    if args.models:
        return args.models
    from harness.zoo import list_specs, read_models_file

    if args.models_file:
        try:
            return read_models_file(args.models_file)
        except OSError as e:
            raise CommandError(f"cannot read {args.models_file}: {e}") from None
    return [spec.name for spec in list_specs()]


def _cmd_run(args: argparse.Namespace) -> int:
    options = RunOptions(models=_selected_models(args), tiers=args.tiers, workers=args.workers, shard=args.shard,
                         reports_dir=args.reports_dir, timeout=args.timeout, global_timeout=args.global_timeout,
                         run_id=args.run_id)
    run_dir = run_matrix(options)
    _print_summary(run_dir)
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    _print_summary(merge_runs(args.sources, args.out, args.reports_dir))
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    diff = diff_matrices(load_matrix(args.old), load_matrix(args.new))
    print(render_diff_markdown(diff), end="")
    return 1 if args.fail_on_regression and diff.regressions else 0


def _print_summary(run_dir: Path) -> None:
    matrix = load_matrix(run_dir)
    for tier in TIERS:
        counts = defaultdict(int)
        for row in matrix.rows:
            counts[row.tiers[tier].status] += 1
        print(f"{tier:12} " + "  ".join(f"{s} {counts[s]}" for s in STATUSES if counts[s]))
    if (run_dir / DIFF_FILE).exists():
        print(f"changes since the previous run: {run_dir / DIFF_FILE}")
    print(f"report: {run_dir / 'index.html'}")
