"""Pooling: PoolingParams and pooler configuration, the poolers on known tensors, decoders turned
into embedders and reward models against Transformers, scheduling without chunked prefill,
and bad input that must fail cleanly before anything is queued."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import harness.zoo as zoo
from engine import LLM, PoolerConfig, PoolingParams, PoolingType, SamplingParams
from engine.layers.pooler import Pooler, PoolingMetadata, resolve_pooler_config, sentence_transformers_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = [
    "Hi",
    "The capital of France is Paris, and the capital of Germany is Berlin.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Le café est très chaud. ¿Dónde está la estación?",
]


@pytest.fixture(scope="module")
def bert() -> LLM:
    return LLM(str(zoo.model_path("tiny-bert")), task="embed")


# --- parameters and configuration ------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(dimensions=0), "dimensions"), (dict(dimensions=2.5), "dimensions"), (dict(dimensions=True), "dimensions"),
    (dict(normalize="yes"), "normalize"), (dict(softmax=1), "softmax"),
])
def test_pooling_params_reject_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=rf"PoolingParams\.{field}="):
        PoolingParams(**kwargs)


def test_pooling_params_checked_against_the_task():
    PoolingParams(dimensions=8, normalize=False).verify("embed", embedding_size=64)
    with pytest.raises(ValueError, match=r"PoolingParams\.softmax=True .*task 'embed' does not use it"):
        PoolingParams(softmax=True).verify("embed", 64)
    with pytest.raises(ValueError, match=r"PoolingParams\.dimensions=8 .*task 'classify'"):
        PoolingParams(dimensions=8).verify("classify", 64)
    with pytest.raises(ValueError, match=r"PoolingParams\.dimensions=65 .*embedding size 64"):
        PoolingParams(dimensions=65).verify("embed", 64)


@pytest.mark.parametrize("override, message", [
    ({"pooling": "MEAN"}, r"unknown field\(s\) \['pooling'\]"),
    ({"pooling_type": "MAX"}, r"pooling_type='MAX' is invalid"),
    ({"normalize": "true"}, r"normalize='true' is invalid"),
    ({"pooling_type": "STEP", "returned_token_ids": []}, r"returned_token_ids=\[\] is invalid"),
    ({"pooling_type": "LAST", "step_tag_id": 5}, r"step_tag_id applies only to pooling_type STEP"),
    ("{not json", r"not valid JSON"),
])
def test_override_pooler_config_errors_name_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        resolve_pooler_config("embed", PoolingType.CLS, None, override)


def test_pooler_config_precedence(tmp_path: Path):
    """Task defaults, then the checkpoint's sentence-transformers config, then the override."""
    assert resolve_pooler_config("embed", PoolingType.LAST, None, None) == PoolerConfig(PoolingType.LAST, True, False)
    assert resolve_pooler_config("classify", PoolingType.CLS, None, None) == PoolerConfig(PoolingType.CLS, False, True)
    assert resolve_pooler_config("reward", PoolingType.LAST, None, None).pooling_type == PoolingType.ALL
    _write_st_modules(tmp_path, ["Transformer", "Pooling"], {"pooling_mode_mean_tokens": True})
    assert sentence_transformers_config(tmp_path) == PoolerConfig(PoolingType.MEAN, normalize=False)
    got = resolve_pooler_config("embed", PoolingType.CLS, tmp_path, '{"normalize": true}')
    assert (got.pooling_type, got.normalize) == (PoolingType.MEAN, True)
    # Only embeddings follow the sentence-transformers recipe.
    assert resolve_pooler_config("classify", PoolingType.CLS, tmp_path, None).pooling_type == PoolingType.CLS


def test_sentence_transformers_modules_beyond_pooling_are_refused(tmp_path: Path):
    _write_st_modules(tmp_path, ["Transformer", "Pooling", "Dense", "Normalize"], {"pooling_mode": "cls"})
    with pytest.raises(ValueError, match=r"modules \['Dense'\] are not supported"):
        sentence_transformers_config(tmp_path)
    _write_st_modules(tmp_path, ["Transformer", "Pooling"], {"pooling_mode": "max"})
    with pytest.raises(ValueError, match=r"pooling \['max'\] is not supported"):
        sentence_transformers_config(tmp_path)


