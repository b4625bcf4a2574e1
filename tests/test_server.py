"""The OpenAI-compatible server, run as a real subprocess on loopback and driven by the official
`openai` client: results equal the offline LLM API, bad input gets a clear OpenAI-shaped error
and costs other requests nothing, disconnects free their KV blocks, and a bounded load test
and a KV-starved server finish every request correctly.
"""
from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from engine.entrypoints.openai.protocol import MAX_STOP_SEQUENCES  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from harness.serving import ServerProcess  # noqa: E402

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny-llama"
API_KEY = "sk-litmus-test"
MAX_MODEL_LEN = 512
SMALL_KV_BLOCKS = 12  # x 16 tokens: room for ~2 of the KV test's requests at once
SMALL_MAX_MODEL_LEN = 128
BODY_LIMIT = 256 * 1024

PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away, there lived",
    "1, 2, 3, 5, 8,",
    "def add(a, b):",
    "Paris is the capital of",
    "Hello",
]
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}]
# Words to build load-test prompts of many lengths from.
WORDS = ("the model reads every token of the prompt and then writes new ones one step at a time while "
         "other requests share the same batch so the server keeps all of them moving").split()


# --- servers ----------------------------------------------------------------------------------
class Server(ServerProcess):
    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.base_url, api_key=API_KEY, max_retries=0, timeout=120, **kw)

    def async_client(self, **kw) -> "openai.AsyncOpenAI":
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=API_KEY, max_retries=0, timeout=120, **kw)


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from harness.zoo import model_path

    return model_path(MODEL)


@pytest.fixture(scope="module")
def servers(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Server]:
    logs = tmp_path_factory.mktemp("server-logs")
    common = ("--served-model-name", MODEL, "--log-level", "warning")
    # Both start at once: each spends most of its start-up importing torch and loading the model.
    with contextlib.ExitStack() as stack:
        started = {
            "main": Server.start(str(model_dir), logs / "main.log", *common, "--max-model-len", str(MAX_MODEL_LEN),
                                 "--max-num-seqs", "64", "--max-request-bytes", str(BODY_LIMIT), api_key=API_KEY),
            "small_kv": Server.start(str(model_dir), logs / "small_kv.log", *common, "--max-model-len",
                                     str(SMALL_MAX_MODEL_LEN), "--num-kv-blocks", str(SMALL_KV_BLOCKS),
                                     api_key=API_KEY),
        }
        for server in started.values():
            stack.enter_context(server)
        for server in started.values():
            server.wait_ready()
        yield started


@pytest.fixture(scope="module")
def server(servers: dict[str, Server]) -> Server:
    return servers["main"]


@pytest.fixture(scope="module")
def offline(model_dir: Path) -> LLM:
    return LLM(str(model_dir), max_model_len=MAX_MODEL_LEN)


def _greedy(max_tokens: int = 16, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


# --- basics -------------------------------------------------------------------------------------
def test_health_models_and_api_key(server):
    assert server.request("GET", "/health") == (200, {"status": "ok"})
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    with pytest.raises(openai.AuthenticationError) as info:
        openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    status, body = server.request("GET", "/v1/models")
    assert status == 401 and body["error"]["type"] == "authentication_error"


def test_metrics_endpoint(server):
    status, text = server.request("GET", "/metrics")
    assert status == 200
    assert b"litmus_kv_blocks_in_use " in text and b"litmus_num_running " in text


# --- results equal the offline API --------------------------------------------------------------
def test_greedy_completions_equal_offline_generate(server, offline):
    client = server.client()
    want = offline.generate(PROMPTS, _greedy(24), use_tqdm=False)
    # One request per prompt, and all prompts in one batched request.
    single = [client.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0) for p in PROMPTS]
    batched = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=24, temperature=0)
    assert [c.index for c in batched.choices] == list(range(len(PROMPTS)))
    for resp, choice, w in zip(single, batched.choices, want):
        out = w.outputs[0]
        assert resp.choices[0].text == choice.text == out.text
        assert resp.choices[0].finish_reason == choice.finish_reason == out.finish_reason
        assert resp.usage.completion_tokens == len(out.token_ids)
        assert resp.usage.prompt_tokens == len(w.prompt_token_ids)
    assert batched.usage.completion_tokens == sum(len(w.outputs[0].token_ids) for w in want)


