"""What every serving check shares: one `litmus serve` subprocess per model for the whole run,
the official openai clients pointed at it, and the offline engine to compare it with.

The server's log is attached to the report of every failing test that used it.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from harness.serving import ServerProcess

API_KEY = "sk-litmus-serving"
# One intra-op thread in the server: it shares two cores with this process and, usually, others
# (two spinning threads per process made a 135M model several times slower, measured).
SERVER_ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The offline engine here, too, runs on one intra-op thread, for the same reason as SERVER_ENV."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def server(model: str, model_spec: Any, dtype: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`litmus serve` for --model; session scope, so one server per model however many modules use it."""
    log = tmp_path_factory.mktemp("serving") / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', model)}.log"
    process = ServerProcess.start(model_spec.path, log, "--served-model-name", model, "--dtype", dtype,
                                  "--task", model_spec.task, "--log-level", "warning", api_key=API_KEY,
                                  env=SERVER_ENV)
    with process:
        process.wait_ready()
        yield process


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def async_client(server: ServerProcess) -> Callable[[], "openai.AsyncOpenAI"]:
    """A factory: an AsyncOpenAI belongs to the event loop it first runs on, so make one per asyncio.run."""
    return functools.partial(openai.AsyncOpenAI, base_url=server.base_url, api_key=API_KEY, max_retries=0,
                             timeout=300)


@pytest.fixture(scope="session")
def generation_model(model_spec: Any) -> None:
    if model_spec.task != "generate":
        pytest.skip(f"a pooling model (task={model_spec.task}): it generates no text to serve")


@pytest.fixture(scope="session")
def offline(engine_runner: Callable[..., Any], model_spec: Any, generation_model: None) -> Iterator[Any]:
    """The engine's offline API (LLM) on the same checkpoint and dtype as the server."""
    with engine_runner(model_spec.path) as runner:
        yield runner


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    report = yield
    server = getattr(item, "funcargs", {}).get("server")
    if report.failed and isinstance(server, ServerProcess):
        report.sections.append(("litmus serve", server.log_tail()))
    return report
