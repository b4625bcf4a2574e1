"""`litmus bench`: the engine's throughput and latency against Transformers (and llama.cpp).

Every backend gets the same random prompts (token ids, so no tokenizer differences), decodes
greedily and ignores EOS, so each produces exactly num_prompts * output_len tokens. Each backend
warms up once outside the timing. With --compare the backends run in one process, interleaved
round by round, so a busy machine slows them alike; the printed ratio is the first backend's
over each other's.

The roofline is the workload's matmul FLOPs (2 per weight per token: the body on every prompt
and generated token, the LM head on the tokens that pick a next one) over the peak of a square
matmul measured in the same process, dtype and thread count: the share of the machine's matmul
throughput the backend turned into model work. The peak is measured before the first round and
after every round, and the highest counts: this machine's speed drifts by 20 % and more over
minutes, and a ceiling measured during a slow spell would flatter every percentage (one run here
measured 158 GFLOP/s where minutes earlier it had measured 318).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

# engine-transformers: the engine running Transformers' modeling code (model_impl="transformers").
BACKENDS = ("engine", "engine-transformers", "hf", "llamacpp")
DTYPES = ("float32", "bfloat16", "float16")
# Transformers' generate pads a batch to one length and grows its cache by concatenation, so
# its best batch size depends on the machine: these are tried and the fastest is reported.
DEFAULT_HF_BATCH_SIZES = (16, 32, 64)


class BenchError(Exception):
    """A benchmark that cannot run as asked (unknown backend, missing package...)."""


@dataclass
class Workload:
    model: str  # as the user named it
    path: str  # the resolved HF directory
    dtype: str
    num_prompts: int
    input_len: int
    output_len: int
    seed: int = 0
    # Engine backends: False runs their decode steps as a graph torch.compile captures (in the warm-up).
    enforce_eager: bool = True

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


@dataclass(frozen=True)
class Elapsed:
    """Wall-clock and process CPU seconds. On a shared machine the wall clock also counts time
    spent waiting for a core; the CPU time does not."""

    wall: float
    cpu: float

    @classmethod
    def now(cls) -> Elapsed:
        return cls(time.perf_counter(), time.process_time())

    def __sub__(self, other: Elapsed) -> Elapsed:
        return Elapsed(self.wall - other.wall, self.cpu - other.cpu)


@dataclass
class Run:
    """One timed pass of the whole workload."""

    seconds: float
    cpu_seconds: float  # the process's CPU time: on a shared machine, less of it means less work
    output_tokens: int
    peak_rss_mb: float
    batch_size: int | None = None
    step_stats: dict[str, float] | None = None  # engine backends: engine.stats' per-step phases


# ---------------------------------------------------------------- backends


class Backend(ABC):
    name: str

    @abstractmethod
    def generate(self, prompts: list[list[int]], output_len: int, batch_size: int | None = None) -> int:
        """Greedy output_len tokens per prompt, EOS ignored; returns the tokens generated."""

    @abstractmethod
    def first_token_then_rest(self, prompt: list[int], output_len: int) -> tuple[Elapsed, Elapsed]:
        """One request alone: time to its first token, and to all output_len tokens."""

    def step_stats(self) -> dict[str, float] | None:
        """Per-step time by phase during the last call above, for a backend that steps visibly."""
        return None


class EngineBackend(Backend):
    name = "engine"

    def __init__(self, w: Workload, model_impl: str = "auto"):
        from engine import LLM

        if model_impl != "auto":
            self.name = f"engine-{model_impl}"
        # The cache holds exactly the workload: every prompt at full length at once.
        self.llm = LLM(w.path, dtype=w.dtype, max_model_len=w.input_len + w.output_len,
                       max_num_seqs=max(w.num_prompts, 1), seed=w.seed, model_impl=model_impl,
                       enforce_eager=w.enforce_eager)

    def _params(self, output_len: int):
        from engine import SamplingParams

        return SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)

    def step_stats(self) -> dict[str, float]:
        return self.llm.llm_engine.stats.summary()

    def generate(self, prompts: list[list[int]], output_len: int, batch_size: int | None = None) -> int:
        self.llm.llm_engine.stats.reset()
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], self._params(output_len),
                                    use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs)

    def first_token_then_rest(self, prompt: list[int], output_len: int) -> tuple[Elapsed, Elapsed]:
        engine = self.llm.llm_engine
        engine.stats.reset()
        start = Elapsed.now()
        engine.add_request("bench-latency", None, prompt, self._params(output_len))
        first = None
        while engine.has_unfinished_requests():
            outputs = engine.step()
            if first is None and any(o.outputs[0].token_ids for o in outputs):
                first = Elapsed.now() - start
            engine.pop_finished(outputs)
        return first, Elapsed.now() - start


class HfBackend(Backend):
    name = "hf"

    def __init__(self, w: Workload):
        from transformers import AutoModelForCausalLM

        from harness.runners import _stopping_only

        self.model = AutoModelForCausalLM.from_pretrained(w.path, dtype=w.torch_dtype).eval()
        self.model.generation_config = _stopping_only(self.model.generation_config)
        self.pad_id = self.model.generation_config.pad_token_id or 0

    @torch.inference_mode()
    def _generate_batch(self, prompts: list[list[int]], output_len: int, streamer: Any = None) -> int:
        width = max(len(p) for p in prompts)
        # Left padding: every row's last prompt token sits in the last column, where generate appends.
        input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = self.model.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=output_len,
                                  min_new_tokens=output_len, streamer=streamer)
        return (out.shape[1] - width) * len(prompts)

    def generate(self, prompts: list[list[int]], output_len: int, batch_size: int | None = None) -> int:
        size = batch_size or len(prompts)
        return sum(self._generate_batch(prompts[i:i + size], output_len) for i in range(0, len(prompts), size))

    def first_token_then_rest(self, prompt: list[int], output_len: int) -> tuple[Elapsed, Elapsed]:
        # Both times from one generate call: timing one token and then all of them in two calls
        # let a hiccup in the first make the rest look faster than free (negative ms per token
        # on a tiny model).
        clock = _FirstTokenClock()
        self._generate_batch([prompt], output_len, streamer=clock)
        return clock.first, Elapsed.now() - clock.start


class _FirstTokenClock:
    """A generate() streamer that notes when the first new token arrives. generate calls put()
    with the prompt first, then with each new token as soon as it is chosen."""

    def __init__(self) -> None:
        self.start = Elapsed.now()
        self.first: Elapsed | None = None
        self._puts = 0

    def put(self, value: torch.Tensor) -> None:
        self._puts += 1
        if self._puts == 2:
            self.first = Elapsed.now() - self.start

    def end(self) -> None:
        pass


class LlamaCppBackend(Backend):
    name = "llamacpp"

    def __init__(self, w: Workload, gguf: str | None):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise BenchError(
                "the llamacpp backend needs the package llama-cpp-python, which is not installed "
                "(pip install llama-cpp-python; it compiles llama.cpp from source)"
            ) from None
        path = gguf or _source_gguf(w.path)
        if path is None:
            raise BenchError(f"the llamacpp backend needs a GGUF file: pass --gguf (none recorded for {w.model})")
        self.gguf = path
        # The same thread count as torch's, for generation and for prompt processing alike.
        threads = torch.get_num_threads()
        self.llm = Llama(model_path=path, n_ctx=w.input_len + w.output_len, n_threads=threads,
                         n_threads_batch=threads, seed=w.seed, verbose=False)

    def _decode(self, prompt: list[int], output_len: int, on_token: Callable[[], None] | None = None) -> int:
        # generate() yields greedy tokens without stopping at EOS; the count bounds it.
        self.llm.reset()
        count = 0
        for _ in self.llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, reset=True):
            count += 1
            if on_token is not None and count == 1:
                on_token()
            if count == output_len:
                break
        return count

    def generate(self, prompts: list[list[int]], output_len: int, batch_size: int | None = None) -> int:
        # llama-cpp-python's high-level API decodes one sequence at a time.
        return sum(self._decode(p, output_len) for p in prompts)

    def first_token_then_rest(self, prompt: list[int], output_len: int) -> tuple[Elapsed, Elapsed]:
        marks: list[Elapsed] = []
        start = Elapsed.now()
        self._decode(prompt, output_len, on_token=lambda: marks.append(Elapsed.now() - start))
        return marks[0], Elapsed.now() - start


def _source_gguf(model_dir: str) -> str | None:
    """The GGUF a zoo model was converted from, as its provenance records it."""
    provenance = Path(model_dir) / "litmus_provenance.json"
    if not provenance.is_file():
        return None
    source = json.loads(provenance.read_text()).get("source", {})
    file = source.get("file") if isinstance(source, dict) else None
    return file if isinstance(file, str) and file.endswith(".gguf") and Path(file).is_file() else None


def make_backend(name: str, w: Workload, gguf: str | None = None) -> Backend:
    if name == "engine":
        return EngineBackend(w)
    if name == "engine-transformers":
        return EngineBackend(w, model_impl="transformers")
    if name == "hf":
        return HfBackend(w)
    if name == "llamacpp":
        return LlamaCppBackend(w, gguf)
    raise BenchError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")


# ---------------------------------------------------------------- measurements


def make_prompts(w: Workload, count: int | None = None) -> list[list[int]]:
    """Seeded random prompts of input_len ordinary (non-special) token ids."""
    from transformers import AutoConfig, AutoTokenizer

    vocab = AutoConfig.from_pretrained(w.path).vocab_size
    try:
        special = set(AutoTokenizer.from_pretrained(w.path).all_special_ids)
    except (OSError, ValueError):
        special = set()
    allowed = torch.tensor([t for t in range(vocab) if t not in special])
    gen = torch.Generator().manual_seed(w.seed)
    picks = torch.randint(0, len(allowed), (count or w.num_prompts, w.input_len), generator=gen)
    return allowed[picks].tolist()


def matmul_peaks_gflops(dtype: torch.dtype, sizes: tuple[int, ...] = (512, 1024),
                        seconds: float = 0.3) -> dict[str, float]:
    """The best FLOP rate of square matmuls through torch's matmul and through the engine's own
    linear layer (a packed weight: kernels/cpu's GEMM for float32, oneDNN for bfloat16), each size
    tried for about `seconds`. The roofline's ceiling is the larger. Each multiply is short (a
    few ms) so that some run within one scheduler time slice even on a busy machine: the best of
    them is what the cores can do."""
    from engine.layers.linear import pack_linears

    peaks: dict[str, float] = {}
    for size in sizes:
        x = torch.randn(size, size, dtype=dtype)
        linear = torch.nn.Linear(size, size, bias=False, dtype=dtype)
        candidates = {"torch": lambda: x @ linear.weight.T}
        if pack_linears(linear):
            candidates["engine"] = lambda: linear(x)
        with torch.inference_mode():
            for name, matmul in candidates.items():
                rate = 2 * size ** 3 / _best_seconds(matmul, seconds) / 1e9
                peaks[name] = max(peaks.get(name, 0.0), rate)
    return peaks


def _best_seconds(fn: Callable[[], Any], seconds: float) -> float:
    fn()  # the first call pays one-off setup
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_params(path: str) -> tuple[int, int]:
    """(body, head): weights every token multiplies through its layers, and the LM head's.

    Counted on a weightless (meta) copy of the Transformers model: every >= 2-D parameter
    except embedding tables (a lookup, not a matmul); the head counts even when tied.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    head = model.get_output_embeddings().weight
    body = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and id(p) not in embeddings and p is not head)
    return body, head.numel()