def test_token_id_prompts(server, offline):
    ids = offline.get_tokenizer()(PROMPTS[1]).input_ids
    want = offline.generate({"prompt_token_ids": ids}, _greedy(12), use_tqdm=False)[0].outputs[0]
    client = server.client()
    one = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    two = client.completions.create(model=MODEL, prompt=[ids, ids[:3]], max_tokens=12, temperature=0)
    assert one.choices[0].text == two.choices[0].text == want.text
    assert one.usage.prompt_tokens == len(ids) and two.usage.prompt_tokens == len(ids) + 3


def test_greedy_chat_equals_offline_chat(server, offline):
    want = offline.chat(CHAT, _greedy(20), use_tqdm=False)[0]
    resp = server.client().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, temperature=0)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == want.outputs[0].text
    assert choice.finish_reason == want.outputs[0].finish_reason
    assert resp.usage.prompt_tokens == len(want.prompt_token_ids)
    assert resp.usage.completion_tokens == len(want.outputs[0].token_ids)
    # max_completion_tokens is the newer name for the same limit.
    newer = server.client().chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=20,
                                                   temperature=0)
    assert newer.choices[0].message.content == choice.message.content


# --- streaming ----------------------------------------------------------------------------------
def _stop_inside(text: str) -> str:
    """A 3-character stop string from the middle of text."""
    mid = len(text) // 2
    return text[mid:mid + 3]


def _stop_across_tokens(tokens: list[str], text: str) -> str:
    """A stop string that starts in one token's text and ends in the next one's.

    Only such a stop makes the engine cut text a stream has already been offered, so it is
    the case that shows the stream holding text back until the stop can no longer match.
    (Token strings of partial UTF-8 characters differ from the text, so positions are only
    trusted where the tokens so far spell the text exactly.)
    """
    prefix = ""
    for i in range(len(tokens) - 1):
        prefix += tokens[i]
        if not text.startswith(prefix + tokens[i + 1]):
            break
        if i >= 2 and len(tokens[i]) >= 2 and tokens[i + 1].strip():
            stop = tokens[i][-2:] + tokens[i + 1][:1]
            if text.find(stop) == len(prefix) - 2:
                return stop
    pytest.fail(f"no token boundary to put a stop string across in {tokens}")


@pytest.mark.parametrize("with_stop", [False, True], ids=["no-stop", "stop"])
def test_streamed_completion_equals_non_streamed(server, with_stop):
    client = server.client()
    kw = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=40, temperature=0)
    if with_stop:
        probe = client.completions.create(**kw, logprobs=0).choices[0]
        kw["stop"] = [_stop_across_tokens(probe.logprobs.tokens, probe.text), "zzzz-never"]
    whole = client.completions.create(**kw)
    if with_stop:
        assert whole.choices[0].finish_reason == "stop"
        assert whole.choices[0].text == probe.text[:probe.text.index(kw["stop"][0])]
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("with_stop", [False, True], ids=["no-stop", "stop"])
def test_streamed_chat_equals_non_streamed(server, with_stop):
    client = server.client()
    kw = dict(model=MODEL, messages=CHAT, max_tokens=40, temperature=0)
    if with_stop:
        probe = client.chat.completions.create(**kw, logprobs=True).choices[0]
        kw["stop"] = _stop_across_tokens([t.token for t in probe.logprobs.content], probe.message.content)
    whole = client.chat.completions.create(**kw)
    if with_stop:
        assert whole.choices[0].finish_reason == "stop"
        assert whole.choices[0].message.content == probe.message.content[:probe.message.content.index(kw["stop"])]
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # no include_usage, no usage


# --- logprobs -----------------------------------------------------------------------------------
def test_completion_logprobs_equal_offline(server, offline):
    want = offline.generate(PROMPTS[0], _greedy(10, logprobs=3), use_tqdm=False)[0].outputs[0]
    resp = server.client().completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=10, temperature=0,
                                              logprobs=3)
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    for i, (token, entry) in enumerate(zip(want.token_ids, want.logprobs)):
        assert lp.tokens[i] == entry[token].decoded_token
        assert lp.token_logprobs[i] == pytest.approx(entry[token].logprob, abs=1e-4)
        top3 = sorted((e for e in entry.values() if e.rank <= 3), key=lambda e: e.rank)
        assert max(lp.top_logprobs[i].values()) == pytest.approx(top3[0].logprob, abs=1e-4)
        assert 1 <= len(lp.top_logprobs[i]) <= 4  # the top 3, plus the chosen one if not among them
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(10)]
    # Streamed logprobs are the same ones, split across chunks.
    chunks = list(server.client().completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=10,
                                                     temperature=0, logprobs=3, stream=True))
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == lp.tokens
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == lp.text_offset


