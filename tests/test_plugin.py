"""The litmus pytest plugin through pytest itself (pytester): options, and one result record
per tier test whatever its outcome, with and without xdist."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.models.registry import MODEL_IMPLS
from harness.plugin import MODEL_IMPLS as PLUGIN_MODEL_IMPLS
from harness.plugin import check_name
from harness.results import read_records

pytest_plugins = ["pytester"]

PASSED_METRICS = {"tokens": 7, "perplexity": 23.5}

SUITE = """
import numpy
import pytest

pytestmark = pytest.mark.strict


def test_passes(model, litmus_record):
    # A numpy scalar (as lm-eval's metrics are) must cross from an xdist worker too.
    litmus_record.metrics.update(tokens=7, perplexity=numpy.float64(23.5))


def test_fails(model):
    assert model == "never", "tokens differ at position 3"


def test_skips(model):
    pytest.skip("needs a GPU")


def test_skips_silently(model):
    pytest.skip("")


@pytest.fixture
def broken_setup():
    raise RuntimeError("could not load weights")


def test_setup_errors(model, broken_setup):
    pass


@pytest.fixture
def broken_teardown():
    yield
    raise RuntimeError("leaked KV blocks")


def test_teardown_errors(model, broken_teardown):
    pass


@pytest.mark.parametrize("batch", [1, 3])
def test_batches(model, batch):
    pass


@pytest.mark.xfail(reason="rope scaling not implemented", strict=True)
def test_known_failure(model):
    assert False


def test_about_other_subject(litmus_record):
    litmus_record.model = "tiny-gpt2"
    litmus_record.architecture = "GPT2LMHeadModel"
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    # test_unit.py stands for a unit test: no tier marker, so no record.
    pytester.makepyfile(test_suite=SUITE, test_unit="def test_unit(model):\n    pass\n")
    return pytester


def _records(path: Path) -> dict[str, dict]:
    return {(r.model, r.check): r for r in read_records(path)}


def _run(suite: pytest.Pytester, *args: str, subprocess: bool = False) -> pytest.RunResult:
    run = suite.runpytest_subprocess if subprocess else suite.runpytest
    return run("-p", "no:cacheprovider", "--results-dir", str(suite.path / "out"), *args)