def workload_flops(w: Workload, body: int, head: int) -> float:
    # The body runs on every prompt token and every generated token but the last; the head on
    # each token that picks the next one (a prompt's last, and every generated one but the last,
    # plus the last prompt token's pick): output_len rows per prompt.
    return 2.0 * w.num_prompts * (body * (w.input_len + w.output_len - 1) + head * w.output_len)


@contextmanager
def peak_rss() -> Iterator[Callable[[], float]]:
    """Yields a reader of the process's peak RSS (MB) since entering.

    Linux resets the high-water mark when "5" is written to /proc/self/clear_refs; where that
    fails the reader returns the peak since the process started.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    yield _read_peak_rss_mb


def _read_peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_run(backend: Backend, prompts: list[list[int]], output_len: int, batch_size: int | None = None) -> Run:
    with peak_rss() as rss:
        start = Elapsed.now()
        tokens = backend.generate(prompts, output_len, batch_size)
        took = Elapsed.now() - start
        return Run(took.wall, took.cpu, tokens, rss(), batch_size, backend.step_stats())


# ---------------------------------------------------------------- throughput


@dataclass
class BackendResult:
    backend: str
    tok_s: float
    requests_s: float
    total_time_s: float
    cpu_time_s: float
    output_tokens: int
    roofline_pct: float
    peak_rss_mb: float
    runs: list[dict[str, Any]] = field(default_factory=list)
    batch_size: int | None = None
    batch_sizes_tried: dict[str, float] | None = None  # hf: batch size -> tok/s
    weights: str | None = None  # llamacpp: the GGUF file (its own quantization, whatever --dtype says)
    step_stats: dict[str, float] | None = None  # the median run's, see Run


def summarize(name: str, runs: list[Run], w: Workload, flops: float, peak_gflops: float,
              tried: dict[str, float] | None = None, weights: str | None = None) -> BackendResult:
    """A backend's median run (by time; of an even count, the faster middle one) at its chosen
    configuration."""
    mid = sorted(runs, key=lambda r: r.seconds)[(len(runs) - 1) // 2]
    return BackendResult(
        backend=name, tok_s=mid.output_tokens / mid.seconds, requests_s=w.num_prompts / mid.seconds,
        total_time_s=mid.seconds, cpu_time_s=mid.cpu_seconds, output_tokens=mid.output_tokens,
        roofline_pct=100.0 * flops / mid.seconds / (peak_gflops * 1e9),
        peak_rss_mb=max(r.peak_rss_mb for r in runs), runs=[asdict(r) for r in runs], batch_size=mid.batch_size,
        batch_sizes_tried=tried, weights=weights, step_stats=mid.step_stats,
    )


def hf_batch_sizes(requested: str | None, num_prompts: int) -> list[int]:
    sizes = _int_list(requested, "--hf-batch-sizes") if requested else list(DEFAULT_HF_BATCH_SIZES)
    return sorted({min(s, num_prompts) for s in sizes})


def run_throughput(w: Workload, backends: list[str], repeats: int = 1, hf_sizes: list[int] | None = None,
                   gguf: str | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    loaded = {name: _load_and_warm(name, w, gguf, log) for name in backends}
    prompts = make_prompts(w)
    body, head = matmul_params(w.path)
    flops = workload_flops(w, body, head)
    peaks = matmul_peaks_gflops(w.torch_dtype)
    runs: dict[str, list[Run]] = {name: [] for name in backends}
    tried: dict[str, float] | None = None
    best_hf = None
    for round_ in range(repeats):
        for name, backend in loaded.items():
            if name == "hf" and best_hf is None:
                search = [timed_run(backend, prompts, w.output_len, size) for size in hf_sizes or [w.num_prompts]]
                tried = {str(r.batch_size): r.output_tokens / r.seconds for r in search}
                best = max(search, key=lambda r: r.output_tokens / r.seconds)
                best_hf = best.batch_size
                run = best
            else:
                run = timed_run(backend, prompts, w.output_len, best_hf if name == "hf" else None)
            runs[name].append(run)
            log(f"[round {round_ + 1}/{repeats}] {name}: {run.output_tokens / run.seconds:.1f} tok/s"
                + (f" (batch size {run.batch_size})" if run.batch_size else ""))
        peaks = {name: max(rate, peaks.get(name, 0.0)) for name, rate in matmul_peaks_gflops(w.torch_dtype).items()}
    peak = max(peaks.values())
    results = {name: summarize(name, runs[name], w, flops, peak, tried if name == "hf" else None,
                               getattr(loaded[name], "gguf", None)) for name in backends}
    first = backends[0]
    return {
        **_header("throughput", w),
        "matmul_peak_gflops": peak,
        "matmul_peaks_gflops": peaks,
        "matmul_params": {"body": body, "head": head},
        "workload_gflop": flops / 1e9,
        # The fastest this workload could run at the measured matmul peak.
        "roofline_tok_s": w.num_prompts * w.output_len * peak * 1e9 / flops,
        "results": {name: asdict(r) for name, r in results.items()},
        "ratios": {f"{first}/{other}": results[first].tok_s / results[other].tok_s for other in backends[1:]},
    }


def _load_and_warm(name: str, w: Workload, gguf: str | None, log: Callable[[str], None]) -> Backend:
    start = time.perf_counter()
    backend = make_backend(name, w, gguf)
    # Warm-up, not timed: first-call allocations, lazy inits, compiled-kernel caches. A compiled
    # engine captures one graph for a single sequence and one for any larger batch: both run here.
    for count in (2, 1):
        backend.generate(make_prompts(w, count=count), min(w.output_len, 4))
    log(f"{name}: loaded and warmed up in {time.perf_counter() - start:.1f}s")
    return backend


# ---------------------------------------------------------------- latency


def run_latency(w: Workload, backends: list[str], repeats: int = 3, gguf: str | None = None,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    prompt = make_prompts(w, count=1)[0]
    loaded = {name: _load_and_warm(name, w, gguf, log) for name in backends}
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in backends}
    for round_ in range(repeats):
        for name, backend in loaded.items():
            with peak_rss() as rss:
                first, total = backend.first_token_then_rest(prompt, w.output_len)
                sample = {"ttft_ms": first.wall * 1e3, "ms_per_output_token": _ms_per_token(first.wall, total.wall, w),
                          "cpu_ms_per_output_token": _ms_per_token(first.cpu, total.cpu, w),
                          "total_time_s": total.wall, "peak_rss_mb": rss()}
                stats = backend.step_stats()
                if stats is not None:
                    sample.update(step_ms=stats["step_ms"], step_overhead_ms=stats["overhead_ms"])
            samples[name].append(sample)
            log(f"[round {round_ + 1}/{repeats}] {name}: first token {sample['ttft_ms']:.1f} ms, "
                f"{sample['ms_per_output_token']:.1f} ms per output token")
    results = {}
    for name, rows in samples.items():
        median = {key: statistics.median(r[key] for r in rows) for key in rows[0] if key != "peak_rss_mb"}
        per_token = median["ms_per_output_token"]
        results[name] = {"backend": name, **median, "decode_tok_s": 1e3 / per_token,
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in rows), "runs": rows,
                         "weights": getattr(loaded[name], "gguf", None)}
    first_name = backends[0]
    return {
        **_header("latency", w),
        "results": results,
        # Above 1: the first backend needs fewer ms per output token than the other.
        "ratios": {f"{first_name}/{other}": results[other]["ms_per_output_token"] /
                   results[first_name]["ms_per_output_token"] for other in backends[1:]},
    }


def _ms_per_token(first: float, total: float, w: Workload) -> float:
    """Decode time per token after the first."""
    return (total - first) * 1e3 / (w.output_len - 1)


# ---------------------------------------------------------------- reporting and CLI


def _header(kind: str, w: Workload) -> dict[str, Any]:
    from harness.results import environment

    return {
        "kind": kind, "model": w.model, "dtype": w.dtype, "num_prompts": w.num_prompts, "input_len": w.input_len,
        "output_len": w.output_len, "seed": w.seed, "enforce_eager": w.enforce_eager,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **environment(),
    }


def format_report(report: dict[str, Any]) -> str:
    if report["kind"] == "throughput":
        peaks = ", ".join(f"{name} {rate:.0f}" for name, rate in report["matmul_peaks_gflops"].items())
        lines = [f"throughput: {report['model']} {report['dtype']}, {report['num_prompts']} prompts x "
                 f"{report['input_len']} in / {report['output_len']} out, {report['threads']} threads"
                 f"{_compiled(report)}; matmul peak {report['matmul_peak_gflops']:.0f} GFLOP/s ({peaks}) -> "
                 f"roofline {report['roofline_tok_s']:.0f} tok/s"]
        for r in report["results"].values():
            extra = f"  batch size {r['batch_size']}" if r["batch_size"] else ""
            extra += f"  weights {Path(r['weights']).name}" if r["weights"] else ""
            lines.append(f"  {r['backend']:9s} {r['tok_s']:9.1f} tok/s {r['requests_s']:7.2f} req/s "
                         f"{r['total_time_s']:8.2f} s (cpu {r['cpu_time_s']:.2f} s)  "
                         f"roofline {r['roofline_pct']:5.1f}%  peak RSS {r['peak_rss_mb']:.0f} MB{extra}")
            if r["step_stats"]:
                lines.append(_format_step_stats(r["step_stats"]))
    else:
        lines = [f"latency: {report['model']} {report['dtype']}, batch 1, {report['input_len']} in / "
                 f"{report['output_len']} out, {report['threads']} threads{_compiled(report)}"]
        for r in report["results"].values():
            extra = f"  weights {Path(r['weights']).name}" if r["weights"] else ""
            lines.append(f"  {r['backend']:9s} first token {r['ttft_ms']:8.1f} ms  {r['ms_per_output_token']:7.2f} "
                         f"ms/token (cpu {r['cpu_ms_per_output_token']:.2f})  "
                         f"peak RSS {r['peak_rss_mb']:.0f} MB{extra}")
            if "step_overhead_ms" in r:
                lines.append(f"{'':12s}per step {r['step_ms']:.2f} ms, of it {r['step_overhead_ms']:.2f} ms outside "
                             f"the model (scheduler, inputs, sampling, outputs)")
    for pair, ratio in report["ratios"].items():
        what = "tok/s" if report["kind"] == "throughput" else "decode speed (ms per token, inverted)"
        lines.append(f"ratio {pair} ({what}): {ratio:.2f}x")
    return "\n".join(lines)


def _compiled(report: dict[str, Any]) -> str:
    return "" if report.get("enforce_eager", True) else ", engine decode steps compiled"


def _format_step_stats(stats: dict[str, float]) -> str:
    from engine.stats import PHASES

    phases = ", ".join(f"{name} {stats[f'{name}_ms']:.2f}" for name in PHASES)
    return (f"{'':12s}{stats['steps']} steps, {stats['step_ms']:.1f} ms each: {phases} ms; outside the model "
            f"{stats['overhead_ms']:.2f} ms ({stats['overhead_pct']:.1f}%)")


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise BenchError(f"{option} {text!r}: expected comma-separated integers") from None
    if not values or any(v < 1 for v in values):
        raise BenchError(f"{option} {text!r}: expected integers >= 1")
    return values


def _backends(args: argparse.Namespace) -> list[str]:
    names = [n.strip() for n in args.compare.split(",")] if args.compare else [args.backend]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise BenchError(f"unknown backend {unknown[0]!r}; choose from {', '.join(BACKENDS)}")
    if len(set(names)) != len(names) or not names:
        raise BenchError(f"--compare {args.compare!r}: name each backend once")
    return names


def _run(args: argparse.Namespace) -> int:
    from harness.cli import CommandError
    from harness.zoo import resolve

    try:
        for option in ("num_prompts", "input_len", "output_len", "repeats"):
            if getattr(args, option) < 1:
                raise BenchError(f"--{option.replace('_', '-')} must be >= 1")
        if args.threads is not None:
            if args.threads < 1:
                raise BenchError("--threads must be >= 1")
            torch.set_num_threads(args.threads)
        if args.kind == "latency" and args.output_len < 2:
            raise BenchError("--output-len must be >= 2 for latency: ms per output token is timed after the first")
        backends = _backends(args)
        w = Workload(args.model, resolve(args.model), args.dtype, args.num_prompts, args.input_len,
                     args.output_len, args.seed, args.enforce_eager)
        if args.kind == "throughput":
            report = run_throughput(w, backends, args.repeats, hf_batch_sizes(args.hf_batch_sizes, w.num_prompts),
                                    args.gguf)
        else:
            report = run_latency(w, backends, args.repeats, args.gguf)
    except (BenchError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    print(format_report(report))
    output = Path(args.output or f"bench-{args.kind}.json")
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")
    return 0


def register_bench_cli(commands) -> None:
    bench = commands.add_parser("bench", help="throughput and latency of the engine against Transformers / llama.cpp")
    kinds = bench.add_subparsers(title="benchmarks", metavar="KIND", required=True)
    for kind, help_text, repeats, num_prompts in (
        ("throughput", "offline batch: every prompt at once, tokens per second", 1, 64),
        ("latency", "one request alone: time to first token and ms per output token", 3, 1),
    ):
        p = kinds.add_parser(kind, help=help_text)
        p.add_argument("--model", required=True, help="zoo name, HF directory or cached hub id")
        p.add_argument("--backend", default="engine", help=f"one of {', '.join(BACKENDS)} (default: engine)")
        p.add_argument("--compare", help="comma-separated backends run interleaved in this process, e.g. engine,hf")
        p.add_argument("--dtype", choices=DTYPES, default="float32")
        if kind == "throughput":
            p.add_argument("--num-prompts", type=int, default=num_prompts)
            p.add_argument("--hf-batch-sizes", help="batch sizes tried for hf, the fastest reported "
                           f"(default: {','.join(map(str, DEFAULT_HF_BATCH_SIZES))})")
        else:
            p.set_defaults(num_prompts=num_prompts)
        p.add_argument("--input-len", type=int, default=32)
        p.add_argument("--output-len", type=int, default=128)
        p.add_argument("--repeats", type=int, default=repeats, help=f"timed rounds per backend (default: {repeats})")
        p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
        p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
        p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                       help="--no-enforce-eager: the engine runs decode steps as the graph torch.compile "
                       "captures during the untimed warm-up (default: eager)")
        p.add_argument("--gguf", help="llamacpp: the GGUF file (default: the one a zoo model was built from)")
        p.add_argument("--output", help=f"JSON report path (default: bench-{kind}.json)")
        p.set_defaults(run=_run, kind=kind)
