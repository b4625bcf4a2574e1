"""`litmus bench` on a tiny zoo model: the real engine and real Transformers, a tiny workload.

Nothing here asserts a speed (the machine is shared): only that each run did the whole
workload, that the report holds its fields with consistent values, and that errors are named.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from harness import bench, zoo
from harness.bench import Workload, make_prompts, matmul_params, workload_flops
from harness.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL = "tiny-llama"
# The zoo model built from a GGUF file, which the llamacpp backend runs directly.
GGUF_MODEL = "smollm2-135m-instruct"
NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN = 3, 5, 4


def _bench(tmp_path: Path, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, dict | None, str, str]:
    out = tmp_path / "report.json"
    code = main(["bench", *args, "--model", MODEL, "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN),
                 "--threads", "1", "--output", str(out)])
    captured = capsys.readouterr()
    return code, json.loads(out.read_text()) if out.exists() else None, captured.out, captured.err


def test_throughput_compare_reports_both_backends_and_their_ratio(tmp_path: Path, capsys) -> None:
    code, report, out, _ = _bench(tmp_path, capsys, "throughput", "--num-prompts", str(NUM_PROMPTS),
                                  "--compare", "engine,hf", "--hf-batch-sizes", "2,3")
    assert code == 0
    assert report["kind"] == "throughput" and report["model"] == MODEL and report["threads"] == 1
    assert report["matmul_peak_gflops"] == max(report["matmul_peaks_gflops"].values()) > 0
    assert report["roofline_tok_s"] > 0
    for name in ("engine", "hf"):
        r = report["results"][name]
        # EOS ignored: every prompt got every token, whatever the random weights pick.
        assert r["output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
        assert r["tok_s"] == pytest.approx(r["output_tokens"] / r["total_time_s"])
        assert r["requests_s"] == pytest.approx(NUM_PROMPTS / r["total_time_s"])
        assert 0 < r["roofline_pct"] and r["peak_rss_mb"] > 0 and r["cpu_time_s"] > 0
    hf = report["results"]["hf"]
    # Batch size 2 leaves a last batch of 1: it too must produce its tokens.
    assert set(hf["batch_sizes_tried"]) == {"2", "3"}
    assert hf["batch_size"] in (2, 3)
    assert hf["tok_s"] == pytest.approx(max(hf["batch_sizes_tried"].values()))
    ratio = report["results"]["engine"]["tok_s"] / hf["tok_s"]
    assert report["ratios"] == {"engine/hf": pytest.approx(ratio)}
    assert f"ratio engine/hf (tok/s): {ratio:.2f}x" in out
    assert hf["step_stats"] is None


def test_engine_steps_are_split_into_model_and_overhead(tmp_path: Path, capsys) -> None:
    code, report, out, _ = _bench(tmp_path, capsys, "throughput", "--num-prompts", str(NUM_PROMPTS),
                                  "--backend", "engine")
    assert code == 0
    r = report["results"]["engine"]
    stats = r["step_stats"]
    # A token per sequence per step at most (prefills may take several steps, chunked).
    assert stats["steps"] >= OUTPUT_LEN
    phases = [stats[f"{name}_ms"] for name in ("schedule", "prepare", "model", "sample", "output")]
    assert all(p > 0 for p in phases)
    assert stats["step_ms"] == pytest.approx(sum(phases))
    assert stats["overhead_ms"] == pytest.approx(stats["step_ms"] - stats["model_ms"])
    assert stats["overhead_pct"] == pytest.approx(100 * stats["overhead_ms"] / stats["step_ms"])
    # The steps are the run: their time is the run's, less what generate() does around them.
    assert stats["steps"] * stats["step_ms"] / 1e3 <= r["total_time_s"]
    assert f"{stats['steps']} steps" in out and "outside the model" in out


def test_engine_native_against_its_transformers_backend(tmp_path: Path, capsys) -> None:
    code, report, out, _ = _bench(tmp_path, capsys, "throughput", "--num-prompts", str(NUM_PROMPTS),
                                  "--compare", "engine,engine-transformers")
    assert code == 0
    native, backend = report["results"]["engine"], report["results"]["engine-transformers"]
    assert native["output_tokens"] == backend["output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
    assert report["ratios"] == {"engine/engine-transformers": pytest.approx(native["tok_s"] / backend["tok_s"])}


def test_latency_compare_reports_first_token_and_per_token_times(tmp_path: Path, capsys) -> None:
    code, report, out, _ = _bench(tmp_path, capsys, "latency", "--compare", "hf,engine", "--repeats", "1")
    assert code == 0 and report["kind"] == "latency"
    for name in ("engine", "hf"):
        r = report["results"][name]
        assert r["ttft_ms"] > 0 and r["ms_per_output_token"] > 0
        assert r["decode_tok_s"] == pytest.approx(1e3 / r["ms_per_output_token"])
        assert r["total_time_s"] * 1e3 > r["ttft_ms"]
    engine = report["results"]["engine"]
    assert 0 < engine["step_overhead_ms"] < engine["step_ms"] and "step_ms" not in report["results"]["hf"]
    ratio = report["results"]["engine"]["ms_per_output_token"] / report["results"]["hf"]["ms_per_output_token"]
    assert report["ratios"] == {"hf/engine": pytest.approx(ratio)}
    assert "ratio hf/engine" in out


def test_one_backend_has_no_ratio(tmp_path: Path, capsys) -> None:
    code, report, out, _ = _bench(tmp_path, capsys, "throughput", "--num-prompts", "2", "--backend", "engine")
    assert code == 0
    assert list(report["results"]) == ["engine"] and report["ratios"] == {}
    assert "\nratio " not in out


def test_roofline_ceiling_is_the_highest_peak_measured_across_the_rounds(tmp_path: Path, capsys, monkeypatch) -> None:
    # The machine's speed drifts: a peak measured in a slow spell must not lower the ceiling
    # (that would flatter every roofline percentage). Measurements: before round 1, after each.
    measured = iter([{"torch": 100.0, "engine": 90.0}, {"torch": 120.0, "engine": 300.0},
                     {"torch": 80.0, "engine": 70.0}])
    monkeypatch.setattr(bench, "matmul_peaks_gflops", lambda dtype: next(measured))
    code, report, _, _ = _bench(tmp_path, capsys, "throughput", "--num-prompts", str(NUM_PROMPTS),
                                "--backend", "engine", "--repeats", "2")
    assert code == 0 and next(measured, None) is None
    assert report["matmul_peaks_gflops"] == {"torch": 120.0, "engine": 300.0}
    assert report["matmul_peak_gflops"] == 300.0
    tokens = NUM_PROMPTS * OUTPUT_LEN
    assert report["roofline_tok_s"] == pytest.approx(tokens * 300.0 / report["workload_gflop"])


def test_llamacpp_without_its_package_is_a_clear_error(tmp_path: Path, capsys, monkeypatch) -> None:
    # None in sys.modules makes `import llama_cpp` fail as if it were not installed.
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    code, report, _, err = _bench(tmp_path, capsys, "throughput", "--num-prompts", "2", "--backend", "llamacpp")
    assert code == 1 and report is None
    assert "llama-cpp-python" in err and "not installed" in err


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_llamacpp_runs_the_gguf_a_zoo_model_was_built_from(tmp_path: Path, capsys) -> None:
    try:
        zoo.model_path(GGUF_MODEL)
    except zoo.ZooUnavailableError as exc:
        pytest.skip(f"{GGUF_MODEL} is unavailable: {exc}")
    out = tmp_path / "report.json"
    code = main(["bench", "throughput", "--model", GGUF_MODEL, "--backend", "llamacpp", "--num-prompts", "2",
                 "--input-len", "4", "--output-len", "3", "--threads", "1", "--output", str(out)])
    assert code == 0, capsys.readouterr().err
    r = json.loads(out.read_text())["results"]["llamacpp"]
    assert r["output_tokens"] == 2 * 3
    assert r["weights"].endswith(".gguf")


@pytest.mark.parametrize(("args", "message"), [
    (["--compare", "engine,vllm"], "unknown backend 'vllm'"),
    (["--compare", "engine,engine"], "name each backend once"),
    (["--num-prompts", "0"], "--num-prompts must be >= 1"),
    (["--hf-batch-sizes", "8,x", "--backend", "hf"], "--hf-batch-sizes"),
])
def test_bad_arguments_are_named(tmp_path: Path, capsys, args: list[str], message: str) -> None:
    code, report, _, err = _bench(tmp_path, capsys, "throughput", *args)
    assert code == 1 and report is None
    assert message in err


def test_latency_needs_two_output_tokens(tmp_path: Path, capsys) -> None:
    out = tmp_path / "r.json"
    code = main(["bench", "latency", "--model", MODEL, "--output-len", "1", "--output", str(out)])
    assert code == 1 and not out.exists()
    assert "--output-len must be >= 2" in capsys.readouterr().err


def test_prompts_are_seeded_ordinary_tokens() -> None:
    from transformers import AutoTokenizer

    path = str(zoo.model_path(MODEL))
    w = Workload(MODEL, path, "float32", num_prompts=4, input_len=16, output_len=1)
    prompts = make_prompts(w)
    assert prompts == make_prompts(w)
    assert prompts != make_prompts(Workload(MODEL, path, "float32", 4, 16, 1, seed=1))
    assert [len(p) for p in prompts] == [16] * 4
    special = set(AutoTokenizer.from_pretrained(path).all_special_ids)
    assert not special & {t for p in prompts for t in p}


def test_flops_count_every_linear_weight_once() -> None:
    from transformers import AutoConfig

    path = str(zoo.model_path(MODEL))
    c = AutoConfig.from_pretrained(path)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    attention = c.hidden_size * head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    body, head = matmul_params(path)
    assert body == c.num_hidden_layers * (attention + mlp)
    assert head == c.vocab_size * c.hidden_size
    w = Workload(MODEL, path, "float32", num_prompts=2, input_len=3, output_len=4)
    # Per prompt: the body on 3 prompt tokens + 3 generated ones fed back; the head on 4 picks.
    assert workload_flops(w, body, head) == 2 * 2 * (6 * body + 4 * head)