def test_all_minilm_declares_mean_pooling_normalized_and_256_tokens():
    llm = LLM(str(zoo.model_path("all-minilm-l6-v2")), task="embed")
    config = llm.llm_engine.config
    assert config.pooler_config == PoolerConfig(PoolingType.MEAN, normalize=True, softmax=False)
    assert config.max_model_len == 256  # sentence_bert_config.json's max_seq_length, not BERT's 512


# --- the pooler on known tensors -------------------------------------------------------------

def _pool(config: PoolerConfig, task: str, hidden, token_ids, params=None, head=None):
    meta = PoolingMetadata([len(t) for t in token_ids], token_ids, [params or PoolingParams()] * len(token_ids))
    return Pooler(config, task, head)(hidden, meta)


def test_pooling_types_select_their_rows():
    hidden = torch.arange(15, dtype=torch.float32).view(5, 3)  # sequences of 2 and 3 rows
    ids = [[7, 8], [9, 10, 11]]
    raw = dict(normalize=False, softmax=False)
    last = _pool(PoolerConfig(PoolingType.LAST, **raw), "embed", hidden, ids)
    cls = _pool(PoolerConfig(PoolingType.CLS, **raw), "embed", hidden, ids)
    mean = _pool(PoolerConfig(PoolingType.MEAN, **raw), "embed", hidden, ids)
    everything = _pool(PoolerConfig(PoolingType.ALL, **raw), "embed", hidden, ids)
    assert [x.tolist() for x in last] == [hidden[1].tolist(), hidden[4].tolist()]
    assert [x.tolist() for x in cls] == [hidden[0].tolist(), hidden[2].tolist()]
    assert [x.tolist() for x in mean] == [hidden[:2].mean(0).tolist(), hidden[2:].mean(0).tolist()]
    assert [x.tolist() for x in everything] == [hidden[:2].tolist(), hidden[2:].tolist()]


def test_normalize_dimensions_softmax_and_sigmoid():
    hidden = torch.tensor([[3.0, 4.0, 12.0]])
    embedded = _pool(PoolerConfig(PoolingType.LAST, True, False), "embed", hidden, [[1]],
                     PoolingParams(dimensions=2))[0]
    assert embedded.tolist() == pytest.approx([0.6, 0.8])
    probs = _pool(PoolerConfig(PoolingType.LAST, False, True), "classify", hidden, [[1]])[0]
    assert probs.tolist() == pytest.approx(torch.softmax(hidden[0], 0).tolist())
    unscaled = _pool(PoolerConfig(PoolingType.LAST, False, True), "classify", hidden, [[1]],
                     PoolingParams(softmax=False))
    assert unscaled[0].tolist() == hidden[0].tolist()
    one_logit = _pool(PoolerConfig(PoolingType.LAST, False, True), "score", hidden, [[1]], head=lambda x: x[:, :1])
    assert one_logit[0].tolist() == pytest.approx([torch.sigmoid(torch.tensor(3.0)).item()])


def test_step_pooling_keeps_step_tag_rows_and_returned_columns():
    hidden = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    ids = [[4, 9, 4, 1, 9, 9]]
    config = PoolerConfig(PoolingType.STEP, False, True, step_tag_id=9, returned_token_ids=(3, 0))
    out = _pool(config, "reward", hidden, ids)[0]
    want = torch.softmax(hidden[[1, 4, 5]][:, [3, 0]], dim=-1)
    torch.testing.assert_close(out, want)


# --- models ------------------------------------------------------------------------------------

@torch.inference_mode()
def _hf_hidden(path: Path, prompts: list[str]) -> list[torch.Tensor]:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    return [model(**tokenizer(p, return_tensors="pt")).last_hidden_state[0] for p in prompts]


