"""The pytest plugin behind every suite: model selection, runners, shared prompts, and one
result record per tier test.

Loaded through the `pytest11` entry point, so it is active in any pytest run of an
environment where litmus is installed; it must therefore stay cheap to import.

Records: a test carrying a tier marker (smoke, strict, ...) gets one ResultRecord whatever
its outcome. Where the test runs (an xdist worker, or this process) its identity and metrics
travel as a user property on each phase report; the process that is not a worker combines
the setup/call/teardown reports and appends the record, so records are written from one
place even under `-n`.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest

from harness.results import RECORDS_FILE, TIERS, ResultRecord, append_record, jsonable

if TYPE_CHECKING:
    from harness.runners import EngineRunner, HfRunner
    from harness.zoo import ModelInfo

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


DTYPES = ("auto", "float32", "bfloat16", "float16")
REFERENCES = ("hf", "golden")
# engine.models.registry.MODEL_IMPLS, restated: importing the engine here would load torch at
# every pytest start (tests/test_plugin.py keeps the two equal).
MODEL_IMPLS = ("auto", "native", "transformers")
# The user property that carries a test's record notes from where it runs to the writer.
_PROPERTY = "litmus_record"
_NOTES = pytest.StashKey["RecordNotes"]()


@dataclass
class RecordNotes:
    """A tier test's record in the making: identity (overridable by the test through the
    `litmus_record` fixture, for tests whose subject is not --model) and measured metrics."""

    tier: str
    check: str
    model: str
    architecture: str | None = None
    task: str | None = None
    dtype: str = "float32"
    model_impl: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


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
    group.addoption("--models-file", action="append", default=[], metavar="FILE",
                    help="file with one model per line (# starts a comment); adds to --model")
    group.addoption("--zoo", action="store_true", help="check every zoo model (litmus zoo list)")
    group.addoption("--results-dir", metavar="DIR", default=None,
                    help=f"directory whose {RECORDS_FILE} receives one result record per tier test "
                    "(default: $LITMUS_RESULTS_DIR, else .litmus/results under the rootdir)")
    group.addoption("--dtype", choices=DTYPES, default="auto",
                    help="dtype of both the engine and the reference (auto: float32 on CPU)")
    group.addoption("--reference", choices=REFERENCES, default="hf",
                    help="strict tier reference: run Transformers (hf) or read golden/ files (golden)")
    group.addoption("--model-impl", choices=MODEL_IMPLS, default="auto",
                    help="the engine's implementation (LLM(model_impl=...)): auto (native where the engine "
                    "has one, else the Transformers backend), native or transformers")


def pytest_configure(config: pytest.Config) -> None:
    for tier in TIERS:
        config.addinivalue_line("markers", f"{tier}: a check of the {tier} tier (see DESIGN.md)")
    # The model list is known only now, so the `model` fixture is made here. Being a plugin
    # fixture, a test module's own `model` fixture still overrides it as usual.
    models = selected_models(config)
    holder = ModuleType("litmus_models")
    holder.model = pytest.fixture(scope="session", params=models, ids=models, name="model")(_param)
    config.pluginmanager.register(holder, "litmus-models")
    if not hasattr(config, "workerinput"):
        writer = RecordWriter(results_dir(config), models, config.getoption("--model-impl"))
        config.pluginmanager.register(writer, "litmus-records")


def selected_models(config: pytest.Config) -> list[str]:
    given = list(config.getoption("--model"))
    for file in config.getoption("--models-file"):
        from harness.zoo import read_models_file

        try:
            given += read_models_file(Path(file))
        except OSError as exc:
            raise pytest.UsageError(f"--models-file {file}: {exc.strerror or exc}") from None
    if config.getoption("--zoo"):
        from harness.zoo import list_specs

        given += [spec.name for spec in list_specs()]
    if given:
        # A model named twice would only be checked twice.
        return list(dict.fromkeys(given))
    from harness.zoo import DEFAULT_MODEL

    return [DEFAULT_MODEL]


def results_dir(config: pytest.Config) -> Path:
    given = config.getoption("--results-dir") or os.environ.get("LITMUS_RESULTS_DIR")
    return Path(given) if given else Path(config.rootpath) / ".litmus" / "results"


def resolved_dtype(config: pytest.Config) -> str:
    dtype = config.getoption("--dtype")
    if dtype != "auto":
        return dtype
    # The engine's "auto" is float32 off-GPU, and this machine class has no GPU for bf16 weights.
    return "float32"


def _param(request: pytest.FixtureRequest) -> str:
    return request.param


# tryfirst: xdist's worker turns each item's xdist_group markers into its node id's group in its
# own pytest_collection_modifyitems, which would otherwise run before this one and see none.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        model = _model_param(item)
        # With `--dist loadgroup` every test of one model runs in one worker, which loads the
        # model once and confines a crash to that model's records.
        if model is not None:
            item.add_marker(pytest.mark.xdist_group(model))


def _model_param(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("model") if callspec is not None else None


def _tier_of(item: pytest.Item) -> str | None:
    tiers = [tier for tier in TIERS if item.get_closest_marker(tier) is not None]
    if len(tiers) > 1:
        raise pytest.UsageError(f"{item.nodeid} is marked with several tiers {tiers}; a check belongs to one")
    return tiers[0] if tiers else None


def _notes(item: pytest.Item) -> RecordNotes | None:
    if _NOTES not in item.stash:
        tier = _tier_of(item)
        if tier is None:
            return None
        model = _model_param(item)
        callspec = getattr(item, "callspec", None)
        name = check_name(item.path.stem, item.originalname, callspec and callspec.id, model)
        item.stash[_NOTES] = _new_notes(tier, name, model, resolved_dtype(item.config),
                                        item.config.getoption("--model-impl"))
    return item.stash[_NOTES]


def _new_notes(tier: str, check: str, model: str | None, dtype: str = "float32",
               model_impl: str = "auto") -> RecordNotes:
    info = _describe(model) if model is not None else None
    architecture = info.architecture if info else None
    return RecordNotes(tier=tier, check=check, model=model or "-", architecture=architecture,
                       task=info.task if info else None, dtype=dtype,
                       model_impl=_engine_impl(tier, architecture, info.task if info else None, model_impl))


def _engine_impl(tier: str, architecture: str | None, task: str | None, model_impl: str) -> str:
    """What LLM(model_impl=...) will run the architecture with, as the record states it ("" for
    none: no engine in the tier, or one that cannot run it)."""
    from engine.models.registry import UnsupportedArchitectureError, resolve_model_impl

    if tier == "community" or architecture is None:
        return ""
    try:
        impl = resolve_model_impl([architecture], model_impl)
    except UnsupportedArchitectureError:
        return ""
    # The backend runs generation only.
    return "" if impl == "transformers" and task not in (None, "generate") else impl


def check_name(module: str, function: str, param_id: str | None, model: str | None) -> str:
    """What a record checks: module::function plus the parameter ids other than the model's
    (the record has its own model field), e.g. `test_generation::test_batches[3]`."""
    params = param_id or ""
    if model is not None and model in params:
        # Ids join with "-", and model names contain "-" too, so the model's id is cut out whole.
        params = "-".join(part for part in params.replace(model, "\0", 1).split("-") if part and part != "\0")
    return f"{module}::{function}" + (f"[{params}]" if params else "")


@functools.cache
def _describe(model: str) -> ModelInfo:
    from harness.zoo import describe

    return describe(model)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    report = yield
    notes = _notes(item)
    if notes is not None:
        # Plain JSON values only: xdist carries user_properties to the controller through execnet,
        # which refuses numpy scalars (lm-eval's metrics are numpy.float64).
        plain = json.loads(json.dumps(asdict(notes), default=jsonable))
        report.user_properties.append((_PROPERTY, plain))
    return report


class RecordWriter:
    """Turns the phase reports of each tier test into its one record (runs where records are
    written: the xdist controller, or the only process)."""

    def __init__(self, directory: Path, models: list[str], model_impl: str = "auto") -> None:
        self.path = directory / RECORDS_FILE
        self.models = models
        self.model_impl = model_impl
        self.pending: dict[str, dict[str, Any]] = {}
        self.written = 0

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        notes = dict(report.user_properties).get(_PROPERTY)
        if notes is None:
            return
        state = self.pending.setdefault(report.nodeid, {"outcome": None, "reason": "", "duration": 0.0})
        state["duration"] += report.duration
        state["notes"] = notes
        outcome, reason = _phase_verdict(report)
        if outcome is not None and (state["outcome"] in (None, "pass")):
            state["outcome"], state["reason"] = outcome, reason
        if report.when == "teardown":
            self._write(report.nodeid, self.pending.pop(report.nodeid))

    @pytest.hookimpl(optionalhook=True)
    def pytest_handlecrashitem(self, crashitem: str, report: pytest.TestReport, sched: Any) -> None:
        # An xdist worker died inside this test: no teardown report will come for it.
        state = self.pending.pop(crashitem, None)
        notes = state["notes"] if state else self._crash_notes(crashitem)
        if notes is not None:
            self._write(crashitem, {"notes": notes, "outcome": "error", "duration": state["duration"] if state else 0.0,
                                    "reason": "the test process crashed (worker died) while running this check"})

    def _write(self, nodeid: str, state: dict[str, Any]) -> None:
        notes = state["notes"]
        outcome = state["outcome"] or "error"
        reason = state["reason"] or ("" if outcome == "pass" else "no verdict was reported for this check")
        append_record(self.path, ResultRecord(
            model=notes["model"], architecture=notes["architecture"], task=notes["task"], tier=notes["tier"],
            check=notes["check"], outcome=outcome, reason=reason, metrics=notes["metrics"],
            dtype=notes["dtype"], model_impl=notes["model_impl"], duration_s=round(state["duration"], 3),
            nodeid=nodeid,
        ))
        self.written += 1

    def _crash_notes(self, nodeid: str) -> dict[str, Any] | None:
        """Notes for a test that crashed before any phase report: its tier is the suite
        directory it lives in, its model the selected model its id names."""
        path, _, name = nodeid.partition("::")
        tier = next((tier for tier in TIERS if tier in Path(path).parts), None)
        if tier is None:
            return None
        function, _, params = name.partition("[")
        model = max((m for m in self.models if m in params), key=len, default=None)
        check = check_name(Path(path).stem, function, params.rstrip("]"), model)
        return asdict(_new_notes(tier, check, model, model_impl=self.model_impl))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.written:
            terminalreporter.write_line(f"litmus: {self.written} result records appended to {self.path}")


def _phase_verdict(report: pytest.TestReport) -> tuple[str | None, str]:
    """(outcome, reason) a phase report decides, or (None, "") when it leaves the verdict open."""
    if report.when == "call" and hasattr(report, "wasxfail"):
        # An expected failure is still a failure of the check; the xfail reason says why it is known.
        return ("fail", f"known failure: {report.wasxfail}") if report.skipped else ("pass", "")
    if report.skipped:
        reason = _skip_reason(report)
        return ("skip", reason) if reason else ("error", "skipped without a reason")
    if report.failed:
        kind = "fail" if report.when == "call" else "error"
        prefix = "" if report.when == "call" else f"{report.when}: "
        return kind, prefix + _failure_reason(report)
    return ("pass", "") if report.when == "call" else (None, "")


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    text = str(longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else longrepr or "").strip()
    # pytest words an empty reason as a bare "Skipped".
    return "" if text == "Skipped" else text.removeprefix("Skipped: ")


def _failure_reason(report: pytest.TestReport) -> str:
    """The exception line of the failure, short enough for a matrix footnote."""
    crash = getattr(report.longrepr, "reprcrash", None)
    message = crash.message if crash is not None else str(report.longrepr or "failed")
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    return first[:500]


@pytest.fixture
def litmus_record(request: pytest.FixtureRequest) -> RecordNotes:
    """The running test's record: put measured numbers in .metrics; a test whose subject is
    not --model sets .model / .architecture / .task."""
    notes = _notes(request.node)
    if notes is None:
        raise pytest.UsageError(f"{request.node.nodeid} uses litmus_record but has no tier marker ({', '.join(TIERS)})")
    return notes


@pytest.fixture(scope="session")
def model_spec(model: str) -> ModelInfo:
    from harness.zoo import describe

    return describe(model, build=True)


@pytest.fixture(scope="session")
def model_path(model_spec: ModelInfo) -> str:
    return model_spec.path


@pytest.fixture(scope="session")
def dtype(pytestconfig: pytest.Config) -> str:
    return resolved_dtype(pytestconfig)


@pytest.fixture(scope="session")
def reference(pytestconfig: pytest.Config) -> str:
    return pytestconfig.getoption("--reference")


@pytest.fixture(scope="session")
def hf_runner(dtype: str) -> type[HfRunner]:
    """HfRunner with --dtype as its default dtype."""
    import torch

    from harness.runners import HfRunner

    return functools.partial(HfRunner, dtype=getattr(torch, dtype))


@pytest.fixture(scope="session")
def engine_runner(dtype: str, pytestconfig: pytest.Config) -> type[EngineRunner]:
    """EngineRunner with --dtype and --model-impl as its defaults."""
    from harness.runners import EngineRunner

    return functools.partial(EngineRunner, dtype=dtype, model_impl=pytestconfig.getoption("--model-impl"))


@pytest.fixture(scope="module")
def one_torch_thread() -> Any:
    """Torch on one intra-op thread for a module: tiny models gain nothing from a second, and
    on a few cores shared with other processes (xdist workers, other jobs) two spinning
    threads per process made a SmolLM2 decode step ~6x slower in CPU time (measured)."""
    from harness.runners import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def tier_torch_threads(request: pytest.FixtureRequest) -> None:
    """A tier module's torch threads: one_torch_thread under xdist, where the workers share the
    cores; torch's own choice in a run alone, where a trained model's matmuls use every core
    (SmolLM2's strict tier ~1.5x faster in wall time on 2 cores)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        request.getfixturevalue("one_torch_thread")


@pytest.fixture(scope="session")
def example_prompts() -> list[str]:
    return list(EXAMPLE_PROMPTS)