def test_every_outcome_becomes_one_record(suite: pytest.Pytester) -> None:
    result = _run(suite, "--model", "tiny-llama")
    result.assert_outcomes(passed=6, failed=1, skipped=2, errors=2, xfailed=1)
    records = _records(suite.path / "out")
    lines = (suite.path / "out" / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(records) == 10

    def get(check: str, model: str = "tiny-llama"):
        return records[(model, f"test_suite::{check}")]

    passed = get("test_passes")
    assert (passed.outcome, passed.tier, passed.metrics) == ("pass", "strict", PASSED_METRICS)
    assert (passed.architecture, passed.task, passed.dtype) == ("LlamaForCausalLM", "generate", "float32")
    assert passed.engine_version and passed.torch and passed.transformers and passed.timestamp
    failed = get("test_fails")
    assert failed.outcome == "fail" and "tokens differ at position 3" in failed.reason
    assert (get("test_skips").outcome, get("test_skips").reason) == ("skip", "needs a GPU")
    silent = get("test_skips_silently")
    assert (silent.outcome, silent.reason) == ("error", "skipped without a reason")
    setup = get("test_setup_errors")
    assert setup.outcome == "error" and setup.reason.startswith("setup: ") and "could not load weights" in setup.reason
    teardown = get("test_teardown_errors")
    assert teardown.outcome == "error" and "leaked KV blocks" in teardown.reason
    assert get("test_batches[1]").outcome == get("test_batches[3]").outcome == "pass"
    known = get("test_known_failure")
    assert known.outcome == "fail" and "rope scaling not implemented" in known.reason
    other = get("test_about_other_subject", model="tiny-gpt2")
    assert other.architecture == "GPT2LMHeadModel" and other.outcome == "pass"
    assert "litmus: 10 result records appended" in result.stdout.str()


def test_records_name_the_engine_implementation(suite: pytest.Pytester) -> None:
    def impls(*args: str) -> dict[str, str]:
        out = suite.path / "out"
        _run(suite, "--model", "tiny-llama", "--model", "tiny-arcee", "-k", "test_passes", *args)
        records = read_records(out)
        (out / "results.jsonl").unlink()
        return {r.model: r.model_impl for r in records}

    # auto: native where the engine has the architecture, else the Transformers backend.
    assert impls() == {"tiny-llama": "native", "tiny-arcee": "transformers"}
    assert impls("--model-impl", "transformers") == {"tiny-llama": "transformers", "tiny-arcee": "transformers"}
    # model_impl="native" cannot run tiny-arcee at all: the record claims no implementation.
    assert impls("--model-impl", "native") == {"tiny-llama": "native", "tiny-arcee": ""}


def test_xdist_controller_writes_each_record_once(suite: pytest.Pytester) -> None:
    result = _run(suite, "--model", "tiny-llama", "--model", "tiny-qwen2", "-n", "2", "--dist", "loadgroup",
                  subprocess=True)
    result.assert_outcomes(passed=11, failed=2, skipped=4, errors=4, xfailed=2)
    lines = (suite.path / "out" / "results.jsonl").read_text().splitlines()
    keys = [(d["model"], d["check"]) for d in map(json.loads, lines)]
    assert len(keys) == len(set(keys)) == 19  # 9 per model, the model-less test once
    assert {d["model"] for d in map(json.loads, lines)} == {"tiny-llama", "tiny-qwen2", "tiny-gpt2"}
    passed = [d["metrics"] for d in map(json.loads, lines) if d["check"] == "test_suite::test_passes"]
    assert passed == [PASSED_METRICS] * 2


def test_loadgroup_runs_each_models_checks_in_one_worker(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_grouped="""
import os
import pytest

pytestmark = pytest.mark.strict


@pytest.mark.parametrize("step", range(6))
def test_step(model, step, litmus_record):
    litmus_record.metrics["worker"] = os.environ["PYTEST_XDIST_WORKER"]
""")
    models = ["tiny-llama", "tiny-qwen2", "tiny-mistral"]
    result = _run(pytester, *[arg for m in models for arg in ("--model", m)], "-n", "2", "--dist", "loadgroup",
                  subprocess=True)
    result.assert_outcomes(passed=18)
    workers = {}
    for record in read_records(pytester.path / "out"):
        workers.setdefault(record.model, set()).add(record.metrics["worker"])
    assert sorted(workers) == sorted(models) and all(len(w) == 1 for w in workers.values()), workers


def test_worker_crash_is_an_error_record(pytester: pytest.Pytester) -> None:
    pytester.mkdir("strict")
    pytester.path.joinpath("strict", "test_crash.py").write_text(
        "import os, pytest\n\n"
        "@pytest.mark.strict\n"
        "def test_segfaults(model):\n    os._exit(3)\n"
    )
    _run(pytester, "strict", "--model", "tiny-llama", "-n", "1", subprocess=True)
    (record,) = read_records(pytester.path / "out")
    assert (record.model, record.tier, record.outcome) == ("tiny-llama", "strict", "error")
    assert record.check == "test_crash::test_segfaults" and "crashed" in record.reason


def test_models_file_and_zoo_select_models(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_model(model):\n    pass\n")
    pytester.path.joinpath("models.txt").write_text("# nightly\ntiny-qwen3  # GQA\n\ntiny-llama\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--model", "tiny-llama", "--models-file", "models.txt",
                                "--collect-only", "-q")
    # tiny-llama, named twice, runs once; the file's order follows the command line's.
    assert [line for line in result.stdout.lines if "test_model[" in line] == [
        "test_models_file_and_zoo_select_models.py::test_model[tiny-llama]",
        "test_models_file_and_zoo_select_models.py::test_model[tiny-qwen3]",
    ]
    from harness.zoo import list_specs

    result = pytester.runpytest("-p", "no:cacheprovider", "--zoo", "--collect-only", "-q")
    assert result.stdout.str().count("test_model[") == len(list_specs())


def test_missing_models_file_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_model(model):\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--models-file", "absent.txt")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--models-file absent.txt" in result.stderr.str()


def test_a_check_in_two_tiers_is_refused(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        "import pytest\n\n@pytest.mark.smoke\n@pytest.mark.strict\ndef test_both(model):\n    pass\n"
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "--model", "tiny-llama",
                                "--results-dir", str(pytester.path / "out"))
    assert "marked with several tiers" in result.stdout.str() + result.stderr.str()


@pytest.mark.parametrize(
    ("param_id", "model", "expected"),
    [
        (None, None, "test_x::test_y"),
        ("tiny-llama", "tiny-llama", "test_x::test_y"),
        ("tiny-llama-3", "tiny-llama", "test_x::test_y[3]"),
        ("1-tiny-llama-greedy", "tiny-llama", "test_x::test_y[1-greedy]"),
        ("3", None, "test_x::test_y[3]"),
    ],
)
def test_check_name_drops_the_model_id_only(param_id, model, expected) -> None:
    assert check_name("test_x", "test_y", param_id, model) == expected


def test_models_file_comments_and_blanks(tmp_path: Path) -> None:
    from harness.zoo import read_models_file

    path = tmp_path / "models.txt"
    path.write_text("a\n  # b\nc # d\n\n")
    assert read_models_file(path) == ["a", "c"]


def test_model_impl_choices_are_the_engines() -> None:
    assert PLUGIN_MODEL_IMPLS == MODEL_IMPLS
