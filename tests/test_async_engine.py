"""AsyncLLMEngine: one engine thread, many asyncio callers, outputs equal to the offline API."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from engine.config import EngineConfig
from engine.core.async_engine import AsyncLLMEngine, EngineDeadError, GenerateRequest
from engine.core.engine import LLMEngine
from engine.llm import LLM
from engine.pooling_params import PoolingParams
from engine.sampling_params import SamplingParams

MAX_MODEL_LEN = 256
PROMPTS = [
    "The quick brown fox",
    "Once upon a time, in a land far away, there lived",
    "1, 2, 3, 5, 8,",
    "def add(a, b):",
    "Paris is the capital of",
    "Hello",
]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from harness.zoo import model_path

    return model_path("tiny-llama")


@pytest.fixture(scope="module")
def offline(model_dir: Path) -> LLM:
    return LLM(str(model_dir), max_model_len=MAX_MODEL_LEN)


def _greedy(max_tokens: int = 12, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kw)


def _engine(model_dir: Path, **kw) -> AsyncLLMEngine:
    kw.setdefault("max_model_len", MAX_MODEL_LEN)
    return AsyncLLMEngine(LLMEngine(EngineConfig.create(str(model_dir), **kw)))


async def _final(engine: AsyncLLMEngine, request_id: str, prompt: str, params: SamplingParams):
    last = None
    async for out in engine.generate(request_id, prompt, None, params):
        last = out
    return last


async def _wait_idle(engine: AsyncLLMEngine, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.01)):
        s = engine.stats
        if s.num_requests == 0 and s.kv_blocks_in_use == 0 and s.num_running == 0 and s.num_waiting == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine not idle: {engine.stats}")


def test_concurrent_requests_match_offline_and_share_steps(model_dir, offline):
    params = [_greedy(max_tokens=8 + 2 * i) for i in range(len(PROMPTS))]
    expected = offline.generate(PROMPTS, params, use_tqdm=False)
    engine = _engine(model_dir)
    stepping_threads: set[int] = set()
    real_step = engine.engine.step

    def recording_step():
        stepping_threads.add(threading.get_ident())
        return real_step()

    engine.engine.step = recording_step

    async def main():
        engine.start()
        try:
            return await asyncio.gather(*(
                _final(engine, f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(PROMPTS, params))
            ))
        finally:
            await asyncio.to_thread(engine.shutdown)

    outs = asyncio.run(main())
    for got, want in zip(outs, expected):
        assert got.finished
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert got.outputs[0].text == want.outputs[0].text
    # One thread stepped, and it was not this one.
    assert len(stepping_threads) == 1 and threading.get_ident() not in stepping_threads
    # Batched: far fewer steps than the tokens generated (one step per token if run one by one).
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert engine.stats.num_steps < tokens / 2
    assert engine.stats.num_finished_requests == len(PROMPTS)


def test_leaving_early_aborts_and_frees_blocks_others_unaffected(model_dir, offline):
    expected = offline.generate(PROMPTS[:3], _greedy(40), use_tqdm=False)
    engine = _engine(model_dir)

    async def quitter():
        gen = engine.generate("quit", PROMPTS[1], None, _greedy(200, ignore_eos=True))
        seen = 0
        async for out in gen:
            seen = len(out.outputs[0].token_ids)
            if seen >= 3:
                break
        await gen.aclose()
        return seen

    async def main():
        engine.start()
        try:
            results = await asyncio.gather(quitter(), *(
                _final(engine, f"keep{i}", p, _greedy(40)) for i, p in enumerate(PROMPTS[:3])
            ))
            await _wait_idle(engine)
            return results
        finally:
            await asyncio.to_thread(engine.shutdown)

    seen, *kept = asyncio.run(main())
    assert 3 <= seen < 200
    for got, want in zip(kept, expected):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
    assert engine.stats.num_aborted_requests == 1
    assert engine.stats.kv_blocks_in_use == 0


def test_cancelled_task_aborts_its_request(model_dir):
    engine = _engine(model_dir)

    async def main():
        engine.start()
        try:
            task = asyncio.ensure_future(_final(engine, "c", PROMPTS[0], _greedy(200, ignore_eos=True)))
            while engine.stats.num_running == 0:
                await asyncio.sleep(0.005)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await _wait_idle(engine)
        finally:
            await asyncio.to_thread(engine.shutdown)

    asyncio.run(main())
    assert engine.stats.num_aborted_requests == 1


def test_bad_prompt_fails_alone_before_queueing(model_dir, offline):
    expected = offline.generate(PROMPTS[0], _greedy(), use_tqdm=False)[0]
    engine = _engine(model_dir)
    vocab = engine.engine.config.hf_config.vocab_size

    async def bad(ids):
        with pytest.raises(ValueError) as info:
            async for _ in engine.generate(f"bad{len(ids)}", None, ids, _greedy()):
                pass
        return str(info.value)

    async def main():
        engine.start()
        try:
            good = asyncio.ensure_future(_final(engine, "good", PROMPTS[0], _greedy()))
            errors = [await bad([]), await bad([vocab]), await bad([1] * (MAX_MODEL_LEN + 1))]
            return await good, errors
        finally:
            await asyncio.to_thread(engine.shutdown)

    good, errors = asyncio.run(main())
    assert "empty" in errors[0] and "vocabulary" in errors[1] and "max_model_len" in errors[2]
    assert good.outputs[0].token_ids == expected.outputs[0].token_ids


def test_batch_call_validates_all_prompts_first(model_dir):
    engine = _engine(model_dir)

    async def main():
        engine.start()
        try:
            requests = [GenerateRequest("ok", PROMPTS[0], None, _greedy()),
                        GenerateRequest("empty", None, [], _greedy())]
            with pytest.raises(ValueError, match="empty"):
                async for _ in engine.generate_many(requests):
                    pass
            await asyncio.sleep(0.05)
            return engine.stats
        finally:
            await asyncio.to_thread(engine.shutdown)

    stats = asyncio.run(main())
    assert stats.num_requests == 0 and stats.num_steps == 0  # the good half never ran either


def test_duplicate_request_id_fails_only_the_second(model_dir):
    engine = _engine(model_dir)

    async def main():
        engine.start()
        try:
            first = asyncio.ensure_future(_final(engine, "same", PROMPTS[0], _greedy(30, ignore_eos=True)))
            while engine.stats.num_requests == 0:
                await asyncio.sleep(0.005)
            with pytest.raises(ValueError, match="already in use"):
                await _final(engine, "same", PROMPTS[1], _greedy())
            return await first
        finally:
            await asyncio.to_thread(engine.shutdown)

    out = asyncio.run(main())
    assert out.finished and len(out.outputs[0].token_ids) == 30


def test_engine_crash_reaches_every_waiting_caller(model_dir):
    engine = _engine(model_dir)

    def broken_step():
        raise RuntimeError("kernel exploded")

    engine.engine.step = broken_step

    async def main():
        engine.start()
        try:
            results = await asyncio.gather(
                *(_final(engine, f"r{i}", p, _greedy()) for i, p in enumerate(PROMPTS[:3])), return_exceptions=True
            )
            assert not engine.is_alive
            with pytest.raises(EngineDeadError):
                await _final(engine, "late", PROMPTS[0], _greedy())
            return results
        finally:
            await asyncio.to_thread(engine.shutdown)

    results = asyncio.run(main())
    assert all(isinstance(r, EngineDeadError) and "kernel exploded" in str(r) for r in results)


def test_kv_exhaustion_preempts_and_resumes(model_dir, offline):
    # 8 blocks x 16 tokens = 128 tokens of cache for 6 requests of up to ~70 tokens each.
    prompts = PROMPTS
    params = _greedy(48, ignore_eos=True)
    expected = offline.generate(prompts, params, use_tqdm=False)
    engine = _engine(model_dir, num_kv_blocks=8, max_model_len=128)

    async def main():
        engine.start()
        try:
            return await asyncio.gather(*(_final(engine, f"r{i}", p, params) for i, p in enumerate(prompts)))
        finally:
            await asyncio.to_thread(engine.shutdown)

    outs = asyncio.run(main())
    assert engine.stats.num_preemptions > 0
    assert engine.stats.kv_blocks_in_use == 0
    for got, want in zip(outs, expected):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
    # Recomputing a preempted sequence generates nothing new, and the counters say so.
    assert engine.stats.generation_tokens == 48 * len(prompts)
    assert engine.stats.prompt_tokens == sum(len(o.prompt_token_ids) for o in outs)


def test_pooling_requests_equal_offline_embed():
    """A pooling model's requests go through the same engine thread; a bad one fails alone."""
    from harness.zoo import model_path

    path = str(model_path("tiny-bert"))
    expected = [o.outputs.embedding for o in LLM(path, task="embed").embed(PROMPTS, use_tqdm=False)]
    engine = AsyncLLMEngine(LLMEngine(EngineConfig.create(path, task="embed")))
    too_wide = PoolingParams(dimensions=engine.engine.config.hf_config.hidden_size + 1)

    async def embed(i: int, prompt: str, params: PoolingParams):
        async for out in engine.generate_many([GenerateRequest(f"e{i}", prompt, None, params)]):
            return out[1]

    async def main():
        engine.start()
        try:
            with pytest.raises(ValueError, match="dimensions"):
                await embed(-1, PROMPTS[0], too_wide)
            outs = await asyncio.gather(*(embed(i, p, PoolingParams()) for i, p in enumerate(PROMPTS)))
            await _wait_idle(engine)
            return outs
        finally:
            await asyncio.to_thread(engine.shutdown)

    outs = asyncio.run(main())
    for got, want in zip(outs, expected):
        assert got.finished
        assert got.outputs.data.tolist() == pytest.approx(want, abs=1e-5)
    assert engine.stats.prompt_tokens == sum(len(o.prompt_token_ids) for o in outs)
    assert engine.stats.generation_tokens == 0 and engine.stats.num_finished_requests == len(PROMPTS)
