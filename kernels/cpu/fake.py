"""Shape-only ("fake") versions of the C++ ops, for torch.compile: tracing a model runs these
instead of the kernels to learn each result's shape and dtype (the engine compiles decode steps
with enforce_eager=False). Registered once the kernels load; each must describe exactly what its
kernel returns (tests/test_kernels.py checks them with torch.library.opcheck)."""
from __future__ import annotations

import torch

_PANEL = 64  # output features per packed panel (linear.cpp kPanel)


def _per_row(x: torch.Tensor, features) -> torch.Tensor:
    return x.new_empty(x.shape[0], features)


def _gated(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


def register() -> None:
    fake = torch.library.register_fake
    fake("litmus::decode_attention")(lambda q, *args: q.new_empty(q.shape))
    fake("litmus::prefill_attention")(lambda q, *args: q.new_empty(q.shape))
    fake("litmus::write_kv_cache")(lambda *args: None)
    fake("litmus::rms_norm")(lambda x, weight, eps, residual: (
        x.new_empty(x.shape), x.new_empty(x.shape if residual is not None else (0,))))
    fake("litmus::rotary_embedding")(lambda positions, q, k, *args: (q.new_empty(q.shape), k.new_empty(k.shape)))
    fake("litmus::silu_and_mul")(_gated)
    fake("litmus::gelu_and_mul")(lambda x, approximate: _gated(x))
    fake("litmus::linear")(lambda x, packed, bias, out_features: _per_row(x, out_features))
    fake("litmus::gated_linear")(lambda x, packed, bias, d, act: _per_row(x, d))
    fake("litmus::pack_linear_weight")(
        lambda w: w.new_empty(-(-w.shape[0] // _PANEL), w.shape[1], _PANEL))
    fake("litmus::pack_gated_linear_weight")(
        lambda w: w.new_empty(-(-(w.shape[0] // 2) // (_PANEL // 2)), w.shape[1], _PANEL))
    fake("litmus::argmax_rows")(lambda x: x.new_empty(x.shape[0], dtype=torch.long))
