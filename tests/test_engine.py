"""End-to-end engine behaviour on the tiny zoo models: stopping rules, detokenization, batch
invariance, preemption, chunked prefill, prefix caching, sliding window and prompt logprobs
against Transformers, and bad input that must fail cleanly without corrupting the engine."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import harness.zoo as zoo
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from engine.worker.model_runner import zeros_on_demand

GREEDY = dict(temperature=0.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


PROMPTS = [
    "Hi",
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "1, 2, 3, 5, 8, 13,",
    "Le café est très chaud. ¿Dónde está la estación? 東京は大きい都市です。",
    "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n",
    " ".join(["The quick brown fox jumps over the lazy dog."] * 6),
]


# --- fixtures (module scope: set up after the thread pin above, and used only here) ---------

@pytest.fixture(scope="module")
def llama_path() -> Path:
    return zoo.model_path("tiny-llama")


@pytest.fixture(scope="module")
def mistral_path() -> Path:
    return zoo.model_path("tiny-mistral")


def make_llm(path: Path, **kwargs) -> LLM:
    kwargs.setdefault("max_model_len", 256)
    return LLM(str(path), **kwargs)


@pytest.fixture(scope="module")
def llm(llama_path: Path) -> LLM:
    return make_llm(llama_path)


@pytest.fixture(scope="module")
def qwen2() -> tuple[LLM, Path]:
    """tiny-qwen2 (tied embeddings) repeats its tokens a lot under greedy decoding: penalties bite."""
    path = zoo.model_path("tiny-qwen2")
    return make_llm(path), path


@pytest.fixture(scope="module")
def tokenizer(llm: LLM):
    return llm.get_tokenizer()


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p).input_ids for p in PROMPTS]


def gen(llm: LLM, prompts, **params):
    return llm.generate(prompts, SamplingParams(**params), use_tqdm=False)


def token_lists(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def ids_prompts(prompt_ids: list[list[int]]) -> list[dict]:
    return [{"prompt_token_ids": ids} for ids in prompt_ids]


@pytest.fixture(scope="module")
def reference(llm: LLM, prompt_ids) -> list[list[int]]:
    """Greedy tokens of each prompt run alone on the default engine."""
    return [token_lists(gen(llm, ids_prompts([ids]), max_tokens=24, ignore_eos=True, **GREEDY))[0]
            for ids in prompt_ids]


def hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    """Plain greedy decoding with a full forward pass per token (no KV cache, no generate())."""
    out: list[int] = []
    for _ in range(num_tokens):
        logits = model(torch.tensor([prompt + out])).logits[0, -1]
        out.append(int(logits.argmax()))
    return out


def copy_model(src: Path, dst: Path, link_weights: bool = True) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name.endswith(".safetensors") and link_weights:
            (dst / f.name).symlink_to(f)
        else:
            shutil.copy(f, dst / f.name)
    return dst


# --- stopping rules -------------------------------------------------------------------------

def test_max_tokens_finishes_with_length(llm: LLM) -> None:
    for n in (1, 7):
        out = gen(llm, PROMPTS[1], max_tokens=n, ignore_eos=True, **GREEDY)[0].outputs[0]
        assert len(out.token_ids) == n
        assert out.finish_reason == "length" and out.stop_reason is None


def test_max_model_len_ends_the_sequence(llama_path: Path) -> None:
    small = make_llm(llama_path, max_model_len=20)
    prompt = list(range(1000, 1012))
    out = gen(small, {"prompt_token_ids": prompt}, max_tokens=100, ignore_eos=True, **GREEDY)[0].outputs[0]
    assert len(prompt) + len(out.token_ids) == 20
    assert out.finish_reason == "length"


@pytest.fixture(scope="module")
def long_greedy(llm: LLM):
    out = gen(llm, PROMPTS[3], max_tokens=40, ignore_eos=True, **GREEDY)[0].outputs[0]
    assert len(out.text) > 30
    return out


def test_stop_string_truncates_the_text(llm: LLM, long_greedy) -> None:
    full = long_greedy.text
    stop = full[20:24]
    cut = full.find(stop)
    out = gen(llm, PROMPTS[3], max_tokens=40, ignore_eos=True, stop=stop, **GREEDY)[0].outputs[0]
    assert out.text == full[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    # Generation stopped at the token completing the stop string.
    ids = list(out.token_ids)
    assert ids == list(long_greedy.token_ids)[:len(ids)]
    assert len(ids) < len(long_greedy.token_ids)
    tok = llm.get_tokenizer()
    assert stop in tok.decode(ids)
    assert stop not in tok.decode(ids[:-1])


def test_include_stop_str_in_output(llm: LLM, long_greedy) -> None:
    full = long_greedy.text
    stop = full[20:24]
    cut = full.find(stop)
    out = gen(llm, PROMPTS[3], max_tokens=40, ignore_eos=True, stop=[stop],
              include_stop_str_in_output=True, **GREEDY)[0].outputs[0]
    assert out.text == full[:cut + len(stop)]
    assert out.text.endswith(stop)
    assert out.stop_reason == stop


def test_the_earliest_stop_string_wins(llm: LLM, long_greedy) -> None:
    full = long_greedy.text
    late, early = full[25:29], full[12:15]
    assert full.find(early) < full.find(late)
    out = gen(llm, PROMPTS[3], max_tokens=40, ignore_eos=True, stop=[late, early], **GREEDY)[0].outputs[0]
    assert out.stop_reason == early
    assert out.text == full[:full.find(early)]


def test_stop_token_ids(llm: LLM, long_greedy) -> None:
    ids = list(long_greedy.token_ids)
    pos = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])
    out = gen(llm, PROMPTS[3], max_tokens=40, ignore_eos=True, stop_token_ids=[ids[pos]], **GREEDY)[0].outputs[0]
    assert list(out.token_ids) == ids[:pos + 1]
    assert out.finish_reason == "stop" and out.stop_reason == ids[pos]


def test_min_tokens_holds_back_stop_token_ids(llm: LLM, long_greedy) -> None:
    ids = list(long_greedy.token_ids)
    pos = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    stop = ids[pos]
    out = gen(llm, PROMPTS[3], max_tokens=40, min_tokens=pos + 3, ignore_eos=True, stop_token_ids=[stop],
              **GREEDY)[0].outputs[0]
    got = list(out.token_ids)
    assert len(got) >= pos + 3
    assert stop not in got[:pos + 3]
    assert got[:pos] == ids[:pos]  # identical until the banned token would have come
    assert got[pos] != stop
    if out.finish_reason == "stop":
        assert got[-1] == stop and stop not in got[:-1]


@pytest.fixture(scope="module")
def eos_model(llama_path: Path, llm: LLM, tmp_path_factory: pytest.TempPathFactory):
    """tiny-llama with EOS set to the token it greedily produces 4th for PROMPTS[1]."""
    ids = token_lists(gen(llm, PROMPTS[1], max_tokens=12, ignore_eos=True, **GREEDY))[0]
    pos = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i])
    eos = ids[pos]
    path = copy_model(llama_path, tmp_path_factory.mktemp("eos") / "model")
    for name in ("generation_config.json", "config.json"):
        data = json.loads((path / name).read_text())
        data["eos_token_id"] = eos
        (path / name).write_text(json.dumps(data))
    return make_llm(path), ids, pos, eos


def test_eos_stops_and_ignore_eos_continues(eos_model) -> None:
    llm, ids, pos, eos = eos_model
    assert eos in llm.llm_engine.eos_token_ids
    out = gen(llm, PROMPTS[1], max_tokens=12, **GREEDY)[0].outputs[0]
    assert list(out.token_ids) == ids[:pos + 1]
    assert out.finish_reason == "stop" and out.stop_reason is None
    out = gen(llm, PROMPTS[1], max_tokens=12, ignore_eos=True, **GREEDY)[0].outputs[0]
    assert list(out.token_ids) == ids
    assert out.finish_reason == "length"


def test_min_tokens_holds_back_eos(eos_model) -> None:
    llm, ids, pos, eos = eos_model
    out = gen(llm, PROMPTS[1], max_tokens=12, min_tokens=pos + 2, **GREEDY)[0].outputs[0]
    got = list(out.token_ids)
    assert len(got) >= pos + 2
    assert got[:pos] == ids[:pos]
    assert eos not in got[:pos + 2]
    if out.finish_reason == "stop":
        assert got[-1] == eos


def test_n_greater_than_one(llm: LLM) -> None:
    outs = gen(llm, PROMPTS[1], n=4, temperature=1.5, seed=3, max_tokens=10, ignore_eos=True)[0].outputs
    assert [o.index for o in outs] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 10 and o.finish_reason == "length" for o in outs)
    assert len({tuple(o.token_ids) for o in outs}) > 1
    again = gen(llm, PROMPTS[1], n=4, temperature=1.5, seed=3, max_tokens=10, ignore_eos=True)[0].outputs
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]
    greedy = gen(llm, PROMPTS[1], n=3, max_tokens=10, ignore_eos=True, **GREEDY)[0].outputs
    assert len(greedy) == 3 and len({tuple(o.token_ids) for o in greedy}) == 1


# --- detokenization, logprobs, seeds -------------------------------------------------------

def test_incremental_detokenization_equals_decoding_the_output(llm: LLM, tokenizer) -> None:
    prompts = PROMPTS + ["東京", "Ça", "🙂 emoji", "\n\n"]
    seen_replacement = 0
    for seed in range(6):
        skip = bool(seed % 2)
        outs = gen(llm, prompts, temperature=1.0, seed=seed, max_tokens=40, skip_special_tokens=skip)
        for out in outs:
            c = out.outputs[0]
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=skip), (out.prompt, c.token_ids)
            seen_replacement += "\ufffd" in c.text
    # Random tokens of a byte-level BPE often split characters: the hard case was exercised.
    assert seen_replacement > 0


def test_logprobs_hold_the_sampled_token_with_one_based_ranks(llm: LLM) -> None:
    outs = gen(llm, PROMPTS[:4], temperature=2.0, seed=0, max_tokens=12, logprobs=2, ignore_eos=True)
    outside_top = 0
    for out in outs:
        c = out.outputs[0]
        assert len(c.logprobs) == len(c.token_ids)
        total = 0.0
        for tok, entry in zip(c.token_ids, c.logprobs):
            assert tok in entry
            assert 2 <= len(entry) <= 3
            lp = entry[tok]
            assert lp.rank >= 1 and lp.logprob <= 0
            assert lp.decoded_token is not None
            ranked = sorted(entry.values(), key=lambda x: -x.logprob)
            assert ranked[0].rank == 1
            assert all(x.rank == 1 + sum(y.logprob > x.logprob for y in entry.values())
                       for x in entry.values() if x.rank <= 2)
            outside_top += lp.rank > 2
            total += lp.logprob
        assert c.cumulative_logprob == pytest.approx(total, abs=1e-4)
    assert outside_top > 0  # temperature 2 picked tokens outside the top 2, and they were reported


def test_seeded_sampling_does_not_depend_on_the_batch(llm: LLM) -> None:
    target = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    alone = token_lists(llm.generate([PROMPTS[3]], target, use_tqdm=False))[0]
    others = [
        SamplingParams(temperature=0.0, max_tokens=5),
        SamplingParams(temperature=0.9, seed=7, max_tokens=20),
        SamplingParams(temperature=1.0, max_tokens=8),  # unseeded
        target,
        SamplingParams(temperature=0.5, top_k=5, max_tokens=3),
    ]
    batched = token_lists(llm.generate([PROMPTS[1], PROMPTS[7], PROMPTS[3], PROMPTS[3], PROMPTS[2]], others,
                                       use_tqdm=False))
    assert batched[3] == alone
    other_seed = token_lists(gen(llm, [PROMPTS[3]], temperature=1.0, seed=1235, max_tokens=12, ignore_eos=True))[0]
    assert other_seed != alone


def test_repetition_penalty_matches_transformers(qwen2, prompt_ids) -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    llm, path = qwen2
    model = hf_model(path)
    proc = RepetitionPenaltyLogitsProcessor(1.8)
    prompt = prompt_ids[4]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(16):
            scores = model(torch.tensor([ids])).logits[:, -1]
            ids.append(int(proc(torch.tensor([ids]), scores).argmax()))
    out = gen(llm, {"prompt_token_ids": prompt}, max_tokens=16, ignore_eos=True, repetition_penalty=1.8, **GREEDY)
    assert token_lists(out)[0] == ids[len(prompt):]
    plain = token_lists(gen(llm, {"prompt_token_ids": prompt}, max_tokens=16, ignore_eos=True, **GREEDY))[0]
    assert plain != ids[len(prompt):]  # the penalty changed something, so the comparison meant something


def test_frequency_and_presence_penalties_match_a_manual_greedy_loop(qwen2, prompt_ids) -> None:
    llm, path = qwen2
    model = hf_model(path)
    prompt = prompt_ids[1]
    freq, pres = 1.5, 0.7
    out: list[int] = []
    with torch.no_grad():
        for _ in range(16):
            logits = model(torch.tensor([prompt + out])).logits[0, -1].clone()
            for t in set(out):  # output tokens only; the prompt does not count
                logits[t] -= freq * out.count(t) + pres
            out.append(int(logits.argmax()))
    got = token_lists(gen(llm, {"prompt_token_ids": prompt}, max_tokens=16, ignore_eos=True,
                          frequency_penalty=freq, presence_penalty=pres, **GREEDY))[0]
    assert got == out
    plain = token_lists(gen(llm, {"prompt_token_ids": prompt}, max_tokens=16, ignore_eos=True, **GREEDY))[0]
    assert len(set(plain)) < len(plain) and plain != out  # the penalties changed something


# --- the same tokens whatever the batching -------------------------------------------------

def test_greedy_tokens_and_logprobs_match_transformers(llm: LLM, llama_path: Path, reference, prompt_ids) -> None:
    model = hf_model(llama_path)
    for ids, ref in list(zip(prompt_ids, reference))[:4]:
        assert hf_greedy(model, ids, 12) == ref[:12]
    prompt = prompt_ids[3]
    out = gen(llm, {"prompt_token_ids": prompt}, max_tokens=10, logprobs=2, ignore_eos=True, **GREEDY)[0].outputs[0]
    with torch.no_grad():
        ref_lp = torch.log_softmax(model(torch.tensor([prompt + list(out.token_ids)])).logits[0].double(), dim=-1)
    for j, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref_lp[len(prompt) - 1 + j]
        assert entry[tok].rank == 1 and tok == int(row.argmax())
        assert entry[tok].logprob == pytest.approx(float(row[tok]), abs=1e-4)
        assert sorted(x.logprob for x in entry.values()) == pytest.approx(sorted(row.topk(2).values.tolist()), abs=1e-4)
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)))


def test_batch_invariance(llm: LLM, prompt_ids, reference) -> None:
    batched = token_lists(gen(llm, ids_prompts(prompt_ids), max_tokens=24, ignore_eos=True, **GREEDY))
    assert batched == reference
    # Reversed order too: each sequence's neighbours differ.
    rev = token_lists(gen(llm, ids_prompts(prompt_ids[::-1]), max_tokens=24, ignore_eos=True, **GREEDY))
    assert rev[::-1] == reference


def test_preemption_gives_the_same_tokens(llama_path: Path, prompt_ids, reference) -> None:
    # 24 blocks of 4 tokens hold 96 tokens; the 8 sequences need about 280 at once.
    assert all(len(ids) + 24 <= 96 for ids in prompt_ids)
    small = make_llm(llama_path, max_model_len=96, block_size=4, num_kv_blocks=24)
    outs = token_lists(gen(small, ids_prompts(prompt_ids), max_tokens=24, ignore_eos=True, **GREEDY))
    assert small.llm_engine.scheduler.num_preemptions > 0
    assert outs == reference
    assert small.llm_engine.block_manager.num_free_blocks == 24


def test_chunked_prefill_gives_the_same_tokens(llama_path: Path, prompt_ids, reference) -> None:
    chunked = make_llm(llama_path, max_num_batched_tokens=5)
    outs = token_lists(gen(chunked, ids_prompts(prompt_ids), max_tokens=24, ignore_eos=True, **GREEDY))
    assert outs == reference


def _logprob_bits(outputs) -> list:
    """Every sampled and prompt logprob of each output, as exact floats."""
    def values(entries):
        return [None if e is None else sorted((t, lp.logprob) for t, lp in e.items()) for e in entries or []]
    return [(values(o.prompt_logprobs), values(o.outputs[0].logprobs)) for o in outputs]


def require_cpu_kernels() -> None:
    from litmus_kernels import cpu, ops

    if ops.backend(torch.zeros(1)) != "cpp" or not cpu.available():
        pytest.skip("the C++ CPU kernels are not what runs here (LITMUS_KERNELS or no compiler)")


def test_cpu_kernels_give_each_sequence_the_same_logprob_bits_in_any_batch_and_chunking(llama_path: Path,
                                                                                      prompt_ids) -> None:
    # Every CPU kernel computes a row from that row alone (the GEMM, attention for a prompt token or a
    # decode alike, the norms): batching, chunked prefill and the prefix cache change no bit of what a
    # sequence gets, as if it ran alone.
    require_cpu_kernels()
    params = dict(max_tokens=8, ignore_eos=True, logprobs=3, prompt_logprobs=2, **GREEDY)
    prompts = ids_prompts(prompt_ids)
    expected = _logprob_bits(gen(make_llm(llama_path), prompts, **params))
    alone = make_llm(llama_path)
    assert [_logprob_bits(gen(alone, [p], **params))[0] for p in prompts] == expected
    assert _logprob_bits(gen(make_llm(llama_path, max_num_batched_tokens=5), prompts, **params)) == expected
    # Prompt logprobs turn the prefix lookup off, so the cached runs sample only.
    cached = make_llm(llama_path, enable_prefix_caching=True, block_size=4)
    sampled = {**params, "prompt_logprobs": None}
    gen(cached, prompts, **sampled)
    hits = cached.llm_engine.block_manager.prefix_hits
    assert [bits[1] for bits in _logprob_bits(gen(cached, prompts, **sampled))] == [bits[1] for bits in expected]
    assert cached.llm_engine.block_manager.prefix_hits > hits


@pytest.mark.parametrize("name, kwargs", [
    ("tiny-llama", {}), ("tiny-llama", {"dtype": "bfloat16"}), ("tiny-gpt2", {}), ("tiny-mixtral", {}),
    ("tiny-llama", {"model_impl": "transformers"}),
])
def test_compiled_decode_steps_give_the_eager_bits(name: str, kwargs: dict, prompt_ids) -> None:
    # enforce_eager=False runs decode steps as the graph torch.compile captures: the same ops in the
    # same order, so no logprob changes a bit (LayerNorm and GELU models, MoE routing, Transformers'
    # own modeling code, bfloat16 alike).
    from torch._dynamo.utils import counters

    path = zoo.model_path(name)
    params = dict(max_tokens=8, ignore_eos=True, logprobs=3, prompt_logprobs=2, **GREEDY)
    prompts = ids_prompts(prompt_ids)
    eager, compiled = make_llm(path, **kwargs), make_llm(path, enforce_eager=False, **kwargs)
    traced = counters["stats"]["calls_captured"]
    assert _logprob_bits(gen(compiled, prompts, **params)) == _logprob_bits(gen(eager, prompts, **params))
    assert counters["stats"]["calls_captured"] > traced  # the decode steps did run compiled


def test_compiled_decode_steps_follow_a_weight_edited_in_place(llama_path: Path, prompt_ids) -> None:
    # A traced graph reads each weight's pack as it stands: an edited weight is packed anew before
    # the next compiled step (the C++ GEMM's pack, or oneDNN's with LITMUS_KERNELS=torch).
    params = dict(max_tokens=8, ignore_eos=True, logprobs=3, **GREEDY)
    eager, compiled = make_llm(llama_path), make_llm(llama_path, enforce_eager=False)

    def edited_mid_request(llm: LLM) -> list:
        # The edit lands after the (eager) prefill step, so only the decode steps can pick it up.
        engine = llm.llm_engine
        for i, prompt in enumerate(prompt_ids):
            engine.add_request(f"edit-{i}", None, prompt, SamplingParams(**params))
        outputs = {o.request_id: o for o in engine.step()}
        with torch.no_grad():
            engine.model_runner.model.model.layers[0].mlp.down_proj.weight.mul_(0.5)
        while engine.has_unfinished_requests():
            outputs.update((o.request_id, o) for o in engine.step())
        return _logprob_bits(outputs[f"edit-{i}"] for i in range(len(prompt_ids)))

    edited = edited_mid_request(eager)
    assert edited != _logprob_bits(gen(make_llm(llama_path), ids_prompts(prompt_ids), **params))
    assert edited_mid_request(compiled) == edited


def test_prefix_caching_gives_the_same_tokens_and_hits(llama_path: Path, tokenizer, llm: LLM) -> None:
    shared = " ".join(["Shared system prompt: be brief, be kind, and answer in English."] * 3)
    prompts = [shared + q for q in (" What is 2+2?", " Name a color.", " Say hi.", "")] + [shared]
    expected = token_lists(gen(llm, prompts, max_tokens=10, ignore_eos=True, **GREEDY))
    cached = make_llm(llama_path, enable_prefix_caching=True, block_size=4)
    bm = cached.llm_engine.block_manager
    first = token_lists(gen(cached, prompts, max_tokens=10, ignore_eos=True, **GREEDY))
    assert first == expected
    hits = bm.prefix_hits
    second = token_lists(gen(cached, prompts, max_tokens=10, ignore_eos=True, **GREEDY))
    assert second == expected
    assert bm.prefix_hits - hits >= len(prompts) * (len(tokenizer(shared).input_ids) // 4 - 1)
    # One at a time: each request finds the previous ones' blocks, including a fully cached prompt.
    serial = make_llm(llama_path, enable_prefix_caching=True, block_size=4, max_num_seqs=1)
    assert token_lists(gen(serial, prompts, max_tokens=10, ignore_eos=True, **GREEDY)) == expected
    assert serial.llm_engine.block_manager.prefix_hits > 0
    # Prompt logprobs need every position's logits: a cached prefix must not cut them short.
    plain_plp = gen(llm, prompts[0], max_tokens=1, prompt_logprobs=1, **GREEDY)[0].prompt_logprobs
    cached_plp = gen(cached, prompts[0], max_tokens=1, prompt_logprobs=1, **GREEDY)[0].prompt_logprobs
    assert len(cached_plp) == len(plain_plp) == len(tokenizer(prompts[0]).input_ids)
    for a, b in zip(plain_plp[1:], cached_plp[1:]):
        assert a.keys() == b.keys()
        assert [x.logprob for x in a.values()] == pytest.approx([x.logprob for x in b.values()], abs=1e-5)


def test_prefix_caching_with_preemption_gives_the_same_tokens(llama_path: Path, prompt_ids, reference) -> None:
    both = make_llm(llama_path, max_model_len=96, block_size=4, num_kv_blocks=24, enable_prefix_caching=True)
    prompts = ids_prompts(prompt_ids + prompt_ids[3:5])
    outs = token_lists(gen(both, prompts, max_tokens=24, ignore_eos=True, **GREEDY))
    assert both.llm_engine.scheduler.num_preemptions > 0
    assert outs == reference + reference[3:5]


# --- against Transformers: sliding window, prompt logprobs ---------------------------------

@pytest.fixture(scope="module")
def mistral_hf(mistral_path: Path):
    model = hf_model(mistral_path)
    assert model.config.sliding_window == 32
    return model


@pytest.fixture(scope="module")
def long_prompt(tokenizer) -> list[int]:
    ids = tokenizer(PROMPTS[3] + " " + PROMPTS[7] + " " + PROMPTS[2]).input_ids
    assert len(ids) > 90  # well past the 32-token window
    return ids


@pytest.mark.parametrize("budget", [None, 7], ids=["one-prefill", "chunked"])
def test_sliding_window_matches_transformers(mistral_path: Path, mistral_hf, long_prompt, budget) -> None:
    llm = make_llm(mistral_path, max_num_batched_tokens=budget, block_size=8)
    assert llm.llm_engine.config.hf_config.sliding_window == 32
    out = token_lists(gen(llm, {"prompt_token_ids": long_prompt}, max_tokens=20, ignore_eos=True, **GREEDY))[0]
    assert out == hf_greedy(mistral_hf, long_prompt, 20)


def test_sliding_window_really_changes_the_result(mistral_path: Path, long_prompt) -> None:
    params = dict(max_tokens=1, prompt_logprobs=0, **GREEDY)
    windowed = gen(make_llm(mistral_path), {"prompt_token_ids": long_prompt}, **params)[0].prompt_logprobs
    full = gen(make_llm(mistral_path, hf_overrides={"sliding_window": None}),
               {"prompt_token_ids": long_prompt}, **params)[0].prompt_logprobs
    tokens = long_prompt
    diff = [abs(windowed[i][tokens[i]].logprob - full[i][tokens[i]].logprob) for i in range(1, len(tokens))]
    # Positions inside the first window see the same keys either way; later ones do not.
    assert max(diff[:31]) < 1e-4
    assert max(diff[32:]) > 1e-2


@pytest.mark.parametrize("budget", [None, 6], ids=["one-prefill", "chunked"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral", "tiny-qwen3"])
def test_prompt_logprobs_match_transformers(name: str, budget, long_prompt) -> None:
    path = zoo.model_path(name)
    llm = make_llm(path, max_num_batched_tokens=budget)
    prompt = long_prompt[:60]
    out = gen(llm, {"prompt_token_ids": prompt}, max_tokens=2, prompt_logprobs=3, **GREEDY)[0]
    plp = out.prompt_logprobs
    assert len(plp) == len(prompt)
    assert plp[0] is None
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(path)(torch.tensor([prompt])).logits[0].double(), dim=-1)
    for i in range(1, len(prompt)):
        entry, tok, row = plp[i], prompt[i], ref[i - 1]
        assert tok in entry
        assert entry[tok].logprob == pytest.approx(float(row[tok]), abs=1e-4)
        # 1-based rank: one more than the tokens HF scores higher (up to float tolerance).
        surely_above = int((row > row[tok] + 1e-4).sum())
        maybe_above = int((row > row[tok] - 1e-4).sum()) - 1
        assert surely_above + 1 <= entry[tok].rank <= maybe_above + 1
        assert len(entry) in (3, 4)  # the top 3, plus the prompt token when it is not among them
        top = sorted((lp.logprob for lp in entry.values()), reverse=True)[:3]
        assert top == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)


# --- bad input ------------------------------------------------------------------------------

def test_bad_prompts_are_rejected_and_corrupt_nothing(llm: LLM, prompt_ids, reference) -> None:
    engine = llm.llm_engine
    max_len = engine.config.max_model_len
    vocab = engine.config.hf_config.vocab_size
    cases = [
        ({"prompt_token_ids": [5] * (max_len + 1)}, "max_model_len"),
        ({"prompt_token_ids": []}, "empty"),
        ("", "empty"),
        ({"prompt_token_ids": [5, vocab, 7]}, "vocabulary"),
        ({"prompt_token_ids": [-1]}, "vocabulary"),
    ]
    for prompt, words in cases:
        with pytest.raises(ValueError, match=words):
            gen(llm, prompt, max_tokens=4, **GREEDY)
        # A bad prompt inside a batch of good ones rejects the call before anything is queued.
        with pytest.raises(ValueError, match=words):
            gen(llm, [ids_prompts(prompt_ids)[0], prompt, ids_prompts(prompt_ids)[1]], max_tokens=4, **GREEDY)
        assert not engine.has_unfinished_requests()
        assert engine.block_manager.num_used_blocks == 0
    # Prompt exactly max_model_len long is fine.
    ok = gen(llm, {"prompt_token_ids": [5] * max_len}, max_tokens=4, **GREEDY)[0].outputs[0]
    assert ok.finish_reason == "length" and len(ok.token_ids) == 1
    after = token_lists(gen(llm, ids_prompts(prompt_ids), max_tokens=24, ignore_eos=True, **GREEDY))
    assert after == reference


def test_a_rejected_request_does_not_disturb_running_ones(llm: LLM, prompt_ids, reference) -> None:
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=24, ignore_eos=True, **GREEDY)
    engine.add_request("good-0", None, prompt_ids[2], params)
    engine.add_request("good-1", None, prompt_ids[5], params)
    finished = {}
    for step in range(40):
        if step == 3:
            for bad in ([], [10**7], [1] * (engine.config.max_model_len + 1)):
                with pytest.raises(ValueError):
                    engine.add_request(f"bad-{len(bad)}", None, bad, params)
            with pytest.raises(ValueError, match="already in use"):
                engine.add_request("good-0", None, prompt_ids[0], params)
        outputs = engine.step()
        finished.update({o.request_id: o for o in outputs if o.finished})
        engine.pop_finished(outputs)
        if not engine.has_unfinished_requests():
            break
    assert set(finished) == {"good-0", "good-1"}
    assert token_lists([finished["good-0"], finished["good-1"]]) == [reference[2], reference[5]]
    assert engine.requests == {}


@pytest.mark.parametrize(("params", "field"), [
    (dict(logprobs=10**6), "logprobs"),
    (dict(prompt_logprobs=10**6), "prompt_logprobs"),
    (dict(stop_token_ids=[10**6], min_tokens=2), "stop_token_ids"),
])
def test_sampling_params_beyond_the_vocabulary_are_rejected_and_corrupt_nothing(
        llm: LLM, prompt_ids, reference, params, field) -> None:
    with pytest.raises(ValueError, match=field):
        llm.generate([ids_prompts(prompt_ids)[0], ids_prompts(prompt_ids)[1]],
                     [SamplingParams(max_tokens=4), SamplingParams(max_tokens=4, **params)], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert token_lists(gen(llm, ids_prompts(prompt_ids[:2]), max_tokens=24, ignore_eos=True, **GREEDY)) \
        == reference[:2]


def test_unknown_architecture_is_named(llama_path: Path, tmp_path: Path) -> None:
    path = copy_model(llama_path, tmp_path / "model")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="NoSuchModelForCausalLM"):
        LLM(str(path), max_model_len=64)


def _rewrite_weights(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_missing_tensor_is_named(llama_path: Path, tmp_path: Path) -> None:
    path = copy_model(llama_path, tmp_path / "model", link_weights=False)
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite_weights(path, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        LLM(str(path), max_model_len=64)


def test_misshapen_tensor_is_named(llama_path: Path, tmp_path: Path) -> None:
    path = copy_model(llama_path, tmp_path / "model", link_weights=False)
    name = "model.layers.0.mlp.down_proj.weight"

    def edit(tensors):
        tensors[name] = torch.zeros(64, 191)
    _rewrite_weights(path, edit)
    with pytest.raises(ValueError, match=name.replace(".", r"\.")) as info:
        LLM(str(path), max_model_len=64)
    assert "(64, 191)" in str(info.value) and "(64, 192)" in str(info.value)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux's /proc to read resident memory")
def test_kv_cache_memory_is_backed_only_where_written():
    before = _resident_bytes()
    cache = zeros_on_demand((3, 4096, 16, 64), torch.float32)  # 48 MiB
    assert _resident_bytes() - before < 4 << 20, "allocating the cache made it resident"
    cache[:, :2] = 1.0
    assert _resident_bytes() - before < 8 << 20, "writing two blocks per head made the whole cache resident"
    assert cache.count_nonzero() == 3 * 2 * 16 * 64
