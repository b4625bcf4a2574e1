"""The `litmus` lm-eval model on the tiny Llama, checked against lm-eval's own `hf` model."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from engine import SamplingParams  # noqa: E402
from harness.lmeval import LitmusLM  # noqa: E402
from harness.sensibility import Corpus, write_lm_eval_tasks  # noqa: E402

# The tiny checkpoint holds 256 positions; a short limit makes long texts span several windows.
MAX_LENGTH = 64
CONTEXTS = ["The quick brown fox", "def add(a, b):\n", "1, 2, 3, 5, 8,", "Le café est"]
CONTINUATIONS = [" jumps over the lazy dog", "    return a + b", " 13, 21", " très chaud."]
LONG_TEXT = " ".join(CONTEXTS[i % 4] + CONTINUATIONS[i % 4] for i in range(30))


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def plain_tiny_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a generation config holding only its special tokens: lm-eval's hf model
    leaves a checkpoint's generation config in force (this one asks for a repetition penalty and
    no_repeat_ngram_size), while litmus decodes exactly what a request asks for."""
    path = tmp_path_factory.mktemp("plain-tiny-llama") / "model"
    shutil.copytree(tiny_llama_dir, path)
    config = json.loads((path / "generation_config.json").read_text())
    plain = {key: config[key] for key in ("bos_token_id", "eos_token_id") if key in config}
    (path / "generation_config.json").write_text(json.dumps(plain))
    return path


