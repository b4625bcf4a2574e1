"""Comparators deciding whether two greedy generations, or two scorings of the same prompts,
come from the same model.

Outputs are the runners' plain tuples: (token_ids, text) or (token_ids, text, top_logprobs)
where top_logprobs holds, per generated position, token id -> logprob for the top-k plus
the chosen token; prompt logprobs are (prompt_token_ids, prompt_logprobs), the same dicts
per prompt position with the prompt's own token in place of the chosen one and None at
position 0.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# Float32 engine vs HF differed by at most 3.2e-5 over every zoo model (9 prompts x 32 tokens),
# from summation order alone; this leaves 30x headroom while a wrong scale, rope base or
# weight moves logprobs by far more.
DEFAULT_LOGPROB_ATOL = 1e-3


class ComparisonError(AssertionError):
    """A failed comparison; `comparison` keeps the measurements for the result record."""

    def __init__(self, message: str, comparison: LogprobsComparison | PromptLogprobsComparison) -> None:
        super().__init__(message)
        self.comparison = comparison


@dataclass
class PromptComparison:
    prompt_index: int
    length_0: int
    length_1: int
    # First position whose chosen tokens differ; None when one output is a prefix of the other.
    first_divergence: int | None
    # Positions whose logprob values were compared (conditioned on identical prefixes).
    compared_positions: int
    max_abs_logprob_diff: float
    max_diff_position: int | None
    problems: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return self.first_divergence is None and self.length_0 == self.length_1

    @property
    def matched_tokens(self) -> int:
        """Tokens both sides chose alike before any divergence."""
        return min(self.length_0, self.length_1) if self.first_divergence is None else self.first_divergence


@dataclass
class _Comparison:
    """What every comparison of a batch of prompts measures (subclasses add `prompts`)."""

    name_0: str
    name_1: str
    atol: float

    @property
    def passed(self) -> bool:
        return not any(p.problems for p in self.prompts)

    @property
    def max_abs_logprob_diff(self) -> float:
        return max((p.max_abs_logprob_diff for p in self.prompts), default=0.0)

    def metrics(self) -> dict[str, float | int | None]:
        return {
            "prompts": len(self.prompts),
            "compared_positions": sum(p.compared_positions for p in self.prompts),
            "max_abs_logprob_diff": self.max_abs_logprob_diff,
            "logprob_atol": self.atol,
        }

    def _raise_if_failed(self) -> None:
        failed = [p for p in self.prompts if p.problems]
        if failed:
            details = "\n".join(problem for p in failed for problem in p.problems)
            raise ComparisonError(
                f"{self.name_0} vs {self.name_1}: {len(failed)} of {len(self.prompts)} prompts fail\n{details}", self
            )


@dataclass
class LogprobsComparison(_Comparison):
    prompts: list[PromptComparison]

    def metrics(self) -> dict[str, float | int | None]:
        return {
            **super().metrics(),
            "identical_prompts": sum(p.identical for p in self.prompts),
            "divergent_prompts": sum(p.first_divergence is not None for p in self.prompts),
            "first_divergence": _earliest(p.first_divergence for p in self.prompts),
            "matched_tokens": sum(p.matched_tokens for p in self.prompts),
        }


def _earliest(positions: Iterable[int | None]) -> int | None:
    return min((pos for pos in positions if pos is not None), default=None)


def check_outputs_equal(
    outputs_0: Sequence[Sequence[Any]],
    outputs_1: Sequence[Sequence[Any]],
    name_0: str,
    name_1: str,
) -> None:
    """Token ids and text must be identical for every prompt."""
    _check_same_prompt_count(outputs_0, outputs_1, name_0, name_1)
    _raise_on_mismatch(list(enumerate(zip(outputs_0, outputs_1))), (name_0, name_1))


def check_text_where_tokens_match(
    outputs_0: Sequence[Sequence[Any]],
    outputs_1: Sequence[Sequence[Any]],
    name_0: str,
    name_1: str,
) -> int:
    """Where both sides chose the same token ids, their texts must be identical too.

    The same ids can only decode differently through a detokenizer bug. Returns the number
    of prompts compared.
    """
    _check_same_prompt_count(outputs_0, outputs_1, name_0, name_1)
    pairs = [
        (index, (out_0, out_1))
        for index, (out_0, out_1) in enumerate(zip(outputs_0, outputs_1))
        if list(out_0[0]) == list(out_1[0])
    ]
    _raise_on_mismatch(pairs, (name_0, name_1))
    return len(pairs)


def _raise_on_mismatch(
    indexed_pairs: list[tuple[int, tuple[Sequence[Any], Sequence[Any]]]], names: tuple[str, str]
) -> None:
    mismatches = [
        _mismatch_message(index, out_0[:2], out_1[:2], names)
        for index, (out_0, out_1) in indexed_pairs
        if list(out_0[0]) != list(out_1[0]) or out_0[1] != out_1[1]
    ]
    if mismatches:
        raise AssertionError(
            f"{len(mismatches)} of {len(indexed_pairs)} prompts compared differ:\n" + "\n".join(mismatches)
        )


def _mismatch_message(index: int, out_0: Sequence[Any], out_1: Sequence[Any], names: tuple[str, str]) -> str:
    (ids_0, text_0), (ids_1, text_1) = out_0, out_1
    if list(ids_0) == list(ids_1):
        what = "same tokens, text differs"
    else:
        where = _first_difference(ids_0, ids_1)
        what = f"tokens differ from position {min(len(ids_0), len(ids_1)) if where is None else where}"
    return (
        f"prompt {index}: {what}\n"
        f"  {names[0]}: {text_0!r}\n    ids {list(ids_0)}\n"
        f"  {names[1]}: {text_1!r}\n    ids {list(ids_1)}"
    )


def check_logprobs_close(
    outputs_0: Sequence[Sequence[Any]],
    outputs_1: Sequence[Sequence[Any]],
    name_0: str,
    name_1: str,
    *,
    eos_token_ids: Collection[int] = (),
    atol: float = DEFAULT_LOGPROB_ATOL,
    tokenizer: Any = None,
    warn_on_mismatch: bool = True,
) -> LogprobsComparison:
    """Greedy outputs agree up to near-ties, at every position and in length.

    Walks each prompt's tokens to the first divergence. Up to and including it both sides
    condition on the same prefix, so the logprobs of tokens in both top-k must agree within
    `atol`; at the divergence each chosen token must be in the other side's top-k (a near
    tie), and nothing after it is comparable. Without a divergence the lengths must match,
    unless the shorter output ends on one of `eos_token_ids`.
    """
    _check_same_prompt_count(outputs_0, outputs_1, name_0, name_1)
    names = (name_0, name_1)
    prompts = [
        _compare_prompt(index, out_0, out_1, names, set(eos_token_ids), atol, tokenizer)
        for index, (out_0, out_1) in enumerate(zip(outputs_0, outputs_1))
    ]
    comparison = LogprobsComparison(name_0, name_1, atol, prompts)
    comparison._raise_if_failed()
    if warn_on_mismatch:
        for p in prompts:
            if p.first_divergence is not None:
                warnings.warn(
                    f"{name_0} vs {name_1}: prompt {p.prompt_index} diverges at position "
                    f"{p.first_divergence} between near-tied tokens (each in the other's top-k)",
                    stacklevel=2,
                )
    return comparison


def _compare_prompt(
    index: int,
    out_0: Sequence[Any],
    out_1: Sequence[Any],
    names: tuple[str, str],
    eos_token_ids: set[int],
    atol: float,
    tokenizer: Any,
) -> PromptComparison:
    (ids_0, _, top_0), (ids_1, _, top_1) = out_0[:3], out_1[:3]
    divergence = _first_difference(ids_0, ids_1)
    result = PromptComparison(
        prompt_index=index,
        length_0=len(ids_0),
        length_1=len(ids_1),
        first_divergence=divergence,
        compared_positions=0,
        max_abs_logprob_diff=0.0,
        max_diff_position=None,
        problems=_malformed(index, names[0], ids_0, top_0) + _malformed(index, names[1], ids_1, top_1),
    )
    if result.problems:
        return result

    last = divergence if divergence is not None else min(len(ids_0), len(ids_1)) - 1
    result.compared_positions = last + 1
    result.max_abs_logprob_diff, result.max_diff_position = _max_logprob_diff(top_0[: last + 1], top_1[: last + 1])

    fmt = _TokenFormatter(tokenizer)
    if divergence is not None:
        result.problems += _near_tie_problems(index, divergence, (ids_0, ids_1), (top_0, top_1), names, fmt)
    else:
        result.problems += _length_problems(index, (ids_0, ids_1), names, eos_token_ids)
    if result.max_abs_logprob_diff > atol:
        at = result.max_diff_position
        result.problems.append(
            f"prompt {index}, position {at}: logprobs differ by {result.max_abs_logprob_diff:.3g} > atol {atol:g} "
            f"on an identical prefix\n" + fmt.top_k_lines(names, (top_0[at], top_1[at]))
        )
    return result


def _near_tie_problems(
    index: int,
    pos: int,
    ids: tuple[Sequence[int], Sequence[int]],
    tops: tuple[Sequence[dict[int, float]], Sequence[dict[int, float]]],
    names: tuple[str, str],
    fmt: _TokenFormatter,
) -> list[str]:
    missing = [
        f"{fmt(ids[side][pos])} ({names[side]}'s choice) is not in {names[1 - side]}'s top-k"
        for side in (0, 1)
        if ids[side][pos] not in tops[1 - side][pos]
    ]
    if not missing:
        return []
    return [
        f"prompt {index}, position {pos}: tokens diverge and " + "; ".join(missing) + "\n"
        + fmt.top_k_lines(names, (tops[0][pos], tops[1][pos]))
    ]


def _length_problems(
    index: int, ids: tuple[Sequence[int], Sequence[int]], names: tuple[str, str], eos_token_ids: set[int]
) -> list[str]:
    """One output is a prefix of the other: only an EOS explains stopping early."""
    if len(ids[0]) == len(ids[1]):
        return []
    side = 0 if len(ids[0]) < len(ids[1]) else 1
    shorter, longer = ids[side], ids[1 - side]
    if shorter and shorter[-1] in eos_token_ids:
        return []
    return [
        f"prompt {index}: {names[side]} stopped after {len(shorter)} tokens without an EOS, "
        f"{names[1 - side]} went on to {len(longer)} tokens with the same prefix"
    ]


def _malformed(index: int, name: str, ids: Sequence[int], top: Sequence[dict[int, float]]) -> list[str]:
    if len(top) != len(ids):
        return [f"prompt {index}: {name} has {len(ids)} tokens but logprobs for {len(top)} positions"]
    missing = [pos for pos, (token, step) in enumerate(zip(ids, top)) if token not in step]
    if missing:
        return [f"prompt {index}: {name}'s logprobs lack its own chosen token at positions {missing}"]
    return []


@dataclass
class PromptLogprobsDiff:
    """One prompt as scored by both sides."""

    prompt_index: int
    num_tokens: int
    # Every position after the first, which nothing predicts.
    compared_positions: int = 0
    # Positions whose top-k token sets are the same on both sides.
    matched_positions: int = 0
    # First position whose top-k sets differ (passing only as a near-tie at the k-th rank).
    first_topk_mismatch: int | None = None
    max_abs_logprob_diff: float = 0.0
    max_diff_position: int | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class PromptLogprobsComparison(_Comparison):
    num_logprobs: int
    prompts: list[PromptLogprobsDiff]

    def metrics(self) -> dict[str, float | int | None]:
        return {
            **super().metrics(),
            "matched_topk_positions": sum(p.matched_positions for p in self.prompts),
            "first_topk_mismatch": _earliest(p.first_topk_mismatch for p in self.prompts),
            "num_logprobs": self.num_logprobs,
        }


def check_prompt_logprobs_close(
    outputs_0: Sequence[Sequence[Any]],
    outputs_1: Sequence[Sequence[Any]],
    name_0: str,
    name_1: str,
    *,
    num_logprobs: int,
    atol: float = DEFAULT_LOGPROB_ATOL,
    tokenizer: Any = None,
) -> PromptLogprobsComparison:
    """Both sides score the same prompts alike at every prompt position.

    The prompts must tokenize to the same ids. Every prompt position conditions on the same
    prefix on both sides, so at each one the logprobs of tokens both sides report (the
    prompt's own token always) agree within `atol`, and the top-`num_logprobs` sets are
    equal except across a near-tie at the k-th rank: a token in one side's top-k only may
    score there at most `atol` above the other side's k-th logprob, else the other side
    could not have left it out had both computed the same distribution.
    """
    _check_same_prompt_count(outputs_0, outputs_1, name_0, name_1)
    names, fmt = (name_0, name_1), _TokenFormatter(tokenizer)
    prompts = [
        _compare_prompt_logprobs(index, out_0, out_1, names, num_logprobs, atol, fmt)
        for index, (out_0, out_1) in enumerate(zip(outputs_0, outputs_1))
    ]
    comparison = PromptLogprobsComparison(name_0, name_1, atol, num_logprobs, prompts)
    comparison._raise_if_failed()
    return comparison


def _compare_prompt_logprobs(
    index: int,
    out_0: Sequence[Any],
    out_1: Sequence[Any],
    names: tuple[str, str],
    k: int,
    atol: float,
    fmt: _TokenFormatter,
) -> PromptLogprobsDiff:
    (ids_0, steps_0), (ids_1, steps_1) = out_0, out_1
    ids_0, ids_1 = list(ids_0), list(ids_1)
    result = PromptLogprobsDiff(index, len(ids_0))
    result.problems = _malformed_prompt_logprobs(index, names[0], ids_0, steps_0, k) + _malformed_prompt_logprobs(
        index, names[1], ids_1, steps_1, k
    )
    if ids_0 != ids_1:
        at = _first_difference(ids_0, ids_1)
        at = min(len(ids_0), len(ids_1)) if at is None else at
        result.problems.append(
            f"prompt {index}: tokenized differently from position {at}: "
            f"{names[0]} {ids_0[at:at + 5]}, {names[1]} {ids_1[at:at + 5]}"
        )
    if result.problems:
        return result

    result.compared_positions = max(len(ids_0) - 1, 0)
    diff, at = _max_logprob_diff(steps_0[1:], steps_1[1:])
    result.max_abs_logprob_diff, result.max_diff_position = diff, None if at is None else at + 1
    beyond_tie = []
    for pos in range(1, len(ids_0)):
        steps = (steps_0[pos], steps_1[pos])
        tops = (_top_k_set(steps[0], ids_0[pos], k), _top_k_set(steps[1], ids_0[pos], k))
        if tops[0] == tops[1]:
            result.matched_positions += 1
            continue
        if result.first_topk_mismatch is None:
            result.first_topk_mismatch = pos
        if _beyond_near_tie(steps, tops, atol):
            beyond_tie.append(pos)
    if beyond_tie:
        pos = beyond_tie[0]
        result.problems.append(
            f"prompt {index}: top-{k} sets differ beyond a near-tie at {len(beyond_tie)} of "
            f"{result.compared_positions} positions, first at position {pos} (prompt token {fmt(ids_0[pos])})\n"
            + fmt.top_k_lines(names, (steps_0[pos], steps_1[pos]))
        )
    if diff > atol:
        at = result.max_diff_position
        result.problems.append(
            f"prompt {index}, position {at}: prompt logprobs differ by {diff:.3g} > atol {atol:g}\n"
            + fmt.top_k_lines(names, (steps_0[at], steps_1[at]))
        )
    return result


def _top_k_set(step: dict[int, float], prompt_token: int, k: int) -> set[int]:
    """A position's top-k: all its entries, less the prompt's own token when that ranked below
    the top k and so came as the extra (k+1)-th entry."""
    return set(step) - {prompt_token} if len(step) > k else set(step)


def _beyond_near_tie(
    steps: tuple[dict[int, float], dict[int, float]], tops: tuple[set[int], set[int]], atol: float
) -> bool:
    for side, other in ((0, 1), (1, 0)):
        kth = min((steps[other][token] for token in tops[other]), default=-math.inf)
        if any(steps[side][token] > kth + atol for token in tops[side] - tops[other]):
            return True
    return False


def _malformed_prompt_logprobs(
    index: int, name: str, ids: Sequence[int], steps: Sequence[dict[int, float] | None], k: int
) -> list[str]:
    if len(steps) != len(ids):
        return [f"prompt {index}: {name} has {len(ids)} prompt tokens but logprobs for {len(steps)} positions"]
    problems = []
    if steps and steps[0] is not None:
        problems.append(f"prompt {index}: {name} has logprobs at position 0, which no token precedes")
    lacking = [pos for pos in range(1, len(ids)) if steps[pos] is None or ids[pos] not in steps[pos]]
    if lacking:
        problems.append(f"prompt {index}: {name}'s prompt logprobs lack the prompt's own token at positions {lacking}")
    sized = [pos for pos in range(1, len(ids)) if steps[pos] is not None and len(steps[pos]) not in (k, k + 1)]
    if sized:
        problems.append(
            f"prompt {index}: {name} has {len(steps[sized[0]])} logprobs at position {sized[0]} "
            f"({len(sized)} positions in all), not the top {k} plus the prompt token"
        )
    return problems


def _first_difference(ids_0: Sequence[int], ids_1: Sequence[int]) -> int | None:
    """First position where both outputs have a token and the tokens differ."""
    return next((pos for pos, (a, b) in enumerate(zip(ids_0, ids_1)) if a != b), None)


def _max_logprob_diff(
    top_0: Sequence[dict[int, float]], top_1: Sequence[dict[int, float]]
) -> tuple[float, int | None]:
    worst, worst_at = 0.0, None
    for pos, (step_0, step_1) in enumerate(zip(top_0, top_1)):
        for token in step_0.keys() & step_1.keys():
            diff = _logprob_diff(step_0[token], step_1[token])
            if worst_at is None or diff > worst:
                worst, worst_at = diff, pos
    return worst, worst_at


def _logprob_diff(a: float, b: float) -> float:
    if a == b:  # also two -inf, which subtract to NaN
        return 0.0
    diff = abs(a - b)
    # A NaN must fail every tolerance, and NaN compares False with all of them.
    return math.inf if math.isnan(diff) else diff


def _check_same_prompt_count(outputs_0: Sequence, outputs_1: Sequence, name_0: str, name_1: str) -> None:
    if len(outputs_0) != len(outputs_1):
        raise AssertionError(f"{name_0} has outputs for {len(outputs_0)} prompts, {name_1} for {len(outputs_1)}")


class _TokenFormatter:
    """Shows a token as its id plus, given a tokenizer, its decoded text."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, token: int) -> str:
        if self.tokenizer is None:
            return str(token)
        return f"{token} {self.tokenizer.decode([token])!r}"

    def top_k_lines(self, names: tuple[str, str], tops: tuple[dict[int, float], dict[int, float]]) -> str:
        width = max(len(name) for name in names)
        lines = []
        for name, top in zip(names, tops):
            ranked = sorted(top.items(), key=lambda item: -item[1])
            lines.append(f"  {name:>{width}} top-k: " + ", ".join(f"{self(t)}: {lp:.4f}" for t, lp in ranked))
        return "\n".join(lines)
