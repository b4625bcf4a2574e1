"""Sparse mixture-of-experts layer: the routing against a naive per-token reference and
Transformers' own router code, the expert computation against a per-token loop, loading of
per-expert checkpoint tensors. The MoE models themselves run against Transformers squeezed
(chunked prefill, preemption) with the other decoder families, in tests/test_models_decoders.py.
"""
from __future__ import annotations

import json
import shutil
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import DeepseekV2Config, DeepseekV3Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.phimoe.modeling_phimoe import sparsemixer

from engine.layers.moe import FusedMoE, GroupedTopK, route, stack_experts
from engine.loader import WeightsError
from engine.models.dbrx import _stack_experts as dbrx_stack_experts
from engine.models.registry import get_model_impl, supported_architectures
from harness import zoo
from harness.runners import EngineRunner

NUM_EXPERTS, HIDDEN, INTER = 6, 16, 24


def _logits(tokens: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(tokens, NUM_EXPERTS, generator=torch.Generator().manual_seed(seed)) * 2


def _naive_route(logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool):
    """One token at a time, experts ranked by a Python sort."""
    weights, ids = [], []
    for row in logits.tolist():
        ranked = sorted(range(len(row)), key=lambda e: -row[e])[:top_k]
        if scoring == "softmax":
            probs = torch.tensor(row).softmax(-1)[ranked]
            picked = probs / probs.sum() if renormalize else probs
        else:
            picked = torch.tensor([row[e] for e in ranked]).softmax(-1)
        weights.append(picked)
        ids.append(ranked)
    return torch.stack(weights), torch.tensor(ids)


@pytest.mark.parametrize("scoring,renormalize", [("softmax", False), ("softmax", True), ("topk_softmax", False)])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_route_matches_naive_per_token_reference(scoring: str, renormalize: bool, top_k: int) -> None:
    logits = _logits()
    weights, ids = route(logits, top_k, scoring, renormalize)
    ref_weights, ref_ids = _naive_route(logits, top_k, scoring, renormalize)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights)
    if renormalize or scoring == "topk_softmax":
        torch.testing.assert_close(weights.sum(-1), torch.ones(len(logits)))
    else:
        assert (weights.sum(-1) < 1).all()


@pytest.mark.parametrize("jitter_eps", [0.01, 0.3])
def test_sparsemixer_matches_transformers(jitter_eps: float) -> None:
    logits = _logits(256, seed=1)
    weights, ids = route(logits, 2, "sparsemixer", jitter_eps=jitter_eps)
    ref_weights, ref_ids = sparsemixer(logits, jitter_eps=jitter_eps, training=False, top_k=2)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights)
    assert ((weights > 0) & (weights <= 1)).all()


def test_sparsemixer_threshold_admits_near_experts() -> None:
    """A wide threshold lets near-best experts share the softmax; a zero one leaves each pick alone."""
    logits = _logits(256, seed=1)
    assert (route(logits, 2, "sparsemixer", jitter_eps=0.3)[0] < 1).any()
    assert route(logits, 2, "sparsemixer", jitter_eps=0.0)[0].eq(1).all()


def test_bad_routing_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="scoring 'cosine'"):
        FusedMoE(HIDDEN, INTER, NUM_EXPERTS, 2, "silu", scoring="cosine")
    with pytest.raises(ValueError, match="6 experts cannot be routed in 4 groups"):
        FusedMoE(HIDDEN, INTER, NUM_EXPERTS, 2, "silu", grouped=GroupedTopK(num_groups=4, topk_groups=2))
    with pytest.raises(ValueError, match="top_k=3 exceeds the 2 experts"):
        FusedMoE(HIDDEN, INTER, NUM_EXPERTS, 3, "silu", grouped=GroupedTopK(num_groups=3, topk_groups=1))
    with pytest.raises(ValueError, match="top_k=7"):
        FusedMoE(HIDDEN, INTER, NUM_EXPERTS, 7, "silu")
    with pytest.raises(ValueError, match="exactly 2"):
        route(_logits(), 3, "sparsemixer", jitter_eps=0.01)


# DeepSeek's grouped routing: 8 experts in 4 groups of 2, the best 2 groups routable.
DEEPSEEK_ROUTING = dict(hidden_size=HIDDEN, num_attention_heads=4, n_routed_experts=8, n_group=4, topk_group=2)


