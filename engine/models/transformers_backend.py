"""Transformers backend: any Transformers decoder that uses the attention interface, on the engine.

The HF model computes everything except attention. Each of its attention modules calls
`ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`; the engine registers `litmus` there, a
function that hands q/k/v to an engine `Attention` (one per HF attention module), which writes
K/V to that layer's paged cache and attends over it. So batching, scheduling and the KV cache
stay the engine's:

- the flattened batch goes through the HF model as ONE sequence [1, num_tokens], with the
  engine's positions as position_ids and no HF cache (use_cache=False);
- masking is the engine's (block tables + AttentionMetadata). Transformers builds no mask for
  an implementation it has no mask function for (masking_utils returns None straight away),
  so nothing O(num_tokens^2) is built per step, and the function ignores the mask it gets;
- the AttentionMetadata reaches the function as a keyword argument, which Transformers passes
  from the model's forward down to the attention interface.

Logits come from the HF model's own head code (lm_head plus any logit scaling or softcap).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from torch import nn
from transformers import AttentionInterface, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast

from engine.config import EngineConfig
from engine.layers.attention import Attention, AttentionMetadata
from engine.models.registry import UnsupportedArchitectureError, supported_architectures

ATTN_IMPLEMENTATION = "litmus"
_META_KWARG = "litmus_meta"
_PROBE_KWARG = "litmus_probe"
# Attention arguments that carry no math the engine would have to reproduce.
_IGNORED_KWARGS = frozenset({"position_ids", "use_cache", "cache_position", "output_attentions", "is_causal",
                             _META_KWARG, _PROBE_KWARG})
_HANDLED_KWARGS = frozenset({"sliding_window", "softcap"})
_ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


class TransformersForCausalLM(nn.Module):
    """An HF causal LM behind the engine's model interface: forward(input_ids, positions, meta)
    returns hidden states [num_tokens, hidden]; compute_logits(hidden) returns float logits."""

    def __init__(self, hf_model: PreTrainedModel):
        super().__init__()
        self.model = hf_model
        self._bind_attention()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        out = self.model.base_model(
            input_ids=input_ids[None], position_ids=positions[None], use_cache=False, **{_META_KWARG: meta}
        )
        return out.last_hidden_state[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # The CausalLM's forward is run with its body replaced by the hidden states already
        # computed, so whatever it does after lm_head (Granite's logits_scaling, Gemma's final
        # softcap, Cohere's logit_scale) is applied here too, as the sampler needs. The input ids
        # only give the call its shape: the stand-in body ignores them.
        with _body_returning(self.model, hidden[None]):
            logits = self.model(input_ids=torch.zeros(1, hidden.shape[0], dtype=torch.long), use_cache=False).logits
        return logits[0].float()

    @torch.inference_mode()
    def _bind_attention(self) -> None:
        """One forward of one token finds the modules that call the attention interface and what
        they pass (head counts and head_dim from the tensors; scaling, sliding window, softcap
        from the arguments), and gives each an engine Attention built from exactly that."""
        probe = _Probe()
        self.model.base_model(
            input_ids=torch.zeros(1, 1, dtype=torch.long), position_ids=torch.zeros(1, 1, dtype=torch.long),
            use_cache=False, **{_PROBE_KWARG: probe},
        )
        name = type(self.model).__name__
        if not probe.layers:
            raise UnsupportedArchitectureError(
                f"the Transformers backend cannot run {name}: its forward never calls the attention interface"
            )
        for module, bound in probe.layers.items():
            module.engine_attention = bound


@dataclass
class _Probe:
    layers: dict[nn.Module, _BoundAttention] = field(default_factory=dict)

    def record(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float | None, kwargs: dict[str, Any]) -> None:
        name = type(module).__name__
        if module in self.layers:
            # A second call would need a second KV cache that the module has no place for.
            raise UnsupportedArchitectureError(
                f"the Transformers backend cannot run a model whose attention module {name} runs more than once "
                f"per forward (shared attention layers)"
            )
        problem = _attention_problem(module, kwargs)
        if problem:
            raise UnsupportedArchitectureError(
                f"the Transformers backend cannot run attention module {name}: {problem}"
            )
        # Values narrower or wider than queries and keys (MiniCPM3's and DeepSeek's latent
        # attention) are cached and attended at the wider of the two head dims, zero-padded: the
        # padding adds nothing to a score or to an output feature that is kept.
        self.layers[module] = _BoundAttention(
            Attention(
                num_heads=query.shape[1], head_dim=max(query.shape[-1], value.shape[-1]),
                scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
                num_kv_heads=key.shape[1], sliding_window=kwargs.get("sliding_window"),
                logits_soft_cap=kwargs.get("softcap"),
            ),
            v_head_dim=value.shape[-1],
        )


class _BoundAttention(nn.Module):
    """An engine Attention at the call's shapes: [1, H, n, Dqk] / [1, Hkv, n, Dv] in, [1, n, H, Dv] out."""

    def __init__(self, attention: Attention, v_head_dim: int):
        super().__init__()
        self.attention = attention
        self.v_head_dim = v_head_dim

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        attention, n = self.attention, query.shape[2]
        out = attention(*(_flat(_pad_to(s, attention.head_dim)) for s in (query, key, value)), meta)
        return out.view(1, n, attention.num_heads, attention.head_dim)[..., :self.v_head_dim]


