"""Rotary position embeddings: inverse frequencies per rope type, applied by position."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from litmus_kernels import ops


def rope_inv_freq(rotary_dim: int, params: dict[str, Any], max_position: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale for a `rope_parameters` dict (transformers 5)."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    base = float(params.get("rope_theta", 10000.0))
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / float(params["factor"]), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, params, max_position), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(rotary_dim, base, params, max_position)
    raise NotImplementedError(f"rope_type {rope_type!r} is not implemented by the engine")


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any], max_position: int) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    factor = float(params["factor"])
    low = float(params.get("low_freq_factor", 1.0))
    high = float(params.get("high_freq_factor", 4.0))
    old_len = float(params.get("original_max_position_embeddings", max_position))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context stretched by `factor`."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(rotary_dim: int, base: float, params: dict[str, Any],
                   max_position: int) -> tuple[torch.Tensor, float]:
    # High frequencies are kept, low ones divided by `factor`, the band between blended linearly
    # (the band's bounds from beta_fast / beta_slow rotations over the original context).
    old_len = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_position / old_len
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)

    def dim_of(rotations: float) -> float:
        return rotary_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(params.get("beta_fast") or 32), dim_of(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    extrapolation = 1 - ramp
    inv_freq = 1.0 / (factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """Applies rope to the first rotary_dim features of each head.

    neox style rotates the two halves against each other (Llama, Mistral, Qwen); gpt-j style
    rotates interleaved pairs.
    """

    def __init__(self, head_dim: int, rotary_dim: int, max_position: int, params: dict[str, Any],
                 is_neox_style: bool = True):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.is_neox_style = is_neox_style
        inv_freq, scale = rope_inv_freq(rotary_dim, params, max_position)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", freqs.cos() * scale, persistent=False)
        self.register_buffer("sin", freqs.sin() * scale, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q/k [T, heads * head_dim] -> rotated copies."""
        return ops.rotary_embedding(positions, q, k, self.cos, self.sin, self.head_dim, self.is_neox_style)


def get_rope(head_dim: int, max_position: int, params: dict[str, Any], is_neox_style: bool = True) -> RotaryEmbedding:
    """Rope over the first int(head_dim * partial_rotary_factor) features of each head."""
    rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    return RotaryEmbedding(head_dim, rotary_dim, max_position, params, is_neox_style)
