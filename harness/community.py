"""Community reports: a user's evidence-backed verdict on one model, as reports/community/*.yaml.

A report says which model (and architecture) was run, on which engine version, on what date,
which tiers the reporter ran, and its status: `works` (every check passed or was skipped for a
stated reason), `partial` (smoke passed, some other check failed) or `broken` (smoke failed or
never passed). The status must follow from the verdicts in the evidence, which also pins the
exact checkpoint (sha256 of config.json and of every weights file) and the software versions.

    schema_version: 1
    model: smollm2-135m-instruct            # zoo name, hub id, or the checkpoint's name
    architecture: LlamaForCausalLM
    status: works                           # works | partial | broken
    engine_version: 0.1.0
    date: 2025-06-01                        # the day the checks ran (UTC)
    tiers: [smoke, strict]                  # the tiers the reporter ran; smoke is required
    reporter: jane                          # optional
    notes: free text                        # optional
    evidence:
      config_sha256: <64 hex>               # config.json (a GGUF file: its derived config, as JSON)
      weights_sha256: {model.safetensors: <64 hex>}
      versions: {engine: 0.1.0, transformers: 5.23.0, torch: 2.13.0, git_sha: ..., python: ...}
      device: cpu
      dtype: float32
      verdicts:                             # one list per tier in `tiers`
        smoke:
        - {check: test_smoke::test_selected_model, outcome: pass}
        strict:
        - {check: ..., outcome: skip, reason: ...}   # a reason is required unless outcome is pass

`litmus report --model X` runs the tiers on X with pytest and writes such a file.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.cli import CommandError
from harness.results import OUTCOMES, ResultRecord, read_records

SCHEMA_VERSION = 1
STATUSES = ("works", "partial", "broken")
# The tiers a reporter runs; `community` is what the reports themselves make.
RUNNABLE_TIERS = ("smoke", "strict", "sensibility")
FAILING = ("fail", "error")
REQUIRED_VERSIONS = ("engine", "transformers", "torch")
OPTIONAL_VERSIONS = ("git_sha", "python")
REPO_ROOT = Path(__file__).resolve().parent.parent
REPORTS_DIR = REPO_ROOT / "reports" / "community"
# What `litmus report` runs per tier, relative to suites/. Smoke runs only its check of the selected
# model: the rest of that suite sweeps the engine's own architectures, which say nothing of this model.
SUITE_TARGETS = {
    "smoke": "smoke/test_smoke.py::test_selected_model",
    "strict": "strict",
    "sensibility": "sensibility",
}

_SHA256 = re.compile(r"[0-9a-f]{64}")
_VERSION = re.compile(r"\d+(\.\d+)*([.+-]?[0-9A-Za-z.+-]*)?")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TOP_FIELDS = ("schema_version", "model", "architecture", "status", "engine_version", "date", "tiers", "evidence")
_OPTIONAL_FIELDS = ("reporter", "notes")
_EVIDENCE_FIELDS = ("config_sha256", "weights_sha256", "versions", "device", "dtype", "verdicts")
_VERDICT_FIELDS = ("check", "outcome", "reason")


class ReportError(ValueError):
    """A report file that does not follow the schema; names the file and every bad field."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {name}: {message}" if name else f"{source}: {message}" for name, message in problems]
        super().__init__("\n".join(lines))


@dataclass
class Verdict:
    check: str
    outcome: str
    reason: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"check": self.check, "outcome": self.outcome, **({"reason": self.reason} if self.reason else {})}


@dataclass
class Evidence:
    config_sha256: str
    weights_sha256: dict[str, str]
    versions: dict[str, str]
    device: str
    dtype: str
    verdicts: dict[str, list[Verdict]]


@dataclass
class CommunityReport:
    model: str
    architecture: str
    status: str
    engine_version: str
    date: dt.date
    tiers: list[str]
    evidence: Evidence
    reporter: str = ""
    notes: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in _TOP_FIELDS if name != "evidence"}
        data.update({name: getattr(self, name) for name in _OPTIONAL_FIELDS if getattr(self, name)})
        evidence = asdict(self.evidence)
        evidence["verdicts"] = {tier: [v.to_dict() for v in vs] for tier, vs in self.evidence.verdicts.items()}
        return {**data, "evidence": evidence}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=110)


def derive_status(verdicts: dict[str, list[Verdict]]) -> str:
    """broken: smoke failed, or no smoke check passed; partial: another check failed; else works."""
    smoke = verdicts.get("smoke", [])
    if not any(v.outcome == "pass" for v in smoke) or any(v.outcome in FAILING for v in smoke):
        return "broken"
    if any(v.outcome in FAILING for vs in verdicts.values() for v in vs):
        return "partial"
    return "works"


