"""harness.matrix: aggregation, rows, merge, diff, the runner (with a stand-in pytest) and the CLI."""
from __future__ import annotations

import argparse
import csv
import json
import struct
import sys
import textwrap
import time
from pathlib import Path

import pytest

from engine.models.metadata import load_architectures
from harness.cli import CommandError
from harness.matrix import (
    NO_RECORDS,
    NOT_IMPLEMENTED,
    UNKNOWN_ARCHITECTURE,
    UNLISTED,
    Change,
    Matrix,
    RunInfo,
    RunOptions,
    Shard,
    _selected_models,
    build_matrix,
    diff_matrices,
    family_of,
    load_matrix,
    register_matrix_cli,
    run_matrix,
    write_matrix_csv,
    write_matrix_json,
    write_reports,
)
from harness.report_html import write_heatmap
from harness.results import TIERS, ResultRecord, append_record, read_records


def record(model: str, tier: str, outcome: str, reason: str = "", check: str = "generate",
           architecture: str | None = "LlamaForCausalLM", task: str | None = "generate") -> ResultRecord:
    if outcome == "skip" and not reason:
        reason = "needs GPU"
    return ResultRecord(model=model, architecture=architecture, task=task, tier=tier, check=check,
                        outcome=outcome, reason=reason)


def matrix_of(records: list[ResultRecord], run_id: str = "run") -> Matrix:
    return build_matrix(records, RunInfo.for_records(run_id, "start", "end", records))


def row(matrix: Matrix, architecture: str, section: str = "text_generation", task: str | None = None):
    (found,) = [r for r in matrix.rows if r.architecture == architecture and r.section == section
                and (task is None or r.task == task)]
    return found


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="litmus")
    register_matrix_cli(parser.add_subparsers())
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- aggregation and rows

@pytest.mark.parametrize(
    ("outcomes", "status"),
    [
        (["pass", "fail", "error", "skip"], "error"),
        (["pass", "fail", "skip"], "fail"),
        (["pass", "skip"], "pass"),
        (["skip", "skip"], "skip"),
        ([], "untested"),
    ],
)
def test_tier_status_follows_error_fail_pass_skip_precedence(outcomes, status):
    records = [record(f"m{i}", "strict", o, reason=f"{o} {i}" if o != "pass" else "") for i, o in enumerate(outcomes)]
    assert row(matrix_of(records), "LlamaForCausalLM").tiers["strict"].status == status


def test_reason_lists_the_deciding_records_reasons_once_each():
    records = [record("a", "strict", "fail", "token 3 differs"), record("b", "strict", "fail", "token 3 differs"),
               record("c", "strict", "fail", "length differs"), record("d", "strict", "skip", "needs GPU")]
    assert row(matrix_of(records), "LlamaForCausalLM").tiers["strict"].reason == "length differs; token 3 differs"


def test_skip_reasons_are_deduplicated_in_the_matrix():
    records = [record("a", "sensibility", "skip", "untrained synthetic weights"),
               record("b", "sensibility", "skip", "untrained synthetic weights"),
               record("c", "sensibility", "skip", "needs GPU")]
    tier = row(matrix_of(records), "LlamaForCausalLM").tiers["sensibility"]
    assert (tier.status, tier.reason) == ("skip", "needs GPU; untrained synthetic weights")


def test_per_model_detail_keeps_each_models_verdict_and_checks():
    records = [record("a", "strict", "pass", check="greedy"), record("a", "strict", "fail", "eos", check="text"),
               record("b", "strict", "pass", check="greedy")]
    models = row(matrix_of(records), "LlamaForCausalLM").tiers["strict"].models
    assert models["a"].status == "fail" and models["a"].reason == "eos"
    assert models["a"].checks == {"greedy": "pass", "text": "fail"}
    assert models["b"].status == "pass"


@pytest.mark.parametrize(
    ("statuses", "level"),
    [
        ({"smoke": "pass", "strict": "pass", "sensibility": "pass", "community": "pass"}, "community"),
        ({"smoke": "pass", "strict": "pass", "sensibility": "skip", "community": "pass"}, "strict"),
        ({"smoke": "pass", "strict": "fail", "sensibility": "pass"}, "smoke"),
        ({"strict": "pass", "sensibility": "pass"}, None),  # smoke untested: no level at all
    ],
)
def test_level_is_the_highest_tier_passed_with_all_lower_tiers_passed(statuses, level):
    records = [record("m", tier, outcome) for tier, outcome in statuses.items()]
    assert row(matrix_of(records), "LlamaForCausalLM").level == level


