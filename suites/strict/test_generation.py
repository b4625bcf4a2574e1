"""Strict tier: the engine is the same model as in Transformers.

Greedy generation is judged by check_logprobs_close: tokens may differ only at a near-tie
(each side's token in the other's top-k), logprobs on identical prefixes agree, lengths agree.
Exact token equality is not demanded: two correct float32 implementations can flip a
near-tie, and a test failing on that would be noise. Prompt logprobs are judged at every
prompt position by check_prompt_logprobs_close. Each runs with the prompts one at a time, a
few together and all at once, each batching compared with the reference on its own: a prompt's
output must not depend on what it is batched with. Text is demanded exactly wherever tokens
agree, since then any difference is the engine's detokenizer.

The reference is Transformers run now (`--reference hf`) or its recorded outputs in golden/
(`--reference golden`, see harness/golden.py). In golden mode a stale golden file skips with
its reason, while a missing or unreadable one is an error: a model put under golden checks
without a recording is a mistake in the run, not a verdict on the model, and one command
(`litmus golden record --model X`) fixes it; skipping would let it pass unnoticed.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from harness.compare import (
    ComparisonError,
    check_logprobs_close,
    check_prompt_logprobs_close,
    check_text_where_tokens_match,
)
from harness.diff_layers import explain_failure
from harness.golden import ReferenceOutputs, ReferenceSettings, default_golden_dir, golden_status, run_hf_reference
from harness.runners import EngineRunner, TokensPromptLogprobs, in_batches

pytestmark = [pytest.mark.strict, pytest.mark.usefixtures("generation_model")]

# Prompts one at a time, three at a time, all at once (None).
BATCH_SIZES = [1, 3, None]
BATCH_IDS = ["batch1", "batch3", "batch_all"]


# Once per model for every test here; the engine and its generations are shared by all strict modules (conftest.py).
@pytest.fixture(scope="module")
def reference_outputs(
    request: pytest.FixtureRequest, reference: str, model: str, model_path: str, example_prompts: list[str],
    settings: ReferenceSettings, hf_runner: Callable[..., Any],
) -> ReferenceOutputs:
    if reference == "hf":
        with hf_runner(model_path) as hf:
            return run_hf_reference(hf, example_prompts, settings)
    status = golden_status(default_golden_dir(request.config.rootpath), model, example_prompts, settings, model_path)
    if status.state == "stale":
        pytest.skip(f"golden stale: {'; '.join(status.reasons)}")
    if status.state != "fresh":
        pytest.fail(f"golden {status.describe()}; record it with `litmus golden record --model {model}`", pytrace=False)
    return status.golden.reference


@pytest.mark.parametrize("batch_size", BATCH_SIZES, ids=BATCH_IDS)
def test_greedy_logprobs_match_hf(
    reference_outputs: ReferenceOutputs, engine: EngineRunner, engine_generations, batch_size: int | None,
    reference: str, litmus_record, model_path: str, example_prompts: list[str],
):
    litmus_record.metrics.update(reference=reference, batch_size=batch_size or len(reference_outputs.generations))
    _measured(litmus_record, model_path, example_prompts, lambda: check_logprobs_close(
        reference_outputs.generations,
        engine_generations(batch_size),
        reference,
        "engine",
        eos_token_ids=reference_outputs.eos_token_ids,
        tokenizer=engine.tokenizer,
    ))


@pytest.mark.parametrize("batch_size", BATCH_SIZES, ids=BATCH_IDS)
def test_prompt_logprobs_match_hf(
    reference_outputs: ReferenceOutputs, engine: EngineRunner, example_prompts: list[str],
    settings: ReferenceSettings, batch_size: int | None, reference: str, litmus_record, model_path: str,
):
    k = settings.num_prompt_logprobs
    litmus_record.metrics.update(reference=reference, batch_size=batch_size or len(example_prompts))
    outputs: list[TokensPromptLogprobs] = in_batches(
        example_prompts, batch_size, lambda batch: engine.prompt_logprobs(batch, k)
    )
    _measured(litmus_record, model_path, example_prompts, lambda: check_prompt_logprobs_close(
        reference_outputs.prompt_logprobs, outputs, reference, "engine", num_logprobs=k, tokenizer=engine.tokenizer
    ))


def test_text_matches_hf_where_tokens_match(
    reference_outputs: ReferenceOutputs, engine_generations, reference: str, litmus_record
):
    compared = check_text_where_tokens_match(
        reference_outputs.generations, engine_generations(None), reference, "engine"
    )
    litmus_record.metrics.update(reference=reference, compared_prompts=compared)
    if not compared:
        pytest.skip("no prompt produced identical tokens on both sides, so no text was comparable")


def _measured(litmus_record, model_path: str, prompts: list[str], compare: Callable[[], Any]) -> None:
    """Runs a comparison and puts its measurements in the result record, failing or not; a failure
    also names the first module whose output leaves Transformers' (harness.diff_layers)."""
    try:
        comparison = compare()
    except ComparisonError as failure:
        litmus_record.metrics.update(failure.comparison.metrics())
        module = explain_failure(failure, model_path, prompts)
        litmus_record.metrics["first_diverging_module"] = module
        head, _, rest = str(failure).partition("\n")
        raise ComparisonError(f"{head}; first diverging module: {module}\n{rest}", failure.comparison) from None
    litmus_record.metrics.update(comparison.metrics())
