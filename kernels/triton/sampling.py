"""Top-k / top-p mask without sorting the vocabulary.

Each keep-set is "every logit >= a threshold", and the threshold is found by bisection over
the logits' float32 bit patterns mapped to order-preserving integers: 32 halvings pin the
exact threshold value. Top-k's threshold is the k-th largest logit (ties kept, as the
reference keeps them). Top-p's is the smallest logit whose strictly-larger logits hold less
than p of the probability (the reference's "mass before it < p" in sorted order).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from litmus_kernels.triton._common import block_for

# Vocabulary entries per inner-loop step.
BLOCK_V = 1024


@triton.jit
def _ordered_key(x):
    """int64 that orders like the float32 x (with -0.0 == 0.0)."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    # Negative floats order backwards by their bits: flipping the magnitude bits fixes that.
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)


@triton.jit
def _count_at_least(row_ptr, vocab, threshold, BLOCK: tl.constexpr):
    count = tl.zeros([BLOCK], tl.int32)
    for v0 in range(0, vocab, BLOCK):
        v = v0 + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + v, mask=v < vocab, other=float("-inf"))
        count += ((_ordered_key(x) >= threshold) & (v < vocab)).to(tl.int32)
    return tl.sum(count, 0)


@triton.jit
def _mass_above(row_ptr, vocab, threshold, floor, row_max, BLOCK: tl.constexpr):
    """Unnormalised probability of the logits with key > threshold among those with key >= floor."""
    mass = tl.zeros([BLOCK], tl.float32)
    for v0 in range(0, vocab, BLOCK):
        v = v0 + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + v, mask=v < vocab, other=float("-inf"))
        key = _ordered_key(x)
        mass += tl.where((key > threshold) & (key >= floor) & (v < vocab), tl.exp(x - row_max), 0.0)
    return tl.sum(mass, 0)


@triton.jit
def _top_k_top_p_kernel(logits_ptr, out_ptr, top_k_ptr, top_p_ptr, vocab, stride_l, stride_o,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    src = logits_ptr + row * stride_l
    k = tl.load(top_k_ptr + row)
    p = tl.load(top_p_ptr + row).to(tl.float32)
    key_lo = -2147483649  # below every key
    key_hi = 2147483648  # above every key

    # Top-k: the largest key t with at least k logits >= t (k >= vocab keeps everything).
    floor = tl.full([], key_lo, tl.int64)
    if (k > 0) & (k < vocab):
        lo = tl.full([], key_lo, tl.int64)  # invariant: count(>= lo) >= k, count(>= hi) < k
        hi = tl.full([], key_hi, tl.int64)
        for _ in range(33):
            mid = lo + (hi - lo) // 2
            enough = _count_at_least(src, vocab, mid, BLOCK) >= k
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid)
        floor = lo

    # Top-p over what top-k kept: the smallest key t whose larger kept logits hold < p.
    if p < 1.0:
        row_max = tl.full([], float("-inf"), tl.float32)
        for v0 in range(0, vocab, BLOCK):
            v = v0 + tl.arange(0, BLOCK)
            row_max = tl.maximum(row_max, tl.max(tl.load(src + v, mask=v < vocab, other=float("-inf")), 0))
        target = p * _mass_above(src, vocab, key_lo, floor, row_max, BLOCK)
        lo = tl.full([], key_lo, tl.int64)  # invariant: mass(> lo) >= target, mass(> hi) < target
        hi = tl.full([], key_hi, tl.int64)
        for _ in range(33):
            mid = lo + (hi - lo) // 2
            heavy = _mass_above(src, vocab, mid, floor, row_max, BLOCK) >= target
            lo = tl.where(heavy, mid, lo)
            hi = tl.where(heavy, hi, mid)
        # The top logit always stays (hi only passes it when p * mass is 0, i.e. p == 0).
        floor = tl.maximum(floor, tl.minimum(hi, _ordered_key(row_max)))

    for v0 in range(0, vocab, BLOCK):
        v = v0 + tl.arange(0, BLOCK)
        x = tl.load(src + v, mask=v < vocab)
        tl.store(out_ptr + row * stride_o + v, tl.where(_ordered_key(x) >= floor, x, float("-inf")), mask=v < vocab)


def top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits [N, V] float32; top_k [N] (0 = off), top_p [N] (1 = off). Returns a masked copy."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    out = torch.empty_like(logits)
    rows, vocab = logits.shape
    if rows:
        _top_k_top_p_kernel[(rows,)](
            logits, out, top_k, top_p, vocab, logits.stride(0), out.stride(0), BLOCK=min(block_for(vocab), BLOCK_V),
        )
    return out