def test_every_documented_architecture_has_a_row_even_without_records():
    matrix = matrix_of([])
    expected = {(i.architecture, i.section, i.subsection, i.tasks[0]) for i in load_architectures()}
    assert {(r.architecture, r.section, r.subsection, r.task) for r in matrix.rows} == expected
    assert len(matrix.rows) == len(load_architectures())
    assert all(r.tiers[t].status == "untested" for r in matrix.rows for t in TIERS)


def test_untested_reason_says_whether_the_engine_implements_the_architecture():
    matrix = matrix_of([])
    assert row(matrix, "LlamaForCausalLM").tiers["smoke"].reason == NO_RECORDS
    # Aquila needs remote code: neither native nor a Transformers class for the backend.
    assert row(matrix, "AquilaForCausalLM").tiers["smoke"].reason == NOT_IMPLEMENTED
    # Native Llama also embeds (last-token pooling); Mixtral generates through the backend.
    assert row(matrix, "LlamaForCausalLM", "embedding").tiers["smoke"].reason == NO_RECORDS
    assert row(matrix, "MixtralForCausalLM").implemented
    # The backend does not pool, and Jamba's classifier is not native.
    assert row(matrix, "JambaForSequenceClassification", "classification").tiers["smoke"].reason == NOT_IMPLEMENTED


def test_records_map_to_rows_by_architecture_alias_and_task():
    records = [
        record("olmo", "smoke", "pass", architecture="OlmoForCausalLM"),  # transformers' spelling
        record("embedder", "smoke", "fail", "bad norm", task="embed"),
        record("untasked", "smoke", "pass", task=None),
        record("glm", "smoke", "pass", architecture="ChatGLMModel"),
    ]
    matrix = matrix_of(records)
    assert row(matrix, "OLMoForCausalLM").tiers["smoke"].status == "pass"
    assert row(matrix, "LlamaForCausalLM", "embedding").tiers["smoke"].status == "fail"
    assert row(matrix, "LlamaForCausalLM").models == ["untasked"]  # no task: the generate row
    assert row(matrix, "LlamaForCausalLM", "reward").models == []
    # Listed as text and as multimodal generate rows: a text check belongs to the text row.
    assert row(matrix, "ChatGLMModel").models == ["glm"]
    assert row(matrix, "ChatGLMModel", "multimodal").models == []


def test_records_of_unlisted_architectures_get_rows_of_their_own():
    records = [record("q3", "strict", "pass", architecture="Qwen3ForCausalLM"),
               record("odd", "strict", "fail", "boom", architecture="LlamaForCausalLM", task="classify"),
               record("lost", "strict", "error", "crashed", architecture=None)]
    matrix = matrix_of(records)
    assert len(matrix.rows) == len(load_architectures()) + 3
    qwen3 = row(matrix, "Qwen3ForCausalLM", UNLISTED)
    assert (qwen3.tiers["strict"].status, qwen3.implemented, qwen3.family) == ("pass", True, "Qwen")
    assert row(matrix, "LlamaForCausalLM", UNLISTED, task="classify").tiers["strict"].status == "fail"
    assert row(matrix, UNKNOWN_ARCHITECTURE, UNLISTED).tiers["strict"].reason == "crashed"
    assert [r.section for r in matrix.rows][-3:] == [UNLISTED] * 3


def test_unknown_tier_is_an_error_not_a_dropped_record():
    with pytest.raises(ValueError, match="unknown tier 'nightly'"):
        matrix_of([record("m", "nightly", "pass")])


