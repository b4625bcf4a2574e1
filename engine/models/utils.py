"""Loading checkpoint tensors into engine modules whose parameters may fuse several HF ones."""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from engine.loader import WeightsError


@dataclass(frozen=True)
class Packed:
    """HF tensor `.part.` is shard `shard` of the engine parameter named with `.fused.` instead."""
    fused: str
    part: str
    shard: int


# The torch.nn.init functions that modules' constructors call to fill their parameters.
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
                   "kaiming_normal_", "xavier_uniform_", "xavier_normal_")


@contextmanager
def built_for_loading(device: torch.device) -> Iterator[None]:
    """Modules constructed here get their parameters allocated on `device` but not initialised:
    load_weights overwrites every parameter or raises, so the random fill was wasted work (1.4 s
    of a 2.9 s engine start for SmolLM2-135M)."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device(device):
            yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def fused_linear(in_features: int, shard_sizes: list[int], bias: bool) -> nn.Linear:
    """One Linear computing several HF projections at once; loading fills it shard by shard."""
    layer = nn.Linear(in_features, sum(shard_sizes), bias=bias)
    for param in layer.parameters():
        param.shard_sizes = shard_sizes
    return layer


def load_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    packed: Iterable[Packed] = (),
    skip: tuple[str, ...] = (),
    renames: Iterable[tuple[str, str]] = (),
    transposed: tuple[str, ...] = (),
) -> None:
    """Copy every checkpoint tensor into its parameter; error on a missing or misshapen one.

    Tensors whose name contains one of `skip` are ignored (e.g. a tied lm_head); tensors with
    no parameter (buffers such as rotary inv_freq) are ignored too. `renames` are (checkpoint
    substring, engine substring) pairs, for a variant whose checkpoint names its modules
    differently from the family's implementation; errors still name the checkpoint's tensors.
    Tensors whose name ends with one of `transposed` are stored [in, out] (GPT-2's Conv1D) and
    are transposed into their parameter.
    """
    packed = list(packed)
    renames = list(renames)
    params = dict(model.named_parameters())
    expected = {_rename(n, renames, reverse=True) for name in params for n in _checkpoint_names(name, packed)}
    loaded: set[str] = set()
    for checkpoint_name, tensor in weights:
        if any(s in checkpoint_name for s in skip):
            continue
        name = _rename(checkpoint_name, renames)
        target, shard = _target(name, packed)
        param = params.get(target)
        if param is None:
            continue
        dest = param.data
        if shard is not None:
            sizes = param.shard_sizes
            dest = dest.narrow(0, sum(sizes[:shard]), sizes[shard])
        if checkpoint_name.endswith(transposed):
            dest = dest.t()
        if tuple(dest.shape) != tuple(tensor.shape):
            raise WeightsError(
                f"checkpoint tensor {checkpoint_name!r} has shape {tuple(tensor.shape)}, "
                f"but the model expects {tuple(dest.shape)} (parameter {target!r})"
            )
        dest.copy_(tensor.to(dest.dtype))
        loaded.add(checkpoint_name)
    missing = sorted(expected - loaded)
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise WeightsError(f"checkpoint is missing tensors the model needs: {shown}")


def _rename(name: str, renames: list[tuple[str, str]], reverse: bool = False) -> str:
    for old, new in reversed(renames) if reverse else renames:
        name = name.replace(new, old) if reverse else name.replace(old, new)
    return name


def _target(name: str, packed: list[Packed]) -> tuple[str, int | None]:
    for p in packed:
        if f".{p.part}." in name:
            return name.replace(f".{p.part}.", f".{p.fused}."), p.shard
    return name, None


def _checkpoint_names(param_name: str, packed: list[Packed]) -> list[str]:
    parts = [p for p in packed if f".{p.fused}." in param_name]
    if not parts:
        return [param_name]
    return [param_name.replace(f".{p.fused}.", f".{p.part}.") for p in parts]