# --------------------------------------------------------------------------- reading and validating

def load_report(path: Path) -> CommunityReport:
    return validate_report(read_yaml(path), str(path))


def read_yaml(path: Path) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(str(path), [("", f"cannot read the file: {exc}")]) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ReportError(str(path), [("", f"not valid YAML: {where}{problem}")]) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe loading that rejects a key given twice, which plain YAML loading resolves silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def validate_report(data: Any, source: str = "<report>") -> CommunityReport:
    """The report in `data` (parsed YAML), or ReportError listing every problem found."""
    problems: list[tuple[str, str]] = []
    if not isinstance(data, dict):
        raise ReportError(source, [("", f"the top level must be a mapping of fields, not {type(data).__name__}")])
    _check_fields(data, "", _TOP_FIELDS, _OPTIONAL_FIELDS, problems)
    if "schema_version" in data and data["schema_version"] != SCHEMA_VERSION:
        problems.append(("schema_version", f"must be {SCHEMA_VERSION}, not {data['schema_version']!r}"))
    for name in ("model", "reporter", "notes"):
        if name in data and not _text(data[name]):
            problems.append((name, "must be a non-empty string"))
    if "architecture" in data and not (isinstance(data["architecture"], str)
                                       and _IDENTIFIER.fullmatch(data["architecture"])):
        problems.append(("architecture", f"must be a model class name like LlamaForCausalLM, not "
                                         f"{data['architecture']!r}"))
    if "status" in data and data["status"] not in STATUSES:
        problems.append(("status", f"must be one of {', '.join(STATUSES)}, not {data['status']!r}"))
    _check_version(data.get("engine_version"), "engine_version", problems, present="engine_version" in data)
    date = _check_date(data, problems)
    tiers = _check_tiers(data, problems)
    evidence = data.get("evidence")
    if "evidence" in data:
        _check_evidence(evidence, tiers, data.get("engine_version"), problems)
    if problems:
        raise ReportError(source, problems)
    verdicts = {tier: [Verdict(v["check"], v["outcome"], v.get("reason", "")) for v in evidence["verdicts"][tier]]
                for tier in tiers}
    derived = derive_status(verdicts)
    if data["status"] != derived:
        raise ReportError(source, [("status", f"is {data['status']!r} but the verdicts say {derived!r} "
                                              f"({_status_why(verdicts)})")])
    return CommunityReport(
        model=data["model"], architecture=data["architecture"], status=data["status"],
        engine_version=str(data["engine_version"]), date=date, tiers=tiers,
        evidence=Evidence(
            config_sha256=evidence["config_sha256"], weights_sha256=dict(evidence["weights_sha256"]),
            versions={k: str(v) for k, v in evidence["versions"].items()}, device=evidence["device"],
            dtype=evidence["dtype"], verdicts=verdicts,
        ),
        reporter=data.get("reporter", ""), notes=data.get("notes", ""),
    )


def _check_fields(data: dict, prefix: str, required: tuple[str, ...], optional: tuple[str, ...],
                  problems: list[tuple[str, str]]) -> None:
    for name in required:
        if name not in data:
            problems.append((prefix + name, "is missing"))
    for name in data:
        if name not in required and name not in optional:
            problems.append((f"{prefix}{name}", f"is not a field of a community report (fields here: "
                                                f"{', '.join(required + optional)})"))


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _check_version(value: Any, name: str, problems: list[tuple[str, str]], present: bool = True) -> None:
    if present and not (isinstance(value, str) and _VERSION.fullmatch(value)):
        problems.append((name, f"must be a version string like '0.1.0' (quoted in YAML), not {value!r}"))


def _check_date(data: dict, problems: list[tuple[str, str]]) -> dt.date | None:
    if "date" not in data:
        return None
    value = data["date"]
    if isinstance(value, str):
        try:
            value = dt.date.fromisoformat(value)
        except ValueError:
            pass
    if not isinstance(value, dt.date) or isinstance(value, dt.datetime):
        problems.append(("date", f"must be a date YYYY-MM-DD, not {data['date']!r}"))
        return None
    # A day of slack: the reporter's "today" may be ahead of UTC.
    if value > dt.datetime.now(dt.timezone.utc).date() + dt.timedelta(days=1):
        problems.append(("date", f"{value} is in the future"))
    return value