def test_a_causal_lm_embeds_with_its_last_token_normalized():
    """task="embed" on a ...ForCausalLM checkpoint: the body's last hidden state, normalized, as
    Transformers' base model computes it from the same checkpoint."""
    path = zoo.model_path("tiny-qwen2")
    llm = LLM(str(path), task="embed", max_model_len=256)
    assert llm.llm_engine.config.pooler_config.pooling_type == PoolingType.LAST
    got = torch.tensor([o.outputs.embedding for o in llm.embed(PROMPTS, use_tqdm=False)])
    want = torch.stack([F.normalize(h[-1], dim=-1) for h in _hf_hidden(path, PROMPTS)])
    assert F.cosine_similarity(got, want).min() >= 0.9999
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(PROMPTS)))


def test_reward_with_step_pooling_reads_the_lm_head_at_step_tags():
    """A causal LM as a process reward model (Math-Shepherd style): LM logits of the returned
    tokens at each step-tag position, through softmax."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = zoo.model_path("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    step, plus, minus = (tokenizer(t, add_special_tokens=False).input_ids[0] for t in (" step", " +", " -"))
    prompt = "Add 2 and 3. step 2 + 3 = 5 step so the answer is 5 step"
    override = {"pooling_type": "STEP", "step_tag_id": step, "returned_token_ids": [plus, minus], "softmax": True}
    llm = LLM(str(path), task="reward", override_pooler_config=override, max_model_len=256)
    got = llm.reward(prompt, use_tqdm=False)[0].outputs.data
    ids = tokenizer(prompt).input_ids
    with torch.inference_mode():
        logits = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(torch.tensor([ids])).logits[0]
    rows = [i for i, t in enumerate(ids) if t == step]
    assert len(rows) == 3 and got.shape == (3, 2)
    torch.testing.assert_close(got, torch.softmax(logits[rows][:, [plus, minus]], dim=-1), atol=1e-5, rtol=0)


def test_reward_with_all_pooling_is_every_hidden_state():
    path = zoo.model_path("tiny-llama-embed")
    outputs = LLM(str(path), task="reward", max_model_len=256).reward(PROMPTS, use_tqdm=False)
    for out, want in zip(outputs, _hf_hidden(path, PROMPTS)):
        assert out.outputs.data.shape == want.shape
        torch.testing.assert_close(out.outputs.data, want, atol=1e-4, rtol=1e-4)


def test_embedding_model_scores_are_cosine_similarities(bert: LLM):
    embedded = torch.tensor([o.outputs.embedding for o in bert.embed(PROMPTS[:3], use_tqdm=False)])
    scorer = LLM(str(zoo.model_path("tiny-bert")), task="score")
    scores = [o.outputs.score for o in scorer.score(PROMPTS[0], PROMPTS[1:3], use_tqdm=False)]
    assert scores == pytest.approx(F.cosine_similarity(embedded[:1], embedded[1:3]).tolist(), abs=1e-6)


def test_cross_encoder_scores_pairs_with_token_types():
    """The second text's segment id matters: scoring the pair as one segment gives another score."""
    llm = LLM(str(zoo.model_path("tiny-bert-cross-encoder")), task="score")
    score = llm.score("a question", "an answer", use_tqdm=False)[0].outputs.score
    tokenizer = llm.get_tokenizer()
    encoded = tokenizer("a question", "an answer")
    assert set(encoded.token_type_ids) == {0, 1}
    one_segment = llm.encode({"prompt_token_ids": encoded.input_ids}, use_tqdm=False)[0].outputs.data.item()
    assert 0 < score < 1 and abs(score - one_segment) > 1e-3


def test_prompts_longer_than_the_step_budget_wait_instead_of_chunking():
    """Encoders see each prompt whole: with room for one prompt per step, each runs alone, and
    its embedding is the one it gets in a full batch."""
    path = str(zoo.model_path("tiny-bert"))
    small = LLM(path, task="embed", max_model_len=32, max_num_batched_tokens=32)
    prompts = ["word " * 20, "other " * 25, "third text " * 9]
    lengths = [len(small.get_tokenizer()(p).input_ids) for p in prompts]
    assert all(16 < n <= 32 for n in lengths), lengths
    got = [o.outputs.embedding for o in small.embed(prompts, use_tqdm=False)]
    want = [o.outputs.embedding for o in LLM(path, task="embed").embed(prompts, use_tqdm=False)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"max_num_batched_tokens=16 is below max_model_len=32"):
        LLM(path, task="embed", max_model_len=32, max_num_batched_tokens=16)