def _pad_to(states: torch.Tensor, head_dim: int) -> torch.Tensor:
    extra = head_dim - states.shape[-1]
    return torch.nn.functional.pad(states, (0, extra)) if extra else states


def _attention_problem(module: nn.Module, kwargs: dict[str, Any]) -> str | None:
    """Why the engine's Attention would compute something else than this call asks for, if it would."""
    if kwargs.get("is_causal", getattr(module, "is_causal", True)) is False:
        return "it is not causal"
    unknown = sorted(k for k, v in kwargs.items()
                     if v is not None and k not in _IGNORED_KWARGS and k not in _HANDLED_KWARGS)
    if unknown:
        return f"it passes attention arguments the engine does not implement: {', '.join(unknown)}"
    return None


def litmus_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Transformers' attention-function signature: q/k [1, H(kv), n, D], v [1, Hkv, n, Dv] in,
    [1, n, H, Dv] out. The mask is ignored: the engine's metadata says what each token sees.
    `dropout` is named only so that it is not taken for an unknown argument (it is 0 in eval)."""
    probe: _Probe | None = kwargs.get(_PROBE_KWARG)
    if probe is not None:
        probe.record(module, query, key, value, scaling, kwargs)
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None
    meta: AttentionMetadata | None = kwargs.get(_META_KWARG)
    if meta is None:
        raise UnsupportedArchitectureError(
            f"the Transformers backend cannot run attention module {type(module).__name__}: the model does not "
            f"pass the forward's keyword arguments down to the attention interface"
        )
    return module.engine_attention(query, key, value, meta), None


def _flat(states: torch.Tensor) -> torch.Tensor:
    """[1, heads, n, D] -> [n, heads * D], the engine's token-major layout."""
    return states[0].transpose(0, 1).reshape(states.shape[2], -1)


class _PrecomputedBody(nn.Module):
    """Stands in for an HF model's body (its base model), returning given hidden states.

    Head code may call a sub-module of the body instead (OPT calls model.decoder): any attribute
    that is a module of the real body is this stand-in too; anything else is the body's own.
    """

    def __init__(self, hidden: torch.Tensor, body: nn.Module):
        super().__init__()
        self.hidden = hidden
        object.__setattr__(self, "_body", body)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            value = getattr(object.__getattribute__(self, "_body"), name)
            return self if isinstance(value, nn.Module) else value

    def forward(self, *args: Any, **kwargs: Any) -> _BodyOutput:
        return _BodyOutput(last_hidden_state=self.hidden)


class _BodyOutput(BaseModelOutputWithPast):
    """The body's output as head code reads it: fields other bodies return (MoE models'
    router_logits, read only to add an auxiliary training loss) are None."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return None


@contextmanager
def _body_returning(hf_model: PreTrainedModel, hidden: torch.Tensor) -> Iterator[None]:
    # A CausalLM that reached its real body some other way cannot go wrong silently: that body's
    # attention would be called without the engine's metadata, and litmus_attention raises.
    prefix = hf_model.base_model_prefix
    body = getattr(hf_model, prefix)
    setattr(hf_model, prefix, _PrecomputedBody(hidden, body))
    try:
        yield
    finally:
        setattr(hf_model, prefix, body)


def transformers_class(hf_config: PretrainedConfig) -> type[PreTrainedModel]:
    """The Transformers class the config names, checked to be one the backend can run."""
    architectures = hf_config.architectures or []
    cls = next((getattr(transformers, a) for a in architectures if hasattr(transformers, a)), None)
    if cls is None:
        raise UnsupportedArchitectureError(
            f"architecture {architectures!r} is not a class of Transformers {transformers.__version__}, so the "
            f"Transformers backend cannot run it (natively supported: {', '.join(supported_architectures())})"
        )
    problem = _backend_problem(cls, hf_config)
    if problem:
        raise UnsupportedArchitectureError(f"the Transformers backend cannot run {cls.__name__}: {problem}")
    return cls


def _backend_problem(cls: type, hf_config: PretrainedConfig) -> str | None:
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel) and issubclass(cls, GenerationMixin)):
        return "it is not a Transformers generative model class"
    if getattr(hf_config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model; the backend runs decoders"
    # Other layer kinds (linear attention, Mamba, chunked attention) keep state or masks of
    # their own that a flattened batch of several sequences would mix up. Checked first: it is
    # the deeper reason where both apply (Jamba).
    other = sorted(set(getattr(hf_config, "layer_types", None) or ()) - _ATTENTION_LAYER_TYPES)
    if other:
        return (f"it has layer types the backend does not support: {', '.join(other)} (per-sequence state or "
                f"masks that the engine's paged KV cache and flattened batches have no place for)")
    if not cls.is_backend_compatible():
        return ("the class does not support custom attention backends (_supports_attention_backend is False), "
                "so its attention cannot be routed to the engine's KV cache")
    return None


def load_transformers_model(config: EngineConfig) -> TransformersForCausalLM:
    """Weights are loaded by Transformers itself (safetensors directory or GGUF file)."""
    cls = transformers_class(config.hf_config)
    AttentionInterface.register(ATTN_IMPLEMENTATION, litmus_attention)
    gguf = {"gguf_file": config.source.gguf_file.name} if config.source.gguf_file is not None else {}
    hf_model = cls.from_pretrained(
        config.source.path, config=config.hf_config, dtype=config.dtype, attn_implementation=ATTN_IMPLEMENTATION,
        **gguf,
    )
    return TransformersForCausalLM(hf_model.to(config.device)).eval()
