"""BlockManager: free-list accounting, reference counts, prefix caching by chained hashes, LRU eviction."""
from __future__ import annotations

import itertools
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core import block_manager as bm_module
from engine.core.block_manager import BlockManager
from engine.core.request import Sequence
from engine.sampling_params import SamplingParams

BS = 4
_ids = itertools.count()


def make_seq(tokens: list[int]) -> Sequence:
    return Sequence(next(_ids), "r", 0, list(tokens), SamplingParams())


def compute(bm: BlockManager, seq: Sequence, upto: int | None = None) -> None:
    """What the scheduler does for a prefill: blocks for the tokens, then mark them computed and publish."""
    upto = seq.num_tokens if upto is None else upto
    assert bm.allocate(seq, upto)
    seq.num_computed_tokens = upto
    bm.cache_computed_blocks(seq)


def snapshot(bm: BlockManager, *seqs: Sequence):
    return (
        list(bm._free), dict(bm._cached),
        [(b.ref_count, b.hash, b.token_ids) for b in bm.blocks],
        [list(s.block_table) for s in seqs],
    )


def check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    refs = Counter(b for s in live for b in s.block_table)
    for block in bm.blocks:
        assert block.ref_count == refs.get(block.block_id, 0), block
        assert (block.ref_count == 0) == (block.block_id in bm._free), block
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
    assert bm.num_used_blocks == len(refs)
    for h, block_id in bm._cached.items():
        assert bm.blocks[block_id].hash == h
        assert len(bm.blocks[block_id].token_ids) == bm.block_size


# --- allocation and freeing -----------------------------------------------------------------

def test_rejects_empty_pool() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, BS)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


def test_allocate_and_free_account_for_every_block() -> None:
    bm = BlockManager(8, BS)
    a, b = make_seq(range(10)), make_seq(range(3))
    assert bm.allocate(a, 10)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    assert bm.allocate(b, 3)
    assert len(b.block_table) == 1 and bm.num_free_blocks == 4
    assert not set(a.block_table) & set(b.block_table)
    assert all(bm.blocks[i].ref_count == 1 for i in a.block_table + b.block_table)
    check_invariants(bm, [a, b])
    bm.free(a)
    assert a.block_table == [] and bm.num_free_blocks == 7
    check_invariants(bm, [b])
    bm.free(b)
    assert bm.num_free_blocks == 8 and bm.num_used_blocks == 0
    check_invariants(bm, [])


def test_allocate_grows_only_at_block_boundaries() -> None:
    bm = BlockManager(8, BS)
    seq = make_seq(range(5))
    assert bm.allocate(seq, 5)
    assert len(seq.block_table) == 2
    first = list(seq.block_table)
    for n in (6, 7, 8):
        assert bm.allocate(seq, n)
        assert seq.block_table == first
    assert bm.allocate(seq, 9)
    assert seq.block_table[:2] == first and len(seq.block_table) == 3
    assert bm.blocks_needed(seq, 9) == 0
    assert bm.blocks_needed(seq, 13) == 1
    assert bm.blocks_needed(seq, 17) == 2


def test_allocation_failure_changes_nothing() -> None:
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    a = make_seq(range(8))
    compute(bm, a)
    b = make_seq(range(100, 106))
    assert bm.allocate(b, 4)
    before = snapshot(bm, a, b)
    assert not bm.allocate(b, 4 + 2 * BS)  # needs 2 more blocks, 1 is free
    assert snapshot(bm, a, b) == before
    c = make_seq(range(200, 220))
    assert not bm.allocate(c, 20)
    assert c.block_table == [] and snapshot(bm, a, b) == before
    # The exact fit still succeeds afterwards.
    assert bm.allocate(b, 4 + BS)
    assert bm.num_free_blocks == 0


def test_blocks_freed_go_to_the_back_of_the_free_list_tail_first() -> None:
    bm = BlockManager(6, BS)
    a = make_seq(range(12))
    assert bm.allocate(a, 12)
    table = list(a.block_table)
    bm.free(a)
    # Never-used blocks first, then a's blocks with its tail before its head.
    assert list(bm._free)[-3:] == table[::-1]


# --- prefix caching -------------------------------------------------------------------------

def test_same_prefix_shares_blocks_with_reference_counts() -> None:
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    prefix = list(range(1, 9))  # two full blocks
    a = make_seq(prefix + [50, 51])
    compute(bm, a)
    b = make_seq(prefix + [60, 61, 62])
    assert bm.match_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    assert [bm.blocks[i].ref_count for i in b.block_table] == [2, 2]
    b.num_cached_tokens = 8
    bm.count_prefix_lookup(b)
    assert bm.prefix_hits == 2
    used = bm.num_used_blocks
    assert bm.allocate(b, b.num_tokens)
    assert bm.num_used_blocks == used + 1  # only the tail block is new
    check_invariants(bm, [a, b])
    bm.free(a)
    # The shared blocks survive a's release; a's own tail block is free.
    assert all(bm.blocks[i].ref_count == 1 for i in b.block_table)
    assert all(i not in bm._free for i in b.block_table)
    check_invariants(bm, [b])
    bm.free(b)
    check_invariants(bm, [])
    assert bm.num_free_blocks == 16


