"""Helpers shared by the Triton kernels."""
from __future__ import annotations

import triton
import triton.language as tl

# tl.dot needs every dimension >= 16 on NVIDIA GPUs.
MIN_DOT = 16


def block_for(n: int, minimum: int = 1) -> int:
    """The power-of-two tile that covers n (tiles must be powers of two)."""
    return max(triton.next_power_of_2(n), minimum)


@triton.jit
def tanh(x):
    # tl.math has no tanh; this form never overflows (exp of a non-positive number).
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)
