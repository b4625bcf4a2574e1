"""Strict tier: a prompt's greedy output does not depend on what it is batched with.

Each example prompt is generated alone, then all together, all together in reverse order, two
at a time among different partners that stop after different numbers of tokens (so the decode
batch changes shape under both), and with at most two sequences running at once (so later
prompts' prefills share steps with earlier ones' decodes). Every batching must give the same greedy
tokens as the prompt alone. Unlike test_generation, nothing here is compared with Transformers
and no near-tie excuses a difference: the same engine on the same prompt has no second
implementation whose rounding could differ, only a batch that should not matter.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from engine import LLM, SamplingParams
from harness.golden import ReferenceSettings
from harness.runners import EngineRunner, TokensTextLogprobs

pytestmark = [pytest.mark.strict, pytest.mark.usefixtures("generation_model")]

SETTINGS = ReferenceSettings()
MAX_TOKENS = SETTINGS.max_tokens
# Partners leave the batch after these many tokens, at steps spread over the subjects' decode.
PARTNER_TOKENS = (3, 11)
# Where a batch's two subjects sit among its four places, one arrangement per batch in turn.
SUBJECT_PLACES = ((0, 3), (1, 2), (0, 1), (2, 3))
STAGGERED_MAX_SEQS = 2


@dataclass
class Greedy:
    token_ids: list[int]
    # Per position: token id -> logprob, the chosen token and the top num_logprobs.
    logprobs: list[dict[int, float]]


def generate(llm: LLM, prompts: list[str], max_tokens: list[int]) -> list[Greedy]:
    params = [SamplingParams(temperature=0.0, max_tokens=n, logprobs=SETTINGS.num_logprobs) for n in max_tokens]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [
        Greedy(list(c.token_ids), [{t: lp.logprob for t, lp in step.items()} for step in c.logprobs or []])
        for c in (out.outputs[0] for out in outputs)
    ]


def as_greedy(generations: list[TokensTextLogprobs]) -> list[Greedy]:
    return [Greedy(token_ids, logprobs) for token_ids, _, logprobs in generations]


@pytest.fixture(scope="module")
def alone(engine_generations: Callable[[int | None], list[TokensTextLogprobs]]) -> list[Greedy]:
    """Each prompt generated on its own: test_generation's batch of one, shared."""
    return as_greedy(engine_generations(1))


def together(llm: LLM, prompts: list[str]) -> list[Greedy]:
    return generate(llm, prompts, [MAX_TOKENS] * len(prompts))


def reversed_order(llm: LLM, prompts: list[str]) -> list[Greedy]:
    return together(llm, prompts[::-1])[::-1]


def other_partners(llm: LLM, prompts: list[str]) -> list[Greedy]:
    """Two prompts at a time among two partners that leave after PARTNER_TOKENS tokens, so the
    decode batch changes shape under both subjects; each batch places its subjects elsewhere."""
    n = len(prompts)
    results: dict[int, Greedy] = {}
    for batch_index, first in enumerate(range(0, n, 2)):
        subjects = [first, (first + 1) % n]
        places = SUBJECT_PLACES[batch_index % len(SUBJECT_PLACES)]
        size = len(subjects) + len(PARTNER_TOKENS)
        batch, budgets = [""] * size, [MAX_TOKENS] * size
        for subject, place in zip(subjects, places, strict=True):
            batch[place] = prompts[subject]
        partner_places = [place for place in range(size) if place not in places]
        for j, (place, budget) in enumerate(zip(partner_places, PARTNER_TOKENS, strict=True)):
            batch[place], budgets[place] = prompts[(first + 2 + j) % n], budget
        outputs = generate(llm, batch, budgets)
        for subject, place in zip(subjects, places, strict=True):
            # With an odd number of prompts the last batch's second subject is prompt 0 again.
            results.setdefault(subject, outputs[place])
    return [results[i] for i in range(n)]


BATCHINGS = {"reversed": reversed_order, "other_partners": other_partners}


@pytest.mark.parametrize("batching", ["together", *BATCHINGS])
def test_batch_partners_do_not_change_greedy_tokens(
    engine: EngineRunner, alone: list[Greedy], engine_generations: Callable[[int | None], list[TokensTextLogprobs]],
    example_prompts: list[str], batching: str, litmus_record
):
    # All prompts at once is test_generation's batch_all run (the same request), shared rather than repeated.
    batched = (as_greedy(engine_generations(None)) if batching == "together"
               else BATCHINGS[batching](engine.llm, example_prompts))
    check_same(alone, batched, batching, engine, litmus_record)


def test_staggered_scheduling_does_not_change_greedy_tokens(
    engine_runner: Callable[..., EngineRunner], model_path: str, engine: EngineRunner, alone: list[Greedy],
    example_prompts: list[str], litmus_record,
):
    litmus_record.metrics["max_num_seqs"] = STAGGERED_MAX_SEQS
    # Prompts of equal budgets admitted together would finish together and be replaced together,
    # every prefill then in a step without decodes; a partner leaving after a few tokens puts them
    # out of step for good, so each later prompt's prefill joins an earlier one's decode.
    batch = [example_prompts[-1], *example_prompts]
    with engine_runner(model_path, max_num_seqs=STAGGERED_MAX_SEQS) as staggered:
        outputs = generate(staggered.llm, batch, [PARTNER_TOKENS[0]] + [MAX_TOKENS] * len(example_prompts))[1:]
    check_same(alone, outputs, f"max_num_seqs={STAGGERED_MAX_SEQS}", engine, litmus_record)


def check_same(alone: list[Greedy], batched: list[Greedy], batching: str, engine: EngineRunner, litmus_record) -> None:
    mismatches, worst = [], 0.0
    for i, (a, b) in enumerate(zip(alone, batched, strict=True)):
        same = next((p for p, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
        prefix = min(len(a.token_ids), len(b.token_ids)) if same is None else same + 1
        # The chosen tokens' logprobs on the common prefix: how far the batch moved the numbers.
        for p in range(prefix):
            token = a.token_ids[p]
            if token in b.logprobs[p]:
                worst = max(worst, abs(a.logprobs[p][token] - b.logprobs[p][token]))
        if same is not None or len(a.token_ids) != len(b.token_ids):
            mismatches.append(_describe(i, a, b, same, engine))
    litmus_record.metrics.update(batching=batching, prompts=len(alone), differing_prompts=len(mismatches),
                                 max_abs_logprob_diff=worst)
    assert not mismatches, (
        f"{len(mismatches)} of {len(alone)} prompts decode differently {batching} than alone:\n" + "\n".join(mismatches)
    )


def _describe(index: int, a: Greedy, b: Greedy, at: int | None, engine: EngineRunner) -> str:
    if at is None:
        return f"prompt {index}: {len(a.token_ids)} tokens alone, {len(b.token_ids)} batched (same prefix)"
    ranked = sorted(a.logprobs[at].values(), reverse=True)
    gap = ranked[0] - ranked[1] if len(ranked) > 1 else float("inf")
    decode = engine.tokenizer.decode
    return (f"prompt {index}, position {at}: alone {a.token_ids[at]} {decode([a.token_ids[at]])!r}, batched "
            f"{b.token_ids[at]} {decode([b.token_ids[at]])!r} (alone's top-2 logprob gap there {gap:.3g})")