def test_freed_blocks_stay_cached_for_later_requests() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    a = make_seq(range(10))
    compute(bm, a)
    cached_blocks = a.block_table[:2]
    bm.free(a)
    assert bm.num_free_blocks == 8
    b = make_seq(list(range(10)) + [99])
    assert bm.match_prefix(b) == 8
    assert b.block_table == cached_blocks
    # Taking cached blocks back removes them from the free list.
    assert bm.num_free_blocks == 6
    check_invariants(bm, [b])


def test_different_first_block_gives_no_hit_even_if_the_second_matches() -> None:
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    second = [20, 21, 22, 23]
    a = make_seq([1, 2, 3, 4] + second + [9])
    compute(bm, a)
    b = make_seq([5, 6, 7, 8] + second + [9])
    assert bm.match_prefix(b) == 0
    assert b.block_table == []
    bm.count_prefix_lookup(b)
    assert bm.prefix_hits == 0
    assert bm.prefix_queries == 2


def test_only_full_computed_blocks_are_published() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    a = make_seq(range(11))
    assert bm.allocate(a, 11)
    a.num_computed_tokens = 7  # one full block computed, the second half done
    bm.cache_computed_blocks(a)
    assert len(bm._cached) == 1
    b = make_seq(range(11))
    assert bm.match_prefix(b) == 4
    bm.free(b)
    a.num_computed_tokens = 11
    bm.cache_computed_blocks(a)
    assert len(bm._cached) == 2
    c = make_seq(range(11))
    assert bm.match_prefix(c) == 8


