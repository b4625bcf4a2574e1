"""The pytest plugin behind every suite: model selection, runners and the shared prompts.

Loaded through the `pytest11` entry point, so it is active in any pytest run of an
environment where litmus is installed; it must therefore stay cheap to import.
"""
from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import pytest

from harness.results import TIERS

if TYPE_CHECKING:
    from harness.runners import EngineRunner, HfRunner

# Varied on purpose: short and long, prose and code, lists, digits, non-ASCII, so a
# tokenizer or position bug shows on at least one of them.
EXAMPLE_PROMPTS = [
    "What is the capital of France?",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Here is a shopping list:\n1. eggs\n2. flour\n3.",
    "Once upon a time, in a village at the edge of a dark forest, there lived",
    "1, 2, 3, 5, 8, 13, 21,",
    "Explain in one sentence why the sky is blue.",
    "Le café est très chaud, alors je vais attendre. ¿Dónde está la estación? 東京は",
    "The history of the printing press begins long before Gutenberg. Woodblock printing "
    "was practised in China by the ninth century, and movable type made of baked clay was "
    "described by Shen Kuo around 1040. Metal movable type appeared in Korea in the "
    "thirteenth century. When Johannes Gutenberg developed his press in Mainz around 1450, "
    "he combined an oil-based ink, a hand mould for casting type in large numbers, and a "
    "screw press adapted from those used for wine and paper. Within fifty years presses were "
    "at work in more than two hundred European cities, and the",
    "Q: How many legs does a spider have?\nA:",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("litmus", "Litmus model checks")
    group.addoption(
        "--model",
        action="append",
        default=[],
        metavar="NAME|PATH",
        help="model to check: a zoo name, a local HF directory, or a hub id in the local HF cache "
        "(repeatable; default: the zoo's default model)",
    )


def pytest_configure(config: pytest.Config) -> None:
    for tier in TIERS:
        config.addinivalue_line("markers", f"{tier}: a check of the {tier} tier (see DESIGN.md)")
    # The model list is known only now, so the `model` fixture is made here. Being a plugin
    # fixture, a test module's own `model` fixture still overrides it as usual.
    models = selected_models(config)
    holder = ModuleType("litmus_models")
    holder.model = pytest.fixture(scope="session", params=models, ids=models, name="model")(_param)
    config.pluginmanager.register(holder, "litmus-models")


def selected_models(config: pytest.Config) -> list[str]:
    if given := config.getoption("--model"):
        # A model named twice would only be checked twice.
        return list(dict.fromkeys(given))
    from harness.zoo import DEFAULT_MODEL

    return [DEFAULT_MODEL]


def _param(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="session")
def model_path(model: str) -> str:
    from harness.zoo import resolve

    return resolve(model)


@pytest.fixture(scope="session")
def hf_runner() -> type[HfRunner]:
    from harness.runners import HfRunner

    return HfRunner


@pytest.fixture(scope="session")
def engine_runner() -> type[EngineRunner]:
    from harness.runners import EngineRunner

    return EngineRunner


@pytest.fixture(scope="session")
def example_prompts() -> list[str]:
    return list(EXAMPLE_PROMPTS)
