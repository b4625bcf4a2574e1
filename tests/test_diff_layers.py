"""The divergence localiser (harness.diff_layers): it finds no divergence between a correct
engine and Transformers, names the planted module for planted faults, and a strict failure's
record names its first diverging module."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import zoo
from harness.compare import ComparisonError, check_logprobs_close
from harness.diff_layers import (
    DEFAULT_TOLERANCE,
    compare_sites,
    diff_layers,
    engine_sites,
    explain_failure,
    reference_sites,
)
from harness.faults import CATALOGUE, inject, site_of
from harness.plugin import EXAMPLE_PROMPTS
from harness.runners import EngineRunner, HfRunner

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LONG_PROMPT = max(EXAMPLE_PROMPTS, key=len)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sides():
    """Zoo model -> (engine, the reference's sites over the long prompt, its token ids), made on first use."""
    runners: list[EngineRunner] = []

    class Sides(dict):
        def __missing__(self, name: str):
            path = str(zoo.model_path(name))
            engine = EngineRunner(path)
            runners.append(engine)
            ids = engine.tokenizer(LONG_PROMPT).input_ids
            with HfRunner(path) as hf:
                self[name] = engine, reference_sites(hf.model, ids), ids
            return self[name]

    yield Sides()
    for engine in runners:
        engine.close()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma2"])
def test_correct_engine_has_no_divergence(sides, name: str):
    engine, reference, ids = sides[name]
    diff = compare_sites(reference, engine_sites(engine.llm, ids), name, LONG_PROMPT)
    num_layers = engine.llm.llm_engine.config.hf_config.num_hidden_layers
    sites = [s.site for s in diff.sites]
    assert sites[0] == "embed" and sites[-2:] == ["final_norm", "logits"]
    for i in range(num_layers):
        assert {f"layers.{i}.self_attn", f"layers.{i}.mlp", f"layers.{i}.input_layernorm", f"layers.{i}"} <= set(sites)
    assert diff.unmatched == []
    assert all(s.shape[0] == len(ids) for s in diff.sites)
    assert diff.first_divergence is None, diff.table()
    assert max(s.rel for s in diff.sites) < DEFAULT_TOLERANCE / 3


# (fault, model) -> the site it was planted in, checked against where the planted modules lie.
NAMED = {
    ("rope_theta", "tiny-llama"): "layers.0.self_attn",
    ("kv_slot_off_by_one", "tiny-llama"): "layers.0.self_attn",
    ("norm_eps", "tiny-llama"): "layers.0.input_layernorm",
    ("rmsnorm_offset", "tiny-llama"): "layers.0.input_layernorm",
    ("embedding_scale_dropped", "tiny-gemma2"): "embed",
    ("activation_swapped", "tiny-gemma2"): "layers.0.mlp",
    ("logit_softcap_dropped", "tiny-gemma2"): "logits",
    ("sliding_window_ignored", "tiny-gemma2"): "layers.0.self_attn",
}


@pytest.mark.parametrize("fault, name", sorted(NAMED))
def test_planted_fault_is_named(sides, fault: str, name: str):
    engine, reference, ids = sides[name]
    expected = NAMED[fault, name]
    with inject(engine.llm, CATALOGUE[fault]) as planted:
        diff = compare_sites(reference, engine_sites(engine.llm, ids), name, LONG_PROMPT, fault=fault)
    assert site_of(planted[0]) == expected
    first = diff.first_divergence
    assert first is not None and first.site == expected, diff.table()
    # Everything computed before the planted module agrees.
    assert not any(diff.diverged(s) for s in diff.sites[:diff.sites.index(first)])


def test_diff_layers_command_writes_table_and_plot(tmp_path, capsys):
    from harness.cli import main

    plot = tmp_path / "diff.png"
    assert main(["diff-layers", "--model", "tiny-qwen2", "--fault", "bias_dropped", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "first diverging module: layers.0.self_attn" in out
    assert "| layers.0.self_attn |" in out and "**first**" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diff_layers_refuses_an_inapplicable_fault(capsys):
    from harness.cli import main

    assert main(["diff-layers", "--model", "tiny-llama", "--fault", "logit_softcap_dropped"]) == 1
    assert "does not apply: the model has no final logit soft cap" in capsys.readouterr().err


def test_explain_failure_on_a_correct_model_and_a_broken_path():
    path = str(zoo.model_path("tiny-llama"))
    ok = ([1, 2], "", [{1: -0.1, 2: -2.0}, {2: -0.1, 3: -2.0}])
    wrong = ([1, 3], "", [{1: -0.1, 2: -2.0}, {3: -0.1, 4: -2.0}])
    with pytest.raises(ComparisonError) as failure:
        check_logprobs_close([ok, ok], [ok, wrong], "hf", "engine")
    # The engine here is correct: the outputs above were made up, so nothing diverges.
    assert explain_failure(failure.value, path, EXAMPLE_PROMPTS[:2]) == "none"
    assert explain_failure(failure.value, "/nonexistent/model", EXAMPLE_PROMPTS[:2]).startswith("unknown (")


def test_diff_layers_public_function_matches_fixture_path():
    diff = diff_layers("tiny-llama", LONG_PROMPT, "gqa_head_mapping")
    assert diff.fault == "gqa_head_mapping" and diff.first_divergence.site == "layers.0.self_attn"


# A plugin that plants a fault in every engine the strict suite (and diff-layers) creates.
_PLANTING_PLUGIN = '''
import contextlib
from engine.llm import LLM
from harness.faults import CATALOGUE, inject

_stack = contextlib.ExitStack()
_init = LLM.__init__

def _faulty_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    _stack.enter_context(inject(self, CATALOGUE["rope_theta"]))

LLM.__init__ = _faulty_init
'''


def test_strict_failure_record_names_first_diverging_module(tmp_path):
    (tmp_path / "plant_rope_theta.py").write_text(_PLANTING_PLUGIN)
    results = tmp_path / "results"
    command = [sys.executable, "-m", "pytest", str(ROOT / "suites" / "strict" / "test_generation.py"),
               "-k", "greedy_logprobs and batch_all", "--model", "tiny-llama", "--results-dir", str(results),
               "-p", "plant_rope_theta", "-p", "no:cacheprovider", "-q"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    records = [json.loads(line) for line in (results / "results.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["outcome"] == "fail"
    assert records[0]["metrics"]["first_diverging_module"] == "layers.0.self_attn"
    assert "first diverging module: layers.0.self_attn" in records[0]["reason"]
