"""Serving tier, /v1/completions: strict through the wire (greedy tokens, text and logprobs from
the API equal LLM.generate's), seeded sampling with n, and stop strings.

Logprob tokens come back as "token_id:<id>" (return_tokens_as_token_ids), so the API's answers
are compared as token ids with the same comparators the strict tier uses.
"""
from __future__ import annotations

import asyncio

import pytest

from engine.sampling_params import SamplingParams
from harness.compare import check_logprobs_close, check_text_where_tokens_match
from harness.serving import completion_result

pytestmark = [pytest.mark.serving, pytest.mark.usefixtures("generation_model")]

MAX_TOKENS = 16
NUM_LOGPROBS = 5
GREEDY = dict(temperature=0, max_tokens=MAX_TOKENS, logprobs=NUM_LOGPROBS,
              extra_body={"return_tokens_as_token_ids": True})
# The server batches differently and may run another thread count, so its float32 sums run in
# another order: logprobs differ by ~1e-5 (measured), a wrong logit moves them by far more.
ATOL = 1e-4


@pytest.fixture(scope="module")
def offline_greedy(offline, example_prompts):
    return offline.generate_greedy_logprobs(example_prompts, MAX_TOKENS, NUM_LOGPROBS)


@pytest.mark.parametrize("how", ["one_request", "concurrent"])
def test_greedy_equals_llm_generate(client, async_client, model, example_prompts, offline_greedy, how,
                                    litmus_record):
    """All prompts in one request, or one request per prompt all at once (the server batches them
    its own way): each answer is LLM.generate's, tokens up to near-ties, logprobs up to float
    tolerance, text wherever the tokens agree."""
    if how == "one_request":
        resp = client.completions.create(model=model, prompt=example_prompts, **GREEDY)
        assert sorted(c.index for c in resp.choices) == list(range(len(example_prompts)))
        choices = sorted(resp.choices, key=lambda c: c.index)
        usages = [resp.usage]
    else:
        async def main():
            async with async_client() as c:
                return await asyncio.gather(*(c.completions.create(model=model, prompt=p, **GREEDY)
                                              for p in example_prompts))

        responses = asyncio.run(main())
        choices = [r.choices[0] for r in responses]
        usages = [r.usage for r in responses]
    got = [completion_result(c) for c in choices]
    comparison = check_logprobs_close(offline_greedy, got, "LLM.generate", "API", atol=ATOL)
    litmus_record.metrics.update(comparison.metrics())
    litmus_record.metrics["text_compared_prompts"] = check_text_where_tokens_match(
        [o[:2] for o in offline_greedy], [g[:2] for g in got], "LLM.generate", "API")
    for ids, _, top in got:
        # Greedy: the chosen token is the top one, listed with at most the top-k beside it.
        assert all(step[token] == max(step.values()) and len(step) <= NUM_LOGPROBS + 1 for token, step in zip(ids, top))
    assert sum(u.completion_tokens for u in usages) == sum(len(ids) for ids, _, _ in got)


def test_seeded_sampling_with_n_is_reproducible_and_equals_llm_generate(client, model, offline, example_prompts):
    kw = dict(model=model, prompt=example_prompts[0], max_tokens=8, temperature=1.0, n=3, seed=1234)
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert len(texts) == 3
    assert [c.text for c in sorted(again.choices, key=lambda c: c.index)] == texts
    params = SamplingParams(n=3, temperature=1.0, seed=1234, max_tokens=8)
    want = offline.llm.generate(example_prompts[0], params, use_tqdm=False)[0]
    assert texts == [o.text for o in want.outputs]
    assert first.usage.completion_tokens == sum(len(o.token_ids) for o in want.outputs)


def test_stop_string_ends_the_text_before_it(client, async_client, model, offline, example_prompts,
                                             offline_greedy):
    prompt, text = max(zip(example_prompts, (o[1] for o in offline_greedy)), key=lambda item: len(item[1]))
    if len(text) < 8:
        pytest.fail(f"no prompt gave 8 characters of greedy text to put a stop string in: {text!r}")
    stop = text[len(text) // 2:len(text) // 2 + 3]
    want = text[:text.index(stop)]
    kw = dict(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stop=[stop, "@@never@@"])
    choice = client.completions.create(**kw).choices[0]
    assert (choice.text, choice.finish_reason, choice.stop_reason) == (want, "stop", stop)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, stop=[stop])
    assert offline.llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].text == want

    async def streamed():
        async with async_client() as client:
            stream = await client.completions.create(**kw, stream=True)
            return [chunk.choices[0] async for chunk in stream]

    chunks = asyncio.run(streamed())
    # The stream holds text back while a stop string may still complete, so it never sends past one.
    assert "".join(c.text for c in chunks) == want
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]