@pytest.mark.parametrize(
    ("display_name", "architecture", "family"),
    [
        ("QwQ, Qwen2", "Qwen2ForCausalLM", "Qwen"),
        ("Llama 3.1, Llama 3, Llama 2, LLaMA, Yi", "LlamaForCausalLM", "Llama"),
        ("StarCoder, SantaCoder, WizardCoder", "GPTBigCodeForCausalLM", "StarCoder"),
        ("Qwen2-based", "Qwen2Model", "Qwen"),
        ("Ovis2.5", "Ovis2_5", "Ovis"),
        (None, "Llama4ForConditionalGeneration", "Llama"),
    ],
)
def test_family(display_name, architecture, family):
    assert family_of(display_name, architecture) == family


def test_matrix_json_has_the_documented_shape_and_round_trips(tmp_path):
    matrix = matrix_of([record("m", "smoke", "skip", "needs GPU")], run_id="r1")
    write_matrix_json(matrix, tmp_path / "matrix.json")
    data = json.loads((tmp_path / "matrix.json").read_text())
    assert set(data["run"]) == {"id", "started", "finished", "engine_version", "git_sha", "transformers", "torch",
                                "device"}
    first = data["rows"][0]
    assert list(first)[:8] == ["architecture", "task", "family", "models", "example_hf_models", "inputs", "tiers",
                               "level"]
    assert list(first["tiers"]) == list(TIERS)
    assert set(first["tiers"]["smoke"]) == {"status", "reason", "models"}
    assert load_matrix(tmp_path) == matrix


def test_csv_has_one_line_per_row_and_tier(tmp_path):
    matrix = matrix_of([record("m", "smoke", "pass")])
    write_matrix_csv(matrix, tmp_path / "matrix.csv")
    with (tmp_path / "matrix.csv").open() as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(matrix.rows) * len(TIERS)
    llama_smoke = [ln for ln in lines if ln["architecture"] == "LlamaForCausalLM" and ln["tier"] == "smoke"
                   and ln["section"] == "text_generation"]
    assert [(ln["status"], ln["models"]) for ln in llama_smoke] == [("pass", "m")]