def test_encoders_keep_no_kv_cache(bert: LLM):
    layers = bert.llm_engine.model_runner.attention_layers
    assert layers and all(not layer.causal and layer.k_cache.numel() == 0 for layer in layers)


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("model, kwargs, message", [
    ("tiny-bert", dict(task="classify"), r"task='classify' is not supported by BertModel; it runs: embed, score"),
    ("tiny-bert", dict(task="generate"), r"task='generate' is not supported by BertModel"),
    ("tiny-bert", dict(task="embedding"), r"task='embedding' is invalid"),
    ("tiny-bert", dict(task="embed", enable_prefix_caching=True), r"enable_prefix_caching is not supported"),
    ("tiny-llama", dict(override_pooler_config={"pooling_type": "MEAN"}), r"applies to pooling tasks"),
    ("tiny-llama", dict(task="embed", model_impl="transformers"), r"runs only native implementations"),
    ("tiny-qwen2-classifier", dict(task="score"), r"needs a cross-encoder with one output \(num_labels=1\)"),
    ("tiny-roberta", dict(task="embed", max_model_len=513), r"exceeds the 512 positions"),
])
def test_bad_configuration_is_refused_by_name(model: str, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LLM(str(zoo.model_path(model)), **kwargs)


def test_auto_task_is_the_architectures_first():
    assert LLM(str(zoo.model_path("tiny-bert-cross-encoder")), task="auto").llm_engine.config.task == "classify"


def test_wrong_method_for_the_task_is_refused(bert: LLM):
    with pytest.raises(ValueError, match=r"generation needs task='generate'; this model runs the pooling task 'embed'"):
        bert.generate("Hi", SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match=r"LLM.classify needs a model loaded with task='classify'"):
        bert.classify("Hi")
    with pytest.raises(ValueError, match=r"LLM.embed needs a model loaded with task='embed'"):
        LLM(str(zoo.model_path("tiny-llama")), max_model_len=64).embed("Hi")


def test_bad_request_in_a_batch_queues_nothing(bert: LLM):
    vocab = bert.llm_engine.config.hf_config.vocab_size
    with pytest.raises(ValueError, match=r"out of the vocabulary"):
        bert.embed(["fine", {"prompt_token_ids": [101, vocab, 102]}], use_tqdm=False)
    with pytest.raises(ValueError, match=r"PoolingParams.dimensions=65 is invalid"):
        bert.embed(PROMPTS, PoolingParams(dimensions=65), use_tqdm=False)
    with pytest.raises(ValueError, match=r"PoolingParams.softmax=False is invalid"):
        bert.embed(PROMPTS, PoolingParams(softmax=False), use_tqdm=False)
    with pytest.raises(ValueError, match=r"score pairs text_1 with text_2: got 2 and 3 texts"):
        LLM(str(zoo.model_path("tiny-bert")), task="score").score(["a", "b"], ["c", "d", "e"])
    assert not bert.llm_engine.has_unfinished_requests()
    assert len(bert.embed(PROMPTS, use_tqdm=False)) == len(PROMPTS)


def test_out_of_range_token_types_are_refused_before_queuing():
    llm = LLM(str(zoo.model_path("tiny-bert-cross-encoder")), task="score")
    with pytest.raises(ValueError, match=r"token type ids \[2\] are out of the model's range \[0, 2\)"):
        llm.llm_engine.add_pooling_request("x", None, [101, 1037, 102], PoolingParams(), [0, 0, 2])
    assert not llm.llm_engine.has_unfinished_requests()


def _write_st_modules(directory: Path, kinds: list[str], pooling: dict) -> None:
    modules = [{"idx": i, "name": str(i), "path": f"{i}_{k}" if k == "Pooling" else "",
                "type": f"sentence_transformers.models.{k}"} for i, k in enumerate(kinds)]
    (directory / "modules.json").write_text(json.dumps(modules))
    if "Pooling" in kinds:
        pooling_dir = directory / f"{kinds.index('Pooling')}_Pooling"
        pooling_dir.mkdir(exist_ok=True)
        (pooling_dir / "config.json").write_text(json.dumps(pooling))
