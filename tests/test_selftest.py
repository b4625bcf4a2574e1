"""`litmus selftest` (harness.selftest): planted faults judged by the tiers in-process, the control
row, the records and the table; and the false-alarm check over repeated strict-suite runs."""
from __future__ import annotations

import pytest

from harness.results import ResultRecord, read_records
from harness.selftest import (
    CONTROL,
    RECORDS,
    REPORT,
    compare_runs,
    render_flaky,
    run_repeats,
    run_selftest,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("selftest")
    faults = ["bias_dropped", "rope_theta", "sliding_window_ignored", "expert_top_k"]
    return run_selftest(["tiny-qwen2"], ["smoke", "strict", "sensibility"], faults, out), out


def test_strict_catches_the_planted_faults_and_not_the_control(run):
    result, _ = run
    by_fault = {o.fault: o for o in result.outcomes}
    assert list(by_fault) == [CONTROL, "bias_dropped", "rope_theta", "sliding_window_ignored", "expert_top_k"]
    control = by_fault[CONTROL]
    assert control.verdicts["strict"].outcome == "pass" and control.verdicts["smoke"].outcome == "pass"
    assert control.named_site == "none"
    for fault in ("bias_dropped", "rope_theta"):
        outcome = by_fault[fault]
        assert outcome.caught_by("strict"), outcome.verdicts["strict"]
        assert outcome.named_site == outcome.expected_site == "layers.0.self_attn"
    assert by_fault["sliding_window_ignored"].not_applicable == "the model has no sliding-window layer"
    assert by_fault["expert_top_k"].not_applicable == "the model has no mixture-of-experts block"
    # A synthetic model is not judged by the sensibility tier.
    assert "not a trained model" in by_fault["rope_theta"].verdicts["sensibility"].detail
    assert result.strict_catches_all()


def test_records_and_table(run):
    result, out = run
    records = read_records(out / RECORDS)
    assert len(records) == 5 * 3
    assert {r.check for r in records} == {f"selftest::{f}" for f in [CONTROL, *result.faults]}
    strict = {r.check: r for r in records if r.tier == "strict"}
    assert strict["selftest::rope_theta"].outcome == "fail" and strict["selftest::rope_theta"].metrics["caught"]
    assert strict["selftest::control"].outcome == "pass"
    # The comparisons' own measurements travel with the verdict.
    control, faulted = strict["selftest::control"].metrics, strict["selftest::rope_theta"].metrics
    assert control["prompt_logprobs"]["max_abs_logprob_diff"] <= control["prompt_logprobs"]["logprob_atol"]
    assert faulted["prompt_logprobs"]["max_abs_logprob_diff"] > faulted["prompt_logprobs"]["logprob_atol"]
    assert strict["selftest::expert_top_k"].outcome == "skip"
    assert "mixture-of-experts" in strict["selftest::expert_top_k"].reason
    assert not (out / "results.jsonl").exists(), "selftest records must stay out of a matrix's results.jsonl"
    table = (out / REPORT).read_text()
    assert "Strict catches every fault that applied, with no false alarm: **yes**" in table
    assert "| rope_theta | tiny-qwen2 | missed | caught | n/a | yes: layers.0.self_attn |" in table
    assert "| expert_top_k | mixture-of-experts routing to top_k - 1 experts | not run: no selected model has a " \
           "mixture-of-experts block |" in table


def _record(model: str, check: str, outcome: str, **metrics) -> ResultRecord:
    return ResultRecord(model=model, architecture="LlamaForCausalLM", task="generate", tier="strict", check=check,
                        outcome=outcome, reason="" if outcome != "skip" else "why", metrics=metrics)


def test_compare_runs_reports_flaky_and_missing_verdicts():
    runs = [
        [_record("a", "c1", "pass", d=1.0), _record("a", "c2", "fail"), _record("b", "c1", "pass")],
        [_record("a", "c1", "pass", d=2.0), _record("a", "c2", "pass"), _record("b", "c1", "pass")],
        [_record("a", "c1", "pass", d=1.0), _record("a", "c2", "fail")],
    ]
    flaky = compare_runs(["a", "b"], runs)
    assert flaky.flaky == {("a", "c2"): ["fail", "pass", "fail"], ("b", "c1"): ["pass", "pass", None]}
    assert flaky.metrics_differ == [("a", "c1")]
    report = render_flaky(flaky)
    assert "Flaky verdicts (an outcome that differs between runs): **2**" in report
    assert "| a | c2 | fail, pass, fail |" in report


def test_repeated_strict_suite_runs_agree(tmp_path):
    flaky = run_repeats(["tiny-llama"], 2, tmp_path, timeout_s=600, select="pitfalls or text_matches")
    assert flaky.flaky == {}
    assert len(flaky.verdicts) == 2 and all(runs == ["pass", "pass"] for runs in flaky.verdicts.values())
    assert "Flaky verdicts (an outcome that differs between runs): **0**" in (tmp_path / "flaky.md").read_text()


def test_selftest_command_rejects_unknown_names(capsys):
    from harness.cli import main

    assert main(["selftest", "--faults", "rope_theta,no_such_fault"]) == 1
    assert "no_such_fault" in capsys.readouterr().err
    assert main(["selftest", "--repeat", "1"]) == 1

