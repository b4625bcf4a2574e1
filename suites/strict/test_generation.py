"""Strict tier: greedy generation on the engine is the same model as in Transformers.

The verdict is check_logprobs_close: tokens may differ only at a near-tie (each side's token
in the other's top-k), logprobs on identical prefixes agree, lengths agree. Exact token
equality is not demanded: two correct float32 implementations can flip a near-tie, and a
test failing on that would be noise. Text is demanded exactly wherever tokens agree, since
then any difference is the engine's detokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from harness.compare import check_logprobs_close, check_text_where_tokens_match
from harness.runners import TokensTextLogprobs

pytestmark = pytest.mark.strict

MAX_TOKENS = 32
NUM_LOGPROBS = 5


@dataclass
class HfReference:
    outputs: list[TokensTextLogprobs]
    eos_token_ids: list[int]
    tokenizer: Any


# Module scope: each side loads a model and generates once per model, for all tests here.
@pytest.fixture(scope="module")
def hf_reference(hf_runner, model_path, example_prompts) -> HfReference:
    with hf_runner(model_path) as hf:
        outputs = hf.generate_greedy_logprobs(example_prompts, MAX_TOKENS, NUM_LOGPROBS)
        return HfReference(outputs, hf.eos_token_ids, hf.tokenizer)


@pytest.fixture(scope="module")
def engine_outputs(engine_runner, model_path, example_prompts) -> list[TokensTextLogprobs]:
    with engine_runner(model_path) as engine:
        return engine.generate_greedy_logprobs(example_prompts, MAX_TOKENS, NUM_LOGPROBS)


def test_greedy_logprobs_match_hf(hf_reference: HfReference, engine_outputs: list[TokensTextLogprobs]):
    check_logprobs_close(
        hf_reference.outputs,
        engine_outputs,
        "hf",
        "engine",
        eos_token_ids=hf_reference.eos_token_ids,
        tokenizer=hf_reference.tokenizer,
    )


def test_text_matches_hf_where_tokens_match(hf_reference: HfReference, engine_outputs: list[TokensTextLogprobs]):
    if not check_text_where_tokens_match(hf_reference.outputs, engine_outputs, "hf", "engine"):
        pytest.skip("no prompt produced identical tokens on both sides, so no text was comparable")