@pytest.fixture(scope="module")
def litmus(plain_tiny_dir: Path, one_torch_thread) -> LitmusLM:
    return LitmusLM(pretrained=str(plain_tiny_dir), dtype="float32", max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def hf(plain_tiny_dir: Path, one_torch_thread):
    from lm_eval.models.huggingface import HFLM

    # hf scores a window of n tokens with n - 1 as input, litmus with all n in the engine's
    # prompt: one position less on hf's side gives both the same windows.
    return HFLM(pretrained=str(plain_tiny_dir), dtype="float32", device="cpu", max_length=MAX_LENGTH - 1)


def test_litmus_is_in_lm_evals_registry():
    assert get_model("litmus") is LitmusLM


def test_tokenization_is_hfs(litmus: LitmusLM, hf):
    for text in [*CONTEXTS, "<s> already starts with BOS", ""]:
        assert litmus.tok_encode(text) == hf.tok_encode(text), text
    assert litmus.prefix_token_id == hf.prefix_token_id
    assert litmus.eot_token_id == hf.eot_token_id


def test_loglikelihood_matches_hf(litmus: LitmusLM, hf):
    # An empty context is scored from the prefix token (BOS).
    pairs = list(zip(CONTEXTS, CONTINUATIONS)) + [("", "The quick brown fox")]
    ours = litmus.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    theirs = hf.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    for (lp, greedy), (hf_lp, hf_greedy), pair in zip(ours, theirs, pairs):
        assert lp == pytest.approx(hf_lp, rel=1e-4, abs=1e-4), pair
        assert greedy == hf_greedy, pair
        assert lp < 0


def test_is_greedy_follows_the_argmax(litmus: LitmusLM):
    context = litmus.tok_encode("The quick brown fox")
    greedy_params = SamplingParams(temperature=0.0, max_tokens=4)
    [greedy] = litmus.llm.generate([{"prompt_token_ids": context}], greedy_params, use_tqdm=False)
    argmax = list(greedy.outputs[0].token_ids)
    other = argmax[:-1] + [(argmax[-1] + 1) % len(litmus.tokenizer)]
    (lp_argmax, is_greedy), (lp_other, not_greedy) = litmus._loglikelihood_tokens(
        [(None, context, argmax), (None, context, other)])
    assert (is_greedy, not_greedy) == (True, False)
    assert lp_argmax > lp_other


def test_loglikelihood_rolling_matches_hf_across_windows(litmus: LitmusLM, hf):
    texts = [LONG_TEXT, CONTEXTS[0]]
    assert len(litmus.tok_encode(LONG_TEXT)) > 3 * MAX_LENGTH
    ours = litmus.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    theirs = hf.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    assert ours == pytest.approx(theirs, rel=1e-4)


def test_generate_until_matches_hf(litmus: LitmusLM, hf):
    args = [(context, {"until": ["\n"], "max_gen_toks": 12, "do_sample": False}) for context in CONTEXTS]
    ours = litmus.generate_until(_requests("generate_until", args), disable_tqdm=True)
    theirs = hf.generate_until(_requests("generate_until", args), disable_tqdm=True)
    assert ours == theirs
    assert all("\n" not in text for text in ours)


def test_generate_until_stops_at_the_first_stop_string(litmus: LitmusLM):
    free = litmus.generate_until(_requests("generate_until", [(CONTEXTS[0], {"until": [], "max_gen_toks": 24})]),
                                 disable_tqdm=True)[0]
    assert len(free) > 8
    stop = free[5:8]
    [stopped] = litmus.generate_until(
        _requests("generate_until", [(CONTEXTS[0], {"until": [stop], "max_gen_toks": 24})]), disable_tqdm=True)
    assert stopped == free[:free.index(stop)]


def test_sampled_generation_is_seeded(litmus: LitmusLM):
    kwargs = {"until": [], "max_gen_toks": 16, "do_sample": True, "temperature": 1.0, "seed": 7}
    requests = _requests("generate_until", [(CONTEXTS[0], kwargs)] * 2)
    first, again = litmus.generate_until(requests, disable_tqdm=True)
    assert first == again and first


def test_unsupported_generation_kwargs_are_refused(litmus: LitmusLM):
    kwargs = {"until": [], "max_gen_toks": 8, "num_beams": 4}
    with pytest.raises(ValueError, match="num_beams"):
        litmus.generate_until(_requests("generate_until", [(CONTEXTS[0], kwargs)]))


def test_a_continuation_longer_than_max_length_is_refused(litmus: LitmusLM):
    with pytest.raises(ValueError, match=f"max_length={MAX_LENGTH}"):
        litmus._loglikelihood_tokens([(None, [1], [5] * MAX_LENGTH)])


def test_a_context_is_truncated_from_the_left_to_max_length(litmus: LitmusLM):
    continuation = litmus.tok_encode(CONTINUATIONS[0], add_special_tokens=False)
    long_context = litmus.tok_encode(LONG_TEXT)
    kept = MAX_LENGTH - len(continuation)
    (whole, _), (truncated, _) = litmus._loglikelihood_tokens(
        [(None, long_context, continuation), (None, long_context[-kept:], continuation)])
    assert whole == pytest.approx(truncated, abs=1e-6)


def test_command_line_runs_litmus_on_a_local_task(tiny_llama_dir: Path, tmp_path: Path):
    text = (
        "The river rose all night and by morning the lower fields were under brown water. "
        "Farmers moved their cattle to the ridge where the old church stands above the valley. "
        "Nobody in the village could remember a flood so high since the winter of the great storm. "
        "The school stayed closed for a week while the roads were cleared of mud and branches. "
        "Volunteers from the town brought bread, blankets and dry boots to every family that asked. "
        "When the water finally went down the fields were covered in a thin layer of fine silt.\n\n"
    )
    corpus = Corpus(Path("inline"), text, hashlib.sha256(text.encode()).hexdigest())
    write_lm_eval_tasks(corpus, tmp_path / "tasks", num_docs=3)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "harness.lmeval", "run", "--model", "litmus",
         "--model_args", f"pretrained={tiny_llama_dir},dtype=float32,max_length={MAX_LENGTH}",
         "--tasks", "litmus_corpus_mc", "--include_path", str(tmp_path / "tasks"), "--output_path", str(out)],
        capture_output=True, text=True, timeout=240,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
             "HF_DATASETS_CACHE": str(tmp_path / "datasets")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [results_file] = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["config"]["model"] == "litmus"
    assert 0.0 <= results["results"]["litmus_corpus_mc"]["acc,none"] <= 1.0