def _check_tiers(data: dict, problems: list[tuple[str, str]]) -> list[str]:
    if "tiers" not in data:
        return []
    tiers = data["tiers"]
    if not isinstance(tiers, list) or not tiers:
        problems.append(("tiers", f"must be a non-empty list of tiers ({', '.join(RUNNABLE_TIERS)}), not {tiers!r}"))
        return []
    unknown = [t for t in tiers if t not in RUNNABLE_TIERS]
    if unknown:
        problems.append(("tiers", f"{unknown} are not tiers a reporter runs ({', '.join(RUNNABLE_TIERS)})"))
    if len(set(map(str, tiers))) != len(tiers):
        problems.append(("tiers", f"lists a tier twice: {tiers}"))
    if "smoke" not in tiers:
        problems.append(("tiers", "must include smoke: a model not shown to load and run has no verdict"))
    return [t for t in tiers if t in RUNNABLE_TIERS]


def _check_evidence(evidence: Any, tiers: list[str], engine_version: Any, problems: list[tuple[str, str]]) -> None:
    if not isinstance(evidence, dict):
        problems.append(("evidence", f"must be a mapping, not {type(evidence).__name__}"))
        return
    _check_fields(evidence, "evidence.", _EVIDENCE_FIELDS, (), problems)
    if "config_sha256" in evidence and not _is_sha256(evidence["config_sha256"]):
        problems.append(("evidence.config_sha256",
                         f"must be 64 lowercase hex digits, not {evidence['config_sha256']!r}"))
    if "weights_sha256" in evidence:
        _check_weights(evidence["weights_sha256"], problems)
    if "versions" in evidence:
        _check_versions(evidence["versions"], engine_version, problems)
    for name in ("device", "dtype"):
        if name in evidence and not _text(evidence[name]):
            problems.append((f"evidence.{name}", "must be a non-empty string"))
    if "verdicts" in evidence:
        _check_verdicts(evidence["verdicts"], tiers, problems)


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and bool(_SHA256.fullmatch(value))


def _check_weights(weights: Any, problems: list[tuple[str, str]]) -> None:
    if not isinstance(weights, dict) or not weights:
        problems.append(("evidence.weights_sha256", "must map each weights file name to its sha256 (at least one)"))
        return
    for name, digest in weights.items():
        if not _text(name):
            problems.append(("evidence.weights_sha256", f"file name {name!r} must be a non-empty string"))
        elif not _is_sha256(digest):
            problems.append((f"evidence.weights_sha256[{name!r}]", f"must be 64 lowercase hex digits, not {digest!r}"))


def _check_versions(versions: Any, engine_version: Any, problems: list[tuple[str, str]]) -> None:
    if not isinstance(versions, dict):
        problems.append(("evidence.versions", f"must be a mapping ({', '.join(REQUIRED_VERSIONS)}), not {versions!r}"))
        return
    _check_fields(versions, "evidence.versions.", REQUIRED_VERSIONS, OPTIONAL_VERSIONS, problems)
    for name in REQUIRED_VERSIONS:
        if name in versions:
            _check_version(versions[name], f"evidence.versions.{name}", problems)
    for name in OPTIONAL_VERSIONS:
        if name in versions and not _text(versions[name]):
            problems.append((f"evidence.versions.{name}", "must be a non-empty string"))
    if "engine" in versions and isinstance(engine_version, str) and versions["engine"] != engine_version:
        problems.append(("evidence.versions.engine", f"{versions['engine']!r} differs from engine_version "
                                                     f"{engine_version!r}"))


def _check_verdicts(verdicts: Any, tiers: list[str], problems: list[tuple[str, str]]) -> None:
    if not isinstance(verdicts, dict):
        problems.append(("evidence.verdicts", f"must map each tier in `tiers` to its checks, not {verdicts!r}"))
        return
    for tier in tiers:
        if tier not in verdicts:
            problems.append((f"evidence.verdicts.{tier}", "is missing: every tier in `tiers` needs its verdicts"))
    for tier, entries in verdicts.items():
        name = f"evidence.verdicts.{tier}"
        if tier not in tiers:
            problems.append((name, f"is not in `tiers` {tiers}"))
        elif not isinstance(entries, list) or not entries:
            problems.append((name, "must be a non-empty list of {check, outcome, reason} entries"))
        else:
            _check_verdict_list(entries, name, problems)


