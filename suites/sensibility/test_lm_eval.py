"""Sensibility tier through lm-eval: Litmus as the `litmus` lm-eval model against lm-eval's own
`hf` model, on tasks defined over local files made from the corpus (no hub, no download).

Three tasks, one per request type lm-eval has (harness.sensibility.write_lm_eval_tasks):
multiple choice (loglikelihood), paragraph perplexity (loglikelihood_rolling) and completion
(generate_until). Both backends run the same tasks with the same dtype; their metrics must agree.
"""
from __future__ import annotations

from typing import Any

import pytest

import harness.lmeval  # noqa: F401  (registers `litmus` with lm-eval)
from harness.sensibility import Corpus, write_lm_eval_tasks

pytestmark = pytest.mark.sensibility

# Docs per task: 8 x 4 choices = 32 loglikelihood requests, 8 paragraphs, 8 completions; the
# loglikelihoods are compared one by one, so few docs still catch a scoring difference.
NUM_DOCS = 8
# Per loglikelihood (summed over a continuation's tokens): float32 on both sides agrees to ~1e-5.
LOGLIKELIHOOD_RTOL, LOGLIKELIHOOD_ATOL = 0.01, 0.01
# Perplexity-type metrics, as the corpus perplexity check.
PERPLEXITY_RTOL = 0.01
# Accuracy and exact match may differ by one doc: a near-tie between two choices (or two next
# tokens) can fall either way in two correct float implementations.
ONE_DOC = 1 / NUM_DOCS


@pytest.fixture(scope="module")
def lm_eval_runs(model_path: str, dtype: str, corpus: Corpus, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """Backend name -> lm-eval's results (with samples) for the three corpus tasks."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    root = tmp_path_factory.mktemp("lm-eval")
    tasks = write_lm_eval_tasks(corpus, root / "tasks", NUM_DOCS)
    backends = {"litmus": {"pretrained": model_path, "dtype": dtype},
                "hf": {"pretrained": model_path, "dtype": dtype, "device": "cpu"}}
    with pytest.MonkeyPatch.context() as env:
        # Local JSON files only: make any attempt to reach a hub fail at once rather than hang.
        env.setenv("HF_DATASETS_OFFLINE", "1")
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("HF_DATASETS_CACHE", str(root / "datasets"))
        manager = TaskManager(include_path=str(root / "tasks"))
        return {
            name: lm_eval.simple_evaluate(model=name, model_args=args, tasks=list(tasks), task_manager=manager,
                                          batch_size=1, log_samples=True)
            for name, args in backends.items()
        }


def _metrics(runs: dict[str, dict[str, Any]], task: str, names: tuple[str, ...]) -> dict[str, dict[str, float]]:
    return {backend: {name: run["results"][task][f"{name},none"] for name in names} for backend, run in runs.items()}


def _responses(runs: dict[str, dict[str, Any]], task: str) -> dict[str, list[Any]]:
    """Backend -> each doc's filtered responses, in doc order."""
    return {backend: [s["filtered_resps"] for s in sorted(run["samples"][task], key=lambda s: s["doc_id"])]
            for backend, run in runs.items()}


def test_lm_eval_multiple_choice_matches_hf(lm_eval_runs, litmus_record):
    metrics = _metrics(lm_eval_runs, "litmus_corpus_mc", ("acc", "acc_norm"))
    responses = _responses(lm_eval_runs, "litmus_corpus_mc")
    pairs = [(ours[0], theirs[0]) for doc_ours, doc_theirs in zip(responses["litmus"], responses["hf"])
             for ours, theirs in zip(doc_ours, doc_theirs)]
    worst = max(abs(ours - theirs) / (LOGLIKELIHOOD_ATOL + LOGLIKELIHOOD_RTOL * abs(theirs)) for ours, theirs in pairs)
    litmus_record.metrics.update({"docs": NUM_DOCS, "requests": len(pairs), "metrics": metrics,
                                  "max_loglikelihood_abs_diff": max(abs(a - b) for a, b in pairs)})
    assert len(pairs) == 4 * NUM_DOCS
    assert worst <= 1, f"a loglikelihood differs from hf's by more than {LOGLIKELIHOOD_RTOL:.0%} + {LOGLIKELIHOOD_ATOL}"
    for name in ("acc", "acc_norm"):
        ours, theirs = metrics["litmus"][name], metrics["hf"][name]
        assert abs(ours - theirs) <= ONE_DOC + 1e-9, f"{name}: litmus {ours:.3f} vs hf {theirs:.3f}"


def test_lm_eval_rolling_perplexity_matches_hf(lm_eval_runs, litmus_record):
    names = ("word_perplexity", "byte_perplexity", "bits_per_byte")
    metrics = _metrics(lm_eval_runs, "litmus_corpus_rolling", names)
    rel = {name: abs(metrics["litmus"][name] - metrics["hf"][name]) / metrics["hf"][name] for name in names}
    litmus_record.metrics.update({"docs": len(lm_eval_runs["hf"]["samples"]["litmus_corpus_rolling"]),
                                  "metrics": metrics, "rel_diff": rel, "tolerance": PERPLEXITY_RTOL})
    bad = {name: r for name, r in rel.items() if r > PERPLEXITY_RTOL}
    assert not bad, f"litmus and hf differ by more than {PERPLEXITY_RTOL:.0%}: {bad} ({metrics})"


def test_lm_eval_generation_matches_hf(lm_eval_runs, litmus_record):
    metrics = _metrics(lm_eval_runs, "litmus_corpus_generate", ("exact_match",))
    responses = _responses(lm_eval_runs, "litmus_corpus_generate")
    differing = [(ours, theirs) for ours, theirs in zip(responses["litmus"], responses["hf"]) if ours != theirs]
    litmus_record.metrics.update({"docs": NUM_DOCS, "metrics": metrics, "differing_generations": differing})
    assert len(responses["litmus"]) == len(responses["hf"]) == NUM_DOCS
    assert len(differing) <= 1, f"{len(differing)} of {NUM_DOCS} greedy completions differ (litmus, hf): {differing}"
    ours, theirs = metrics["litmus"]["exact_match"], metrics["hf"]["exact_match"]
    assert abs(ours - theirs) <= ONE_DOC + 1e-9, f"exact_match: litmus {ours:.3f} vs hf {theirs:.3f}"
