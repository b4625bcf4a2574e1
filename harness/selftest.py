"""`litmus selftest`: do the tiers catch the bugs model ports really have, and only those?

Each fault of the catalogue (harness.faults) is planted in a correct zoo model through the
fault-injection hook, and the tiers judge the broken engine in-process with the suites' own
code: strict through harness.compare's comparators against a Transformers reference computed
once per model (harness.golden.run_hf_reference, the strict suite's reference), smoke through
the smoke suite's run_smoke, sensibility through the perplexity suite's three checks (trained
models only). A control row runs the same with no fault: any tier failing it is a false alarm.
`litmus diff-layers` runs beside them and must name the module the fault was planted in.

Records (harness.results.ResultRecord, one per fault x model x tier) carry the tier whose check
ran, check `selftest::<fault>` (`selftest::control` for the control) and that tier's verdict on
the faulted model as outcome: `fail` means the tier caught the fault, `pass` that it missed it
(for the control, that there was no false alarm), `skip` that the fault or tier does not apply
(reason given). They are verdicts on deliberately broken models, so they go to their own file
(selftest.jsonl), never a results.jsonl a matrix would read.

`litmus selftest --repeat N` is the false-alarm check at scale instead: the real strict suite,
through pytest, N times over the models, reporting every verdict that differs between runs.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from harness.faults import CATALOGUE, Fault, inject, planted_modules, site_of
from harness.matrix import workers_arg
from harness.results import RECORDS_FILE, ResultRecord, append_record, read_records
from harness.zoo import list_specs

# The zoo models the strict tier passes, covering every fault the engine can host: GQA, biases
# (Qwen2), q/k norm (Qwen3), a sliding window (Mistral, Gemma 2), tied embeddings, GELU and the
# embedding scale (Gemma), soft caps (Gemma 2), experts (Mixtral), and one trained model for the
# sensibility tier.
DEFAULT_MODELS = ("tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma", "tiny-gemma2",
                  "tiny-mixtral", "smollm2-135m-instruct")
TIERS = ("smoke", "strict", "sensibility")
CONTROL = "control"
RECORDS = "selftest.jsonl"
REPORT = "selftest.md"
FLAKY_REPORT = "flaky.md"
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class TierVerdict:
    tier: str
    outcome: str  # the tier's verdict on the (faulted) model: pass / fail / skip / error
    detail: str = ""  # the failure's first line, or why the tier did not run
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)  # what the tier's checks measured


@dataclass
class Outcome:
    """One fault (or the control) on one model."""

    fault: str
    model: str
    architecture: str | None
    task: str
    planted: list[str] = field(default_factory=list)
    not_applicable: str = ""
    verdicts: dict[str, TierVerdict] = field(default_factory=dict)
    expected_site: str | None = None  # where diff-layers must see the outputs part first
    named_site: str | None = None  # where it did ("none" when nowhere)
    named_rel: float | None = None  # the relative error there (when none: the largest at any site)

    def caught_by(self, tier: str) -> bool:
        verdict = self.verdicts.get(tier)
        return verdict is not None and verdict.outcome == "fail"


# --- the tiers, in-process -----------------------------------------------------------------

@functools.cache
def suite_module(tier: str, file: str) -> ModuleType:
    """A suite's test module, imported from the checkout so its own checks are what runs."""
    path = ROOT / "suites" / tier / file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: selftest runs the suites' checks from a source checkout")
    spec = importlib.util.spec_from_file_location(f"litmus_selftest_{tier}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    # Registered first: the dataclasses it defines look their module up while it executes.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _judge(tier: str, check: Callable[[dict[str, Any]], Any]) -> TierVerdict:
    """Runs a tier's checks, which put what they measure in the dict they are given."""
    import pytest

    verdict = TierVerdict(tier, "pass")
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check(verdict.metrics)
    except AssertionError as exc:
        verdict.outcome, verdict.detail = "fail", _first_line(exc)
    except pytest.skip.Exception as exc:
        verdict.outcome, verdict.detail = "skip", _first_line(exc)
    except Exception as exc:  # a crash in the check: reported, not counted as a catch
        verdict.outcome, verdict.detail = "error", f"{type(exc).__name__}: {_first_line(exc)}"
    verdict.seconds = time.perf_counter() - start
    return verdict


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


class Subject:
    """One zoo model: the Transformers side measured once, and the one engine every fault is planted in."""

    def __init__(self, name: str, tiers: Sequence[str], stack: contextlib.ExitStack) -> None:
        from harness import zoo
        from harness.diff_layers import reference_sites
        from harness.golden import ReferenceSettings, run_hf_reference
        from harness.plugin import EXAMPLE_PROMPTS
        from harness.runners import EngineRunner, HfRunner

        self.spec = zoo.describe(name, build=True)
        self.tiers = tiers
        self.prompts = list(EXAMPLE_PROMPTS)
        self.settings = ReferenceSettings()
        self.hf = stack.enter_context(HfRunner(self.spec.path))
        self.engine = stack.enter_context(EngineRunner(self.spec.path))
        self.reference = run_hf_reference(self.hf, self.prompts, self.settings) if "strict" in tiers else None
        # The longest example prompt: past a 32-token sliding window.
        self.diff_ids = self.engine.tokenizer(max(self.prompts, key=len)).input_ids
        self.sites = reference_sites(self.hf.model, self.diff_ids)
        self.sensibility: _SensibilityReference | None = None
        self.sensibility_skip = ""
        if "sensibility" in tiers:
            self._prepare_sensibility()

    def _prepare_sensibility(self) -> None:
        from harness.sensibility import CorpusUnavailableError

        # trained is None for a user's own checkpoint: judging it is what the tier is for (as in its conftest).
        if self.spec.trained is False:
            self.sensibility_skip = "not a trained model: sensibility needs real weights"
            return
        try:
            self.sensibility = _SensibilityReference(self)
        except CorpusUnavailableError as exc:
            self.sensibility_skip = str(exc)

    def run(self, fault: Fault | None) -> Outcome:
        outcome = Outcome(fault.name if fault else CONTROL, self.spec.name, self.spec.architecture, self.spec.task)
        if fault is not None and not planted_modules(self.engine.llm, fault):
            outcome.not_applicable = f"the model has no {fault.needs}"
            return outcome
        with inject(self.engine.llm, fault) if fault else contextlib.nullcontext([]) as planted:
            outcome.planted = list(planted)
            for tier in self.tiers:
                outcome.verdicts[tier] = self._tier(tier)
            self._diff_layers(outcome)
        return outcome

    def _tier(self, tier: str) -> TierVerdict:
        if tier == "strict":
            return _judge(tier, self._strict)
        if tier == "smoke":
            run_smoke = suite_module("smoke", "test_smoke.py").run_smoke
            return _judge(tier, lambda metrics: metrics.update(run_smoke(self.engine.llm, self.prompts)))
        if self.sensibility is None:
            return TierVerdict(tier, "skip", self.sensibility_skip)
        return self.sensibility.judge()

    def _strict(self, metrics: dict[str, Any]) -> None:
        """The strict suite's comparisons, all prompts in one batch; both comparisons are measured
        before the first failure is raised."""
        from harness.compare import (
            ComparisonError,
            check_logprobs_close,
            check_prompt_logprobs_close,
            check_text_where_tokens_match,
        )

        s, ref, tokenizer = self.settings, self.reference, self.engine.tokenizer
        generations = self.engine.generate_greedy_logprobs(self.prompts, s.max_tokens, s.num_logprobs)
        prompt_logprobs = self.engine.prompt_logprobs(self.prompts, s.num_prompt_logprobs)
        comparisons = {
            "greedy": lambda: check_logprobs_close(ref.generations, generations, "hf", "engine",
                                                   eos_token_ids=ref.eos_token_ids, tokenizer=tokenizer,
                                                   warn_on_mismatch=False),
            "prompt_logprobs": lambda: check_prompt_logprobs_close(ref.prompt_logprobs, prompt_logprobs, "hf",
                                                                   "engine", num_logprobs=s.num_prompt_logprobs,
                                                                   tokenizer=tokenizer),
        }
        failures = []
        for name, compare in comparisons.items():
            try:
                metrics[name] = compare().metrics()
            except ComparisonError as failure:
                metrics[name] = failure.comparison.metrics()
                failures.append(failure)
        if failures:
            raise failures[0]
        check_text_where_tokens_match(ref.generations, generations, "hf", "engine")

    def _diff_layers(self, outcome: Outcome) -> None:
        from harness.diff_layers import compare_sites, engine_sites

        diff = compare_sites(self.sites, engine_sites(self.engine.llm, self.diff_ids), self.spec.name, "",
                             fault=outcome.fault)
        order = [s.site for s in diff.sites]
        expected = [site_of(name) for name in outcome.planted]
        expected = sorted((s for s in expected if s in order), key=order.index)
        outcome.expected_site = expected[0] if expected else None
        first = diff.first_divergence
        outcome.named_site = first.site if first else "none"
        outcome.named_rel = first.rel if first else max((s.rel for s in diff.sites), default=0.0)


class _SensibilityReference:
    """The perplexity suite's Transformers measurement, made once per model."""

    def __init__(self, subject: Subject) -> None:
        from harness.sensibility import corpus_windows, load_corpus, perplexity

        self.subject = subject
        self.suite = suite_module("sensibility", "test_perplexity.py")
        self.corpus = load_corpus()
        window = min(self.suite.WINDOW, subject.engine.llm.llm_engine.config.max_model_len)
        self.windows = corpus_windows(subject.engine.tokenizer, self.corpus.text, window, self.suite.MAX_TOKENS)
        start = time.perf_counter()
        self.hf = perplexity(subject.hf.prompt_nll(self.windows), self.windows)
        self.hf_s = time.perf_counter() - start

    def judge(self) -> TierVerdict:
        """The suite's three perplexity-file checks on the engine as it is now; caught if any fails."""
        from harness.plugin import RecordNotes
        from harness.sensibility import perplexity

        subject, suite = self.subject, self.suite
        def checks(metrics: dict[str, Any]) -> None:
            record = RecordNotes("sensibility", "selftest", subject.spec.name, metrics=metrics)
            start = time.perf_counter()
            engine = perplexity(subject.engine.prompt_nll(self.windows), self.windows)
            measured = suite.Measured(engine, self.hf, self.windows, time.perf_counter() - start, self.hf_s)
            suite.test_engine_perplexity_matches_hf(measured, self.corpus, record)
            suite.test_perplexity_below_ceiling(subject.spec.name, measured, self.corpus, record)
            suite.test_generations_not_degenerate(subject.engine, subject.hf, record)

        return _judge("sensibility", checks)


# --- the run -------------------------------------------------------------------------------

@dataclass
class SelftestRun:
    models: list[str]
    tiers: list[str]
    faults: list[str]
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    def for_fault(self, fault: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.fault == fault]

    def strict_catches_all(self) -> bool:
        """Every fault that applied somewhere was caught by strict somewhere, and the control nowhere."""
        applied = [f for f in self.faults if any(not o.not_applicable for o in self.for_fault(f))]
        caught = all(any(o.caught_by("strict") for o in self.for_fault(f)) for f in applied)
        return caught and not self.false_alarms()

    def false_alarms(self) -> list[Outcome]:
        return [o for o in self.for_fault(CONTROL) if any(v.outcome != "pass" and v.outcome != "skip"
                                                          for v in o.verdicts.values())]


def run_selftest(models: Sequence[str], tiers: Sequence[str], faults: Sequence[str], out_dir: Path,
                 progress: Callable[[str], None] = lambda line: None) -> SelftestRun:
    """Plants every fault in every model it applies to, judges each with every tier, and writes
    out_dir/selftest.jsonl (records) and out_dir/selftest.md (the table)."""
    catalogue = [CATALOGUE[name] for name in faults]
    run = SelftestRun(list(models), list(tiers), list(faults))
    out_dir.mkdir(parents=True, exist_ok=True)
    records = out_dir / RECORDS
    records.unlink(missing_ok=True)
    start = time.perf_counter()
    for model in models:
        with contextlib.ExitStack() as stack:
            subject = Subject(model, tiers, stack)
            for fault in [None, *catalogue]:
                outcome = subject.run(fault)
                run.outcomes.append(outcome)
                for record in outcome_records(outcome, tiers):
                    append_record(records, record)
                progress(_progress_line(outcome))
    run.seconds = time.perf_counter() - start
    (out_dir / REPORT).write_text(render(run), encoding="utf-8")
    return run


def outcome_records(outcome: Outcome, tiers: Sequence[str]) -> list[ResultRecord]:
    records = []
    for tier in tiers:
        verdict = outcome.verdicts.get(tier)
        if verdict is None:
            verdict = TierVerdict(tier, "skip", f"fault {outcome.fault} does not apply: {outcome.not_applicable}")
        metrics = {
            "fault": outcome.fault, "caught": verdict.outcome == "fail", "planted": outcome.planted,
            "diff_layers_expected": outcome.expected_site, "diff_layers_named": outcome.named_site,
            "diff_layers_named_rel_error": outcome.named_rel, **verdict.metrics,
        }
        records.append(ResultRecord(
            model=outcome.model, architecture=outcome.architecture, task=outcome.task, tier=tier,
            check=f"selftest::{outcome.fault}", outcome=verdict.outcome, reason=verdict.detail, metrics=metrics,
            duration_s=round(verdict.seconds, 3),
        ))
    return records


def _progress_line(outcome: Outcome) -> str:
    if outcome.not_applicable:
        return f"{outcome.model:<24} {outcome.fault:<24} n/a ({outcome.not_applicable})"
    tiers = " ".join(f"{tier}={_cell(v, outcome.fault == CONTROL)}" for tier, v in outcome.verdicts.items())
    return f"{outcome.model:<24} {outcome.fault:<24} {tiers} diff-layers={outcome.named_site}"


# --- the report ----------------------------------------------------------------------------

def _cell(verdict: TierVerdict | None, control: bool = False) -> str:
    if verdict is None:
        return "-"
    if verdict.outcome == "skip":
        return "n/a"
    if verdict.outcome == "error":
        return "error"
    if control:
        return "FALSE ALARM" if verdict.outcome == "fail" else "clean"
    return "caught" if verdict.outcome == "fail" else "missed"


def _named_cell(outcome: Outcome) -> str:
    if outcome.expected_site is None:
        return f"{outcome.named_site} (expected none)" if outcome.fault == CONTROL else outcome.named_site or "-"
    mark = "yes" if outcome.named_site == outcome.expected_site else "NO"
    return f"{mark}: {outcome.named_site}" + ("" if mark == "yes" else f" (planted {outcome.expected_site})")


def _strict_numbers(verdict: TierVerdict) -> str:
    parts = [f"{name} max |logprob diff| {m['max_abs_logprob_diff']:.2g} (atol {m['logprob_atol']:g})"
             for name, m in verdict.metrics.items() if isinstance(m, dict) and "max_abs_logprob_diff" in m]
    return "; ".join(parts) or "no measurements"


def render(run: SelftestRun) -> str:
    lines = [
        "# Litmus selftest",
        "",
        f"Models: {', '.join(run.models)}. Tiers: {', '.join(run.tiers)}. Wall time: {run.seconds:.0f} s.",
        "Each fault is planted in the engine through harness.faults.inject (no file edits); each tier judges the "
        "faulted engine with its suite's own checks against Transformers. `caught`: the tier failed the faulted "
        "model; `missed`: it passed it; `n/a`: the fault or tier does not apply. The diff-layers column says "
        "whether `litmus diff-layers` named the planted module as the first diverging one.",
        "",
        "Strict catches every fault that applied, with no false alarm: "
        f"**{'yes' if run.strict_catches_all() else 'NO'}**",
        "",
        "## Per fault",
        "",
        "| fault | bug | strict caught on | strict missed on (control: clean on) | smoke caught on "
        "| sensibility caught on | diff-layers named the planted module | does not apply to |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in [CONTROL, *run.faults]:
        outcomes = [o for o in run.for_fault(name) if not o.not_applicable]
        bug = "no fault (false-alarm check)" if name == CONTROL else CATALOGUE[name].description
        skipped = ", ".join(o.model for o in run.for_fault(name) if o.not_applicable) or "-"
        if not outcomes:
            lines.append(f"| {name} | {bug} | not run: no selected model has a {CATALOGUE[name].needs} "
                         f"| | | | | {skipped} |")
            continue

        def on(tier: str, caught: bool) -> str:
            models = [o.model for o in outcomes if tier in o.verdicts and o.verdicts[tier].outcome != "skip"
                      and o.caught_by(tier) == caught]
            if name == CONTROL and caught and models:
                return "FALSE ALARM on " + ", ".join(models)
            return ", ".join(models) or "none"

        named = [o for o in outcomes if o.expected_site is not None]
        diff = ("-" if name == CONTROL else
                f"{sum(o.named_site == o.expected_site for o in named)} of {len(named)} models")
        lines.append(f"| {name} | {bug} | {on('strict', True)} | {on('strict', False)} | {on('smoke', True)} "
                     f"| {on('sensibility', True)} | {diff} | {skipped} |")
    lines += ["", "## Per fault and model (where the fault applies)", "",
              "| fault | model | " + " | ".join(run.tiers) + " | diff-layers: first diverging module |",
              "|---|---|" + "---|" * len(run.tiers) + "---|"]
    for outcome in (o for o in run.outcomes if not o.not_applicable):
        control = outcome.fault == CONTROL
        cells = [_cell(outcome.verdicts.get(tier), control) for tier in run.tiers] + [_named_cell(outcome)]
        lines.append(f"| {outcome.fault} | {outcome.model} | " + " | ".join(cells) + " |")
    missed = [o for o in run.outcomes if o.fault != CONTROL and "strict" in o.verdicts and not o.caught_by("strict")
              and o.verdicts["strict"].outcome != "skip"]
    if missed:
        lines += ["", "Strict passed these faulted models: the fault moves their logprobs less than the "
                  "comparison's tolerance."]
        lines += [f"- {o.fault} on {o.model}: {_strict_numbers(o.verdicts['strict'])}" for o in missed]
    return "\n".join(lines) + "\n"


# --- false alarms: the strict suite, N times -----------------------------------------------

@dataclass
class FlakyRun:
    models: list[str]
    repeat: int
    # (model, check) -> outcome of each run (None where a run has no record for it)
    verdicts: dict[tuple[str, str], list[str | None]] = field(default_factory=dict)
    metrics_differ: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def flaky(self) -> dict[tuple[str, str], list[str | None]]:
        return {key: runs for key, runs in self.verdicts.items() if len(set(runs)) > 1}


def run_repeats(models: Sequence[str], repeat: int, out_dir: Path, timeout_s: float, select: str | None = None,
                workers: str = "0", progress: Callable[[str], None] = lambda line: None) -> FlakyRun:
    """Runs `pytest suites/strict` over the models `repeat` times (only tests matching `select`, a
    -k expression, if given; over `workers` xdist workers, each model on one), each into its own
    results dir, and compares every record's outcome across the runs; writes out_dir/flaky.md."""
    per_run: list[list[ResultRecord]] = []
    start = time.perf_counter()
    for i in range(1, repeat + 1):
        run_dir = out_dir / "repeats" / f"run{i}"
        shutil.rmtree(run_dir, ignore_errors=True)
        command = [sys.executable, "-m", "pytest", str(ROOT / "suites" / "strict"), "-m", "strict", "-q",
                   "-p", "no:cacheprovider", "--results-dir", str(run_dir), *(f"--model={m}" for m in models)]
        if select:
            command += ["-k", select]
        if workers != "0":
            command += ["-n", workers, "--dist", "loadgroup"]
        started = time.perf_counter()
        subprocess.run(command, cwd=ROOT, timeout=timeout_s, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        file = run_dir / RECORDS_FILE
        per_run.append(read_records(file) if file.is_file() else [])
        outcomes = sorted({r.outcome for r in per_run[-1]})
        progress(f"run {i}/{repeat}: {len(per_run[-1])} records ({', '.join(outcomes) or 'none'}) "
                 f"in {time.perf_counter() - started:.0f} s")
    run = compare_runs(models, per_run)
    run.seconds = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / FLAKY_REPORT).write_text(render_flaky(run), encoding="utf-8")
    return run


def compare_runs(models: Sequence[str], per_run: list[list[ResultRecord]]) -> FlakyRun:
    """Each (model, check)'s outcome in every run (None where a run lacks it), and the checks
    whose metrics differ between runs."""
    by_key = [{(r.model, r.check): r for r in records} for records in per_run]
    run = FlakyRun(list(models), len(per_run))
    for key in sorted(set().union(*by_key)):
        run.verdicts[key] = [records[key].outcome if key in records else None for records in by_key]
        metrics = [records[key].metrics for records in by_key if key in records]
        if any(m != metrics[0] for m in metrics):
            run.metrics_differ.append(key)
    return run


def render_flaky(run: FlakyRun) -> str:
    checks = len(run.verdicts)
    lines = [
        "# Litmus strict tier: false-alarm check",
        "",
        f"`pytest suites/strict` run {run.repeat} times over {', '.join(run.models)} ({checks} checks per run, "
        f"{run.seconds:.0f} s in all).",
        "",
        f"Flaky verdicts (an outcome that differs between runs): **{len(run.flaky)}**. "
        f"Checks whose recorded metrics differ between runs: {len(run.metrics_differ)}.",
        "",
        "| model | checks | pass | fail | skip | error | flaky |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model in sorted({model for model, _ in run.verdicts}):
        firsts = [runs[0] for (m, _), runs in run.verdicts.items() if m == model]
        flaky = sum(1 for (m, _) in run.flaky if m == model)
        counts = [sum(1 for o in firsts if o == outcome) for outcome in ("pass", "fail", "skip", "error")]
        lines.append(f"| {model} | {len(firsts)} | " + " | ".join(map(str, counts)) + f" | {flaky} |")
    if run.flaky:
        lines += ["", "| model | check | outcome per run |", "|---|---|---|"]
        lines += [f"| {m} | {c} | {', '.join(str(o) for o in runs)} |" for (m, c), runs in run.flaky.items()]
    return "\n".join(lines) + "\n"


# --- the command ---------------------------------------------------------------------------

def _csv(values: list[str]) -> list[str]:
    return [v for value in values for v in value.split(",") if v]


def register_selftest_cli(commands) -> None:
    parser = commands.add_parser(
        "selftest", help="plant known model bugs in correct zoo models and report which tiers catch them "
        "(--repeat N: run the strict suite N times and report flaky verdicts instead)")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="NAME",
                        help=f"zoo models or paths (space or comma separated; default: {', '.join(DEFAULT_MODELS)})")
    chosen.add_argument("--zoo", action="store_true", help="every zoo model")
    parser.add_argument("--tiers", default=",".join(TIERS), help=f"comma-separated subset of {', '.join(TIERS)}")
    parser.add_argument("--faults", default=",".join(CATALOGUE),
                        help="comma-separated faults of the catalogue (default: all)")
    parser.add_argument("--out", type=Path, default=Path("reports/selftest"),
                        help=f"directory for {REPORT} and {RECORDS} ({FLAKY_REPORT} with --repeat)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: small models on a shared 2-core machine run faster so)")
    parser.add_argument("--repeat", type=int, metavar="N",
                        help="false-alarm check: run the strict suite N times over the models, report flaky verdicts")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per strict-suite run with --repeat")
    parser.add_argument("-n", "--workers", default="0", type=workers_arg,
                        help="with --repeat: pytest-xdist workers per run (default 0: no xdist)")
    parser.add_argument("-k", dest="select", metavar="EXPR", help="with --repeat: only strict tests matching this "
                        "pytest -k expression")
    parser.set_defaults(run=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    from harness.cli import CommandError

    models = [spec.name for spec in list_specs()] if args.zoo else _csv(args.models)
    tiers, faults = _csv([args.tiers]), _csv([args.faults])
    unknown = [t for t in tiers if t not in TIERS] + [f for f in faults if f not in CATALOGUE]
    if unknown:
        raise CommandError(f"unknown tiers/faults {unknown}; tiers: {', '.join(TIERS)}; faults: {', '.join(CATALOGUE)}")
    if args.threads < 1:
        raise CommandError(f"--threads {args.threads}: must be >= 1")
    if args.repeat is not None:
        if args.repeat < 2:
            raise CommandError(f"--repeat {args.repeat}: comparing runs needs at least 2")
        flaky = run_repeats(models, args.repeat, args.out, args.timeout, args.select, args.workers, progress=print)
        print(render_flaky(flaky))
        return 1 if flaky.flaky else 0
    torch.set_num_threads(args.threads)
    run = run_selftest(models, tiers, faults, args.out, progress=print)
    print(render(run))
    print(f"wrote {args.out / REPORT} and {args.out / RECORDS} ({run.seconds:.0f} s)")
    return 0 if run.strict_catches_all() else 1