def test_chat_logprobs_equal_offline(server, offline):
    want = offline.chat(CHAT, _greedy(8, logprobs=2), use_tqdm=False)[0].outputs[0]
    kw = dict(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    resp = server.client().chat.completions.create(**kw)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens == len(want.token_ids)
    for item, token, entry in zip(content, want.token_ids, want.logprobs):
        assert item.token == entry[token].decoded_token
        assert item.logprob == pytest.approx(entry[token].logprob, abs=1e-4)
        assert item.bytes == list(item.token.encode())
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.top_logprobs[0].logprob == pytest.approx(max(e.logprob for e in entry.values()), abs=1e-4)
    streamed = [i for c in server.client().chat.completions.create(**kw, stream=True)
                if c.choices and c.choices[0].logprobs for i in c.choices[0].logprobs.content]
    assert [(i.token, round(i.logprob, 4)) for i in streamed] == [(i.token, round(i.logprob, 4)) for i in content]


# --- n, seed, stop ------------------------------------------------------------------------------
def test_n_with_seed_is_reproducible_and_equals_offline(server, offline):
    client = server.client()
    kw = dict(model=MODEL, prompt=PROMPTS[4], max_tokens=8, temperature=1.0, n=3, seed=123)
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    assert sorted(c.index for c in first.choices) == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    want = offline.generate(PROMPTS[4], SamplingParams(n=3, temperature=1.0, seed=123, max_tokens=8), use_tqdm=False)
    assert [c.text for c in first.choices] == [o.text for o in want[0].outputs]
    assert first.usage.completion_tokens == sum(len(o.token_ids) for o in want[0].outputs)
    # n > 1 streams: every choice gets its own deltas and its own finish.
    texts, finishes = {}, {}
    for chunk in client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, n=2, seed=5, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert set(texts) == set(finishes) == {0, 1}


def test_stop_strings_and_stop_token_ids(server, offline):
    client = server.client()
    full = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=30, temperature=0).choices[0].text
    stop = _stop_inside(full)
    resp = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=30, temperature=0, stop=stop)
    assert resp.choices[0].text == full[:full.index(stop)]
    assert resp.choices[0].finish_reason == "stop"
    want = offline.generate(PROMPTS[2], _greedy(30), use_tqdm=False)[0].outputs[0]
    by_id = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=30, temperature=0,
                                      extra_body={"stop_token_ids": [want.token_ids[4]]})
    assert by_id.usage.completion_tokens <= 5 and by_id.choices[0].finish_reason == "stop"


