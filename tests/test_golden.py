"""Golden files on the tiny Llama: recording and reading back, staleness of every provenance
field, the `litmus golden` command, and the strict suite's `--reference golden` mode."""
from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import pytest

from harness.cli import main
from harness.compare import check_logprobs_close, check_prompt_logprobs_close
from harness.golden import (
    GoldenError,
    ReferenceSettings,
    golden_path,
    golden_status,
    load_golden,
    record_golden,
    run_hf_reference,
    save_golden,
)
from harness.results import read_records

PROMPTS = ["The quick brown fox", "def add(a, b):", "1, 2, 3, 5,"]
SETTINGS = ReferenceSettings(max_tokens=6, num_logprobs=3, num_prompt_logprobs=3)
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")
pytest_plugins = ["pytester"]


@pytest.fixture
def model_dir(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny model that a test may change."""
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))


@pytest.fixture
def golden_dir(tmp_path: Path) -> Path:
    return tmp_path / "golden"


@pytest.fixture
def recorded(model_dir: Path, golden_dir: Path) -> Path:
    return record_golden("tiny", str(model_dir), golden_dir, PROMPTS, SETTINGS)


def status(golden_dir: Path, model_dir: Path, prompts=PROMPTS, settings=SETTINGS):
    return golden_status(golden_dir, "tiny", prompts, settings, str(model_dir))


# --- record and read back ---------------------------------------------------------------------


def test_a_golden_file_reads_back_as_the_reference_it_recorded(recorded, model_dir, golden_dir):
    from harness.runners import HfRunner

    with HfRunner(str(model_dir)) as hf:
        fresh = run_hf_reference(hf, PROMPTS, SETTINGS)
    golden = load_golden(recorded)
    assert golden.model == "tiny"
    assert golden.provenance.prompts == PROMPTS
    ref = golden.reference
    assert ref.eos_token_ids == fresh.eos_token_ids
    assert [(ids, text) for ids, text, _ in ref.generations] == [(ids, text) for ids, text, _ in fresh.generations]
    # Stored to 5 decimals: equal to the live run within rounding.
    generation = check_logprobs_close(fresh.generations, ref.generations, "live", "golden", atol=1e-5)
    assert generation.metrics()["identical_prompts"] == len(PROMPTS)
    prompt = check_prompt_logprobs_close(
        fresh.prompt_logprobs, ref.prompt_logprobs, "live", "golden", num_logprobs=3, atol=1e-5
    )
    assert prompt.metrics()["matched_topk_positions"] == prompt.metrics()["compared_positions"] > 0
    assert [ids for ids, _ in ref.prompt_logprobs] == [ids for ids, _ in fresh.prompt_logprobs]


def test_a_fresh_recording_is_fresh(recorded, model_dir, golden_dir):
    result = status(golden_dir, model_dir)
    assert (result.state, result.reasons, result.path) == ("fresh", [], recorded)
    assert result.golden is not None and len(result.golden.reference.generations) == len(PROMPTS)


def test_recording_again_writes_the_same_bytes(recorded, model_dir, golden_dir):
    first = recorded.read_bytes()
    again = record_golden("tiny", str(model_dir), golden_dir, PROMPTS, SETTINGS)
    assert again == recorded and again.read_bytes() == first


def test_a_large_file_is_gzipped_deterministically_and_replaces_the_plain_one(recorded, golden_dir):
    golden = load_golden(recorded)
    zipped = save_golden(golden, golden_dir, gzip_above=0)
    assert zipped.name == "tiny.json.gz" and not recorded.exists()
    assert golden_path(golden_dir, "tiny") == zipped
    assert gzip.decompress(zipped.read_bytes()).decode().startswith("{")
    assert load_golden(zipped) == golden
    first = zipped.read_bytes()
    assert save_golden(golden, golden_dir, gzip_above=0).read_bytes() == first
    assert save_golden(golden, golden_dir) == recorded and not zipped.exists()


def test_model_names_become_file_names(tmp_path):
    assert golden_path(tmp_path, "tiny-llama").name == "tiny-llama.json"
    assert golden_path(tmp_path, "HuggingFaceTB/SmolLM2-1.7B").name == "HuggingFaceTB--SmolLM2-1.7B.json"
    assert golden_path(tmp_path, "/data/models/my model").name == "data--models--my--model.json"


# --- staleness, one provenance field at a time --------------------------------------------------


def _rewrite_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _change_weights(model_dir: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(model_dir / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})


def _set_provenance(recorded: Path, **changes) -> None:
    data = json.loads(recorded.read_text())
    data["provenance"].update(changes)
    recorded.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda m, g: _change_weights(m), r"weights changed: model.safetensors sha256 [0-9a-f]{12} recorded"),
        (lambda m, g: shutil.copy(m / "model.safetensors", m / "extra.safetensors"),
         r"weight files changed: \['model.safetensors'\] recorded, \['extra.safetensors', 'model.safetensors'\]"),
        (lambda m, g: _rewrite_json(m / "config.json", rms_norm_eps=1e-3), r"config changed"),
        (lambda m, g: _rewrite_json(m / "generation_config.json", eos_token_id=[1, 2]), r"config changed"),
        (lambda m, g: _rewrite_json(m / "tokenizer_config.json", model_max_length=17), r"tokenizer files changed"),
        (lambda m, g: _set_provenance(g, transformers="4.57.1"),
         r"transformers major version changed: 4.57.1 recorded, \d+\.\S+ now"),
        (lambda m, g: _set_provenance(g, torch="1.13.1"), r"torch major version changed: 1.13.1 recorded"),
    ],
    ids=["weights", "weight-files", "config", "generation-config", "tokenizer", "transformers", "torch"],
)
def test_each_model_or_library_change_makes_it_stale_with_the_reason(change, reason, recorded, model_dir, golden_dir):
    change(model_dir, recorded)
    result = status(golden_dir, model_dir)
    assert result.state == "stale"
    assert len(result.reasons) == 1 and re.match(reason, result.reasons[0]), result.reasons


@pytest.mark.parametrize(
    ("prompts", "settings", "reason"),
    [
        (PROMPTS[:2] + ["1, 2, 3, 5, 8"], SETTINGS, "prompts changed: prompt 2 differ"),
        (PROMPTS + ["one more"], SETTINGS, "prompts changed: 3 recorded, 4 now"),
        (PROMPTS, ReferenceSettings(max_tokens=7, num_logprobs=3, num_prompt_logprobs=3),
         "settings changed: max_tokens 6 recorded, 7 now"),
        (PROMPTS, ReferenceSettings(max_tokens=6, num_logprobs=3, num_prompt_logprobs=3, dtype="bfloat16"),
         "settings changed: dtype 'float32' recorded, 'bfloat16' now"),
        (PROMPTS, ReferenceSettings(max_tokens=6, num_logprobs=5, num_prompt_logprobs=2),
         "settings changed: num_logprobs 3 recorded, 5 now, num_prompt_logprobs 3 recorded, 2 now"),
    ],
    ids=["prompt-text", "prompt-count", "max-tokens", "dtype", "k"],
)
def test_other_prompts_or_settings_make_it_stale(prompts, settings, reason, recorded, model_dir, golden_dir):
    result = status(golden_dir, model_dir, prompts, settings)
    assert (result.state, result.reasons) == ("stale", [reason])


def test_what_does_not_change_the_model_keeps_it_fresh(recorded, model_dir, golden_dir):
    # A rebuild under another transformers minor rewrites transformers_version in the configs,
    # and the weights file gets a new mtime; none of that is a different model.
    _rewrite_json(model_dir / "config.json", transformers_version="5.99.0")
    weights = (model_dir / "model.safetensors").read_bytes()
    (model_dir / "model.safetensors").unlink()
    (model_dir / "model.safetensors").write_bytes(weights)
    _set_provenance(recorded, transformers="5.0.0", torch="2.0.1")
    assert status(golden_dir, model_dir).describe() == "fresh"


def test_missing_unreadable_and_foreign_files_are_told_apart(recorded, model_dir, golden_dir):
    assert status(golden_dir / "elsewhere", model_dir).describe().startswith("missing: no golden file ")
    recorded.write_text('{"format": 1, "model": "tiny"')
    assert status(golden_dir, model_dir).state == "unreadable"
    recorded.write_text(json.dumps({"format": 99}))
    assert status(golden_dir, model_dir).describe() == (
        f"unreadable: {recorded}: golden format 99, this harness reads format 1"
    )
    recorded.write_text(json.dumps({"format": 1, "model": "tiny"}))
    assert "malformed golden file (KeyError" in status(golden_dir, model_dir).reasons[0]
    with pytest.raises(GoldenError, match="cannot be read"):
        load_golden(golden_dir / "absent.json")


def test_a_model_without_weights_is_stale_not_a_crash(recorded, model_dir, golden_dir):
    (model_dir / "model.safetensors").unlink()
    result = status(golden_dir, model_dir)
    assert result.state == "stale"
    assert result.reasons == [f"the model's provenance cannot be taken: no weight files "
                              f"(*.safetensors, *.bin, *.gguf) in {model_dir}"]


# --- the command ---------------------------------------------------------------------------------


def test_record_then_check_from_the_command_line(model_dir, golden_dir, capsys):
    model = str(model_dir)
    assert main(["golden", "record", "--model", model, "--out", str(golden_dir)]) == 0
    [written] = golden_dir.iterdir()
    assert written == golden_path(golden_dir, model) and str(written) in capsys.readouterr().out
    assert load_golden(written).provenance.settings == {
        "max_tokens": 32, "num_logprobs": 5, "num_prompt_logprobs": 5, "dtype": "float32"
    }

    assert main(["golden", "check", "--dir", str(golden_dir)]) == 0
    assert capsys.readouterr().out == f"{model}  fresh\n1 of 1 golden files fresh\n"

    _change_weights(model_dir)
    assert main(["golden", "check", "--dir", str(golden_dir), "--model", model, "--model", "tiny-nothing"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{model}  stale: weights changed: model.safetensors sha256 ")
    assert out[1].startswith("tiny-nothing") and "missing: no golden file" in out[1]
    assert out[2] == "0 of 2 golden files fresh"


def test_record_refuses_without_a_model_or_with_an_unknown_one(golden_dir, capsys):
    assert main(["golden", "record", "--out", str(golden_dir)]) == 1
    assert "name a model with --model" in capsys.readouterr().err
    assert main(["golden", "record", "--model", "/no/such/model", "--out", str(golden_dir)]) == 1
    assert "litmus: error: /no/such/model:" in capsys.readouterr().err
    assert not golden_dir.exists()


def test_check_on_an_empty_directory(golden_dir, capsys):
    assert main(["golden", "check", "--dir", str(golden_dir)]) == 0
    assert capsys.readouterr().out == f"no golden files in {golden_dir}\n"


# --- the strict suite against golden files -------------------------------------------------------


def _strict_suite(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, model_dir: Path, golden_dir: Path, results: Path,
    *options: str,
) -> tuple[pytest.RunResult, dict]:
    monkeypatch.setenv("LITMUS_GOLDEN_DIR", str(golden_dir))
    run = pytester.runpytest_inprocess(
        str(REPO / "suites" / "strict" / "test_generation.py"), "--model", str(model_dir), "--reference", "golden",
        "--results-dir", str(results), "-p", "no:cacheprovider", *options,
    )
    return run, {record.check: record for record in read_records(results / "results.jsonl")}


@pytest.fixture
def zoo_model_dir(tmp_path: Path) -> Path:
    """A copy of the zoo's tiny-llama: unlike the fixture model it takes the longest example
    prompt (its 256 positions would not)."""
    from harness.zoo import model_path

    return Path(shutil.copytree(model_path("tiny-llama"), tmp_path / "tiny-llama"))


def test_the_strict_suite_in_golden_mode(zoo_model_dir, golden_dir, tmp_path, pytester, monkeypatch):
    """Against a fresh file every check passes and says so; stale skips with the reason;
    missing is an error naming the command that records it."""
    model_dir = zoo_model_dir
    assert main(["golden", "record", "--model", str(model_dir), "--out", str(golden_dir)]) == 0
    # One batching of each check: the golden wiring is the subject here, not the batch sizes.
    run, records = _strict_suite(
        pytester, monkeypatch, model_dir, golden_dir, tmp_path / "fresh", "-k", "batch3 or text"
    )
    assert run.ret == 0, run.stdout.str()[-3000:]
    assert len(records) == 3 and {r.outcome for r in records.values()} == {"pass"}
    greedy = records["test_generation::test_greedy_logprobs_match_hf[batch3]"].metrics
    assert greedy["reference"] == "golden" and greedy["batch_size"] == 3 and greedy["compared_positions"] > 0
    prompt = records["test_generation::test_prompt_logprobs_match_hf[batch3]"].metrics
    assert prompt["matched_topk_positions"] > 0

    _change_weights(model_dir)
    run, records = _strict_suite(pytester, monkeypatch, model_dir, golden_dir, tmp_path / "stale")
    assert run.ret == 0, run.stdout.str()[-3000:]
    assert {r.outcome for r in records.values()} == {"skip"}
    assert all(r.reason.startswith("golden stale: weights changed: model.safetensors") for r in records.values())

    run, records = _strict_suite(pytester, monkeypatch, model_dir, tmp_path / "empty", tmp_path / "missing")
    assert run.ret == 1
    assert {r.outcome for r in records.values()} == {"error"}
    reason = next(iter(records.values())).reason
    assert "golden missing: no golden file" in reason and "litmus golden record --model" in reason