def test_heatmap_is_a_png_of_plausible_size(tmp_path):
    matrix = matrix_of([record("m", "smoke", "pass"), record("m", "strict", "fail", "x")])
    assert write_heatmap(matrix, tmp_path / "heatmap.png")
    data = (tmp_path / "heatmap.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    # One label line per row: ~119 rows need a tall image; the four tier columns a modest width.
    assert 300 < width < 2000 and height > 10 * len(matrix.rows)
    assert len(data) > 20_000


# --------------------------------------------------------------------------- merge

def write_records(directory: Path, records: list[ResultRecord]) -> Path:
    for r in records:
        append_record(directory / "results.jsonl", r)
    return directory


def test_merge_joins_shards_and_dedupes_identical_records(tmp_path):
    shared = record("a", "smoke", "pass")
    shard0 = write_records(tmp_path / "s0", [shared, record("a", "strict", "fail", "x")])
    shard1 = write_records(tmp_path / "s1", [shared, record("b", "smoke", "skip", "needs GPU")])
    reports = tmp_path / "reports"
    args = parse(["matrix", "merge", str(shard0), str(shard1), "--reports-dir", str(reports)])
    assert args.run(args) == 0
    (merged,) = [d for d in reports.iterdir() if d.is_dir() and not d.is_symlink()]
    assert len(read_records(merged / "results.jsonl")) == 3
    llama = row(load_matrix(merged), "LlamaForCausalLM")
    assert (llama.tiers["smoke"].status, llama.tiers["strict"].status) == ("pass", "fail")
    assert (reports / "latest").resolve() == merged.resolve()
    assert (reports / "supported_models.md").read_text() == (merged / "supported_models.md").read_text()


def test_merge_rejects_two_shards_with_verdicts_for_the_same_check(tmp_path):
    shard0 = write_records(tmp_path / "s0", [record("a", "strict", "pass")])
    shard1 = write_records(tmp_path / "s1", [record("a", "strict", "fail", "differs")])
    args = parse(["matrix", "merge", str(shard0), str(shard1), "--out", str(tmp_path / "out")])
    with pytest.raises(CommandError, match=r"a strict/generate: in .*s0 and in .*s1"):
        args.run(args)


def test_merge_into_a_directory_outside_reports_does_not_publish(tmp_path):
    shard0 = write_records(tmp_path / "s0", [record("a", "strict", "pass")])
    args = parse(["matrix", "--reports-dir", str(tmp_path / "reports"), "merge", str(shard0),
                  "--out", str(tmp_path / "out")])
    assert args.run(args) == 0
    assert (tmp_path / "out" / "matrix.json").is_file()
    assert not (tmp_path / "reports" / "latest").exists()


# --------------------------------------------------------------------------- diff

def test_diff_classifies_row_and_model_changes():
    old = matrix_of([record("a", "smoke", "pass"), record("b", "smoke", "pass"), record("a", "strict", "fail", "x")])
    new = matrix_of([record("a", "smoke", "pass"), record("b", "smoke", "error", "crash"),
                     record("a", "strict", "pass")])
    label = row(new, "LlamaForCausalLM").label
    changes = set(diff_matrices(old, new).changes)
    assert changes == {
        Change(label, None, "smoke", "pass", "error"),
        Change(label, "b", "smoke", "pass", "error"),
        Change(label, None, "strict", "fail", "pass"),
        Change(label, "a", "strict", "fail", "pass"),
    }
    assert {c.kind for c in changes} == {"regression", "newly passing"}


@pytest.mark.parametrize(
    ("old", "new", "kind"),
    [("pass", "fail", "regression"), ("untested", "fail", "newly failing"), ("skip", "error", "newly failing"),
     ("fail", "error", "changed"), ("absent", "pass", "newly passing"), ("pass", "skip", "changed")],
)
def test_change_kinds(old, new, kind):
    assert Change("row", None, "smoke", old, new).kind == kind


def test_diff_cli_exits_non_zero_on_regression_only_when_asked(tmp_path, capsys):
    for name, outcome in (("old", "pass"), ("new", "fail"), ("same", "pass")):
        (tmp_path / name).mkdir()
        write_matrix_json(matrix_of([record("a", "strict", outcome, "differs")], run_id=name),
                          tmp_path / name / "matrix.json")
    args = parse(["matrix", "diff", str(tmp_path / "old"), str(tmp_path / "new"), "--fail-on-regression"])
    assert args.run(args) == 1
    assert "## Regression" in capsys.readouterr().out
    args = parse(["matrix", "diff", str(tmp_path / "old"), str(tmp_path / "new")])
    assert args.run(args) == 0
    args = parse(["matrix", "diff", str(tmp_path / "old"), str(tmp_path / "same"), "--fail-on-regression"])
    assert args.run(args) == 0


# --------------------------------------------------------------------------- shards and the CLI

def test_shard_split_is_deterministic_disjoint_and_complete():
    models = ["m3", "m1", "m4", "m0", "m2", "m1"]
    shards = [Shard(i, 3).select(models) for i in range(3)]
    assert shards == [["m0", "m3"], ["m1", "m4"], ["m2"]]
    assert sorted(sum(shards, [])) == sorted(set(models))


@pytest.mark.parametrize("text", ["3/3", "-1/2", "1", "a/b", "1/0"])
def test_bad_shard_is_rejected(text):
    with pytest.raises(argparse.ArgumentTypeError):
        Shard.parse(text)


def test_cli_parses_run_options(tmp_path):
    args = parse(["matrix", "--model", "a", "--model", "b", "--tiers", "smoke,strict", "-n", "4", "--shard", "1/3",
                  "--timeout", "60", "--reports-dir", str(tmp_path)])
    assert (args.models, args.tiers, args.workers, args.shard, args.timeout) == (["a", "b"], ["smoke", "strict"], "4",
                                                                                Shard(1, 3), 60.0)
    assert args.run.__name__ == "_cmd_run"
    with pytest.raises(SystemExit):
        parse(["matrix", "--tiers", "smoke,nightly"])
    with pytest.raises(SystemExit):
        parse(["matrix", "--zoo", "--model", "a"])


def test_models_file_lists_one_model_a_line_with_comments(tmp_path):
    (tmp_path / "models.txt").write_text("# nightly\ntiny-llama\n\n/models/x  # a local one\n")
    assert _selected_models(parse(["matrix", "--models-file", str(tmp_path / "models.txt")])) == [
        "tiny-llama", "/models/x"]


# --------------------------------------------------------------------------- the runner, with a stand-in pytest

# Takes the runner's pytest arguments and does what STUB_PLAN says: records for some models
# (written like the plugin's controller, into --results-dir), then sleeps and exits.
STUB = textwrap.dedent("""
    import argparse, json, os, sys, time
    from pathlib import Path
    from harness.results import ResultRecord, append_record

    parser = argparse.ArgumentParser()
    parser.add_argument("suites", nargs="+")
    parser.add_argument("-n", required=True)
    parser.add_argument("--dist", required=True)
    parser.add_argument("--results-dir", type=Path, required=True)
    parser.add_argument("--timeout")
    parser.add_argument("--model", action="append", default=[])
    args = parser.parse_args()
    plan = json.loads(os.environ["STUB_PLAN"])
    Path(plan["argv_file"]).write_text(json.dumps(sys.argv[1:]))
    tiers = [Path(s).name for s in args.suites]
    print(f"collected {len(args.model) * len(tiers)} items", flush=True)
    for model in args.model:
        outcome = plan["outcomes"].get(model)
        for tier in tiers if outcome else []:
            append_record(args.results_dir / "results.jsonl", ResultRecord(
                model=model, architecture=plan["architectures"].get(model), task="generate", tier=tier,
                check="greedy", outcome=outcome, reason="" if outcome == "pass" else f"{outcome} in {tier}"))
    time.sleep(plan.get("sleep", 0))
    print(plan.get("last_words", "bye"))
    sys.exit(plan.get("exit", 0))
""")


@pytest.fixture
def stub(tmp_path, monkeypatch):
    script = tmp_path / "fake_pytest.py"
    script.write_text(STUB)
    suites = tmp_path / "suites"
    for tier in ("smoke", "strict"):  # no sensibility or community suite
        (suites / tier).mkdir(parents=True)

    def options(plan: dict, **overrides) -> RunOptions:
        plan = {"argv_file": str(tmp_path / "argv.json"), "architectures": {}, **plan}
        monkeypatch.setenv("STUB_PLAN", json.dumps(plan))
        return RunOptions(**{"models": [], "reports_dir": tmp_path / "reports", "suites_dir": suites,
                             "pytest_command": (sys.executable, str(script)), **overrides})

    options.argv = lambda: json.loads((tmp_path / "argv.json").read_text())
    return options


def test_run_records_errors_for_models_pytest_left_without_records(stub, tmp_path):
    local = tmp_path / "local-model"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"architectures": ["GemmaForCausalLM"]}))
    options = stub({"outcomes": {"tiny-llama": "pass"}, "architectures": {"tiny-llama": "LlamaForCausalLM"},
                    "exit": 3, "last_words": "INTERNALERROR> worker crashed"},
                   models=["tiny-llama", "tiny-qwen2", str(local), "/no/such/model"], timeout=30)
    run_dir = run_matrix(options)

    argv = stub.argv()
    assert argv[argv.index("--results-dir") + 1] == str(run_dir)
    assert argv[argv.index("--timeout") + 1] == "30"
    errors = [r for r in read_records(run_dir / "results.jsonl") if r.outcome == "error"]
    assert {(r.model, r.tier) for r in errors} == {(m, t) for m in ("tiny-qwen2", str(local), "/no/such/model")
                                                   for t in ("smoke", "strict")}
    assert all("exited with code 3" in r.reason and "worker crashed" in r.reason for r in errors)

    matrix = load_matrix(run_dir)
    assert row(matrix, "LlamaForCausalLM").tiers["smoke"].status == "pass"
    assert row(matrix, "Qwen2ForCausalLM").tiers["strict"].status == "error"  # the zoo spec's architecture
    assert row(matrix, "GemmaForCausalLM").tiers["smoke"].status == "error"  # the local config's
    assert row(matrix, UNKNOWN_ARCHITECTURE, UNLISTED).models == ["/no/such/model"]
    assert row(matrix, "LlamaForCausalLM").tiers["sensibility"].status == "untested"  # no suite for it

    assert {f.name for f in run_dir.iterdir()} == {"results.jsonl", "matrix.json", "matrix.csv",
                                                   "supported_models.md", "index.html", "heatmap.png", "pytest.log"}
    reports = tmp_path / "reports"
    assert (reports / "latest").resolve() == run_dir.resolve()
    assert (reports / "supported_models.md").read_text() == (run_dir / "supported_models.md").read_text()


