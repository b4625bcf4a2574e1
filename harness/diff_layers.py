"""Where does the engine part from Transformers? Both run one prompt with forward hooks, and the
outputs are compared site by site in the order Transformers computes them:

- `embed`: the hidden state entering the first decoder layer (embeddings after any scaling);
- `layers.<i>.<child>`: the output of each child both decoder layers have under the same name
  (norms, `self_attn`, `mlp`, ...): attention and MLP outputs before the residual add;
- `layers.<i>`: the residual stream after layer i;
- `final_norm`, then `logits` (after any soft cap or scaling the model applies).

The engine flattens a batch to [tokens, hidden] and its decoder layers return the pending
(branch output, residual) pair, whose sum is the stream Transformers' layer returns as
[batch, seq, hidden]; the engine's logits come from its own compute_logits on the final hidden
state. A site diverges when its max abs error exceeds `tolerance` times the reference's largest
magnitude there; the first diverging site is where to look for the bug. Only the prompt's
forward pass (the prefill) is compared: a bug that shows only while decoding is not localised.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Float32 engine vs Transformers differs by at most 6.4e-6 of a site's largest magnitude (SmolLM2-135M,
# 30 layers, over the nine example prompts; the tiny zoo models stay below 2e-6). 2e-5 sits 3x above
# that and 2.5x below the smallest effect a planted fault has on its own site (a norm epsilon 10x
# too large moves a unit-scale RMSNorm's output by 5e-5).
DEFAULT_TOLERANCE = 2e-5
FINAL_NORMS = ("norm", "final_layernorm", "ln_f", "final_layer_norm")


@dataclass
class SiteDiff:
    site: str
    max_abs: float  # NaN when the two sides' tensors differ in shape
    ref_max: float  # the reference's largest magnitude at this site
    shape: tuple[int, ...]

    @property
    def rel(self) -> float:
        return self.max_abs / self.ref_max if self.ref_max > 0 else (0.0 if self.max_abs == 0 else math.inf)


@dataclass
class LayerDiff:
    model: str
    prompt: str
    num_tokens: int
    tolerance: float
    fault: str | None = None
    sites: list[SiteDiff] = field(default_factory=list)
    # Sites one side produced and the other did not (no like-named module), or of unlike shapes.
    unmatched: list[str] = field(default_factory=list)

    def diverged(self, site: SiteDiff) -> bool:
        return not math.isnan(site.max_abs) and site.rel > self.tolerance

    @property
    def first_divergence(self) -> SiteDiff | None:
        return next((s for s in self.sites if self.diverged(s)), None)

    def table(self) -> str:
        first = self.first_divergence
        lines = [
            f"diff-layers: {self.model}" + (f" with fault {self.fault}" if self.fault else "")
            + f", {self.num_tokens} prompt tokens, tolerance {self.tolerance:g} (max abs / reference max)",
            "",
            "| site | max abs error | reference max | relative | diverged |",
            "|---|---:|---:|---:|---|",
        ]
        for s in self.sites:
            mark = "**first**" if s is first else ("yes" if self.diverged(s) else "")
            lines.append(f"| {s.site} | {s.max_abs:.3g} | {s.ref_max:.3g} | {s.rel:.3g} | {mark} |")
        lines += ["", f"first diverging module: {first.site if first else 'none'}"]
        if self.unmatched:
            lines.append(f"not compared (no counterpart or unlike shapes): {', '.join(self.unmatched)}")
        return "\n".join(lines)

    def plot(self, path: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rel = [max(s.rel, 1e-12) if not math.isnan(s.max_abs) else float("nan") for s in self.sites]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(rel)), 4.0))
        ax.semilogy(range(len(rel)), rel, marker="o")
        ax.axhline(self.tolerance, color="red", linestyle="--", label=f"tolerance {self.tolerance:g}")
        first = self.first_divergence
        if first is not None:
            ax.axvline(self.sites.index(first), color="orange", label=f"first divergence: {first.site}")
        ax.set_xticks(range(len(rel)), [s.site for s in self.sites], rotation=90, fontsize=7)
        ax.set_ylabel("max abs error / reference max")
        ax.set_title(f"{self.model}" + (f" + {self.fault}" if self.fault else "") + ": engine vs Transformers")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


# --- capturing each side -------------------------------------------------------------------

def _decoder_layers(model: nn.Module, num_layers: int) -> tuple[nn.Module, nn.ModuleList]:
    """(the module holding the decoder layers, the layers): the first ModuleList of num_layers entries."""
    for parent in model.modules():
        for child in parent.children():
            if isinstance(child, nn.ModuleList) and len(child) == num_layers:
                return parent, child
    raise ValueError(f"{type(model).__name__} has no list of {num_layers} decoder layers")


def _first_float(args: tuple, kwargs: dict) -> torch.Tensor:
    """A decoder layer's hidden-state input: Transformers' `hidden_states`, else the engine's first
    floating-point argument (its layers take positions first)."""
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    return next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point())


def _main_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _stream(out: Any) -> torch.Tensor:
    """An engine decoder layer's output as the residual stream: branch output + pending residual."""
    if isinstance(out, (tuple, list)):
        return sum(t for t in out if isinstance(t, torch.Tensor))
    return out