def _check_verdict_list(entries: list, name: str, problems: list[tuple[str, str]]) -> None:
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        at = f"{name}[{i}]"
        if not isinstance(entry, dict):
            problems.append((at, f"must be a mapping {{check, outcome, reason}}, not {entry!r}"))
            continue
        _check_fields(entry, f"{at}.", _VERDICT_FIELDS[:2], _VERDICT_FIELDS[2:], problems)
        check, outcome = entry.get("check"), entry.get("outcome")
        if "check" in entry and not _text(check):
            problems.append((f"{at}.check", "must be a non-empty string"))
        elif check in seen:
            problems.append((f"{at}.check", f"{check!r} is listed twice"))
        seen.add(check)
        if "outcome" in entry and outcome not in OUTCOMES:
            problems.append((f"{at}.outcome", f"must be one of {', '.join(OUTCOMES)}, not {outcome!r}"))
        if "reason" in entry and not isinstance(entry["reason"], str):
            problems.append((f"{at}.reason", f"must be a string, not {entry['reason']!r}"))
        elif outcome in OUTCOMES and outcome != "pass" and not _text(entry.get("reason")):
            problems.append((f"{at}.reason", f"is required for outcome {outcome!r}"))


def _status_why(verdicts: dict[str, list[Verdict]]) -> str:
    failed = [f"{tier} {v.check}: {v.outcome}" for tier, vs in verdicts.items() for v in vs if v.outcome in FAILING]
    if failed:
        return "; ".join(failed[:3])
    if not any(v.outcome == "pass" for v in verdicts.get("smoke", [])):
        return "no smoke check passed"
    return "every check passed or was skipped"


# --------------------------------------------------------------------------- writing: `litmus report`

@dataclass
class ReportOptions:
    model: str
    out: Path = REPORTS_DIR
    tiers: list[str] = field(default_factory=lambda: list(RUNNABLE_TIERS))
    name: str | None = None  # the model's name in the report
    reporter: str = ""
    timeout: float | None = None  # per test (pytest-timeout)
    suites_dir: Path = REPO_ROOT / "suites"


