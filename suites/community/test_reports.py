"""Community tier: every report under reports/community/ follows the schema (harness/community.py).

One record per file, under the model and architecture the file reports on, with its status in
the metrics. A second check per file corrupts it field by field and expects the validator to
name that field, so a validator that accepted everything could not pass this suite.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness.community import STATUSES, ReportError, load_report, read_yaml, report_files, validate_report
from harness.zoo import task_of

pytestmark = pytest.mark.community

REPORT_FILES = report_files()


def _identify(litmus_record, path: Path) -> dict[str, Any] | None:
    """Names the record after the file's model, read leniently so that an invalid file is attributed too."""
    try:
        data = read_yaml(path)
    except ReportError:
        data = None
    fields = data if isinstance(data, dict) else {}
    model, architecture = fields.get("model"), fields.get("architecture")
    litmus_record.model = model if isinstance(model, str) and model else path.stem
    litmus_record.architecture = architecture if isinstance(architecture, str) else None
    litmus_record.task = task_of(litmus_record.architecture)
    return data


@pytest.mark.parametrize("path", REPORT_FILES, ids=lambda p: p.name)
def test_report_is_valid(path: Path, litmus_record):
    _identify(litmus_record, path)
    report = load_report(path)  # a ReportError names the file and every bad field
    litmus_record.metrics.update(file=path.name, status=report.status, tiers=report.tiers, date=str(report.date),
                                 engine_version=report.engine_version)


@pytest.mark.parametrize("path", REPORT_FILES, ids=lambda p: p.name)
def test_reporter_says_it_works(path: Path, litmus_record):
    """The tier's verdict: a valid report of `partial` or `broken` is a failure of this model in
    the matrix (the file says what failed), not a failure of the file."""
    _identify(litmus_record, path)
    try:
        report = load_report(path)
    except ReportError as exc:
        pytest.skip(f"{path.name} is invalid, so it says nothing about the model: {exc}")
    litmus_record.metrics.update(file=path.name, status=report.status)
    failed = [f"{tier}/{v.check}" for tier, verdicts in report.evidence.verdicts.items()
              for v in verdicts if v.outcome in ("fail", "error")]
    assert report.status == "works", f"{path.name} reports {report.status}: failing checks {failed}"


def _other_status(data: dict) -> None:
    data["status"] = next(s for s in STATUSES if s != data["status"])


# field the validator must name -> how to break it
CORRUPTIONS: dict[str, Callable[[dict], None]] = {
    "status": _other_status,
    "model": lambda d: d.update(model=""),
    "date": lambda d: d.update(date="last tuesday"),
    "tiers": lambda d: d.update(tiers=[t for t in d["tiers"] if t != "smoke"]),
    "engine_version": lambda d: d.pop("engine_version"),
    "evidence.config_sha256": lambda d: d["evidence"].update(config_sha256=d["evidence"]["config_sha256"][:-1]),
    "evidence.versions.torch": lambda d: d["evidence"]["versions"].pop("torch"),
    "evidence.verdicts.smoke[0].outcome": lambda d: d["evidence"]["verdicts"]["smoke"][0].update(outcome="ok"),
    "evidence.weights": lambda d: d["evidence"].update(weights=d["evidence"]["weights_sha256"]),
}


@pytest.mark.parametrize("path", REPORT_FILES, ids=lambda p: p.name)
def test_validator_rejects_the_report_corrupted(path: Path, litmus_record):
    data = _identify(litmus_record, path)
    try:
        validate_report(data, str(path))
    except ReportError:
        pytest.skip(f"{path.name} is itself invalid (test_report_is_valid says why), so corrupting it proves nothing")
    for field, corrupt in CORRUPTIONS.items():
        bad = copy.deepcopy(data)
        corrupt(bad)
        with pytest.raises(ReportError) as caught:
            validate_report(bad, str(path))
        named = [name for name, _ in caught.value.problems]
        assert field in named, f"corrupting {field} was reported as {named}"
        assert str(path) in str(caught.value)
    litmus_record.metrics["corruptions_rejected"] = len(CORRUPTIONS)
