"""What every sensibility check shares: trained text-generation models only, the corpus, one torch thread."""
from __future__ import annotations

import pytest

from harness.sensibility import Corpus, load_corpus

NOT_TRAINED = "not a trained model: sensibility needs real weights"


# Session scope so it runs before the module fixtures that load models and run evaluations.
@pytest.fixture(scope="session", autouse=True)
def trained_only(model_spec) -> None:
    # trained is None for a user's own checkpoint: judging it is what this tier is for.
    if model_spec.trained is False:
        pytest.skip(NOT_TRAINED)
    if model_spec.task != "generate":
        pytest.skip(f"task {model_spec.task!r}: perplexity and generations need a text-generation model")


@pytest.fixture(scope="session")
def corpus() -> Corpus:
    return load_corpus()


@pytest.fixture(scope="module", autouse=True)
def _threads(tier_torch_threads: None) -> None:
    """The tier shares the cores with other models' checks under xdist (see the plugin's fixture)."""
