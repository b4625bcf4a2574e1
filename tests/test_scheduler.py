"""Scheduler: token budget, chunked prefill, decode-first, max_num_seqs, FCFS, preemption — on fake
sequences (no model: a "step" marks the scheduled tokens computed and appends a token to those that sample)."""
from __future__ import annotations

import itertools
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.block_manager import BlockManager
from engine.core.request import Sequence, SequenceStatus
from engine.core.scheduler import Scheduler, SchedulerOutput
from engine.sampling_params import SamplingParams

_ids = itertools.count()


def make_seq(prompt_len: int, max_tokens: int = 4, first: int = 0, name: str | None = None) -> Sequence:
    sid = next(_ids)
    return Sequence(sid, name or f"r{sid}", 0, list(range(first, first + prompt_len)),
                    SamplingParams(max_tokens=max_tokens, temperature=0))


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=32, caching=False) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size, caching), max_num_seqs, budget)


class Sim:
    """Drives a Scheduler like LLMEngine.step does, checking invariants at every step."""

    def __init__(self, sched: Scheduler):
        self.sched = sched
        self.steps: list[list[tuple[Sequence, int, bool]]] = []
        self.finished: list[Sequence] = []
        # Independent bookkeeping: tokens covered since the sequence's last admission.
        self.covered: dict[int, int] = {}
        self.sampled_at: dict[int, list[int]] = {}

    def add(self, *seqs: Sequence) -> None:
        for seq in seqs:
            self.sched.add(seq)

    def step(self) -> SchedulerOutput:
        sched, bm = self.sched, self.sched.block_manager
        running_before, waiting_before = list(sched.running), list(sched.waiting)
        out = sched.schedule()
        # Victims are the latest admitted, taken from the back; they go to the front of the queue.
        assert out.preempted == running_before[::-1][:len(out.preempted)]
        if out.preempted:
            assert list(sched.waiting) == out.preempted[::-1] + waiting_before
        # Running sequences come first, in admission order; new ones only after all of them.
        kept = [seq for seq in running_before if seq not in out.preempted]
        scheduled = [s.seq for s in out.scheduled]
        old = [seq for seq in scheduled if seq in running_before]
        assert old == kept[:len(old)]
        assert scheduled[:len(old)] == old
        admitted = scheduled[len(old):]
        if admitted:
            assert old == kept and not out.preempted
            assert admitted == waiting_before[:len(admitted)]
        assert out.num_tokens <= sched.max_num_batched_tokens
        assert len(sched.running) <= sched.max_num_seqs
        ids = [s.seq.seq_id for s in out.scheduled]
        assert len(ids) == len(set(ids)), "a sequence scheduled twice in one step"
        for victim in out.preempted:
            assert victim.block_table == [] and victim.num_computed_tokens == 0
            assert victim.status == SequenceStatus.WAITING and victim in sched.waiting
            assert victim not in sched.running
            self.covered.pop(victim.seq_id, None)
        for s in out.scheduled:
            seq = s.seq
            assert s.num_new_tokens >= 1
            assert seq.status == SequenceStatus.RUNNING and seq in sched.running
            # Chunks continue exactly where the last one ended (or after the cached prefix).
            start = self.covered.get(seq.seq_id, seq.num_cached_tokens)
            assert seq.num_computed_tokens == start
            assert start + s.num_new_tokens <= seq.num_tokens
            self.covered[seq.seq_id] = start + s.num_new_tokens
            assert len(seq.block_table) * bm.block_size >= start + s.num_new_tokens
        if not bm.enable_prefix_caching:
            tables = [b for seq in sched.running for b in seq.block_table]
            assert len(tables) == len(set(tables)), "blocks shared without prefix caching"
        assert all(seq.block_table == [] for seq in sched.waiting)
        samples = [s.samples for s in out.scheduled]
        sched.update_after_step(out)
        self.steps.append([(s.seq, s.num_new_tokens, smp) for s, smp in zip(out.scheduled, samples)])
        for s, smp in zip(out.scheduled, samples):
            seq = s.seq
            assert seq.num_computed_tokens == self.covered[seq.seq_id]
            if smp:
                assert seq.num_computed_tokens == seq.num_tokens
                self.sampled_at.setdefault(seq.seq_id, []).append(len(self.steps) - 1)
                seq.append_token(1000 + seq.num_output_tokens, None)
                if seq.num_output_tokens >= seq.params.max_tokens:
                    sched.finish(seq)
                    self.finished.append(seq)
        return out

    def run(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                return
            self.step()
        raise AssertionError("the scheduler did not finish every sequence")


def test_chunked_prefill_splits_a_long_prompt_and_covers_it_exactly() -> None:
    sim = Sim(make_scheduler(budget=16))
    seq = make_seq(50, max_tokens=2)
    sim.add(seq)
    for _ in range(4):
        sim.step()
    chunks = [(n, smp) for step in sim.steps for (_, n, smp) in step]
    assert chunks == [(16, False), (16, False), (16, False), (2, True)]
    assert seq.num_computed_tokens == 50 and seq.num_output_tokens == 1
    sim.step()  # the decode
    assert sim.steps[-1] == [(seq, 1, True)]
    assert seq.is_finished


def test_decodes_are_scheduled_before_new_prefills() -> None:
    sim = Sim(make_scheduler(budget=10))
    a, b = make_seq(5, max_tokens=10), make_seq(5, max_tokens=10)
    sim.add(a, b)
    sim.step()  # both prefills fit: 5 + 5
    assert [(s, n) for s, n, _ in sim.steps[-1]] == [(a, 5), (b, 5)]
    c = make_seq(30, max_tokens=1)
    sim.add(c)
    sim.step()
    # a and b decode (one token each) first, then c gets what is left of the budget.
    assert [(s, n) for s, n, _ in sim.steps[-1]] == [(a, 1), (b, 1), (c, 8)]
    sim.step()
    assert [(s, n) for s, n, _ in sim.steps[-1]] == [(a, 1), (b, 1), (c, 8)]


def test_max_num_seqs_is_respected_and_admission_is_fcfs() -> None:
    sim = Sim(make_scheduler(max_num_seqs=2, budget=100))
    seqs = [make_seq(3 + i, max_tokens=3) for i in range(5)]
    sim.add(*seqs)
    sim.run()
    admitted_order = []
    for step in sim.steps:
        running = {s.seq_id for s, _, _ in step}
        assert len(running) <= 2
        for s, _, _ in step:
            if s not in admitted_order:
                admitted_order.append(s)
    assert admitted_order == seqs
    # A new sequence only starts when an earlier one finished.
    first_steps = [min(i for i, step in enumerate(sim.steps) if any(s is seq for s, _, _ in step)) for seq in seqs]
    assert first_steps == sorted(first_steps)
    assert first_steps[2] > first_steps[1]


def test_head_of_line_is_not_overtaken_by_a_smaller_later_request() -> None:
    # 6 blocks of 4: a takes 4, so b (3 blocks) must wait; c (1 block) would fit but is behind b.
    sim = Sim(make_scheduler(num_blocks=6, budget=64))
    a = make_seq(15, max_tokens=2)
    sim.add(a)
    sim.step()
    b, c = make_seq(12, max_tokens=1), make_seq(2, max_tokens=1)
    sim.add(b, c)
    sim.step()
    assert [s for s, _, _ in sim.steps[-1]] == [a]
    assert list(sim.sched.waiting) == [b, c]
    sim.run()
    order = [s for s in sim.finished]
    assert order == [a, b, c]


def test_preemption_frees_the_latest_admitted_and_requeues_it_first() -> None:
    # 5 blocks of 4. a and b each hold 2 full blocks after their prefill; the next decode needs
    # a third block each, and only one is free.
    sched = make_scheduler(num_blocks=5, budget=64)
    sim = Sim(sched)
    a, b = make_seq(8, max_tokens=6), make_seq(8, max_tokens=6)
    sim.add(a, b)
    sim.step()
    assert a.num_tokens == 9 and b.num_tokens == 9
    late = make_seq(3, max_tokens=1)
    sim.add(late)
    free_before = sched.block_manager.num_free_blocks
    assert free_before == 1
    out = sim.step()
    assert out.preempted == [b]
    assert sched.num_preemptions == 1
    assert [s.seq for s in out.scheduled] == [a]
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert list(sched.waiting) == [b, late]  # the victim goes to the front
    # b's two blocks came back; a took the one that was free.
    assert sched.block_manager.num_free_blocks == free_before - 1 + 2
    assert b.output_token_ids == [1000]  # generated tokens are kept and recomputed
    sim.run()
    assert {s.seq_id for s in sim.finished} == {a.seq_id, b.seq_id, late.seq_id}
    for seq in (a, b):
        assert seq.output_token_ids == [1000 + i for i in range(6)]


def test_the_last_running_sequence_preempts_itself_and_earlier_ones_keep_going() -> None:
    # a holds 3 blocks, b 2; the one free block goes to a's decode (it needs a 4th), so b,
    # scheduled after it, cannot get its 3rd and is its own victim.
    sched = make_scheduler(num_blocks=6, budget=64)
    sim = Sim(sched)
    a, b = make_seq(12, max_tokens=4), make_seq(8, max_tokens=4)
    sim.add(a, b)
    sim.step()
    out = sim.step()
    assert [s.seq for s in out.scheduled] == [a]
    assert out.preempted == [b]
    assert sched.running == [a] and list(sched.waiting) == [b]
    sim.run()
    assert len(sim.finished) == 2


def test_no_admission_in_a_step_that_preempted() -> None:
    sched = make_scheduler(num_blocks=5, budget=64)
    sim = Sim(sched)
    a, b = make_seq(8, max_tokens=3), make_seq(8, max_tokens=3)
    sim.add(a, b)
    sim.step()
    # With a budget of 2, b's decode preempts b itself with 1 token of budget left; a 1-token
    # re-admission chunk of b would fit in the 2 free blocks, but a preempting step admits nothing.
    sched.max_num_batched_tokens = 2
    out = sim.step()
    assert out.preempted == [b]
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 1)]
    assert sched.block_manager.num_free_blocks == 2
    assert list(sched.waiting) == [b]
    out = sim.step()  # next step: a decodes, then b comes back with a 1-token chunk
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(a, 1), (b, 1)]