# --- bad input ----------------------------------------------------------------------------------
# (name, endpoint, body overrides, status, param). Every case is also sent while good requests run.
_TOO_MANY_STOPS = [f"s{i}" for i in range(MAX_STOP_SEQUENCES + 1)]
BAD_REQUESTS = [
    ("prompt longer than max_model_len", "completions", {"prompt": [7] * (MAX_MODEL_LEN + 1)}, 400, "prompt"),
    ("prompt fills the context", "completions", {"prompt": [7] * MAX_MODEL_LEN}, 400, "prompt"),
    ("chat longer than max_model_len", "chat", {"messages": [{"role": "user", "content": "hi " * 600}]}, 400,
     "messages"),
    ("empty prompt", "completions", {"prompt": ""}, 400, "prompt"),
    ("empty token list", "completions", {"prompt": []}, 400, "prompt"),
    ("token id out of vocab", "completions", {"prompt": [1, 2, 10**6]}, 400, "prompt"),
    ("negative token id", "completions", {"prompt": [1, -3]}, 400, "prompt"),
    ("negative temperature", "completions", {"temperature": -0.5}, 400, "temperature"),
    ("top_p 0", "completions", {"top_p": 0}, 400, "top_p"),
    ("top_p above 1", "chat", {"top_p": 1.5}, 400, "top_p"),
    ("n below 1", "completions", {"n": 0}, 400, "n"),
    ("n not an integer", "chat", {"n": "2"}, 400, "n"),
    ("max_tokens below 1", "completions", {"max_tokens": 0}, 400, "max_tokens"),
    ("max_completion_tokens below 1", "chat", {"max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("max_tokens past the context", "completions", {"max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
    ("too many stop strings", "completions", {"stop": _TOO_MANY_STOPS}, 400, "stop"),
    ("empty stop string", "chat", {"stop": [""]}, 400, "stop"),
    ("logprobs above 20", "completions", {"logprobs": 21}, 400, "logprobs"),
    ("top_logprobs without logprobs", "chat", {"top_logprobs": 2}, 400, "top_logprobs"),
    ("min_tokens above max_tokens", "completions", {"min_tokens": 9, "max_tokens": 4}, 400, "min_tokens"),
    ("no messages", "chat", {"messages": []}, 400, "messages"),
    ("message without role", "chat", {"messages": [{"content": "hi"}]}, 400, "messages.0.role"),
    ("missing prompt", "completions", {"prompt": None}, 400, "prompt"),
    ("unknown model", "completions", {"model": "gpt-17"}, 404, "model"),
]
GOOD_BODY = {"completions": {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 4},
             "chat": {"model": MODEL, "messages": CHAT, "max_tokens": 4}}
PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


def _bad_body(endpoint: str, overrides: dict[str, Any]) -> dict[str, Any]:
    body = {**GOOD_BODY[endpoint], **overrides}
    return {k: v for k, v in body.items() if v is not None}


def _raw_bad_requests(server: Server) -> list[tuple[str, str, bytes, dict[str, str], int]]:
    """(name, path, body, headers, status) for what the openai client cannot send."""
    json_headers = {**_auth(), "Content-Type": "application/json"}
    good = json.dumps(GOOD_BODY["completions"]).encode()
    return [
        ("malformed JSON", "/v1/completions", b'{"prompt": "x",', json_headers, 400),
        ("JSON that is not an object", "/v1/completions", b"[1, 2]", json_headers, 400),
        ("wrong content type", "/v1/completions", good, {**_auth(), "Content-Type": "text/plain"}, 415),
        ("no content type", "/v1/chat/completions", json.dumps(GOOD_BODY["chat"]).encode(), _auth(), 415),
        ("oversized body", "/v1/completions",
         json.dumps({**GOOD_BODY["completions"], "prompt": "x" * (BODY_LIMIT + 1)}).encode(), json_headers, 413),
        ("wrong API key", "/v1/completions", good, {"Authorization": "Bearer nope", "Content-Type": "application/json"},
         401),
        ("no API key", "/v1/completions", good, {"Content-Type": "application/json"}, 401),
        ("unknown route", "/v1/embeddingz", good, json_headers, 404),
    ]


def _check_error_shape(body: Any, status: int) -> None:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert err["type"] == {401: "authentication_error"}.get(status, "invalid_request_error")


@pytest.mark.parametrize("name,endpoint,overrides,status,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_a_clear_error(server, name, endpoint, overrides, status, param):
    got, body = server.request("POST", PATHS[endpoint], json.dumps(_bad_body(endpoint, overrides)).encode(),
                           {**_auth(), "Content-Type": "application/json"})
    assert got == status, body
    _check_error_shape(body, status)
    assert body["error"]["param"] == param, body


def test_bad_requests_through_the_openai_client(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", top_p=1.5)
    assert info.value.status_code == 400 and info.value.param == "top_p" and "top_p" in info.value.message
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=CHAT)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=[5] * (MAX_MODEL_LEN + 1))
    assert "max_model_len" in info.value.message


def test_raw_bad_requests(server):
    for name, path, body, headers, status in _raw_bad_requests(server):
        got, answer = server.request("POST", path, body, headers)
        assert got == status, (name, answer)
        _check_error_shape(answer, status)


def test_bad_requests_cost_concurrent_requests_nothing(server, offline):
    """All the bad requests arrive while good ones run; the good ones end exactly as offline."""
    params = _greedy(40, ignore_eos=True)
    want = [o.outputs[0] for o in offline.generate(PROMPTS, params, use_tqdm=False)]
    json_headers = {**_auth(), "Content-Type": "application/json"}

    async def good(client, i: int) -> str:
        kw = dict(model=MODEL, prompt=PROMPTS[i], max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
        if i % 2:
            return "".join([c.choices[0].text async for c in await client.completions.create(**kw, stream=True)])
        return (await client.completions.create(**kw)).choices[0].text

    async def bad(endpoint, overrides, status) -> int:
        return (await asyncio.to_thread(server.request, "POST", PATHS[endpoint],
                                        json.dumps(_bad_body(endpoint, overrides)).encode(), json_headers))[0]

    async def raw_bad(path, body, headers) -> int:
        return (await asyncio.to_thread(server.request, "POST", path, body, headers))[0]

    async def main():
        async with server.async_client() as client:
            goods = [asyncio.ensure_future(good(client, i)) for i in range(len(PROMPTS))]
            await asyncio.sleep(0.05)
            bads = await asyncio.gather(*(bad(e, o, s) for _, e, o, s, _ in BAD_REQUESTS),
                                        *(raw_bad(p, b, h) for _, p, b, h, _ in _raw_bad_requests(server)))
            return await asyncio.gather(*goods), bads

    before = server.wait_idle()
    texts, statuses = asyncio.run(main())
    assert statuses == [b[3] for b in BAD_REQUESTS] + [r[4] for r in _raw_bad_requests(server)]
    assert texts == [w.text for w in want]
    after = server.wait_idle()
    # Only the good requests reached the engine; none was aborted or failed.
    assert after["num_finished_requests"] - before["num_finished_requests"] == len(PROMPTS)
    assert after["num_aborted_requests"] == before["num_aborted_requests"]


# --- disconnects --------------------------------------------------------------------------------
def test_stream_disconnect_aborts_and_frees_blocks(server):
    before = server.wait_idle()
    stream = server.client().completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=400, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True})
    received = 0
    for _ in stream:
        received += 1
        if received == 3:
            break
    assert server.engine_stats()["kv_blocks_in_use"] > 0
    stream.close()
    after = server.wait_idle()
    assert after["num_aborted_requests"] == before["num_aborted_requests"] + 1
    assert after["num_finished_requests"] == before["num_finished_requests"]


def test_non_streaming_disconnect_aborts_and_frees_blocks(server):
    before = server.wait_idle()
    body = json.dumps({"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 480, "n": 4, "temperature": 0.8,
                       "ignore_eos": True}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", body, {**_auth(), "Content-Type": "application/json"})
    deadline = time.monotonic() + 30
    while server.engine_stats()["num_running"] == 0:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.005)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    after = server.wait_idle()
    assert after["num_aborted_requests"] == before["num_aborted_requests"] + 1
    assert after["num_finished_requests"] == before["num_finished_requests"]


# --- load ---------------------------------------------------------------------------------------
@dataclass
class LoadCase:
    kind: str  # "completion" or "chat"
    prompt: str
    max_tokens: int
    ignore_eos: bool
    stream: bool
    cancel: bool


def _load_cases(count: int, seed: int = 0) -> list[LoadCase]:
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        words = rng.randint(1, 120)
        prompt = " ".join(rng.choice(WORDS) for _ in range(words))
        stream = rng.random() < 0.35
        cases.append(LoadCase(kind="chat" if rng.random() < 0.4 else "completion", prompt=prompt,
                              max_tokens=rng.randint(1, 48), ignore_eos=rng.random() < 0.5, stream=stream,
                              cancel=stream and rng.random() < 0.3))
    return cases


def _offline_results(offline: LLM, cases: list[LoadCase]) -> list[Any]:
    params = [_greedy(c.max_tokens, ignore_eos=c.ignore_eos) for c in cases]
    results: list[Any] = [None] * len(cases)
    comp = [i for i, c in enumerate(cases) if c.kind == "completion"]
    chat = [i for i, c in enumerate(cases) if c.kind == "chat"]
    for i, out in zip(comp, offline.generate([cases[i].prompt for i in comp], [params[i] for i in comp],
                                             use_tqdm=False)):
        results[i] = out.outputs[0]
    for i, out in zip(chat, offline.chat([[{"role": "user", "content": cases[i].prompt}] for i in chat],
                                         [params[i] for i in chat], use_tqdm=False)):
        results[i] = out.outputs[0]
    return results


async def _run_case(client: "openai.AsyncOpenAI", case: LoadCase) -> tuple[str, int | None, str | None]:
    """(text, completion tokens (None if cancelled or unknown), finish_reason)."""
    extra = {"ignore_eos": case.ignore_eos}
    if case.kind == "completion":
        kw = dict(model=MODEL, prompt=case.prompt, max_tokens=case.max_tokens, temperature=0, extra_body=extra)
        create, piece = client.completions.create, (lambda c: c.text)
    else:
        kw = dict(model=MODEL, messages=[{"role": "user", "content": case.prompt}], max_tokens=case.max_tokens,
                  temperature=0, extra_body=extra)
        create, piece = client.chat.completions.create, (lambda c: c.delta.content or "")
    if not case.stream:
        resp = await create(**kw)
        choice = resp.choices[0]
        return (choice.text if case.kind == "completion" else choice.message.content,
                resp.usage.completion_tokens, choice.finish_reason)
    stream = await create(**kw, stream=True, stream_options={"include_usage": True})
    text, tokens, finish, chunks = "", None, None, 0
    async with stream:
        async for chunk in stream:
            chunks += 1
            if case.cancel and chunks == 2:
                return text, None, None  # leaving the block closes the connection mid-stream
            for c in chunk.choices:
                text += piece(c)
                finish = c.finish_reason or finish
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    return text, tokens, finish


def test_load(server, offline, record_property):
    """200 requests, 32 at a time, mixed kinds and lengths, some streamed, some cancelled mid-stream."""
    cases = _load_cases(200)
    want = _offline_results(offline, cases)
    before = server.wait_idle()

    async def main():
        gate = asyncio.Semaphore(32)
        latencies: list[float] = []

        async def one(case):
            async with gate:
                start = time.perf_counter()
                result = await _run_case(client, case)
                if not case.cancel:
                    latencies.append(time.perf_counter() - start)
                return result

        async with server.async_client() as client:
            start = time.perf_counter()
            results = await asyncio.gather(*(one(c) for c in cases))
            return results, latencies, time.perf_counter() - start

    results, latencies, elapsed = asyncio.run(main())
    completed = [(c, r, w) for c, r, w in zip(cases, results, want) if not c.cancel]
    for case, (text, tokens, finish), w in completed:
        assert tokens == len(w.token_ids), case
        if case.ignore_eos:
            assert tokens == case.max_tokens
        assert text == w.text, case
        assert finish == w.finish_reason, case
    after = server.wait_idle()
    num_cancelled = sum(c.cancel for c in cases)
    assert after["num_finished_requests"] - before["num_finished_requests"] >= len(completed)
    # A cancelled stream may still have finished before its disconnect arrived.
    assert (after["num_aborted_requests"] - before["num_aborted_requests"]
            + after["num_finished_requests"] - before["num_finished_requests"]) == len(cases)
    latencies.sort()
    report = {
        "requests": len(cases), "completed": len(completed), "cancelled": num_cancelled,
        "seconds": round(elapsed, 2), "requests_per_s": round(len(completed) / elapsed, 1),
        "p50_latency_s": round(statistics.median(latencies), 3),
        "p99_latency_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
        "preemptions": after["num_preemptions"] - before["num_preemptions"],
        "aborted_by_disconnect": after["num_aborted_requests"] - before["num_aborted_requests"],
    }
    record_property("load", report)
    print(f"\nload test: {json.dumps(report)}")


def test_kv_exhaustion_preempts_and_resumes(servers, offline):
    """A cache with room for ~2 of these requests serves 12 at once: preempted, resumed, all exact."""
    small = servers["small_kv"]
    cases = [LoadCase("completion", " ".join(WORDS[: 5 + 3 * i]), 60, True, i % 3 == 0, False) for i in range(12)]
    want = _offline_results(offline, cases)
    before = small.wait_idle()

    async def main():
        async with small.async_client() as client:
            return await asyncio.gather(*(_run_case(client, c) for c in cases))

    results = asyncio.run(main())
    for case, (text, tokens, finish), w in zip(cases, results, want):
        assert (text, tokens, finish) == (w.text, 60, "length"), case
    after = small.wait_idle()
    assert after["num_preemptions"] > before["num_preemptions"]
    assert after["num_kv_blocks"] == SMALL_KV_BLOCKS
    # Preempted, never failed or dropped: every request finished in the engine, none was aborted.
    assert after["num_finished_requests"] - before["num_finished_requests"] == len(cases)
    assert after["num_aborted_requests"] == before["num_aborted_requests"]
    assert after["generation_tokens"] - before["generation_tokens"] == 60 * len(cases)


# --- the command line -----------------------------------------------------------------------------
def test_serve_parser_hooks_into_a_parent_cli():
    import argparse

    from engine.entrypoints.cli import add_serve_parser, run_serve

    parser = argparse.ArgumentParser(prog="litmus")
    add_serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "tiny-llama", "--port", "9001", "--served-model-name", "a", "b",
                              "--max-num-seqs", "8", "--num-kv-blocks", "64", "--enable-prefix-caching",
                              "--dtype", "float32", "--seed", "3", "--api-key", "k", "--max-model-len", "128",
                              "--model-impl", "transformers", "--task", "generate"])
    assert args.run is run_serve
    assert (args.model, args.port, args.served_model_name, args.max_num_seqs) == ("tiny-llama", 9001, ["a", "b"], 8)
    assert (args.num_kv_blocks, args.enable_prefix_caching, args.dtype, args.seed) == (64, True, "float32", 3)
    assert (args.api_key, args.max_model_len, args.host) == ("k", 128, "127.0.0.1")
    assert (args.model_impl, args.task) == ("transformers", "generate")