def make_report(options: ReportOptions) -> tuple[CommunityReport, Path]:
    """Runs the tiers on the model with pytest, then writes the report; returns it and its path."""
    from engine.loader import load_hf_config, resolve_model
    from harness.zoo import ModelInfo, describe

    try:
        info: ModelInfo = describe(options.model, build=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CommandError(f"cannot use model {options.model!r}: {exc}") from None
    targets = {tier: options.suites_dir / SUITE_TARGETS[tier] for tier in options.tiers}
    missing = {tier: f"no suite {target.relative_to(options.suites_dir.parent)} in this checkout"
               for tier, target in targets.items() if not Path(str(target).split("::")[0]).exists()}
    runnable = {tier: target for tier, target in targets.items() if tier not in missing}
    if "smoke" not in runnable:
        raise CommandError(f"a report needs the smoke tier, and it cannot run: {missing.get('smoke', 'not selected')}")
    with tempfile.TemporaryDirectory(prefix="litmus-report-") as results:
        returncode = _run_pytest(options, list(runnable.values()), Path(results))
        records = [r for r in read_records(Path(results)) if r.model == options.model]
    verdicts = _verdicts(records, list(runnable), returncode)
    source = resolve_model(info.path)
    report = CommunityReport(
        model=options.name or _report_name(info),
        architecture=info.architecture or load_hf_config(source).architectures[0],
        status=derive_status(verdicts), engine_version=_versions(records)["engine"],
        date=dt.datetime.now(dt.timezone.utc).date(), tiers=list(runnable), reporter=options.reporter,
        notes="; ".join(f"tier {tier} not run: {why}" for tier, why in missing.items()),
        evidence=Evidence(
            **checkpoint_hashes(source), versions=_versions(records),
            device=records[0].device if records else "", dtype=records[0].dtype if records else "",
            verdicts=verdicts,
        ),
    )
    # The file written must be one the community suite accepts.
    validate_report(yaml.safe_load(report.to_yaml()), "the report litmus made")
    return report, _write(report, options.out)


def _run_pytest(options: ReportOptions, targets: list[Path], results: Path) -> int:
    args = [sys.executable, "-m", "pytest", *map(str, targets), "--model", options.model, "--results-dir",
            str(results), "-p", "no:cacheprovider", "-q"]
    if options.timeout is not None:
        args += ["--timeout", f"{options.timeout:g}"]
    print(f"litmus report: running {' '.join(args[3:])}", file=sys.stderr)
    # pytest's output is relayed to stderr line by line (stdout carries only the report's path);
    # its records, not its output, are the report's verdicts.
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace") as proc:
        for line in proc.stdout:
            sys.stderr.write(line)
    return proc.returncode


def _verdicts(records: list[ResultRecord], tiers: list[str], returncode: int) -> dict[str, list[Verdict]]:
    verdicts: dict[str, list[Verdict]] = {tier: [] for tier in tiers}
    for record in records:
        if record.tier in verdicts:
            verdicts[record.tier].append(Verdict(record.check, record.outcome, record.reason))
    for tier, entries in verdicts.items():
        if not entries:
            # pytest died or collected nothing for this tier: no evidence is an error, not a pass.
            entries.append(Verdict("run", "error", f"pytest exited with code {returncode} without a result "
                                                   f"record for this tier"))
    return verdicts


def _versions(records: list[ResultRecord]) -> dict[str, str]:
    from harness.results import environment

    env = environment()
    first = records[0] if records else None
    return {
        "engine": first.engine_version if first else env["engine_version"],
        "transformers": first.transformers if first else env["transformers"],
        "torch": first.torch if first else env["torch"],
        "git_sha": first.git_sha if first else env["git_sha"],
        "python": env["python"],
    }


def checkpoint_hashes(source) -> dict[str, Any]:
    """sha256 of the config and of every weights file of a resolved checkpoint (engine.loader.ModelSource)."""
    from harness.zoo.store import file_sha256

    if source.gguf_file is not None:  # the config is derived from the GGUF file's metadata
        from engine.loader import load_hf_config

        config = load_hf_config(source).to_json_string(use_diff=False)
        return {"config_sha256": hashlib.sha256(config.encode()).hexdigest(),
                "weights_sha256": {source.gguf_file.name: file_sha256(source.gguf_file)}}
    weights = sorted(source.path.glob("*.safetensors"))
    if not weights:
        raise CommandError(f"{source.path} holds no *.safetensors weights to hash")
    return {"config_sha256": file_sha256(source.path / "config.json"),
            "weights_sha256": {w.name: file_sha256(w) for w in weights}}


def _report_name(info) -> str:
    # A local path means nothing to other readers; its directory name at least names the checkpoint.
    return Path(info.name).name if info.kind == "local" else info.name


def _write(report: CommunityReport, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", report.model).strip("-.") or "model"
    path, n = out / f"{stem}-{report.date}.yaml", 2
    while path.exists():  # never overwrite someone's report
        path, n = out / f"{stem}-{report.date}-{n}.yaml", n + 1
    path.write_text(report.to_yaml(), encoding="utf-8")
    return path


def report_files(directory: Path = REPORTS_DIR) -> list[Path]:
    return sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml"))


# --------------------------------------------------------------------------- CLI

def register_report_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="run smoke + strict + sensibility on a model and write a community report file",
        description="Runs the tier suites on your model with pytest and writes reports/community/<model>-<date>.yaml "
                    "with the evidence (config and weights sha256, versions, every check's verdict).")
    parser.add_argument("--model", required=True, metavar="NAME|PATH", help="zoo name, local path or cached hub id")
    parser.add_argument("--out", type=Path, default=Path("reports", "community"), metavar="DIR",
                        help="default: reports/community")
    parser.add_argument("--tiers", type=_tier_list, default=list(RUNNABLE_TIERS), metavar="T1,T2",
                        help=f"tiers to run (default and choices: {','.join(RUNNABLE_TIERS)}; smoke is required)")
    parser.add_argument("--name", help="the model's name in the report (default: the zoo name / hub id / "
                                       "directory name)")
    parser.add_argument("--reporter", default="", help="who ran the checks (optional)")
    parser.add_argument("--timeout", type=float, metavar="S", help="per-test timeout in seconds (pytest-timeout)")
    parser.set_defaults(run=_cmd_report)


def _tier_list(text: str) -> list[str]:
    tiers = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [t for t in tiers if t not in RUNNABLE_TIERS]
    if unknown or "smoke" not in tiers:
        raise argparse.ArgumentTypeError(f"tiers must include smoke and come from {','.join(RUNNABLE_TIERS)}; "
                                         f"got {text!r}")
    return tiers


def _cmd_report(args: argparse.Namespace) -> int:
    report, path = make_report(ReportOptions(model=args.model, out=args.out, tiers=args.tiers, name=args.name,
                                             reporter=args.reporter, timeout=args.timeout))
    print(f"litmus report: {report.model} ({report.architecture}) {report.status}; tiers {', '.join(report.tiers)}"
          + (f"; {report.notes}" if report.notes else ""), file=sys.stderr)
    print(path)
    return 0

