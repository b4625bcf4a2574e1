"""Serving tier, /v1/embeddings for pooling models: the vectors through the wire are the ones
the offline API gives (`LLM(..., task="embed").embed(texts)`, as in vLLM), batched or one by one,
packed as base64 or as floats, cut to `dimensions`; bad requests get clear errors.

Generation models skip here; that they get a clear 400 from /v1/embeddings is test_api's check.
"""
from __future__ import annotations

import asyncio

import openai
import pytest
import torch

pytestmark = [pytest.mark.serving, pytest.mark.usefixtures("pooling_model")]

TEXTS = [
    "The cat sat on the mat.",
    "A feline rested on the rug.",
    "Quarterly revenue grew by twelve percent.",
    "Le café est très chaud.",
]
# The same engine on both sides: only summation order (batching) differs.
ATOL = 1e-5


@pytest.fixture(scope="module")
def pooling_model(model_spec) -> None:
    if model_spec.task != "embed":
        pytest.skip(f"not an embedding model (task={model_spec.task}): /v1/embeddings serves pooling models")


@pytest.fixture(scope="module")
def offline_llm(model_spec, dtype):
    from engine import LLM

    return LLM(model_spec.path, task="embed", dtype=dtype)


def _offline(llm, **pooling) -> torch.Tensor:
    from engine.pooling_params import PoolingParams

    return torch.tensor([out.outputs.embedding for out in llm.embed(TEXTS, PoolingParams(**pooling), use_tqdm=False)])


def _close(got: torch.Tensor, want: torch.Tensor) -> float:
    """Asserts the rows agree; returns the smallest cosine similarity."""
    assert got.shape == want.shape, (got.shape, want.shape)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    return torch.nn.functional.cosine_similarity(got, want, dim=-1).min().item()


def test_embeddings_equal_offline_embed(client, model, offline_llm, litmus_record):
    """The client's default asks for base64 (packed float32) and unpacks it."""
    resp = client.embeddings.create(model=model, input=TEXTS)
    assert sorted(d.index for d in resp.data) == list(range(len(TEXTS)))
    got = torch.tensor([d.embedding for d in sorted(resp.data, key=lambda d: d.index)])
    litmus_record.metrics["min_cosine"] = _close(got, _offline(offline_llm))
    want_tokens = sum(len(ids) for ids in offline_llm.get_tokenizer()(TEXTS).input_ids)
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == want_tokens


def test_concurrent_single_float_embeddings_equal_offline_embed(async_client, model, offline_llm):
    async def main():
        async with async_client() as client:
            return await asyncio.gather(*(client.embeddings.create(model=model, input=t, encoding_format="float")
                                          for t in TEXTS))

    got = torch.tensor([r.data[0].embedding for r in asyncio.run(main())])
    _close(got, _offline(offline_llm))


def test_dimensions_keep_the_leading_features(client, model, offline_llm):
    resp = client.embeddings.create(model=model, input=TEXTS, dimensions=8)
    got = torch.tensor([d.embedding for d in sorted(resp.data, key=lambda d: d.index)])
    _close(got, _offline(offline_llm, dimensions=8))


def test_bad_embedding_requests_get_clear_errors(client, model, offline_llm):
    # An unknown model's 404 is test_api's check, made for every model.
    too_many = offline_llm.llm_engine.config.hf_config.hidden_size + 1
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=model, input="Hello", dimensions=too_many)
    assert info.value.param == "dimensions", info.value.body
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=model, input="")
    assert info.value.param == "input", info.value.body
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt="Hello", max_tokens=4)
    assert "/v1/completions needs task='generate'" in info.value.message