def test_finish_frees_blocks_from_running_or_waiting() -> None:
    sched = make_scheduler(num_blocks=8)
    a, b = make_seq(6), make_seq(6)
    sched.add(a)
    sched.add(b)
    sched.max_num_seqs = 1
    sched.schedule()
    assert sched.running == [a] and a.block_table
    sched.finish(a)
    sched.finish(b)
    assert a.is_finished and b.is_finished
    assert not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == 8


def test_prefix_hits_are_skipped_by_the_chunks() -> None:
    sched = make_scheduler(num_blocks=32, budget=64, caching=True)
    sim = Sim(sched)
    a = make_seq(13, max_tokens=1)
    sim.add(a)
    sim.run()
    b = make_seq(13, max_tokens=1)
    sim.add(b)
    sim.step()
    assert b.num_cached_tokens == 12
    assert sim.steps[-1] == [(b, 1, True)]


@settings(max_examples=120, deadline=None)
@given(
    prompts=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 8), st.integers(0, 2)), min_size=1, max_size=8),
    budget=st.integers(1, 48),
    max_num_seqs=st.integers(1, 6),
    block_size=st.sampled_from([1, 2, 4, 8]),
    spare_blocks=st.integers(0, 12),
    caching=st.booleans(),
    arrivals=st.lists(st.integers(0, 6), min_size=8, max_size=8),
)
def test_random_workloads_respect_every_limit_and_finish(prompts, budget, max_num_seqs, block_size, spare_blocks,
                                                         caching, arrivals) -> None:
    longest = max(p + m for p, m, _ in prompts)
    # Enough blocks for the longest sequence alone (the engine's config guarantees that much).
    num_blocks = -(-longest // block_size) + spare_blocks
    sched = make_scheduler(num_blocks, block_size, max_num_seqs, budget, caching)
    sim = Sim(sched)
    # Few distinct prefixes, so prefix caching has something to hit.
    seqs = [make_seq(p, m, first=prefix * 7) for p, m, prefix in prompts]
    pending = list(zip(arrivals, seqs))
    step = 0
    while pending or sched.has_unfinished():
        while pending and pending[0][0] <= step:
            sim.add(pending.pop(0)[1])
        if sched.has_unfinished():
            sim.step()
        step += 1
        assert step < 5000, "no progress"
    assert Counter(s.seq_id for s in sim.finished) == Counter(s.seq_id for s in seqs)
    for seq in seqs:
        assert seq.num_output_tokens == seq.params.max_tokens
        assert seq.block_table == []
    assert sched.block_manager.num_free_blocks == num_blocks
    if sched.num_preemptions == 0:
        # Without preemption, arrival order is admission order (FCFS).
        first = {}
        for i, st_ in enumerate(sim.steps):
            for s, _, _ in st_:
                first.setdefault(s.seq_id, i)
        order = sorted(seqs, key=lambda s: first[s.seq_id])
        assert [s.seq_id for s in order] == [s.seq_id for s in seqs]


def test_prefix_hits_count_once_when_admission_waits_for_blocks() -> None:
    # 6 blocks of 4: while `a` decodes, `b` (its first 3 blocks cached from `a`, 3 more needed)
    # is looked up and refused at every step, and admitted once `a` finishes.
    sched = make_scheduler(num_blocks=6, caching=True)
    sim = Sim(sched)
    a = make_seq(13, max_tokens=8)
    sim.add(a)
    sim.step()
    b = make_seq(24, max_tokens=1)
    sim.add(b)
    sim.run()
    assert b.num_cached_tokens == 12 and len(sim.steps) > 3
    bm = sched.block_manager
    assert (bm.prefix_queries, bm.prefix_hits) == ((13 - 1) // 4 + (24 - 1) // 4, 3)
