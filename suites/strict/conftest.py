"""What every strict check shares."""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import pytest

from harness.golden import ReferenceSettings
from harness.runners import EngineRunner, TokensTextLogprobs, in_batches


@pytest.fixture(scope="module", autouse=True)
def _threads(tier_torch_threads: None) -> None:
    """The tier shares the cores with other models' checks under xdist (see the plugin's fixture)."""


@pytest.fixture(scope="session")
def generation_model(model_spec) -> None:
    """Skips a generation check for a pooling model (its strict checks are test_pooling's)."""
    if model_spec.task != "generate":
        pytest.skip(f"a pooling model (task={model_spec.task!r}): it generates no text; its strict checks are "
                    f"test_pooling's")


@pytest.fixture(scope="session")
def engine(generation_model: None, engine_runner: Callable[..., EngineRunner], model_path: str
           ) -> Iterator[EngineRunner]:
    """The engine at its defaults, loaded once per model for every strict module. Session scope
    sets it up before module fixtures: it asks for generation_model itself, so that a pooling
    model skips rather than fail to load for generation."""
    with engine_runner(model_path) as runner:
        yield runner


@pytest.fixture(scope="session")
def settings(dtype: str) -> ReferenceSettings:
    return ReferenceSettings(dtype=dtype)


@pytest.fixture(scope="session")
def engine_generations(
    engine: EngineRunner, example_prompts: list[str], settings: ReferenceSettings
) -> Callable[[int | None], list[TokensTextLogprobs]]:
    """The engine's greedy outputs for a batch size (None: all at once), each computed once per
    model for every strict module."""

    @functools.cache
    def generate(batch_size: int | None) -> list[TokensTextLogprobs]:
        return in_batches(
            example_prompts, batch_size,
            lambda batch: engine.generate_greedy_logprobs(batch, settings.max_tokens, settings.num_logprobs),
        )

    return generate