def test_completed_run_leaves_a_tier_without_records_untested(stub):
    # Exit 1: a test failed, the rest ran; tiny-qwen2 simply has no check recorded in any tier.
    options = stub({"outcomes": {"tiny-llama": "fail"}, "architectures": {"tiny-llama": "LlamaForCausalLM"},
                    "exit": 1}, models=["tiny-llama", "tiny-qwen2"])
    run_dir = run_matrix(options)
    assert {r.model for r in read_records(run_dir / "results.jsonl")} == {"tiny-llama"}
    matrix = load_matrix(run_dir)
    assert row(matrix, "LlamaForCausalLM").tiers["smoke"].status == "fail"
    assert row(matrix, "Qwen2ForCausalLM").tiers["smoke"].status == "untested"


def test_run_over_its_global_timeout_is_killed_and_still_yields_a_matrix(stub):
    # The stub imports torch and transformers before it records anything: allow for a loaded machine.
    options = stub({"outcomes": {"tiny-llama": "pass"}, "sleep": 120},
                   models=["tiny-llama", "tiny-mistral"], global_timeout=20)
    start = time.monotonic()
    run_dir = run_matrix(options)
    assert time.monotonic() - start < 60
    by_model = {(r.model, r.tier): r for r in read_records(run_dir / "results.jsonl")}
    assert by_model["tiny-llama", "smoke"].outcome == "pass"  # recorded before the hang: kept
    assert by_model["tiny-mistral", "strict"].outcome == "error"
    assert "global timeout of 20 s" in by_model["tiny-mistral", "strict"].reason
    assert row(load_matrix(run_dir), "MistralForCausalLM").tiers["smoke"].status == "error"