class _Recorder:
    """Site -> tensors, in the order the sites first fire."""

    def __init__(self) -> None:
        self.calls: dict[str, list[torch.Tensor]] = {}

    def add(self, site: str, tensor: torch.Tensor) -> None:
        rows = tensor.detach().float()
        # Transformers' [1, seq, hidden] and the engine's [tokens, hidden] become [tokens, ...].
        self.calls.setdefault(site, []).append((rows[0] if rows.dim() == 3 else rows).clone())

    def sites(self) -> dict[str, torch.Tensor]:
        # Prefill chunks of one prompt come in order: their rows stack to the whole prompt.
        return {site: torch.cat(parts) for site, parts in self.calls.items()}


@contextmanager
def _hooked(model: nn.Module, num_layers: int, recorder: _Recorder, engine: bool) -> Iterator[nn.Module]:
    """Hooks on the embed / layer children / layer / final norm sites; yields the decoder layers' parent."""
    parent, layers = _decoder_layers(model, num_layers)
    layer_output = _stream if engine else _main_output
    with ExitStack() as stack:
        def hook(module: nn.Module, fn: Callable, **kwargs: Any) -> None:
            stack.callback(module.register_forward_hook(fn, **kwargs).remove)

        pre = layers[0].register_forward_pre_hook(
            lambda m, args, kwargs: recorder.add("embed", _first_float(args, kwargs)), with_kwargs=True)
        stack.callback(pre.remove)
        for i, layer in enumerate(layers):
            for name, child in layer.named_children():
                hook(child, lambda m, a, out, site=f"layers.{i}.{name}": _add_tensor(recorder, site, out))
            hook(layer, lambda m, a, out, site=f"layers.{i}": recorder.add(site, layer_output(out)))
        for name, child in parent.named_children():
            if name in FINAL_NORMS:
                hook(child, lambda m, a, out: recorder.add("final_norm", _main_output(out)))
        yield parent


def _add_tensor(recorder: _Recorder, site: str, out: Any) -> None:
    tensor = _main_output(out)
    if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
        recorder.add(site, tensor)


@torch.inference_mode()
def reference_sites(hf_model: nn.Module, input_ids: list[int]) -> dict[str, torch.Tensor]:
    """Every site's output in a Transformers forward pass over one prompt."""
    recorder = _Recorder()
    with _hooked(hf_model, hf_model.config.num_hidden_layers, recorder, engine=False):
        ids = torch.tensor([input_ids])
        logits = hf_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    recorder.add("logits", logits)
    return recorder.sites()


def engine_sites(llm: Any, input_ids: list[int]) -> dict[str, torch.Tensor]:
    """Every site's output in the engine's prefill of one prompt (through LLM.generate)."""
    from engine import SamplingParams

    recorder = _Recorder()
    hidden: list[torch.Tensor] = []
    num_layers = llm.llm_engine.config.hf_config.num_hidden_layers
    with ExitStack() as stack:
        def attach(model: nn.Module) -> None:
            stack.enter_context(_hooked(model, num_layers, recorder, engine=True))
            stack.callback(model.register_forward_hook(lambda m, a, out: hidden.append(out.detach().clone())).remove)

        llm.apply_model(attach)
        # One token to generate: the request ends with its prefill, so every hook call is the prompt's.
        llm.generate([{"prompt_token_ids": list(input_ids)}], SamplingParams(temperature=0.0, max_tokens=1),
                     use_tqdm=False)
    with torch.inference_mode():
        logits = llm.apply_model(lambda model: model.compute_logits(torch.cat(hidden)))[0]
    recorder.add("logits", logits)
    return recorder.sites()


