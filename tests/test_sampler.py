"""Sampler: top-k / top-p / min-p masks (against independent implementations), penalties (against hand
computation), greedy rows, logprob ranks, and seeded sampling that does not depend on the batch."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.layers.sampler import (
    SamplingBatch,
    apply_penalties,
    apply_top_k_top_p_min_p,
    compute_logprobs_info,
    sample,
)

NEG_INF = float("-inf")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Logits with frequent exact ties (small set of values) and arbitrary floats.
logit_values = st.one_of(
    st.floats(-30, 30, allow_nan=False, width=32),
    st.sampled_from([-3.0, -1.0, 0.0, 0.5, 2.0]),
)


@st.composite
def logits_rows(draw, max_rows: int = 4, max_vocab: int = 24):
    rows = draw(st.integers(1, max_rows))
    vocab = draw(st.integers(1, max_vocab))
    values = draw(st.lists(st.lists(logit_values, min_size=vocab, max_size=vocab), min_size=rows, max_size=rows))
    return torch.tensor(values, dtype=torch.float32)


def no_k(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.long)


def no_p(n: int) -> torch.Tensor:
    return torch.ones(n)


def no_min_p(n: int) -> torch.Tensor:
    return torch.zeros(n)


def kept(masked: torch.Tensor) -> np.ndarray:
    return (masked > NEG_INF).numpy()


# --- independent reference implementations (float64, plain Python) -------------------------

def ref_softmax(row: list[float]) -> list[float]:
    finite = [x for x in row if x != NEG_INF]
    m = max(finite)
    e = [math.exp(x - m) if x != NEG_INF else 0.0 for x in row]
    s = sum(e)
    return [x / s for x in e]


def ref_top_p_counts(row: list[float], p: float, tol: float = 1e-5) -> tuple[int, int]:
    """Smallest number of most likely tokens whose probability reaches p; a (low, high) range
    covering float rounding of the cumulative sum near p."""
    probs = sorted(ref_softmax(row), reverse=True)
    def count(target: float) -> int:
        total = 0.0
        for i, q in enumerate(probs):
            total += q
            if total >= target:
                return i + 1
        return len(probs)
    return max(1, count(p - tol)), max(1, count(p + tol))


# --- top-k ------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(logits_rows(), st.data())
def test_top_k_keeps_exactly_the_tokens_at_least_the_kth_largest(logits, data) -> None:
    n, vocab = logits.shape
    ks = data.draw(st.lists(st.integers(0, vocab + 3), min_size=n, max_size=n))
    out = apply_top_k_top_p_min_p(logits, torch.tensor(ks), no_p(n), no_min_p(n))
    for row, k in enumerate(ks):
        values = logits[row].tolist()
        if k == 0 or k >= vocab:
            assert torch.equal(out[row], logits[row])
            continue
        kth = sorted(values, reverse=True)[k - 1]
        expected = np.array([v >= kth for v in values])
        assert (kept(out[row]) == expected).all()
        assert expected.sum() >= k  # ties with the k-th are kept too
        # Kept tokens are untouched.
        assert torch.equal(out[row][out[row] > NEG_INF], logits[row][torch.from_numpy(expected)])


def test_top_k_with_ties_keeps_every_tied_token() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0]])
    out = apply_top_k_top_p_min_p(logits, torch.tensor([2]), no_p(1), no_min_p(1))
    assert kept(out).tolist() == [[False, True, True, True, False]]


# --- top-p ------------------------------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(logits_rows(), st.data())
def test_top_p_keeps_the_smallest_prefix_reaching_p(logits, data) -> None:
    n, vocab = logits.shape
    ps = data.draw(st.lists(st.floats(0.001, 1.0), min_size=n, max_size=n))
    out = apply_top_k_top_p_min_p(logits, no_k(n), torch.tensor(ps, dtype=torch.float32), no_min_p(n))
    for row, p in enumerate(ps):
        values = logits[row].tolist()
        mask = kept(out[row])
        count = int(mask.sum())
        assert count >= 1
        if p >= 1.0:
            assert torch.equal(out[row], logits[row])
            continue
        lo, hi = ref_top_p_counts(values, float(torch.tensor(p, dtype=torch.float32)))
        assert lo <= count <= hi, (values, p, count, lo, hi)
        # The kept ones are the most likely: nothing dropped beats anything kept.
        kept_vals = [v for v, m in zip(values, mask) if m]
        dropped = [v for v, m in zip(values, mask) if not m]
        if dropped:
            assert min(kept_vals) >= max(dropped)
        assert torch.equal(out[row][out[row] > NEG_INF], logits[row][torch.from_numpy(mask)])


def test_top_p_hand_example() -> None:
    # probs 0.5, 0.3, 0.15, 0.05 (in shuffled order)
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logits = probs.log()
    def keep(p: float) -> list[bool]:
        return kept(apply_top_k_top_p_min_p(logits, no_k(1), torch.tensor([p]), no_min_p(1)))[0].tolist()
    assert keep(0.4) == [False, True, False, False]
    assert keep(0.5) == [False, True, False, False]  # 0.5 reaches p = 0.5 exactly
    assert keep(0.6) == [False, True, False, True]
    assert keep(0.9) == [True, True, False, True]
    assert keep(0.96) == [True, True, True, True]
    assert keep(1e-6) == [False, True, False, False]  # always at least one token


def test_top_p_one_leaves_even_negligible_tokens_alone() -> None:
    """A row with top_p=1 is untouched, also when another row of the batch uses top-p."""
    logits = torch.tensor([[0.0, -100.0, -120.0, 5.0], [0.0, -100.0, -120.0, 5.0]])
    out = apply_top_k_top_p_min_p(logits, no_k(2), torch.tensor([1.0, 0.5]), no_min_p(2))
    assert torch.equal(out[0], logits[0])
    assert kept(out[1]).tolist() == [False, False, False, True]


# --- min-p ------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(logits_rows(), st.data())
def test_min_p_keeps_tokens_with_probability_at_least_min_p_times_the_max(logits, data) -> None:
    n, _ = logits.shape
    mps = data.draw(st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n))
    out = apply_top_k_top_p_min_p(logits, no_k(n), no_p(n), torch.tensor(mps, dtype=torch.float32))
    for row, mp in enumerate(mps):
        if mp == 0.0:
            assert torch.equal(out[row], logits[row])
            continue
        probs = ref_softmax(logits[row].tolist())
        threshold = mp * max(probs)
        mask = kept(out[row])
        assert mask[int(np.argmax(probs))]
        for q, m in zip(probs, mask):
            if abs(q - threshold) > 1e-6 * max(probs):
                assert m == (q >= threshold), (probs, mp)


# --- all three together -----------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(logits_rows(), st.data())
def test_combined_masks_match_sequential_application(logits, data) -> None:
    n, vocab = logits.shape
    ks = data.draw(st.lists(st.integers(0, vocab), min_size=n, max_size=n))
    ps = data.draw(st.lists(st.sampled_from([1.0, 0.3, 0.7, 0.95]), min_size=n, max_size=n))
    mps = data.draw(st.lists(st.sampled_from([0.0, 0.05, 0.2]), min_size=n, max_size=n))
    out = apply_top_k_top_p_min_p(logits, torch.tensor(ks), torch.tensor(ps), torch.tensor(mps))
    for row in range(n):
        one = logits[row:row + 1]
        step = apply_top_k_top_p_min_p(one, torch.tensor(ks[row:row + 1]), no_p(1), no_min_p(1))
        step = apply_top_k_top_p_min_p(step, no_k(1), torch.tensor(ps[row:row + 1]), no_min_p(1))
        step = apply_top_k_top_p_min_p(step, no_k(1), no_p(1), torch.tensor(mps[row:row + 1]))
        # Rows are independent of each other in the batch, and the order top-k, top-p, min-p holds.
        assert torch.equal(out[row], step[0])
        assert kept(out[row]).sum() >= 1
        if ks[row] == 0 and ps[row] == 1.0 and mps[row] == 0.0:
            assert torch.equal(out[row], logits[row])


def test_disabled_rows_are_untouched_next_to_active_ones() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 4
    out = apply_top_k_top_p_min_p(
        logits, torch.tensor([0, 3, 0, 0]), torch.tensor([1.0, 1.0, 0.5, 1.0]), torch.tensor([0.0, 0.0, 0.0, 0.3])
    )
    assert torch.equal(out[0], logits[0])
    assert kept(out[1]).sum() == 3
    assert 1 <= kept(out[2]).sum() < 50
    assert 1 <= kept(out[3]).sum() < 50


# --- penalties --------------------------------------------------------------------------------

def penalty_batch(counts, prompt_mask, presence, frequency, repetition) -> SamplingBatch:
    n = len(presence)
    return SamplingBatch(
        temperature=torch.zeros(n), top_k=no_k(n), top_p=no_p(n), min_p=no_min_p(n), generators=[None] * n,
        num_logprobs=[None] * n,
        penalty_token_counts=torch.tensor(counts, dtype=torch.float32),
        penalty_prompt_mask=torch.tensor(prompt_mask),
        presence_penalty=torch.tensor(presence), frequency_penalty=torch.tensor(frequency),
        repetition_penalty=torch.tensor(repetition),
    )


def test_penalties_against_hand_computation() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 0.0]] * 4)
    # Prompt holds tokens 0 and 1; the output so far is [3, 3, 4]; token 5 is in the output once with logit 0.
    counts = [[0, 0, 0, 2, 1, 1]] * 4
    prompt = [[True, True, False, False, False, False]] * 4
    b = penalty_batch(counts, prompt,
                      presence=[0.0, 0.0, 0.25, 0.25], frequency=[0.0, 0.5, 0.0, 0.5],
                      repetition=[2.0, 1.0, 1.0, 2.0])
    out = apply_penalties(logits, b)
    expected = torch.tensor([
        # repetition only (CTRL/HF): positive / 2, negative * 2, on prompt and output tokens; 0 stays 0
        [1.0, -2.0, 0.5, 1.5, -4.0, 0.0],
        # frequency only: minus 0.5 per occurrence in the output (prompt tokens do not count)
        [2.0, -1.0, 0.5, 2.0, -2.5, -0.5],
        # presence only: minus 0.25 once for each token present in the output
        [2.0, -1.0, 0.5, 2.75, -2.25, -0.25],
        # all three: repetition first, then frequency and presence
        [1.0, -2.0, 0.5, 1.5 - 1.0 - 0.25, -4.0 - 0.5 - 0.25, 0.0 - 0.5 - 0.25],
    ])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_penalties_change_the_greedy_choice() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 0.0]])
    b = penalty_batch([[0, 0, 0, 2, 1, 0]], [[True, True, False, False, False, False]],
                      presence=[0.0], frequency=[0.0], repetition=[4.0])
    # Unpenalised argmax is token 3 (3.0). With repetition 4: token 0 (prompt) 2.0/4 = 0.5, token 2
    # (unseen) 0.5, token 3 (output) 3.0/4 = 0.75 -> still 3.
    assert sample(logits, b).token_ids == [3]
    b.frequency_penalty = torch.tensor([0.2])
    # token 3: 0.75 - 2 * 0.2 = 0.35; tokens 0 and 2 tie at 0.5 -> argmax takes the first.
    assert sample(logits, b).token_ids == [0]


# --- greedy, logprobs, ranks ------------------------------------------------------------------

def plain_batch(temperature, generators=None, num_logprobs=None, top_k=None, top_p=None, min_p=None) -> SamplingBatch:
    n = len(temperature)
    return SamplingBatch(
        temperature=torch.tensor(temperature, dtype=torch.float32),
        top_k=torch.tensor(top_k or [0] * n), top_p=torch.tensor(top_p or [1.0] * n, dtype=torch.float32),
        min_p=torch.tensor(min_p or [0.0] * n, dtype=torch.float32),
        generators=generators or [None] * n, num_logprobs=num_logprobs or [None] * n,
    )


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@settings(max_examples=100, deadline=None)
@given(logits_rows(max_rows=6, max_vocab=30), st.data())
def test_greedy_rows_return_the_argmax_in_any_batch(logits, data) -> None:
    n, _ = logits.shape
    greedy = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    temps = [0.0 if g else 1.3 for g in greedy]
    gens = [None if g else gen(i) for i, g in enumerate(greedy)]
    out = sample(logits, plain_batch(temps, gens, top_k=[1 if i % 2 else 0 for i in range(n)]))
    for row in range(n):
        tok = out.token_ids[row]
        if greedy[row]:
            assert tok == int(logits[row].argmax())
        assert logits[row, tok] == logits[row].max() or not greedy[row]


def test_logprobs_are_of_the_raw_logits_with_one_based_ranks() -> None:
    logits = torch.tensor([[1.0, 4.0, 2.0, 4.0, -1.0], [0.0, 0.0, 3.0, 1.0, 2.0]])
    out = sample(logits, plain_batch([0.0, 0.0], num_logprobs=[2, 0]))
    assert out.token_ids == [1, 2]
    ref = torch.log_softmax(logits.double(), dim=-1)
    chosen, rank, top_ids, top_lps = out.logprobs[0]
    assert rank == 1
    assert chosen == pytest.approx(float(ref[0, 1]), abs=1e-6)
    assert sorted(top_ids) == [1, 3]  # the tie at the top
    assert top_lps == pytest.approx([float(ref[0, 1])] * 2, abs=1e-6)
    chosen, rank, top_ids, top_lps = out.logprobs[1]
    assert rank == 1 and top_ids == [] and top_lps == []


def test_ranks_count_strictly_better_tokens_plus_one() -> None:
    lp = torch.log_softmax(torch.tensor([[0.5, 3.0, 1.0, 3.0, 2.0, 1.0]]), dim=-1).repeat(6, 1)
    chosen, ranks, top_ids, _ = compute_logprobs_info(lp, torch.arange(6), 3)
    assert ranks == [6, 1, 4, 1, 3, 4]
    assert chosen == pytest.approx(lp[0].tolist())
    assert top_ids[0][2] == 4 and sorted(top_ids[0][:2]) == [1, 3]


def test_sampled_token_logprob_is_reported_even_when_outside_the_top() -> None:
    # Near-uniform logits over 200 tokens: the sampled token is rarely among the top 1.
    logits = torch.linspace(0, 0.5, 200).unsqueeze(0)
    outside = 0
    g = gen(3)
    ref = torch.log_softmax(logits, dim=-1)[0]
    for _ in range(30):
        out = sample(logits, plain_batch([1.0], [g], num_logprobs=[1]))
        tok = out.token_ids[0]
        chosen, rank, top_ids, _ = out.logprobs[0]
        assert chosen == pytest.approx(float(ref[tok]), abs=1e-6)
        assert rank == 1 + int((ref > ref[tok]).sum())
        assert top_ids == [199]
        outside += tok != 199
    assert outside > 20


# --- random sampling --------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(logits_rows(max_rows=4, max_vocab=30), st.data())
def test_sampled_tokens_are_never_masked(logits, data) -> None:
    n, vocab = logits.shape
    ks = data.draw(st.lists(st.integers(0, vocab), min_size=n, max_size=n))
    ps = data.draw(st.lists(st.sampled_from([1.0, 0.2, 0.6, 0.9]), min_size=n, max_size=n))
    mps = data.draw(st.lists(st.sampled_from([0.0, 0.1, 0.5]), min_size=n, max_size=n))
    seed = data.draw(st.integers(0, 2**31))
    masked = apply_top_k_top_p_min_p(logits / 0.8, torch.tensor(ks), torch.tensor(ps), torch.tensor(mps))
    b = plain_batch([0.8] * n, [gen(seed + i) for i in range(n)], top_k=ks, top_p=ps, min_p=mps)
    for _ in range(5):
        out = sample(logits, b)
        for row, tok in enumerate(out.token_ids):
            assert masked[row, tok] > NEG_INF


def test_sampling_follows_the_temperature_scaled_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().unsqueeze(0)
    draws = 4000
    for temperature in (1.0, 2.0):
        g = gen(11)
        b = plain_batch([temperature], [g])
        counts = torch.zeros(4)
        for _ in range(draws):
            counts[sample(logits, b).token_ids[0]] += 1
        target = probs ** (1 / temperature)
        target = target / target.sum()
        sigma = (draws * target * (1 - target)).sqrt()
        assert ((counts - draws * target).abs() < 5 * sigma).all(), (temperature, counts, draws * target)


def test_top_k_one_sampling_is_the_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 100)
    b = plain_batch([5.0] * 3, [gen(i) for i in range(3)], top_k=[1, 1, 1])
    for _ in range(10):
        assert sample(logits, b).token_ids == logits.argmax(dim=-1).tolist()


def run_seeded(logits_row: torch.Tensor, rows: list[tuple[float, torch.Generator | None]], steps: int,
               watch: int) -> list[int]:
    """Sample `steps` times with one batch layout; the tokens of row `watch`."""
    logits = logits_row.repeat(len(rows), 1)
    b = plain_batch([t for t, _ in rows], [g for _, g in rows])
    return [sample(logits, b).token_ids[watch] for _ in range(steps)]


def test_same_seed_gives_the_same_tokens_alone_and_inside_any_batch() -> None:
    # A flat distribution over 1000 tokens: two independent 20-token draws agree with probability 1e-60.
    row = torch.zeros(1000)
    alone = run_seeded(row, [(1.0, gen(1234))], 20, 0)
    assert alone == run_seeded(row, [(1.0, gen(1234))], 20, 0)
    unseeded = torch.Generator()
    unseeded.seed()
    batched = run_seeded(row, [(0.0, None), (1.0, gen(99)), (1.0, gen(1234)), (0.7, unseeded), (1.0, gen(5))], 20, 2)
    assert batched == alone
    first = run_seeded(row, [(1.0, gen(1234)), (1.0, gen(1234))], 20, 1)
    assert first == alone
    other = run_seeded(row, [(1.0, gen(1235))], 20, 0)
    assert other != alone
    assert len(set(alone)) > 10  # really random, not a constant


def test_greedy_rows_ignore_generators_and_temperature_near_zero() -> None:
    torch.manual_seed(1)
    logits = torch.randn(2, 64)
    b = plain_batch([0.0, 0.0], [None, None])
    assert sample(logits, b).token_ids == logits.argmax(dim=-1).tolist()
    assert b.all_greedy


def test_banned_tokens_are_never_chosen() -> None:
    logits = torch.tensor([[5.0, 4.0, 1.0], [5.0, 4.0, 1.0]])
    b = plain_batch([0.0, 1.0], [None, gen(0)], num_logprobs=[1, 1])
    b.banned_token_ids = [[0], [0, 1]]
    out = sample(logits, b)
    assert out.token_ids == [1, 2]
    # Logprobs stay those of the raw logits.
    ref = torch.log_softmax(logits[0], dim=-1)
    assert out.logprobs[0][0] == pytest.approx(float(ref[1]), abs=1e-6)
    assert out.logprobs[0][2] == [0]