def test_shard_run_checks_only_its_models_and_publishes_nothing(stub, tmp_path):
    models = ["m0", "m1", "m2", "m3", "m4"]
    options = stub({"outcomes": {m: "pass" for m in models}}, models=models, shard=Shard(1, 2))
    run_dir = run_matrix(options)
    argv = stub.argv()
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--model"] == ["m1", "m3"]
    assert run_dir.name.endswith("-shard1of2")
    assert {r.model for r in read_records(run_dir / "results.jsonl")} == {"m1", "m3"}
    assert not (tmp_path / "reports" / "latest").exists()
    assert not (tmp_path / "reports" / "supported_models.md").exists()


def test_second_run_diffs_against_the_previous_one(stub, tmp_path):
    architectures = {"tiny-llama": "LlamaForCausalLM"}
    first = run_matrix(stub({"outcomes": {"tiny-llama": "pass"}, "architectures": architectures},
                            models=["tiny-llama"], run_id="first"))
    assert not (first / "diff.md").exists()
    second = run_matrix(stub({"outcomes": {"tiny-llama": "fail"}, "architectures": architectures, "exit": 1},
                             models=["tiny-llama"], run_id="second"))
    diff = (second / "diff.md").read_text()
    assert "`first` → `second`" in diff and "| tiny-llama | smoke | pass | fail |" in diff
    assert '<tr class="regression">' in (second / "index.html").read_text()
    assert (tmp_path / "reports" / "latest").resolve() == second.resolve()


def test_run_without_any_suite_for_the_tiers_is_a_command_error(stub):
    with pytest.raises(CommandError, match="no suite directory"):
        run_matrix(stub({"outcomes": {}}, models=["m"], tiers=["sensibility"]))


def test_an_unreadable_previous_matrix_costs_the_new_run_only_its_diff(tmp_path):
    reports = tmp_path / "reports"
    (reports / "old").mkdir(parents=True)
    (reports / "old" / "matrix.json").write_text('{"schema_version": 0}')
    (reports / "latest").symlink_to("old")
    (reports / "new").mkdir()
    records = [record("a", "smoke", "pass")]
    write_reports(reports / "new", records, RunInfo.for_records("new", "s", "e", records), reports, publish=True)
    assert (reports / "new" / "index.html").is_file() and not (reports / "new" / "diff.md").exists()
    assert (reports / "latest").resolve() == (reports / "new").resolve()
