"""Planted model bugs: the fault-injection hook and its catalogue (for `litmus selftest` and
`litmus diff-layers`).

The hook is `inject(llm, fault)`, a context manager around an engine `LLM` that is already
loaded. Inside it the engine runs the model with the bug a port could have; on exit every
parameter, buffer, attribute and kernel entry point is what it was (bit for bit), so one loaded
engine serves a control run and every fault in turn. Nothing is edited on disk and no engine
code changes: a fault either edits the loaded module through `LLM.apply_model` (a parameter's
values, a buffer, a module attribute, a forward hook), or wraps a `litmus_kernels.ops` function (the one
dispatch point every attention layer calls) for the duration of the context. A wrapped kernel is
process-wide: only engine code calls litmus_kernels.ops, so a Transformers reference in the same process
is untouched, but two engines must not be faulted at once.

Each fault says which engine modules it planted into (`inject` yields their names); the earliest
of them, as a diff-layers site (`site_of`), is where `litmus diff-layers` must see the outputs
part first. A fault that finds nothing to plant into (no bias to drop, no sliding window to
ignore) raises FaultNotApplicable, naming what the model lacks.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import litmus_kernels.ops
from engine.layers.activation import GatedActivation
from engine.layers.attention import Attention
from engine.layers.moe import FusedMoE
from engine.layers.norm import GemmaRMSNorm, LayerNorm, RMSNorm
from engine.layers.rotary import RotaryEmbedding, rope_inv_freq
from harness.diff_layers import FINAL_NORMS


class FaultNotApplicable(Exception):
    """The model has nothing this fault can be planted into."""


class Patch:
    """Changes to a live model and the kernels, each undone in reverse order by `undo()`."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def set(self, obj: Any, name: str, value: Any) -> None:
        old = getattr(obj, name)
        setattr(obj, name, value)
        self._undo.append(lambda: setattr(obj, name, old))

    @torch.no_grad()
    def edit(self, tensor: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Overwrites a tensor's values in place (ties to it stay intact); undo copies them back."""
        saved = tensor.detach().clone()
        tensor.copy_(fn(tensor.detach()))
        self._undo.append(lambda: _copy_back(tensor, saved))

    def hook(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        self._undo.append(handle.remove)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


@torch.no_grad()
def _copy_back(tensor: torch.Tensor, saved: torch.Tensor) -> None:
    tensor.copy_(saved)


# A fault's plant function: changes the model through the Patch, returns the engine module names it
# planted into (empty when nothing applied).
Plant = Callable[[nn.Module, Patch], list[str]]


@dataclass(frozen=True)
class Fault:
    name: str
    description: str  # the bug, as a port would have it
    needs: str  # what a model must have for the fault to apply
    plant: Plant


@contextlib.contextmanager
def inject(llm: Any, fault: Fault) -> Iterator[list[str]]:
    """Plants `fault` in the engine LLM's model for the duration of the context; yields the names
    of the engine modules planted into. Raises FaultNotApplicable (planting nothing) when the
    model has none of what the fault needs."""
    patch = Patch()
    try:
        planted = llm.apply_model(lambda model: fault.plant(model, patch))[0]
        if not planted:
            raise FaultNotApplicable(f"fault {fault.name} does not apply: the model has no {fault.needs}")
        yield planted
    finally:
        patch.undo()


def planted_modules(llm: Any, fault: Fault) -> list[str]:
    """The modules `fault` would plant into (empty when it does not apply); the model is left as it was."""
    patch = Patch()
    try:
        return llm.apply_model(lambda model: fault.plant(model, patch))[0]
    finally:
        patch.undo()


_LAYER = re.compile(r"(?:^|\.)(layers|h|blocks|layer)\.(\d+)\.(\w+)")


def site_of(module_name: str) -> str:
    """The diff-layers site whose output a planted module first changes: `layers.<i>.<child>` for
    anything inside decoder layer i, `embed` for the token embedding, `final_norm` for the norm
    after the last layer, `logits` for the LM head or the top-level model."""
    match = _LAYER.search(module_name)
    if match:
        return f"layers.{match.group(2)}.{match.group(3)}"
    last = module_name.rsplit(".", 1)[-1]
    if last in ("embed_tokens", "wte", "word_embeddings", "embed_in"):
        return "embed"
    if last in FINAL_NORMS:
        return "final_norm"
    return "logits"


# --- the catalogue -------------------------------------------------------------------------

def _named(model: nn.Module, kind: type | tuple[type, ...]) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, kind)]


