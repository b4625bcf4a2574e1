"""Community reports (harness/community.py): the schema's validator and `litmus report`."""
from __future__ import annotations

import copy
import datetime as dt
import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.cli import main
from harness.community import ReportError, Verdict, derive_status, load_report, validate_report

SHA = "ab" * 32


def valid_report() -> dict[str, Any]:
    return {
        "schema_version": 1,
        "model": "org/some-model",
        "architecture": "LlamaForCausalLM",
        "status": "partial",
        "engine_version": "0.1.0",
        "date": dt.date(2025, 6, 1),
        "tiers": ["smoke", "strict"],
        "reporter": "someone",
        "evidence": {
            "config_sha256": SHA,
            "weights_sha256": {"model-00001-of-00002.safetensors": SHA, "model-00002-of-00002.safetensors": "cd" * 32},
            "versions": {"engine": "0.1.0", "transformers": "5.23.0", "torch": "2.13.0+cpu", "git_sha": "abc123"},
            "device": "cpu",
            "dtype": "float32",
            "verdicts": {
                "smoke": [{"check": "test_smoke::test_selected_model", "outcome": "pass"}],
                "strict": [
                    {"check": "test_generation::test_greedy_logprobs_match_hf", "outcome": "fail",
                     "reason": "AssertionError: prompt 3: tokens differ at position 7"},
                    {"check": "test_generation::test_text_matches_hf_where_tokens_match", "outcome": "skip",
                     "reason": "no prompt produced identical tokens"},
                ],
            },
        },
    }


def test_valid_report_is_accepted_and_round_trips(tmp_path: Path) -> None:
    report = validate_report(valid_report(), "valid.yaml")
    assert (report.model, report.status, report.tiers) == ("org/some-model", "partial", ["smoke", "strict"])
    assert report.evidence.verdicts["strict"][0] == Verdict("test_generation::test_greedy_logprobs_match_hf", "fail",
                                                            "AssertionError: prompt 3: tokens differ at position 7")
    path = tmp_path / "r.yaml"
    path.write_text(report.to_yaml())
    assert load_report(path) == report


def test_date_may_be_a_quoted_string() -> None:
    assert validate_report({**valid_report(), "date": "2025-06-01"}).date == dt.date(2025, 6, 1)


def _set(*keys: str, value: Any) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        for key in keys[:-1]:
            data = data[key]
        data[keys[-1]] = value
    return mutate


def _drop(*keys: str) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        for key in keys[:-1]:
            data = data[key]
        del data[keys[-1]]
    return mutate


def _verdict(tier: str, index: int, **changes: Any) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        entry = data["evidence"]["verdicts"][tier][index]
        for key, value in changes.items():
            if value is None:
                entry.pop(key, None)
            else:
                entry[key] = value
    return mutate


def _strict_passes(data: dict) -> None:
    data["evidence"]["verdicts"]["strict"] = [{"check": "test_generation::test_greedy_logprobs_match_hf",
                                               "outcome": "pass"}]


# (field the error must name, a fragment of its message, the corruption)
BAD_FIELDS = [
    ("schema_version", "must be 1", _set("schema_version", value=2)),
    ("model", "is missing", _drop("model")),
    ("model", "non-empty string", _set("model", value="  ")),
    ("architecture", "model class name", _set("architecture", value="Llama for causal LM")),
    ("status", "must be one of works, partial, broken", _set("status", value="fine")),
    ("status", "the verdicts say 'works'", _strict_passes),
    ("engine_version", "version string", _set("engine_version", value=1.0)),
    ("date", "must be a date", _set("date", value="yesterday")),
    ("date", "in the future", _set("date", value=dt.date.today() + dt.timedelta(days=30))),
    ("tiers", "non-empty list", _set("tiers", value=[])),
    ("tiers", "not tiers a reporter runs", _set("tiers", value=["smoke", "strict", "vibes"])),
    ("tiers", "twice", _set("tiers", value=["smoke", "smoke", "strict"])),
    ("tiers", "must include smoke", _set("tiers", value=["strict"])),
    ("evidence", "is missing", _drop("evidence")),
    ("evidence", "must be a mapping", _set("evidence", value=["config", SHA])),
    ("evidence.config_sha256", "64 lowercase hex", _set("evidence", "config_sha256", value=SHA.upper())),
    ("evidence.config_sha256", "64 lowercase hex", _set("evidence", "config_sha256", value=SHA[:40])),
    ("evidence.weights_sha256", "at least one", _set("evidence", "weights_sha256", value={})),
    ("evidence.weights_sha256['model.safetensors']", "64 lowercase hex",
     _set("evidence", "weights_sha256", value={"model.safetensors": "not-a-hash"})),
    ("evidence.versions.torch", "is missing", _drop("evidence", "versions", "torch")),
    ("evidence.versions.engine", "differs from engine_version", _set("evidence", "versions", "engine", value="0.2.0")),
    ("evidence.versions.cuda", "not a field", _set("evidence", "versions", "cuda", value="12.1")),
    ("evidence.device", "non-empty string", _set("evidence", "device", value="")),
    ("evidence.dtype", "is missing", _drop("evidence", "dtype")),
    ("evidence.verdicts.strict", "needs its verdicts", _drop("evidence", "verdicts", "strict")),
    ("evidence.verdicts.sensibility", "is not in `tiers`",
     _set("evidence", "verdicts", "sensibility", value=[{"check": "x", "outcome": "pass"}])),
    ("evidence.verdicts.smoke", "non-empty list", _set("evidence", "verdicts", "smoke", value=[])),
    ("evidence.verdicts.strict[0].outcome", "must be one of pass, fail, skip, error",
     _verdict("strict", 0, outcome="bad")),
    ("evidence.verdicts.strict[0].reason", "required for outcome 'fail'", _verdict("strict", 0, reason=None)),
    ("evidence.verdicts.strict[1].check", "listed twice",
     _verdict("strict", 1, check="test_generation::test_greedy_logprobs_match_hf")),
    ("evidence.verdicts.smoke[0].check", "is missing", _verdict("smoke", 0, check=None)),
    ("evidence.verdicts.smoke[0].score", "not a field", _verdict("smoke", 0, score=0.9)),
    ("comment", "not a field of a community report", _set("comment", value="works for me")),
]