def test_serve_passes_engine_options_to_the_engine(model_dir, monkeypatch):
    import uvicorn

    from engine.entrypoints.cli import serve_main

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    assert serve_main([str(model_dir), "--port", "9002", "--model-impl", "transformers", "--dtype", "bfloat16",
                       "--max-model-len", "64", "--served-model-name", "m"]) == 0
    engine = served["app"].state.serving.engine.engine
    assert (engine.config.model_impl, engine.config.dtype, engine.config.max_model_len) == \
           ("transformers", torch.bfloat16, 64)
    assert type(engine.model_runner.model).__module__ == "engine.models.transformers_backend"
    assert served["port"] == 9002 and served["app"].state.serving.served_model_names == ["m"]


def _damage_config(path: Path, **changes: Any) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def _damage_weights(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _truncate(path: Path) -> None:
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:len(data) // 2])


# (case, what breaks the model directory, extra serve arguments, words the one-line error must hold)
BAD_MODELS = [
    ("unknown architecture", lambda p: _damage_config(p, architectures=["NoSuchModelForCausalLM"]), (),
     "NoSuchModelForCausalLM"),
    ("missing config.json", lambda p: (p / "config.json").unlink(), (), "config.json"),
    ("truncated safetensors", _truncate, (), "model.safetensors"),
    ("corrupt safetensors", lambda p: (p / "model.safetensors").write_bytes(b"\x07" * 4096), (), "corrupt"),
    ("missing tensor", lambda p: _damage_weights(p, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight")), (),
     "model.layers.1.self_attn.k_proj.weight"),
    ("shape mismatch", lambda p: _damage_weights(p, lambda t: t.update({"model.norm.weight": torch.ones(7)})), (),
     "model.norm.weight"),
    ("unsupported dtype", lambda p: None, ("--dtype", "int8"), "int8"),
    ("unknown model implementation", lambda p: None, ("--model-impl", "magic"), "model_impl"),
]


@pytest.mark.parametrize("damage,args,words", [c[1:] for c in BAD_MODELS], ids=[c[0] for c in BAD_MODELS])
def test_serve_refuses_a_bad_model_in_one_line(model_dir, tmp_path, monkeypatch, capsys, damage, args, words):
    """Each load-time item of the bad-input catalogue, through `litmus serve`: exit status 1 and
    one line naming the problem, before any port is opened."""
    import uvicorn

    from engine.entrypoints.cli import serve_main

    def started(*_, **__):
        raise AssertionError("the server started on a broken model")

    monkeypatch.setattr(uvicorn, "run", started)
    path = tmp_path / "model"
    shutil.copytree(model_dir, path)
    damage(path)
    assert serve_main([str(path), "--port", "0", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("litmus serve: error:") and err.count("\n") == 1, err
    assert words in err, err


def test_serve_reports_a_bad_model_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "engine.entrypoints.cli", str(tmp_path / "missing"), "--port", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("litmus serve: error:") and "Traceback" not in proc.stderr