def _randomised_router(router: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Random router weights (and score correction bias); returns (hidden states, router logits)."""
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=generator))
        if hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias.copy_(0.3 * torch.randn(router.num_experts, generator=generator))
    x = torch.randn(256, HIDDEN, generator=generator) / HIDDEN ** 0.5
    return x, F.linear(x, router.weight)


def _by_expert(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's picks in expert order (Transformers' top-k leaves them unsorted)."""
    order = ids.argsort(dim=-1)
    return weights.gather(-1, order), ids.gather(-1, order)


def _route_as_transformers(router: torch.nn.Module, top_k: int, scoring: str, **kwargs: Any):
    """route() on the randomised router's logits, checked equal to the router's own picks and
    weights; returns (logits, weights, ids), the picks in expert order."""
    x, logits = _randomised_router(router)
    _, ref_weights, ref_ids = router(x)
    weights, ids = _by_expert(*route(logits, top_k, scoring, **kwargs))
    ref_weights, ref_ids = _by_expert(ref_weights, ref_ids)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights)
    return logits, weights, ids


@pytest.mark.parametrize("topk_method", ["greedy", "group_limited_greedy"])
@torch.no_grad()
def test_deepseek_v2_routing_matches_transformers(topk_method: str) -> None:
    config = DeepseekV2Config(**DEEPSEEK_ROUTING, num_experts_per_tok=3, topk_method=topk_method,
                              routed_scaling_factor=1.5)
    grouped = topk_method == "group_limited_greedy"
    routing = GroupedTopK(4, 2, 1.5) if grouped else GroupedTopK(routed_scaling_factor=1.5)
    logits, _, ids = _route_as_transformers(DeepseekV2TopkRouter(config), 3, "softmax", grouped=routing)
    ungrouped_ids = _by_expert(*route(logits, 3, "softmax"))[1]
    # The group limit binds on some tokens (their third pick), and only with grouping on.
    assert torch.equal(ids, ungrouped_ids) != grouped


@pytest.mark.parametrize("norm_topk_prob", [False, True])
@torch.no_grad()
def test_deepseek_v3_routing_matches_transformers(norm_topk_prob: bool) -> None:
    config = DeepseekV3Config(**DEEPSEEK_ROUTING, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob,
                              routed_scaling_factor=2.5)
    router = DeepseekV3TopkRouter(config)
    bias = router.e_score_correction_bias
    logits, weights, ids = _route_as_transformers(router, 2, "sigmoid", renormalize=norm_topk_prob,
                                                  grouped=GroupedTopK(4, 2, 2.5), score_bias=bias)
    # The bias steers the choice only: the weights are the unbiased sigmoid scores.
    scores = logits.sigmoid().gather(-1, ids)
    expected = scores / scores.sum(-1, keepdim=True) if norm_topk_prob else scores
    torch.testing.assert_close(weights, 2.5 * expected)
    unbiased_ids = route(logits, 2, "sigmoid", grouped=GroupedTopK(4, 2, 2.5))[1].sort(dim=-1).values
    ungrouped_ids = route(logits, 2, "sigmoid", score_bias=bias)[1].sort(dim=-1).values
    assert not torch.equal(ids, unbiased_ids) and not torch.equal(ids, ungrouped_ids)


@torch.no_grad()
def test_ungated_shared_expert_is_added_as_it_is() -> None:
    shared_expert = torch.nn.Linear(HIDDEN, HIDDEN)
    moe = FusedMoE(HIDDEN, INTER, NUM_EXPERTS, 2, "silu", shared_expert=shared_expert, shared_expert_gate=False)
    x = torch.randn(8, HIDDEN, generator=torch.Generator().manual_seed(5))
    torch.nn.init.normal_(moe.experts.w13)
    torch.nn.init.normal_(moe.experts.w2)
    weights, ids = route(moe.gate(x), 2, "softmax")
    assert moe.shared_expert_gate is None
    torch.testing.assert_close(moe(x), moe.experts(x, weights, ids) + shared_expert(x))


def _moe(shared: bool = False, seed: int = 0) -> FusedMoE:
    shared_expert = torch.nn.Sequential(torch.nn.Linear(HIDDEN, INTER), torch.nn.GELU(), torch.nn.Linear(INTER, HIDDEN))
    moe = FusedMoE(HIDDEN, INTER, NUM_EXPERTS, 2, "silu", renormalize=True,
                   shared_expert=shared_expert if shared else None)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in moe.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) / 4)
    return moe


def _naive_moe(moe: FusedMoE, x: torch.Tensor) -> torch.Tensor:
    """Every token through each of its experts separately, weights from the naive router."""
    weights, ids = _naive_route(moe.gate(x), moe.top_k, moe.scoring, moe.renormalize)
    rows = []
    for token, (token_weights, token_ids) in enumerate(zip(weights, ids)):
        out = torch.zeros(HIDDEN)
        for weight, expert in zip(token_weights, token_ids.tolist()):
            gate, up = (moe.experts.w13[expert] @ x[token]).chunk(2)
            out += weight * (moe.experts.w2[expert] @ (F.silu(gate) * up))
        if moe.shared_expert is not None:
            out += torch.sigmoid(moe.shared_expert_gate(x[token])) * moe.shared_expert(x[token])
        rows.append(out)
    return torch.stack(rows)


