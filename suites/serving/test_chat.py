"""Serving tier, /v1/chat/completions: the server renders the model's chat template as LLM.chat
does and answers what LLM.chat answers; streamed chat says what the whole answer says; n
choices stream side by side."""
from __future__ import annotations

import asyncio

import pytest

from engine.sampling_params import SamplingParams
from harness.compare import check_logprobs_close, check_text_where_tokens_match
from harness.serving import chat_result

pytestmark = [pytest.mark.serving, pytest.mark.usefixtures("generation_model", "chat_template")]

MAX_TOKENS = 16
NUM_LOGPROBS = 5
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one, please."}],
]
GREEDY = dict(temperature=0, max_tokens=MAX_TOKENS)
ATOL = 1e-4  # as test_completions.py


@pytest.fixture(scope="module")
def chat_template(offline) -> None:
    if not getattr(offline.tokenizer, "chat_template", None):
        pytest.skip("the model has no chat template, so it has no chat to serve")


def test_chat_equals_llm_chat(client, model, offline, litmus_record):
    """Each conversation alone on both sides: tokens up to near-ties, logprobs up to float tolerance
    (the server may run another thread count), text wherever the tokens agree."""
    params = SamplingParams(**GREEDY, logprobs=NUM_LOGPROBS)
    want, got = [], []
    for messages in CONVERSATIONS:
        out = offline.llm.chat(messages, params, use_tqdm=False)[0]
        completion = out.outputs[0]
        want.append((list(completion.token_ids), completion.text,
                     [{t: lp.logprob for t, lp in step.items()} for step in completion.logprobs]))
        resp = client.chat.completions.create(model=model, messages=messages, logprobs=True,
                                              top_logprobs=NUM_LOGPROBS, **GREEDY,
                                              extra_body={"return_tokens_as_token_ids": True})
        choice = resp.choices[0]
        assert choice.message.role == "assistant"
        assert choice.finish_reason == completion.finish_reason
        assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == \
               (len(out.prompt_token_ids), len(completion.token_ids))
        got.append(chat_result(choice))
    comparison = check_logprobs_close(want, got, "LLM.chat", "API", atol=ATOL)
    litmus_record.metrics.update(comparison.metrics())
    litmus_record.metrics["text_compared_prompts"] = check_text_where_tokens_match(
        [w[:2] for w in want], [g[:2] for g in got], "LLM.chat", "API")


def test_streamed_chat_equals_the_whole_answer(client, async_client, model):
    wholes = [client.chat.completions.create(model=model, messages=m, **GREEDY) for m in CONVERSATIONS[:2]]

    async def stream(c, messages):
        chunks = await c.chat.completions.create(model=model, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY)
        return [chunk async for chunk in chunks]

    async def main():
        async with async_client() as c:
            # One after the other: alone in its batch, as each whole answer was.
            return [await stream(c, m) for m in CONVERSATIONS[:2]]

    for whole, chunks in zip(wholes, asyncio.run(main())):
        *deltas, last = chunks
        assert deltas[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in deltas) == whole.choices[0].message.content
        assert [c.choices[0].finish_reason for c in deltas if c.choices[0].finish_reason] == \
               [whole.choices[0].finish_reason]
        assert last.choices == [] and last.usage == whole.usage


def test_n_choices_stream_side_by_side(client, model):
    """n=2 with a seed: each choice streams its own deltas and finish, and says what the whole answer says."""
    kw = dict(model=model, messages=CONVERSATIONS[0], max_tokens=8, temperature=1.0, n=2, seed=7)
    whole = client.chat.completions.create(**kw)
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                assert c.index not in finishes, f"choice {c.index} finished twice"
                finishes[c.index] = c.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finishes == {c.index: c.finish_reason for c in whole.choices}
