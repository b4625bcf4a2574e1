"""Smoke tier: does the model load and run?

Three subjects, one check: every architecture in the engine's registry (enumerated at
collection, so a family is checked from the moment it registers), a few architectures vLLM's
page lists that the engine runs only through the Transformers backend, and each selected
--model. Each loads, generates on a batch of prompts greedily, by seeded sampling with n > 1,
and with stop tokens (a pooling model encodes the batch twice instead), and every output must
be well formed. Nothing is compared with
Transformers here (that is the strict tier): a tiny checkpoint's text is noise, its shape is not.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from transformers import GenerationConfig

from engine import LLM, RequestOutput, SamplingParams
from engine.config import SUPPORTED_TASKS
from engine.models.registry import UnsupportedArchitectureError, get_model_impl, supported_architectures
from harness import zoo
from harness.zoo.tiny import tiny_model_path

pytestmark = pytest.mark.smoke

MAX_TOKENS = 12
NUM_LOGPROBS = 3
SAMPLING_TOP_K = 20
SEED = 1234
# Tiny checkpoints declare 2048 positions; the prompts need a tenth of that, and a shorter
# max_model_len keeps the KV cache the engine reserves small.
TINY_MAX_MODEL_LEN = 512
# Architectures on vLLM's page that Transformers defines and the engine has no native code for
# (one that gains it moves to the registry sweep): the Transformers backend must run each, or
# refuse it with a reason. Varied on purpose: partial rotary (Phi), q/k norm (OLMo 2), logit
# scaling and parallel blocks (Cohere), sliding-window interleaving (Cohere 2), mixture of experts
# (Mixtral), a decoder nested in its base model (OPT), ALiBi without attention-interface support
# (BLOOM), an encoder-decoder (BART), no attention at all (Mamba, FalconMamba) and Mamba layers
# between attention layers (Jamba).
BACKEND_CANDIDATES = (
    "PhiForCausalLM", "Olmo2ForCausalLM", "CohereForCausalLM", "Cohere2ForCausalLM", "MixtralForCausalLM",
    "OPTForCausalLM", "BloomForCausalLM", "BartForConditionalGeneration", "MambaForCausalLM",
    "FalconMambaForCausalLM", "JambaForCausalLM",
)


def _zoo_recipes() -> dict[str, str]:
    """Architecture -> the first synthetic zoo model of it: hand-tuned recipes are used where they exist."""
    recipes: dict[str, str] = {}
    for spec in zoo.list_specs():
        if spec.kind == "synthetic":
            recipes.setdefault(spec.architecture, spec.name)
    return recipes


@pytest.mark.parametrize("architecture", supported_architectures())
@pytest.mark.usefixtures("one_torch_thread")
def test_registered_architecture(architecture: str, litmus_record, example_prompts: list[str], dtype: str):
    task = get_model_impl([architecture])[1].tasks[0]
    name = _zoo_recipes().get(architecture)
    subject(litmus_record, name or f"tiny-{architecture}", architecture, task, "native")
    require_task(task)
    path = zoo.model_path(name) if name else tiny_model_path(architecture)
    llm = load(litmus_record, str(path), dtype=dtype, model_impl="native", max_model_len=TINY_MAX_MODEL_LEN,
               task=task)
    litmus_record.metrics.update(run_task_smoke(llm, example_prompts))


@pytest.mark.parametrize("architecture", [a for a in BACKEND_CANDIDATES if a not in supported_architectures()])
@pytest.mark.usefixtures("one_torch_thread")
def test_transformers_backend(architecture: str, litmus_record, example_prompts: list[str], dtype: str):
    # The record claims the backend only once it has taken the model: a refusal ran nothing.
    subject(litmus_record, f"tiny-{architecture}", architecture, "generate", "")
    path = str(tiny_model_path(architecture))
    try:
        llm = load(litmus_record, path, dtype=dtype, model_impl="transformers", max_model_len=TINY_MAX_MODEL_LEN)
    except UnsupportedArchitectureError as exc:
        pytest.skip(str(exc))
    litmus_record.model_impl = "transformers"
    litmus_record.metrics.update(run_smoke(llm, example_prompts))


def test_selected_model(model_spec, model_path: str, litmus_record, example_prompts: list[str], dtype: str):
    require_task(model_spec.task)
    llm = load(litmus_record, model_path, dtype=dtype, task=model_spec.task)
    litmus_record.metrics.update(run_task_smoke(llm, example_prompts))


# --- the check -------------------------------------------------------------------------------

def subject(litmus_record, model: str, architecture: str, task: str, model_impl: str) -> None:
    """The record is about this checkpoint, not about --model."""
    litmus_record.model, litmus_record.architecture, litmus_record.task = model, architecture, task
    litmus_record.model_impl = model_impl


def require_task(task: str) -> None:
    if task not in SUPPORTED_TASKS:
        pytest.skip(f"task {task!r} is not supported by the engine yet (supported: {', '.join(SUPPORTED_TASKS)})")


def load(litmus_record, path: str, **llm_kwargs: Any) -> LLM:
    start = time.perf_counter()
    llm = LLM(path, **llm_kwargs)
    litmus_record.metrics["load_s"] = round(time.perf_counter() - start, 3)
    return llm


def run_task_smoke(llm: LLM, prompts: list[str]) -> dict[str, Any]:
    return run_smoke(llm, prompts) if llm.llm_engine.config.task == "generate" else run_pooling_smoke(llm, prompts)


def run_pooling_smoke(llm: LLM, prompts: list[str]) -> dict[str, Any]:
    """A pooling model encodes the batch: one finite output per prompt, of the shape its task
    promises (a unit vector, probabilities, one row per token), the same when run again."""
    start = time.perf_counter()
    config = llm.llm_engine.config
    tokenizer = llm.get_tokenizer()
    fitting = [p for p in prompts if len(tokenizer(p).input_ids) <= config.max_model_len]
    outputs = llm.encode(fitting, use_tqdm=False)
    assert len(outputs) == len(fitting), f"{len(outputs)} outputs for {len(fitting)} prompts"
    for i, (out, prompt) in enumerate(zip(outputs, fitting)):
        where = f"prompt {i} ({prompt[:30]!r})"
        data = out.outputs.data
        assert out.finished, f"{where}: returned unfinished"
        assert out.prompt_token_ids == tokenizer(prompt).input_ids, f"{where}: prompt tokenized differently"
        assert torch.isfinite(data).all(), f"{where}: non-finite output"
        check_pooled_shape(data, config, len(out.prompt_token_ids), where)
    again = llm.encode(fitting, use_tqdm=False)
    assert all(torch.equal(a.outputs.data, b.outputs.data) for a, b in zip(outputs, again)), \
        "encoding the same batch again gave other outputs"
    return {"encode_s": round(time.perf_counter() - start, 3), "prompts": len(fitting),
            "prompts_too_long": len(prompts) - len(fitting), "output_shape": list(outputs[0].outputs.data.shape)}


def check_pooled_shape(data: torch.Tensor, config, num_tokens: int, where: str) -> None:
    pooler = config.pooler_config
    if pooler.pooling_type.value in ("ALL", "STEP"):
        assert data.dim() == 2 and (pooler.pooling_type.value == "STEP" or data.shape[0] == num_tokens), \
            f"{where}: shape {tuple(data.shape)} for {num_tokens} tokens"
        return
    assert data.dim() == 1 and data.numel() > 0, f"{where}: shape {tuple(data.shape)}, expected one vector"
    if config.task == "embed" and pooler.normalize:
        assert abs(data.norm().item() - 1) < 1e-4, f"{where}: embedding norm {data.norm().item()} is not 1"
    if config.task in ("classify", "score") and pooler.softmax and data.numel() > 1:
        assert abs(data.sum().item() - 1) < 1e-4, f"{where}: probabilities sum to {data.sum().item()}"


def run_smoke(llm: LLM, prompts: list[str]) -> dict[str, Any]:
    """Every generation check on a loaded model; returns the metrics."""
    start = time.perf_counter()
    expect = Expectations.of(llm)
    prompts, too_long = fitting_prompts(prompts, expect.tokenizer, llm.llm_engine.config.max_model_len)
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=NUM_LOGPROBS)
    sampled = SamplingParams(n=2, temperature=0.8, top_k=SAMPLING_TOP_K, top_p=0.95, seed=SEED,
                             max_tokens=MAX_TOKENS, logprobs=NUM_LOGPROBS)
    runs = {"greedy": check_run(llm, prompts, [greedy] * len(prompts), expect)}
    runs["sampled"] = check_run(llm, prompts, [sampled] * len(prompts), expect)
    again = llm.generate(prompts, sampled, use_tqdm=False)
    assert _token_ids(again) == _token_ids(runs["sampled"]), "seeded sampling gave other tokens when run again"
    runs["stopped"] = check_stop_tokens(llm, prompts, runs["greedy"], expect)
    completions = [c for outputs in runs.values() for out in outputs for c in out.outputs]
    return {
        "generate_s": round(time.perf_counter() - start, 3),
        "prompts": len(prompts),
        "prompts_too_long": too_long,
        "output_tokens": sum(len(c.token_ids) for c in completions),
        "finish_reasons": dict(Counter(c.finish_reason for c in completions)),
    }


def fitting_prompts(prompts: list[str], tokenizer, max_model_len: int) -> tuple[list[str], int]:
    """The prompts that leave room for MAX_TOKENS within the model's context (the engine rightly
    rejects the others), and how many were left out; a batch of fewer than two checks too little."""
    fitting = [p for p in prompts if len(tokenizer(p).input_ids) + MAX_TOKENS <= max_model_len]
    assert len(fitting) >= 2, f"max_model_len={max_model_len} leaves room for {len(fitting)} of the example prompts"
    return fitting, len(prompts) - len(fitting)


@dataclass(frozen=True)
class Expectations:
    """What the outputs are judged against, read from the checkpoint and its tokenizer."""

    tokenizer: Any
    vocab_size: int
    eos_token_ids: frozenset[int]

    @classmethod
    def of(cls, llm: LLM) -> Expectations:
        config = llm.llm_engine.config
        tokenizer = llm.get_tokenizer()
        # Any of these ends generation for Transformers; a "stop" without a stop reason must end on one.
        eos = {config.hf_config.eos_token_id, tokenizer.eos_token_id}
        try:
            eos.add(GenerationConfig.from_pretrained(config.source.path).eos_token_id)
        except (OSError, ValueError):
            pass  # no (readable) generation_config.json
        ids = {i for e in eos if e is not None for i in ([e] if isinstance(e, int) else e)}
        return cls(tokenizer, config.hf_config.vocab_size, frozenset(ids))


def check_run(llm: LLM, prompts: list[str], params: list[SamplingParams], expect: Expectations) -> list[RequestOutput]:
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert len(outputs) == len(prompts), f"{len(outputs)} outputs for {len(prompts)} prompts"
    for i, (out, prompt, sp) in enumerate(zip(outputs, prompts, params)):
        where = f"prompt {i} ({prompt[:30]!r})"
        assert out.finished, f"{where}: returned unfinished"
        assert out.prompt == prompt, f"{where}: the output names another prompt {out.prompt!r:.40}"
        assert out.prompt_token_ids == expect.tokenizer(prompt).input_ids, f"{where}: prompt tokenized differently"
        assert sorted(c.index for c in out.outputs) == list(range(sp.n)), \
            f"{where}: completion indices {[c.index for c in out.outputs]} for n={sp.n}"
        for completion in out.outputs:
            check_completion(completion, sp, expect, f"{where}, completion {completion.index}")
    return outputs


def check_completion(c, sp: SamplingParams, expect: Expectations, where: str) -> None:
    ids = c.token_ids
    assert 1 <= len(ids) <= sp.max_tokens, f"{where}: {len(ids)} tokens for max_tokens={sp.max_tokens}"
    bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < expect.vocab_size]
    assert not bad, f"{where}: token ids {bad[:5]} outside the vocabulary [0, {expect.vocab_size})"
    assert c.finish_reason in ("length", "stop"), f"{where}: finish_reason {c.finish_reason!r}"
    if c.finish_reason == "length":
        assert len(ids) == sp.max_tokens, f"{where}: 'length' after {len(ids)} of {sp.max_tokens} tokens"
    elif c.stop_reason is None:
        assert ids[-1] in expect.eos_token_ids, f"{where}: 'stop' without a stop reason, yet {ids[-1]} is not EOS"
    else:
        assert c.stop_reason in sp.stop_token_ids and ids[-1] == c.stop_reason, \
            f"{where}: stop_reason {c.stop_reason!r} is not the last token {ids[-1]} / a stop token"
    text = expect.tokenizer.decode(ids, skip_special_tokens=sp.skip_special_tokens)
    assert c.text == text, f"{where}: text {c.text!r:.60} is not the decoded tokens {text!r:.60}"
    check_logprobs(c, sp, where)


def check_logprobs(c, sp: SamplingParams, where: str) -> None:
    assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids), \
        f"{where}: {len(c.logprobs or [])} logprob entries for {len(c.token_ids)} tokens"
    for step, (token, entry) in enumerate(zip(c.token_ids, c.logprobs)):
        at = f"{where}, step {step}"
        assert token in entry, f"{at}: the sampled token {token} is missing from the logprobs"
        assert sp.logprobs <= len(entry) <= sp.logprobs + 1, f"{at}: {len(entry)} logprobs for logprobs={sp.logprobs}"
        values = [lp.logprob for lp in entry.values()]
        assert all(math.isfinite(v) and v <= 0 for v in values), f"{at}: logprobs {values} not finite and <= 0"
        rank = entry[token].rank
        # Logprobs and ranks are of the raw distribution, so greedy picks rank 1 and top-k sampling rank <= k.
        limit = 1 if sp.greedy else (sp.top_k or math.inf)
        assert rank is not None and 1 <= rank <= limit, f"{at}: sampled token has rank {rank} (limit {limit})"
    assert c.cumulative_logprob is not None and math.isfinite(c.cumulative_logprob), \
        f"{where}: cumulative_logprob {c.cumulative_logprob}"
    total = sum(entry[token].logprob for token, entry in zip(c.token_ids, c.logprobs))
    assert c.cumulative_logprob == pytest.approx(total, rel=1e-4, abs=1e-3), \
        f"{where}: cumulative_logprob {c.cumulative_logprob} is not the sum of the token logprobs {total}"


def check_stop_tokens(llm: LLM, prompts: list[str], greedy: list[RequestOutput],
                      expect: Expectations) -> list[RequestOutput]:
    """Each prompt again, with its greedy first token as a stop token: the same batch makes the
    same first step, so every completion must stop right there, on that token."""
    firsts = [out.outputs[0].token_ids[0] for out in greedy]
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=NUM_LOGPROBS, stop_token_ids=[t])
              for t in firsts]
    outputs = check_run(llm, prompts, params, expect)
    for i, (out, first) in enumerate(zip(outputs, firsts)):
        c = out.outputs[0]
        assert (c.finish_reason, c.token_ids) == ("stop", [first]), \
            f"prompt {i}: stop token {first} gave {c.finish_reason!r} after {c.token_ids}"
    return outputs


def _token_ids(outputs: list[RequestOutput]) -> list[list[list[int]]]:
    return [[c.token_ids for c in out.outputs] for out in outputs]
