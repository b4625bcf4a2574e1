"""Sparse mixture-of-experts MLP: a router picks `top_k` experts per token, each expert runs only
on the tokens routed to it, and their outputs are summed with the routing weights.

Routing variants (`scoring`):
- "softmax": softmax over all experts, then top-k (Mixtral, Qwen2-MoE, OLMoE); `renormalize`
  rescales the k picked probabilities to sum to 1 (Mixtral always, the others by norm_topk_prob).
- "topk_softmax": top-k logits, then softmax over those k (GraniteMoE). Equal to "softmax" with
  renormalisation in exact arithmetic; computed the reference's way so the rounding matches too.
- "sparsemixer": PhiMoE's inference routing, top-2 only (see `sparsemixer_route`).

Experts are stacked: w13 [E, 2 * inter, hidden] holds each expert's [gate | up] projection,
w2 [E, hidden, inter] its down projection. Checkpoints store them per expert; `stack_experts`
regroups those tensors on load.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.activation import GatedActivation
from engine.loader import WeightsError

SCORINGS = ("softmax", "topk_softmax", "sparsemixer")


def route(logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool = False,
          jitter_eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, expert ids), both [tokens, top_k], from router logits [tokens, experts]."""
    logits = logits.float()
    if scoring == "softmax":
        weights, ids = logits.softmax(dim=-1).topk(top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids
    if scoring == "topk_softmax":
        top_logits, ids = logits.topk(top_k, dim=-1)
        return top_logits.softmax(dim=-1), ids
    if scoring == "sparsemixer":
        return sparsemixer_route(logits, top_k, jitter_eps)
    raise ValueError(f"MoE scoring {scoring!r} is unknown; use one of {', '.join(SCORINGS)}")


def sparsemixer_route(logits: torch.Tensor, top_k: int, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE at inference: the best expert, then the best of the rest; each one's weight is its
    softmax share among the experts whose logit is within a relative 2 * jitter_eps of it."""
    if top_k != 2:
        raise ValueError(f"sparsemixer routing picks exactly 2 experts, not top_k={top_k}")
    remaining = logits
    weights, ids = [], []
    for _ in range(2):
        best, best_id = remaining.max(dim=-1, keepdim=True)
        # The gap is relative to the larger of |logit| and the best logit (as PhiMoE's reference).
        far = (best - logits) / logits.abs().clamp(min=best) > 2 * jitter_eps
        share = remaining.masked_fill(far, float("-inf")).softmax(dim=-1).gather(-1, best_id)
        weights.append(share)
        ids.append(best_id)
        remaining = remaining.scatter(-1, best_id, float("-inf"))
    return torch.cat(weights, dim=-1), torch.cat(ids, dim=-1)


class FusedMoE(nn.Module):
    def __init__(
        self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, hidden_act: str,
        scoring: str = "softmax", renormalize: bool = False, jitter_eps: float = 0.0,
        shared_expert: nn.Module | None = None,
    ):
        super().__init__()
        if scoring not in SCORINGS:
            raise ValueError(f"MoE scoring {scoring!r} is unknown; use one of {', '.join(SCORINGS)}")
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and the number of experts ({num_experts})")
        self.num_experts = num_experts
        # Read at every forward, so changing it at runtime changes the routing.
        self.top_k = top_k
        self.scoring, self.renormalize, self.jitter_eps = scoring, renormalize, jitter_eps
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = StackedExperts(hidden_size, intermediate_size, num_experts, hidden_act)
        # Qwen2-MoE: a dense MLP every token goes through, scaled by a sigmoid gate of its own.
        self.shared_expert = shared_expert
        if shared_expert is not None:
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.scoring, self.renormalize, self.jitter_eps)
        out = self.experts(x, weights.to(x.dtype), ids)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class StackedExperts(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, hidden_act: str):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.act = GatedActivation(hidden_act)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Each expert runs once, on the (token, slot) pairs routed to it, in expert order."""
        top_k = ids.shape[-1]
        flat_ids = ids.flatten()
        order = flat_ids.argsort(stable=True)
        counts = torch.bincount(flat_ids, minlength=self.w13.shape[0]).tolist()
        tokens = order // top_k
        flat_weights = weights.flatten()
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            slots = order[start:start + count]
            rows = tokens[start:start + count]
            start += count
            h = self.act(F.linear(x.index_select(0, rows), self.w13[expert]))
            h = F.linear(h, self.w2[expert]) * flat_weights[slots, None]
            out.index_add_(0, rows, h)
        return out


def stack_experts(
    weights: Iterable[tuple[str, torch.Tensor]], parts: dict[str, tuple[str, int]], num_experts: int,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Regroup per-expert checkpoint tensors `<prefix>.experts.<e>.<part>.weight` into the stacked
    `<prefix>.experts.<fused>` tensors; `parts` maps a part to (fused, shard), e.g. Mixtral's
    {"w1": ("w13", 0), "w3": ("w13", 1), "w2": ("w2", 0)}. Other tensors pass through unchanged.
    A stacked tensor is yielded once all its pieces have arrived; an incomplete one is an error.
    """
    pattern = re.compile(rf"^(.*\.experts)\.(\d+)\.({'|'.join(map(re.escape, parts))})\.weight$")
    shards_of = {fused: 1 + max(s for f, s in parts.values() if f == fused) for fused, _ in parts.values()}
    pending: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
    for name, tensor in weights:
        match = pattern.match(name)
        if match is None:
            yield name, tensor
            continue
        prefix, expert, part = match.group(1), int(match.group(2)), match.group(3)
        if expert >= num_experts:
            raise WeightsError(f"checkpoint tensor {name!r} is for expert {expert}, but the model has {num_experts}")
        fused, shard = parts[part]
        target = f"{prefix}.{fused}"
        pieces = pending.setdefault(target, {})
        pieces[expert, shard] = tensor
        if len(pieces) == num_experts * shards_of[fused]:
            del pending[target]
            yield target, torch.stack([
                torch.cat([pieces[e, s] for s in range(shards_of[fused])]) for e in range(num_experts)
            ])
    if pending:
        target, pieces = next(iter(pending.items()))
        fused = target.rsplit(".", 1)[1]
        missing = [
            f"{target.rsplit('.', 1)[0]}.{e}.{part}.weight"
            for e in range(num_experts) for part, (f, s) in parts.items() if f == fused and (e, s) not in pieces
        ]
        raise WeightsError(f"checkpoint is missing expert tensors the model needs: {', '.join(missing[:8])}"
                           + (f" ... ({len(missing)} in all)" if len(missing) > 8 else ""))
