"""Strict tier for pooling models: the engine's embeddings, class probabilities and scores are
Transformers'.

The reference is the checkpoint's Transformers model with the same pooling done by hand: the
base model's last hidden states pooled (CLS, LAST or MEAN) and L2-normalized for embeddings, a
sequence classifier's logits through softmax (sigmoid for one logit) for classes and
cross-encoder scores, the cosine of two embeddings for an embedding model's scores. Which
pooling a checkpoint gets by default is stated here independently of the engine: its
sentence-transformers config when it has one (read by sentence-transformers itself), else
vLLM's rule: CLS for BERT-style encoders, LAST for decoders. A sentence-transformers checkpoint
is also compared with the sentence-transformers pipeline itself.

Tolerances: cosine similarity >= 0.9999 per embedding, and the embedding norms within 1e-4
relative (a cosine cannot see a missing normalization); probabilities and scores within 1e-4.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from harness.runners import EngineRunner, HfRunner

pytestmark = pytest.mark.strict

MIN_COSINE = 0.9999
NORM_RTOL = 1e-4
SCORE_ATOL = 1e-4
# Of the largest reference value: per-token outputs (logits) are not on a unit scale.
REWARD_RTOL = 1e-5
ENCODERS = ("BertModel", "RobertaModel", "XLMRobertaModel", "RobertaForMaskedLM")
QUERY = "What is the capital of France?"
DOCUMENTS = [
    "Paris is the capital and largest city of France.",
    "The Eiffel Tower was completed in 1889.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "Berlin ist die Hauptstadt Deutschlands.",
]
BATCH_SIZES = [1, None]
BATCH_IDS = ["batch1", "batch_all"]


@pytest.fixture(scope="module", autouse=True)
def pooling_model(model_spec) -> None:
    if model_spec.task == "generate":
        pytest.skip("a generation model: the pooling checks need an embed / classify / score model "
                    "(its strict checks are test_generation's)")


@pytest.fixture(scope="module")
def default_pooling(model_spec, model_path: str) -> str:
    """The pooling the checkpoint calls for, decided without the engine."""
    if (Path(model_path) / "modules.json").is_file():
        model = _sentence_transformer(model_path)
        modes = {"cls": "CLS", "mean": "MEAN", "lasttoken": "LAST"}
        mode = next(m for m in model if type(m).__name__ == "Pooling").pooling_mode
        if mode not in modes:
            pytest.skip(f"sentence-transformers pooling {mode!r} has no engine counterpart (cls, mean, lasttoken)")
        return modes[mode]
    return "CLS" if model_spec.architecture in ENCODERS else "LAST"


@pytest.fixture(scope="module")
def engine(engine_runner: Callable[..., EngineRunner], model_path: str, model_spec) -> Iterator[EngineRunner]:
    with engine_runner(model_path, task=model_spec.task) as runner:
        yield runner


@pytest.fixture(scope="module")
def hf(hf_runner: Callable[..., HfRunner], model_path: str, model_spec, default_pooling: str) -> Iterator[HfRunner]:
    with hf_runner(model_path, task=model_spec.task, pooling_type=default_pooling) as runner:
        yield runner


@pytest.fixture(scope="module")
def embedding_model(model_spec) -> None:
    if model_spec.task != "embed":
        pytest.skip(f"not an embedding model (task={model_spec.task!r})")


@pytest.mark.usefixtures("embedding_model")
@pytest.mark.parametrize("batch_size", BATCH_SIZES, ids=BATCH_IDS)
def test_embeddings_match_hf(engine: EngineRunner, hf: HfRunner, example_prompts: list[str], batch_size,
                             default_pooling: str, litmus_record):
    litmus_record.metrics.update(pooling=default_pooling, batch_size=batch_size or len(example_prompts))
    got = _batched(example_prompts, batch_size, engine.embed)
    _check_embeddings(got, hf.embed(example_prompts), litmus_record)


@pytest.mark.usefixtures("embedding_model")
@pytest.mark.parametrize("pooling_type", ["CLS", "LAST", "MEAN"])
def test_pooling_types_match_hf(engine_runner, hf_runner, model_path: str, example_prompts: list[str],
                                pooling_type: str, litmus_record):
    """Each pooling over unnormalized hidden states: the hidden states themselves must agree."""
    litmus_record.metrics["pooling"] = pooling_type
    override = {"pooling_type": pooling_type, "normalize": False}
    with engine_runner(model_path, task="embed", override_pooler_config=override) as engine:
        got = engine.embed(example_prompts)
    with hf_runner(model_path, task="embed", pooling_type=pooling_type) as hf:
        want = hf.embed(example_prompts, normalize=False)
    _check_embeddings(got, want, litmus_record)


@pytest.mark.usefixtures("embedding_model")
def test_truncated_dimensions_match_hf(engine: EngineRunner, hf: HfRunner, example_prompts: list[str],
                                       litmus_record):
    dimensions = len(engine.embed(example_prompts[:1])[0]) // 2
    litmus_record.metrics["dimensions"] = dimensions
    got = engine.embed(example_prompts, dimensions=dimensions)
    sizes = sorted({len(v) for v in got})
    assert sizes == [dimensions], f"asked for {dimensions} dimensions, got {sizes}"
    _check_embeddings(got, hf.embed(example_prompts, dimensions=dimensions), litmus_record)


@pytest.mark.usefixtures("embedding_model")
def test_embeddings_match_sentence_transformers(engine: EngineRunner, model_path: str, example_prompts: list[str],
                                                litmus_record):
    if not (Path(model_path) / "modules.json").is_file():
        pytest.skip("not a sentence-transformers checkpoint (no modules.json)")
    want = _sentence_transformer(model_path).encode(example_prompts, convert_to_tensor=True).tolist()
    _check_embeddings(engine.embed(example_prompts), want, litmus_record)


def test_scores_match_hf(engine_runner, hf: HfRunner, engine: EngineRunner, model_path: str, model_spec,
                         litmus_record):
    """Cross-encoders score each pair as one input; embedding models by the cosine of the two."""
    if model_spec.task not in ("score", "embed"):
        pytest.skip(f"task {model_spec.task!r} has no scores (score: cross-encoders and embedding models)")
    if model_spec.task == "score":
        got = engine.score(QUERY, DOCUMENTS) + engine.score(DOCUMENTS, DOCUMENTS[::-1])
    else:
        with engine_runner(model_path, task="score") as scorer:
            got = scorer.score(QUERY, DOCUMENTS) + scorer.score(DOCUMENTS, DOCUMENTS[::-1])
    want = hf.score(QUERY, DOCUMENTS) + hf.score(DOCUMENTS, DOCUMENTS[::-1])
    _check_close(got, want, "max_score_diff", litmus_record)


@pytest.mark.parametrize("batch_size", BATCH_SIZES, ids=BATCH_IDS)
def test_class_probs_match_hf(engine: EngineRunner, hf: HfRunner, example_prompts: list[str], model_spec,
                              batch_size, litmus_record):
    if model_spec.task != "classify":
        pytest.skip(f"not a classifier (task={model_spec.task!r})")
    litmus_record.metrics["batch_size"] = batch_size or len(example_prompts)
    got = _batched(example_prompts, batch_size, engine.classify)
    want = hf.classify(example_prompts)
    assert [len(p) for p in got] == [len(p) for p in want], "the engine returned another number of classes"
    _check_close([p for probs in got for p in probs], [p for probs in want for p in probs], "max_prob_diff",
                 litmus_record)


@pytest.mark.parametrize("batch_size", BATCH_SIZES, ids=BATCH_IDS)
def test_rewards_match_hf(engine: EngineRunner, hf: HfRunner, example_prompts: list[str], model_spec, batch_size,
                          litmus_record):
    """A reward model's per-token outputs (a causal LM's logits, a body's hidden states)."""
    if model_spec.task != "reward":
        pytest.skip(f"not a reward model (task={model_spec.task!r})")
    got, want = _batched(example_prompts, batch_size, engine.reward), hf.reward(example_prompts)
    assert [len(r) for r in got] == [len(r) for r in want], "a prompt's reward has another number of tokens"
    want_t = [torch.tensor(w, dtype=torch.float64) for w in want]
    max_diffs = [(torch.tensor(g, dtype=torch.float64) - w).abs().max().item() for g, w in zip(got, want_t)]
    scale = max(w.abs().max().item() for w in want_t)
    worst = max(range(len(max_diffs)), key=max_diffs.__getitem__)
    rel = max_diffs[worst] / scale
    litmus_record.metrics.update(max_reward_rel_diff=rel, reward_scale=scale)
    assert rel <= REWARD_RTOL, f"prompt {worst}: rewards differ by {rel:.2e} of their scale > {REWARD_RTOL}"


