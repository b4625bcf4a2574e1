"""Serving tier, the API around the model: health and model listing, the OpenAI error bodies
and statuses (401 bad key, 404 unknown model; for generation models 400 for bad parameters, a
prompt too long, or embeddings asked of them), and the Prometheus metrics."""
from __future__ import annotations

import json
import re

import openai
import pytest

from engine.entrypoints.openai.protocol import MAX_LOGPROBS, MAX_STOP_SEQUENCES
from harness.serving import ServerProcess

pytestmark = pytest.mark.serving
needs_generation = pytest.mark.usefixtures("generation_model")
PLAIN_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"

# (case id, parameter, value)
BAD_PARAMS = [
    ("negative-temperature", "temperature", -0.5),
    ("top_p-0", "top_p", 0),
    ("top_p-above-1", "top_p", 1.5),
    ("n-0", "n", 0),
    ("max_tokens-0", "max_tokens", 0),
    ("too-many-logprobs", "logprobs", MAX_LOGPROBS + 1),
    ("too-many-stop-strings", "stop", [f"s{i}" for i in range(MAX_STOP_SEQUENCES + 1)]),
]


@pytest.fixture(scope="module")
def max_model_len(client, model) -> int:
    entry = next(m for m in client.models.list().data if m.id == model)
    return entry.max_model_len


def test_health_and_models(server, client, model):
    assert server.request("GET", "/health") == (200, {"status": "ok"})
    assert [m.id for m in client.models.list().data] == [model]


def test_wrong_or_missing_api_key_is_401(server, model):
    wrong = openai.OpenAI(base_url=server.base_url, api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.models.list()
    assert info.value.status_code == 401
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 1}).encode()
    status, answer = server.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    assert status == 401 and answer["error"]["type"] == "authentication_error", answer


def test_unknown_model_is_404(client):
    """Every endpoint checks the model name first, whatever the model serves."""
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-model", prompt="Hello", max_tokens=1)
    assert (info.value.code, info.value.param) == ("model_not_found", "model")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="Hello")


@needs_generation
@pytest.mark.parametrize("param,value", [case[1:] for case in BAD_PARAMS], ids=[case[0] for case in BAD_PARAMS])
def test_bad_parameter_is_400_naming_it(client, model, param, value):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt="Hello", **{"max_tokens": 4, param: value})
    assert info.value.param == param and param in info.value.message, info.value.body


@needs_generation
def test_prompt_too_long_is_400(client, model, max_model_len):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt=[0] * (max_model_len + 1), max_tokens=1)
    assert info.value.param == "prompt" and "max_model_len" in info.value.message
    # A template of its own (the server's extension): a model without one (Gemma 3's GGUF) is checked too.
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "word " * max_model_len}],
                                       extra_body={"chat_template": PLAIN_TEMPLATE})
    assert info.value.param == "messages" and "max_model_len" in info.value.message


@needs_generation
def test_embeddings_from_a_generation_model_is_400(client, model):
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=model, input="Hello")
    assert info.value.param == "model" and "task='generate'" in info.value.message
    assert "/v1/embeddings needs task='embed'" in info.value.message


def _scrape(server: ServerProcess) -> dict[str, float]:
    status, text = server.request("GET", "/metrics")
    assert status == 200 and isinstance(text, bytes), text
    samples = {}
    for line in text.decode().splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) litmus_\w+ .+", line), line
            continue
        name, value = line.split(" ")
        samples[name] = float(value)
    return samples


def test_metrics_count_requests_tokens_and_kv_blocks(server, client, model, model_spec):
    before = _scrape(server)
    for name in ("litmus_num_waiting", "litmus_num_running", "litmus_kv_blocks_in_use", "litmus_num_kv_blocks"):
        assert name in before, f"{name} missing from /metrics"
    if model_spec.task == "generate":
        usage = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, temperature=0).usage
        generated = usage.completion_tokens
    elif model_spec.task == "embed":
        usage, generated = client.embeddings.create(model=model, input="Once upon a time").usage, 0
    else:
        pytest.skip(f"task={model_spec.task}: the server has no endpoint for it (it serves /v1/completions, "
                    "/v1/chat/completions and /v1/embeddings), so no request to count; the gauges are there")
    server.wait_idle()
    after = _scrape(server)
    grew = {name: after[name] - before[name] for name in after if name.endswith("_total")}
    assert grew["litmus_num_finished_requests_total"] == 1
    assert grew["litmus_prompt_tokens_total"] == usage.prompt_tokens
    assert grew["litmus_generation_tokens_total"] == generated
    assert after["litmus_kv_blocks_in_use"] == after["litmus_num_running"] == after["litmus_num_waiting"] == 0
    assert after["litmus_alive"] == 1
