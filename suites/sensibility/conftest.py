"""What every sensibility check shares: trained text-generation models only, the corpus, one torch thread."""
from __future__ import annotations

import pytest
import torch

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
def one_torch_thread():
    """One intra-op thread: on a 2-core machine shared with other processes, two spinning
    threads per process made a 135M-parameter forward pass 4-7x slower than one (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