def _check_embeddings(got: list[list[float]], want: list[list[float]], litmus_record) -> None:
    assert len(got) == len(want), f"{len(got)} embeddings for {len(want)} prompts"
    assert [len(v) for v in got] == [len(v) for v in want], "embedding sizes differ from the reference"
    g, w = torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64)
    cosine = F.cosine_similarity(g, w, dim=-1)
    norm_diff = ((g.norm(dim=-1) - w.norm(dim=-1)).abs() / w.norm(dim=-1)).max().item()
    litmus_record.metrics.update(min_cosine=cosine.min().item(), max_norm_rel_diff=norm_diff)
    worst = int(cosine.argmin())
    assert cosine.min().item() >= MIN_COSINE, \
        f"prompt {worst}: cosine similarity {cosine[worst].item():.6f} < {MIN_COSINE}"
    assert norm_diff <= NORM_RTOL, f"embedding norms differ by {norm_diff:.2e} (relative) > {NORM_RTOL}"


def _check_close(got: Sequence[float], want: Sequence[float], metric: str, litmus_record) -> None:
    assert len(got) == len(want), f"{len(got)} values for {len(want)} reference values"
    diff = (torch.tensor(got, dtype=torch.float64) - torch.tensor(want, dtype=torch.float64)).abs()
    litmus_record.metrics[metric] = diff.max().item()
    worst = int(diff.argmax())
    assert diff.max().item() <= SCORE_ATOL, f"value {worst}: engine {got[worst]:.6f} vs reference {want[worst]:.6f}"


def _batched(prompts: list[str], batch_size: int | None, run: Callable[[list[str]], list]) -> list:
    """One prompt per call, or all in one: a prompt's output must not depend on its batch."""
    return run(prompts) if batch_size is None else [out for prompt in prompts for out in run([prompt])]


def _sentence_transformer(model_path: str) -> Any:
    if importlib.util.find_spec("sentence_transformers") is None:
        pytest.skip("sentence-transformers is not installed (pip install 'litmus[test]')")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_path, device="cpu", local_files_only=True)