def _wrong_theta(theta: float) -> float:
    # The Llama-2 default a port falls back on when it ignores the config; x100 where that is the config's.
    return 10000.0 if theta != 10000.0 else 1e6


def _rope_theta(model: nn.Module, patch: Patch) -> list[str]:
    params = getattr(model.config, "rope_parameters", None) or {}
    if "rope_theta" not in params:
        return []  # no rope, or one rope_parameters dict per layer type
    wrong = {**params, "rope_theta": _wrong_theta(float(params["rope_theta"]))}
    planted = []
    for name, rope in _named(model, RotaryEmbedding):
        max_position = rope.cos.shape[0]
        inv_freq, scale = rope_inv_freq(rope.rotary_dim, wrong, max_position)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        patch.set(rope, "cos", (freqs.cos() * scale).to(rope.cos))
        patch.set(rope, "sin", (freqs.sin() * scale).to(rope.sin))
        planted.append(name)
    return planted


def _rotary_style(model: nn.Module, patch: Patch) -> list[str]:
    planted = []
    for name, rope in _named(model, RotaryEmbedding):
        patch.set(rope, "is_neox_style", not rope.is_neox_style)
        planted.append(name)
    return planted


def _attention_modules(model: nn.Module) -> list[str]:
    return [name for name, _ in _named(model, Attention)]


def _kv_slot_off_by_one(model: nn.Module, patch: Patch) -> list[str]:
    planted = _attention_modules(model)
    if planted:
        write = litmus_kernels.ops.write_kv_cache

        def write_one_slot_late(k, v, k_cache, v_cache, slot_mapping):
            num_slots = k_cache.shape[0] * k_cache.shape[1]
            write(k, v, k_cache, v_cache, (slot_mapping + 1) % num_slots)

        patch.set(litmus_kernels.ops, "write_kv_cache", write_one_slot_late)
    return planted


