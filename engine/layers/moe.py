"""Sparse mixture-of-experts MLP: a router picks `top_k` experts per token, each expert runs only
on the tokens routed to it, and their outputs are summed with the routing weights.

Routing variants (`scoring`):
- "softmax": softmax over all experts, then top-k (Mixtral, Qwen2-MoE, OLMoE); `renormalize`
  rescales the k picked probabilities to sum to 1 (Mixtral always, the others by norm_topk_prob).
- "topk_softmax": top-k logits, then softmax over those k (GraniteMoE). Equal to "softmax" with
  renormalisation in exact arithmetic; computed the reference's way so the rounding matches too.
- "sparsemixer": PhiMoE's inference routing, top-2 only (see `sparsemixer_route`).
- "sigmoid": independent sigmoid scores (DeepSeek-V3); a learned per-expert `score_bias` steers
  which experts are picked, the weights are the unbiased scores, renormalised by
  `renormalize`.
DeepSeek's grouped top-k (`num_groups` > 1): experts are split into equal groups, only the
`topk_groups` best groups are eligible, a group ranked by its best score (softmax, DeepSeek-V2) or
the sum of its best two (sigmoid, DeepSeek-V3). `routed_scaling_factor` multiplies the weights.

Experts are stacked: w13 [E, 2 * inter, hidden] holds each expert's [gate | up] projection,
w2 [E, hidden, inter] its down projection. Checkpoints store them per expert; `stack_experts`
regroups those tensors on load.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.activation import GatedActivation
from engine.loader import WeightsError

SCORINGS = ("softmax", "topk_softmax", "sparsemixer", "sigmoid")


@dataclass(frozen=True)
class GroupedTopK:
    """DeepSeek's routing extras (module docstring); the defaults leave routing plain."""
    num_groups: int = 1
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0


def route(logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool = False,
          jitter_eps: float = 0.0, grouped: GroupedTopK = GroupedTopK(),
          score_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, expert ids), both [tokens, top_k], from router logits [tokens, experts]."""
    logits = logits.float()
    if scoring == "softmax":
        scores = _keep_top_groups(logits.softmax(dim=-1), grouped, per_group=1)
        weights, ids = scores.topk(top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * grouped.routed_scaling_factor, ids
    if scoring == "sigmoid":
        scores = logits.sigmoid()
        choice = scores if score_bias is None else scores + score_bias.float()
        ids = _keep_top_groups(choice, grouped, per_group=2).topk(top_k, dim=-1).indices
        weights = scores.gather(-1, ids)
        if renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * grouped.routed_scaling_factor, ids
    if scoring == "topk_softmax":
        top_logits, ids = logits.topk(top_k, dim=-1)
        return top_logits.softmax(dim=-1), ids
    if scoring == "sparsemixer":
        return sparsemixer_route(logits, top_k, jitter_eps)
    raise ValueError(f"MoE scoring {scoring!r} is unknown; use one of {', '.join(SCORINGS)}")


def _keep_top_groups(scores: torch.Tensor, grouped: GroupedTopK, per_group: int) -> torch.Tensor:
    """scores with the experts outside the topk_groups best groups set to -inf; a group ranks by
    the sum of its `per_group` best scores."""
    if grouped.num_groups == 1:
        return scores
    by_group = scores.view(-1, grouped.num_groups, scores.shape[-1] // grouped.num_groups)
    group_scores = by_group.topk(per_group, dim=-1).values.sum(dim=-1)
    best = group_scores.topk(grouped.topk_groups, dim=-1).indices
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(-1, best, True)
    return by_group.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(scores)


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
        shared_expert: nn.Module | None = None, grouped: GroupedTopK = GroupedTopK(), score_bias: bool = False,
        shared_expert_gate: bool = True,
    ):
        super().__init__()
        if scoring not in SCORINGS:
            raise ValueError(f"MoE scoring {scoring!r} is unknown; use one of {', '.join(SCORINGS)}")
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and the number of experts ({num_experts})")
        _check_groups(grouped, num_experts, top_k)
        self.num_experts = num_experts
        # Read at every forward, so changing it at runtime changes the routing.
        self.top_k = top_k
        self.scoring, self.renormalize, self.jitter_eps, self.grouped = scoring, renormalize, jitter_eps, grouped
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        # DeepSeek-V3's e_score_correction_bias: a learned constant, not trained by gradients.
        self.score_bias = nn.Parameter(torch.zeros(num_experts), requires_grad=False) if score_bias else None
        self.experts = StackedExperts(hidden_size, intermediate_size, num_experts, hidden_act)
        # A dense MLP every token goes through: Qwen2-MoE scales it by a sigmoid gate of its own,
        # DeepSeek adds it as it is.
        self.shared_expert = shared_expert
        self.shared_expert_gate = (
            nn.Linear(hidden_size, 1, bias=False) if shared_expert is not None and shared_expert_gate else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.scoring, self.renormalize, self.jitter_eps,
                             self.grouped, self.score_bias)
        out = self.experts(x, weights.to(x.dtype), ids)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out


def _check_groups(grouped: GroupedTopK, num_experts: int, top_k: int) -> None:
    groups = grouped.num_groups
    if num_experts % groups or not 0 < grouped.topk_groups <= groups:
        raise ValueError(f"{num_experts} experts cannot be routed in {groups} groups, best {grouped.topk_groups}: "
                         f"the groups must be equal and topk_groups between 1 and the number of groups")
    if top_k > grouped.topk_groups * num_experts // groups:
        raise ValueError(f"top_k={top_k} exceeds the {grouped.topk_groups * num_experts // groups} experts "
                         f"of the {grouped.topk_groups} groups routing keeps")


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
