"""From final logits to the next token per sequence, plus the logprobs reported for it.

Reported logprobs are the log-softmax of the model's logits before any sampling transform
(vLLM's default "raw" mode), so greedy logprobs compare directly with Transformers' logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from litmus_kernels import ops


@dataclass
class SamplingBatch:
    temperature: torch.Tensor  # [N] float; 0 marks a greedy row
    top_k: torch.Tensor  # [N] int64; 0 disables
    top_p: torch.Tensor  # [N] float
    min_p: torch.Tensor  # [N] float
    generators: list[torch.Generator | None]
    num_logprobs: list[int | None]  # per row: None = no logprobs wanted
    # Penalties, present only when some row uses them.
    penalty_token_counts: torch.Tensor | None = None  # [N, V] counts of output tokens
    penalty_prompt_mask: torch.Tensor | None = None  # [N, V] bool: token appears in prompt
    presence_penalty: torch.Tensor | None = None
    frequency_penalty: torch.Tensor | None = None
    repetition_penalty: torch.Tensor | None = None
    # Tokens banned this step per row (EOS / stop ids before min_tokens is reached).
    banned_token_ids: list[list[int]] | None = None

    @property
    def all_greedy(self) -> bool:
        return bool((self.temperature == 0).all())


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: (logprob of the sampled token, its rank, top ids, top logprobs), or None.
    logprobs: list[tuple[float, int, list[int], list[float]] | None]


def compute_logprobs_info(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int):
    """Logprob and 1-based rank of each row's chosen token, and each row's top-k."""
    chosen = logprobs.gather(1, token_ids.view(-1, 1)).squeeze(1)
    ranks = (logprobs > chosen.unsqueeze(1)).sum(dim=1) + 1
    top_lp, top_ids = logprobs.topk(k, dim=1) if k > 0 else (logprobs[:, :0], token_ids.view(-1, 1)[:, :0])
    return chosen.tolist(), ranks.tolist(), top_ids.tolist(), top_lp.tolist()


def apply_penalties(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    counts = b.penalty_token_counts
    seen = (counts > 0) | b.penalty_prompt_mask
    rep = b.repetition_penalty.unsqueeze(1)
    # Repetition penalty (CTRL / HF style) over prompt and output tokens.
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - b.frequency_penalty.unsqueeze(1) * counts
    return logits - b.presence_penalty.unsqueeze(1) * (counts > 0)


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                            min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what top-k, top-p and min-p exclude; rows with 0 / 1 / 0 are untouched.

    Top-k keeps every token tied with the k-th largest logit; top-p keeps the smallest set of
    most likely tokens whose probability reaches p (always at least the top one).
    """
    logits = ops.top_k_top_p(logits, top_k, top_p)
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=1)
        threshold = min_p.unsqueeze(1) * probs.max(dim=1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def sample(logits: torch.Tensor, b: SamplingBatch) -> SamplerOutput:
    """logits [N, V] float32 (one row per sequence that picks a token this step)."""
    want_logprobs = any(n is not None for n in b.num_logprobs)
    raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    if b.banned_token_ids is not None:
        logits = logits.clone()
        for row, banned in enumerate(b.banned_token_ids):
            if banned:
                logits[row, banned] = float("-inf")
    if b.penalty_token_counts is not None:
        logits = apply_penalties(logits, b)
    token_ids = ops.argmax(logits)
    if not b.all_greedy:
        token_ids = torch.where(b.temperature == 0, token_ids, _random_sample(logits, b))
    out_logprobs: list = [None] * len(b.num_logprobs)
    if raw_logprobs is not None:
        k = max(n for n in b.num_logprobs if n is not None)
        chosen, ranks, top_ids, top_lp = compute_logprobs_info(raw_logprobs, token_ids, k)
        for row, n in enumerate(b.num_logprobs):
            if n is not None:
                out_logprobs[row] = (chosen[row], ranks[row], top_ids[row][:n], top_lp[row][:n])
    return SamplerOutput(token_ids.tolist(), out_logprobs)


def _random_sample(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    temperature = torch.where(b.temperature == 0, torch.ones_like(b.temperature), b.temperature)
    logits = apply_top_k_top_p_min_p(logits / temperature.unsqueeze(1), b.top_k, b.top_p, b.min_p)
    probs = logits.softmax(dim=-1)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p; each row uses its own
    # generator, so a seeded request gets the same tokens whatever else is in the batch.
    noise = torch.empty_like(probs)
    for row, gen in enumerate(b.generators):
        if gen is None:  # a greedy row in a mixed batch: its draw is discarded anyway
            noise[row].fill_(1.0)
        else:
            noise[row].exponential_(generator=gen)
    return ops.argmax(probs / noise)