def _interleaved_heads(op: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`op` with query head h reading KV head h % num_kv_heads instead of h // group: the
    repeat-vs-repeat_interleave mix-up. The op's own (correct) mapping is kept and the query heads
    are permuted around it."""

    def attention(q, k_cache, *args, **kwargs):
        num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
        group = num_heads // num_kv_heads
        # The op's head j reads KV head j // group; it stands for our head (j % group) * Hkv + j // group,
        # whose h % Hkv is that same KV head.
        perm = torch.tensor([(j % group) * num_kv_heads + j // group for j in range(num_heads)], device=q.device)
        if kwargs.get("alibi_slopes") is not None:
            kwargs["alibi_slopes"] = kwargs["alibi_slopes"][perm]
        return op(q[:, perm], k_cache, *args, **kwargs)[:, torch.argsort(perm)]

    return attention


def _gqa_head_mapping(model: nn.Module, patch: Patch) -> list[str]:
    # With one KV head (MQA) or one query head per KV head (MHA) every mapping is the same one.
    planted = [name for name, attn in _named(model, Attention) if 1 < attn.num_kv_heads < attn.num_heads]
    if planted:
        patch.set(litmus_kernels.ops, "prefill_attention", _interleaved_heads(litmus_kernels.ops.prefill_attention))
        patch.set(litmus_kernels.ops, "decode_attention", _interleaved_heads(litmus_kernels.ops.decode_attention))
    return planted


def _bias_dropped(model: nn.Module, patch: Patch) -> list[str]:
    planted = []
    for name, linear in _named(model, nn.Linear):
        if linear.bias is not None and _LAYER.search(name):
            patch.edit(linear.bias, torch.zeros_like)
            planted.append(name)
    return planted


def _norm_eps(model: nn.Module, patch: Patch) -> list[str]:
    planted = []
    for name, norm in _named(model, (RMSNorm, LayerNorm)):
        patch.set(norm, "eps", norm.eps * 10)
        planted.append(name)
    return planted


def _rmsnorm_offset(model: nn.Module, patch: Patch) -> list[str]:
    """Gemma's convention on a plain RMSNorm (weight used as 1 + w), and the plain one on Gemma's (w)."""
    planted = []
    for name, norm in _named(model, RMSNorm):
        offset = -1.0 if isinstance(norm, GemmaRMSNorm) else 1.0
        patch.edit(norm.weight, lambda w, offset=offset: w + offset)
        planted.append(name)
    return planted


def _logit_softcap_dropped(model: nn.Module, patch: Patch) -> list[str]:
    if getattr(model, "final_soft_cap", None) is None:
        return []
    patch.set(model, "final_soft_cap", None)
    return [""]


def _attention_option_dropped(option: str) -> Plant:
    """Unsets an Attention option (soft cap, sliding window) wherever a layer has it."""

    def plant(model: nn.Module, patch: Patch) -> list[str]:
        planted = []
        for name, attn in _named(model, Attention):
            if getattr(attn, option) is not None:
                patch.set(attn, option, None)
                planted.append(name)
        return planted

    return plant


def _tied_embeddings_untied(model: nn.Module, patch: Patch) -> list[str]:
    """The LM head left at a fresh initialisation where the checkpoint ties it to the embeddings."""
    head = getattr(model, "lm_head", None)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    if not isinstance(head, nn.Linear) or id(head.weight) not in embeddings:
        return []
    tied = head.weight
    generator = torch.Generator().manual_seed(0)
    fresh = torch.randn(tied.shape, generator=generator) * tied.detach().float().std()
    patch.set(head, "weight", nn.Parameter(fresh.to(tied), requires_grad=False))
    return ["lm_head"]


# The swap a gelu-family activation suffers: exact erf GELU <-> its tanh approximation.
_GELU_SWAP = {"none": "tanh", "tanh": "none"}
# The same swap by the names GatedActivation's kernels go by.
_GATED_GELU_SWAP = {"gelu": "gelu_tanh", "gelu_tanh": "gelu"}


def _gelu_kind(fn: Callable[[torch.Tensor], torch.Tensor]) -> str | None:
    """Which GELU `fn` computes ("none" for erf, "tanh"), found by probing it; None for other activations."""
    x = torch.linspace(-4, 4, 101)
    with torch.no_grad():
        out = fn(x)
    # Within float32 rounding of torch's GELU (a C++ kernel's tanh/erf differ in the last bits);
    # the erf and tanh forms differ by up to ~5e-4 here.
    for kind in _GELU_SWAP:
        if torch.allclose(out, F.gelu(x, approximate=kind), rtol=1e-6, atol=1e-6):
            return kind
    return None


def _activation_swapped(model: nn.Module, patch: Patch) -> list[str]:
    planted = []
    for name, module in model.named_modules():
        if isinstance(module, GatedActivation):
            if module.kernel in _GATED_GELU_SWAP:
                patch.set(module, "kernel", _GATED_GELU_SWAP[module.kernel])
                planted.append(name)
        elif callable(getattr(module, "act", None)) and not isinstance(module.act, nn.Module):
            kind = _gelu_kind(module.act)
            if kind is not None:
                patch.set(module, "act", lambda x, swapped=_GELU_SWAP[kind]: F.gelu(x, approximate=swapped))
                planted.append(f"{name}.act")
    return planted


def _embedding_scale(model: nn.Module) -> float:
    """The factor the model multiplies its input embeddings by (1.0 for none)."""
    from engine.models.gemma import GemmaModel

    for module in model.modules():
        if isinstance(module, GemmaModel):
            return module.hidden_size ** 0.5
        multiplier = getattr(module, "embedding_multiplier", None)
        if isinstance(multiplier, float) and multiplier != 1.0:
            return multiplier
    return 1.0


def _embedding_scale_dropped(model: nn.Module, patch: Patch) -> list[str]:
    scale = _embedding_scale(model)
    if scale == 1.0:
        return []
    name, embedding = _named(model, nn.Embedding)[0]
    # The model's own multiplication stays; dividing its input by the same factor first cancels it.
    patch.hook(embedding.register_forward_hook(lambda module, args, out: out / scale))
    return [name]


def _expert_top_k(model: nn.Module, patch: Patch) -> list[str]:
    """Each mixture-of-experts layer routes a token to top_k - 1 experts (top_k + 1 where top_k is 1)."""
    planted = []
    for name, moe in _named(model, FusedMoE):
        patch.set(moe, "top_k", moe.top_k - 1 if moe.top_k > 1 else moe.top_k + 1)
        planted.append(name)
    return planted


CATALOGUE: dict[str, Fault] = {fault.name: fault for fault in (
    Fault("rope_theta", "rope base ignored from the config: 10000 used (1e6 where the config says 10000)",
          "rotary embedding with a single rope_theta", _rope_theta),
    Fault("rotary_style", "rotary style swapped: neox (halves) where the model rotates gpt-j pairs, or the reverse",
          "rotary embedding", _rotary_style),
    Fault("kv_slot_off_by_one", "each token's K/V written one cache slot late (slot_mapping + 1)",
          "attention layer", _kv_slot_off_by_one),
    Fault("gqa_head_mapping", "query head h reads KV head h % num_kv_heads instead of h // group",
          "grouped-query attention (1 < KV heads < query heads)", _gqa_head_mapping),
    Fault("bias_dropped", "attention / MLP biases not loaded (left at zero)", "bias in a decoder layer",
          _bias_dropped),
    Fault("norm_eps", "norm epsilon 10x the config's (e.g. a default of 1e-5 for a checkpoint saying 1e-6)",
          "RMSNorm or LayerNorm", _norm_eps),
    Fault("rmsnorm_offset", "RMSNorm weight convention swapped: (1 + w) on a plain RMSNorm, w on Gemma's",
          "RMSNorm", _rmsnorm_offset),
    Fault("logit_softcap_dropped", "final logit soft cap not applied", "final logit soft cap",
          _logit_softcap_dropped),
    Fault("attn_softcap_dropped", "attention score soft cap not applied", "attention soft cap",
          _attention_option_dropped("logits_soft_cap")),
    Fault("sliding_window_ignored", "sliding-window layers attend to the whole context", "sliding-window layer",
          _attention_option_dropped("sliding_window")),
    Fault("tied_embeddings_untied", "LM head left at a fresh initialisation instead of tied to the embeddings",
          "LM head tied to the embeddings", _tied_embeddings_untied),
    Fault("activation_swapped", "GELU swapped with its tanh approximation (or the reverse)", "GELU activation",
          _activation_swapped),
    Fault("embedding_scale_dropped", "input embeddings not multiplied by the model's factor (Gemma: sqrt(hidden))",
          "embedding scale factor", _embedding_scale_dropped),
    Fault("expert_top_k", "mixture-of-experts routing to top_k - 1 experts", "mixture-of-experts block",
          _expert_top_k),
)}


def get_fault(name: str) -> Fault:
    try:
        return CATALOGUE[name]
    except KeyError:
        raise KeyError(f"unknown fault {name!r}; known: {', '.join(CATALOGUE)}") from None