def compare_sites(reference: dict[str, torch.Tensor], engine: dict[str, torch.Tensor], model: str, prompt: str,
                  tolerance: float = DEFAULT_TOLERANCE, fault: str | None = None) -> LayerDiff:
    """The sites both sides produced, in the reference's order, with their errors."""
    diff = LayerDiff(model, prompt, next(iter(reference.values())).shape[0], tolerance, fault)
    for site, ref in reference.items():
        if site not in engine:
            diff.unmatched.append(site)
            continue
        got = engine[site]
        if got.shape != ref.shape:
            diff.unmatched.append(f"{site} (shapes {tuple(ref.shape)} vs {tuple(got.shape)})")
            continue
        err = (got - ref).abs().max().item()
        diff.sites.append(SiteDiff(site, math.inf if math.isnan(err) else err, ref.abs().max().item(),
                                   tuple(ref.shape)))
    diff.unmatched += [site for site in engine if site not in reference]
    return diff


def diff_layers(model: str, prompt: str, fault: str | None = None,
                tolerance: float = DEFAULT_TOLERANCE) -> LayerDiff:
    """Loads `model` (zoo name or path) in Transformers and in the engine, optionally plants a fault
    (harness.faults) in the engine, and compares one prompt's forward pass site by site."""
    from harness import zoo
    from harness.faults import get_fault, inject
    from harness.runners import EngineRunner, HfRunner

    path = zoo.resolve(model)
    planted = get_fault(fault) if fault else None
    with EngineRunner(path) as engine:
        ids = engine.tokenizer(prompt).input_ids
        with HfRunner(path) as hf:
            reference = reference_sites(hf.model, ids)
        with inject(engine.llm, planted) if planted else nullcontext():
            got = engine_sites(engine.llm, ids)
    return compare_sites(reference, got, model, prompt, tolerance, fault)


@functools.cache
def first_divergence(model_path: str, prompt: str) -> str:
    """The first site where the engine's forward pass over `prompt` leaves Transformers' tolerance
    ("none" when every site agrees): what a strict failure names as its first diverging module.
    Cached: the strict suite asks once per failing test, about the same prompts."""
    first = diff_layers(model_path, prompt).first_divergence
    return first.site if first else "none"


def explain_failure(failure: AssertionError, model_path: str, prompts: Sequence[str]) -> str:
    """first_divergence on the first prompt a failed comparison (harness.compare.ComparisonError)
    names; never raises, since it only annotates a failure already decided."""
    comparison = getattr(failure, "comparison", None)
    failed = [p.prompt_index for p in getattr(comparison, "prompts", []) if p.problems]
    prompt = prompts[failed[0]] if failed else max(prompts, key=len)
    try:
        return first_divergence(str(model_path), prompt)
    except Exception as exc:  # the localiser failing must not hide the verdict it annotates
        return f"unknown (diff-layers failed: {type(exc).__name__}: {exc})"


def register_diff_layers_cli(commands) -> None:
    from harness.faults import CATALOGUE
    from harness.plugin import EXAMPLE_PROMPTS

    parser = commands.add_parser(
        "diff-layers", help="run Transformers and the engine side by side on one prompt and name the first "
        "layer/module whose output differs beyond tolerance")
    parser.add_argument("--model", required=True, help="zoo name, local HF directory or cached hub id")
    # The longest example prompt: past a 32-token sliding window, so window bugs show too.
    parser.add_argument("--prompt", default=max(EXAMPLE_PROMPTS, key=len), help="prompt (default: a long one)")
    parser.add_argument("--fault", choices=sorted(CATALOGUE), help="plant this fault in the engine first")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="relative tolerance: max abs error over the reference's largest magnitude")
    parser.add_argument("--plot", type=Path, help="PNG to write (default .litmus/diff-layers/<model>[+fault].png)")
    parser.set_defaults(run=_run_cli)


def _run_cli(args) -> int:
    from harness.cli import CommandError
    from harness.faults import FaultNotApplicable

    try:
        diff = diff_layers(args.model, args.prompt, args.fault, args.tolerance)
    except FaultNotApplicable as exc:
        raise CommandError(str(exc)) from None
    print(diff.table())
    name = Path(args.model).name + (f"+{args.fault}" if args.fault else "")
    print(f"plot: {diff.plot(args.plot or Path('.litmus/diff-layers') / f'{name}.png')}")
    return 0