@pytest.mark.parametrize(("field", "message", "corrupt"), BAD_FIELDS,
                         ids=[f"{field}-{message}" for field, message, _ in BAD_FIELDS])
def test_each_bad_field_is_rejected_by_name(field: str, message: str, corrupt: Callable[[dict], None]) -> None:
    data = copy.deepcopy(valid_report())
    corrupt(data)
    with pytest.raises(ReportError) as caught:
        validate_report(data, "reports/community/bad.yaml")
    assert any(name == field and message in text for name, text in caught.value.problems), caught.value.problems
    assert f"reports/community/bad.yaml: {field}: " in str(caught.value)


def test_every_problem_is_listed_at_once() -> None:
    data = {**valid_report(), "status": "fine", "tiers": ["strict"]}
    with pytest.raises(ReportError) as caught:
        validate_report(data, "x.yaml")
    assert {"status", "tiers", "evidence.verdicts.smoke"} <= {name for name, _ in caught.value.problems}


@pytest.mark.parametrize(("text", "message"), [
    ("model: [unclosed\n", "not valid YAML: line 2"),
    ("model: a\nmodel: b\n", "duplicate key 'model'"),
    ("- just\n- a list\n", "top level must be a mapping"),
    ("", "top level must be a mapping of fields, not NoneType"),
])
def test_unreadable_files_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ReportError, match=message) as caught:
        load_report(path)
    assert str(caught.value).startswith(f"{path}: ")


@pytest.mark.parametrize(("smoke", "strict", "status"), [
    (["pass"], ["pass", "skip"], "works"),
    (["pass"], ["pass", "fail"], "partial"),
    (["pass"], ["error"], "partial"),
    (["fail"], ["pass"], "broken"),
    (["pass", "error"], ["pass"], "broken"),
    (["skip"], ["pass"], "broken"),  # smoke never passed: not shown to run
])
def test_status_follows_from_verdicts(smoke: list[str], strict: list[str], status: str) -> None:
    verdicts = {"smoke": [Verdict(f"s{i}", o) for i, o in enumerate(smoke)],
                "strict": [Verdict(f"t{i}", o) for i, o in enumerate(strict)]}
    assert derive_status(verdicts) == status


# --- litmus report ---------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_litmus_report_writes_a_valid_file(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "community"
    assert main(["report", "--model", str(tiny_llama_dir), "--tiers", "smoke,strict", "--out", str(out),
                 "--reporter", "ci"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.parent == out and path.suffix == ".yaml"
    report = load_report(path)
    assert (report.model, report.architecture, report.reporter) == (tiny_llama_dir.name, "LlamaForCausalLM", "ci")
    assert report.tiers == ["smoke", "strict"]
    assert report.evidence.config_sha256 == _sha256(tiny_llama_dir / "config.json")
    assert report.evidence.weights_sha256 == {"model.safetensors": _sha256(tiny_llama_dir / "model.safetensors")}
    smoke = {v.check: v.outcome for v in report.evidence.verdicts["smoke"]}
    assert smoke == {"test_smoke::test_selected_model": "pass"}
    assert report.evidence.verdicts["strict"], "strict ran but left no verdicts"
    assert report.status == derive_status(report.evidence.verdicts)
    assert report.date == dt.datetime.now(dt.timezone.utc).date()
    # A second report of the same model on the same day does not overwrite the first.
    assert main(["report", "--model", str(tiny_llama_dir), "--tiers", "smoke", "--out", str(out)]) == 0
    assert len(list(out.glob("*.yaml"))) == 2


def test_litmus_report_on_a_broken_checkpoint_says_broken(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "truncated-llama"
    shutil.copytree(tiny_llama_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["report", "--model", str(broken), "--tiers", "smoke", "--out", str(tmp_path / "out")]) == 0
    report = load_report(Path(capsys.readouterr().out.strip()))
    assert report.status == "broken"
    (verdict,) = report.evidence.verdicts["smoke"]
    assert verdict.outcome in ("fail", "error") and verdict.reason
    assert report.evidence.weights_sha256 == {"model.safetensors": _sha256(weights)}


def test_litmus_report_requires_smoke(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["report", "--model", "tiny-llama", "--tiers", "strict"])
    assert "must include smoke" in capsys.readouterr().err


def test_written_yaml_is_plain_yaml(tmp_path: Path) -> None:
    """Readable by any YAML parser, not only ours: dates as dates, no Python tags."""
    text = validate_report(valid_report()).to_yaml()
    assert "!!python" not in text
    assert yaml.safe_load(text)["date"] == dt.date(2025, 6, 1)