@pytest.mark.parametrize("shared", [False, True])
@torch.no_grad()
def test_moe_matches_per_token_loop(shared: bool) -> None:
    moe = _moe(shared)
    x = torch.randn(40, HIDDEN, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(moe(x), _naive_moe(moe, x), rtol=1e-5, atol=1e-5)
    # top_k is read at every call: changing it at runtime changes the routing.
    moe.top_k = 1
    single = moe(x)
    torch.testing.assert_close(single, _naive_moe(moe, x), rtol=1e-5, atol=1e-5)
    moe.top_k = 2
    assert not torch.allclose(single, moe(x))


@torch.no_grad()
def test_unrouted_experts_are_not_computed() -> None:
    moe = _moe()
    x = torch.randn(8, HIDDEN, generator=torch.Generator().manual_seed(3))
    _, ids = route(moe.gate(x), moe.top_k, "softmax")
    unused = sorted(set(range(NUM_EXPERTS)) - set(ids.flatten().tolist()))
    assert unused, "the seed should leave some expert without tokens"
    # A dense all-experts computation would spread these NaNs into every token.
    moe.experts.w13[unused] = float("nan")
    assert torch.isfinite(moe(x)).all()


def test_stack_experts_regroups_and_names_missing_pieces() -> None:
    parts = {"w1": ("w13", 0), "w3": ("w13", 1), "w2": ("w2", 0)}
    tensors = {f"layers.0.moe.experts.{e}.{p}.weight": torch.full((2, 3), float(10 * e + i))
               for e in range(2) for i, p in enumerate(["w1", "w3", "w2"])}
    stacked = dict(stack_experts([("other.weight", torch.ones(1)), *tensors.items()], parts, num_experts=2))
    assert set(stacked) == {"other.weight", "layers.0.moe.experts.w13", "layers.0.moe.experts.w2"}
    w13 = stacked["layers.0.moe.experts.w13"]
    assert w13.shape == (2, 4, 3)
    assert w13[1, :2].eq(10).all() and w13[1, 2:].eq(11).all()
    del tensors["layers.0.moe.experts.1.w3.weight"]
    with pytest.raises(WeightsError, match=r"layers\.0\.moe\.experts\.1\.w3\.weight"):
        dict(stack_experts(tensors.items(), parts, num_experts=2))
    with pytest.raises(WeightsError, match="expert 5"):
        dict(stack_experts([("a.experts.5.w1.weight", torch.ones(1))], parts, num_experts=2))



def test_vllm_spellings_run_the_native_implementation(tmp_path) -> None:
    """A config.json naming vLLM's `PhiMoEForCausalLM` (as the remote-code checkpoints do) runs the
    native PhiMoE, and the alias is not a second registry entry."""
    assert get_model_impl(["PhiMoEForCausalLM"]) == get_model_impl(["PhimoeForCausalLM"])
    assert get_model_impl(["OLMoEForCausalLM"]) == get_model_impl(["OlmoeForCausalLM"])
    assert not {"PhiMoEForCausalLM", "OLMoEForCausalLM"} & set(supported_architectures())
    original = zoo.model_path("tiny-phimoe")
    aliased = shutil.copytree(original, tmp_path / "phimoe")
    config = json.loads((aliased / "config.json").read_text())
    (aliased / "config.json").write_text(json.dumps({**config, "architectures": ["PhiMoEForCausalLM"]}))
    prompts = ["The tallest mountain on Earth is", "2, 4, 8, 16, 32,"]
    outputs = []
    for path in (original, aliased):
        with EngineRunner(str(path), model_impl="native", max_model_len=128) as runner:
            assert runner.llm.apply_model(lambda m: type(m).__name__) == ["PhimoeForCausalLM"]
            outputs.append(runner.generate_greedy(prompts, 8))
    assert outputs[0] == outputs[1]


def test_dbrx_expert_matrices_are_stacked_and_checked() -> None:
    experts, ffn, hidden = 2, 3, 4
    w1, v1, w2 = (torch.randn(experts * ffn, hidden) for _ in range(3))
    prefix = "transformer.blocks.0.ffn.experts"
    stacked = dict(dbrx_stack_experts([(f"{prefix}.mlp.w1", w1), (f"{prefix}.mlp.w2", w2), (f"{prefix}.mlp.v1", v1)],
                                      experts))
    assert torch.equal(stacked[f"{prefix}.w13"][1], torch.cat([w1[ffn:], v1[ffn:]]))
    assert torch.equal(stacked[f"{prefix}.w2"][1], w2[ffn:].t())
    with pytest.raises(WeightsError, match=r"experts\.mlp\.v1"):
        dict(dbrx_stack_experts([(f"{prefix}.mlp.w1", w1)], experts))
