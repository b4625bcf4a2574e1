"""Serving tier, streaming: for greedy decoding a stream says exactly what the whole answer says
(text, tokens, logprobs, finish reason, usage), in SSE events that end with `data: [DONE]`."""
from __future__ import annotations

import asyncio
import json

import pytest

from harness.compare import check_logprobs_close, check_text_where_tokens_match
from harness.runners import TokensTextLogprobs
from harness.serving import completion_result

pytestmark = [pytest.mark.serving, pytest.mark.usefixtures("generation_model")]

KW = dict(max_tokens=16, temperature=0, logprobs=2, extra_body={"return_tokens_as_token_ids": True})


def _joined(choices: list) -> TokensTextLogprobs:
    """One choice's stream chunks as one (ids, text, top logprobs)."""
    parts = [completion_result(c) for c in choices]
    return [t for p in parts for t in p[0]], "".join(p[1] for p in parts), [s for p in parts for s in p[2]]


def test_streamed_completion_equals_the_whole_answer(client, model, example_prompts):
    for prompt in example_prompts[:2]:
        whole = client.completions.create(model=model, prompt=prompt, **KW)
        chunks = list(client.completions.create(model=model, prompt=prompt, stream=True,
                                                stream_options={"include_usage": True}, **KW))
        *deltas, last = chunks
        # include_usage: one last chunk with no choices carries the usage; the others carry none.
        assert last.choices == [] and last.usage == whole.usage
        assert all(c.usage is None and len(c.choices) == 1 for c in deltas)
        assert _joined([c.choices[0] for c in deltas]) == completion_result(whole.choices[0])
        assert [c.choices[0].finish_reason for c in deltas if c.choices[0].finish_reason] == \
               [whole.choices[0].finish_reason]


def test_stream_is_sse_ending_with_done(server, model, example_prompts):
    body = {"model": model, "prompt": example_prompts[0], "max_tokens": 8, "temperature": 0, "stream": True}
    status, raw = server.request("POST", "/v1/completions", json.dumps(body).encode(), server.headers())
    assert status == 200 and isinstance(raw, bytes), raw
    events = raw.decode().split("\n\n")
    assert events[-1] == "", "the stream must end with a complete event"
    events = events[:-1]
    assert all(e.startswith("data: ") for e in events), events
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks and all(c["object"] == "text_completion" and "error" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_async_streams_side_by_side_equal_their_whole_answers(client, async_client, model, example_prompts):
    """Several streams at once share batches; each still says what its whole answer, asked for
    alone, says (up to float tolerance: the batches differ)."""
    prompts = example_prompts[:4]
    wholes = [completion_result(client.completions.create(model=model, prompt=p, **KW).choices[0]) for p in prompts]

    async def stream(c, prompt):
        chunks = await c.completions.create(model=model, prompt=prompt, stream=True, **KW)
        return _joined([chunk.choices[0] async for chunk in chunks])

    async def main():
        async with async_client() as c:
            return await asyncio.gather(*(stream(c, p) for p in prompts))

    streams = asyncio.run(main())
    check_logprobs_close(wholes, streams, "whole", "streamed", atol=1e-4)
    check_text_where_tokens_match(wholes, streams, "whole", "streamed")