@given(st.integers(1, 5 * BS), st.integers(0, 3))
def test_a_fully_cached_prompt_still_leaves_a_token_to_compute(length: int, extra_blocks: int) -> None:
    bm = BlockManager(32, BS, enable_prefix_caching=True)
    tokens = list(range(100, 100 + length))
    a = make_seq(tokens)
    compute(bm, a)
    b = make_seq(tokens)
    got = bm.match_prefix(b)
    assert got < b.num_tokens
    assert got == ((length - 1) // BS) * BS  # every full block but the one holding the last token
    assert len(b.block_table) * BS == got
    # A longer prompt sharing the whole of `tokens` gets every full block of it.
    c = make_seq(tokens + list(range(extra_blocks * BS + 1)))
    assert bm.match_prefix(c) == (length // BS) * BS


def test_prefix_caching_off_never_matches_or_publishes() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = make_seq(range(10))
    compute(bm, a)
    assert bm._cached == {}
    b = make_seq(range(10))
    assert bm.match_prefix(b) == 0 and b.block_table == []


def test_a_sequence_with_blocks_is_not_matched_again() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    a = make_seq(range(10))
    compute(bm, a)
    table = list(a.block_table)
    assert bm.match_prefix(a) == 0
    assert a.block_table == table


def test_hash_collision_with_different_tokens_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bm_module, "chain_hash", lambda parent, tokens: 42)
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute(bm, a)
    b = make_seq([9, 9, 9, 9, 5, 6, 7, 8, 9])
    assert bm.match_prefix(b) == 0
    c = make_seq([1, 2, 3, 4, 9, 9, 9, 9, 9])  # real hit on block 0, collision on block 1
    assert bm.match_prefix(c) == 4
    assert c.block_table == a.block_table[:1]


def test_hash_collision_with_equal_tokens_at_another_position_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Equal block tokens after a different prefix are not the same KV (other positions, other context)."""
    monkeypatch.setattr(bm_module, "chain_hash", lambda parent, tokens: 42)
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    x = [1, 2, 3, 4]
    a = make_seq(x + [5, 6, 7, 8, 9])
    compute(bm, a)
    b = make_seq(x + x + [9])  # block 1 has block 0's tokens and (forced) block 0's hash
    assert bm.match_prefix(b) == 4
    assert b.block_table == a.block_table[:1]


def test_hash_collision_ignoring_the_parent_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bm_module, "chain_hash", lambda parent, tokens: hash(tokens))
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    a = make_seq([1, 2, 3, 4, 20, 21, 22, 23, 9])
    compute(bm, a)
    b = make_seq([20, 21, 22, 23, 9])  # a's second block, but as a first block
    assert bm.match_prefix(b) == 0
    assert b.block_table == []


def test_identical_block_published_twice_keeps_the_first() -> None:
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    a, b = make_seq(range(9)), make_seq(range(9))
    assert bm.allocate(a, 9) and bm.allocate(b, 9)  # both computed without sharing (same step)
    for s in (a, b):
        s.num_computed_tokens = 9
        bm.cache_computed_blocks(s)
    a_blocks = list(a.block_table)
    assert len(bm._cached) == 2
    assert set(bm._cached.values()) == set(a_blocks[:2])
    assert all(bm.blocks[i].hash is None for i in b.block_table)
    bm.free(a)
    bm.free(b)
    check_invariants(bm, [])
    c = make_seq(range(10))
    assert bm.match_prefix(c) == 8
    assert c.block_table == a_blocks[:2]


def test_eviction_takes_least_recently_freed_blocks_first() -> None:
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    pa, pb = [1, 2, 3, 4, 5, 6, 7, 8], [11, 12, 13, 14, 15, 16, 17, 18]
    a, b = make_seq(pa), make_seq(pb)
    compute(bm, a)
    compute(bm, b)
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 4 and len(bm._cached) == 4
    # One new block: it must be a's tail (freed first, and tails go before heads).
    c = make_seq([90, 91, 92])
    assert bm.allocate(c, 3)
    assert c.block_table == [a_blocks[1]]
    assert len(bm._cached) == 3
    assert bm.blocks[a_blocks[1]].hash is None
    # a's head block is still a hit; b's prefix is fully there.
    d = make_seq(pa + [0])
    assert bm.match_prefix(d) == 4 and d.block_table == a_blocks[:1]
    e = make_seq(pb + [0])
    assert bm.match_prefix(e) == 8 and e.block_table == b_blocks
    check_invariants(bm, [c, d, e])
    assert bm.num_free_blocks == 0


def test_eviction_order_follows_reuse() -> None:
    """A cached block taken back by a hit and freed again becomes the most recently used."""
    bm = BlockManager(3, BS, enable_prefix_caching=True)
    blocks = {}
    seqs = []
    for start in (10, 20, 30):
        s = make_seq(list(range(start, start + BS)))
        compute(bm, s)
        blocks[start] = s.block_table[0]
        seqs.append(s)
    for s in seqs:
        bm.free(s)
    # Free order is 10, 20, 30. Re-use 10, then free it: now 20 is the oldest.
    hit = make_seq(list(range(10, 10 + BS)) + [1])
    assert bm.match_prefix(hit) == BS
    bm.free(hit)
    victim = make_seq([0])
    assert bm.allocate(victim, 1)
    assert victim.block_table == [blocks[20]]
    check_invariants(bm, [victim])


def test_reset_prefix_cache_forgets_only_unreferenced_blocks() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=True)
    a, b = make_seq(range(5)), make_seq(range(50, 55))
    compute(bm, a)
    compute(bm, b)
    bm.free(a)
    bm.reset_prefix_cache()
    assert list(bm._cached.values()) == b.block_table[:1]
    assert bm.match_prefix(make_seq(range(5))) == 0
    assert bm.match_prefix(make_seq(range(50, 55))) == 4


# --- random operation sequences --------------------------------------------------------------

OPS = st.lists(
    st.tuples(st.sampled_from(["admit", "grow", "free"]), st.integers(0, 7), st.integers(1, 12)),
    min_size=1, max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(OPS, st.booleans())
def test_random_operations_keep_the_accounting_consistent(ops, caching: bool) -> None:
    bm = BlockManager(10, BS, enable_prefix_caching=caching)
    live: list[Sequence] = []
    # Prompts drawn from few prefixes, so prefix hits and shared blocks happen.
    prefixes = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [7, 7, 7, 7, 7, 7, 7, 7]]
    for op, pick, size in ops:
        if op == "admit":
            seq = make_seq(prefixes[pick % 3][: min(size, 8)] + list(range(100, 100 + max(0, size - 8))))
            before = snapshot(bm, *live)
            cached = bm.match_prefix(seq)
            assert cached < seq.num_tokens and cached % BS == 0
            seq.num_computed_tokens = cached
            if bm.allocate(seq, seq.num_tokens):
                seq.num_computed_tokens = seq.num_tokens
                bm.cache_computed_blocks(seq)
                live.append(seq)
            else:
                bm.free(seq)  # give the prefix hits back, as the scheduler does
                assert seq.block_table == []
                # Only the free-list order may differ (returned hits go to its back).
                after = snapshot(bm, *live)
                assert after[1:] == before[1:]
                assert sorted(after[0]) == sorted(before[0])
        elif op == "grow" and live:
            seq = live[pick % len(live)]
            before = snapshot(bm, *live)
            target = seq.num_tokens + size
            if bm.allocate(seq, target):
                seq.token_ids.extend(range(300, 300 + size))
                seq.num_computed_tokens = seq.num_tokens
                bm.cache_computed_blocks(seq)
            else:
                assert snapshot(bm, *live) == before
        elif op == "free" and live:
            bm.free(live.pop(pick % len(live)))
        check_invariants(bm, live)
        for seq in live:
            assert len(seq.block_table) == -(-seq.num_tokens // BS)
