"""The fault-injection hook (harness.faults): every fault changes what the engine computes on a
tiny zoo model, and leaves the model and the kernels exactly as they were once its context
exits. Also the strict tier's batch-invariance check, on a planted batch-dependent bug, and the
generation-config pitfall detection."""
from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import litmus_kernels.ops
from harness import zoo
from harness.compare import DEFAULT_LOGPROB_ATOL
from harness.faults import CATALOGUE, FaultNotApplicable, Patch, inject, planted_modules, site_of
from harness.plugin import EXAMPLE_PROMPTS, RecordNotes
from harness.runners import EngineRunner

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The zoo model each fault is tried on: one that has what the fault needs.
FAULT_MODELS = {
    "rope_theta": "tiny-llama",
    "rotary_style": "tiny-llama",
    "kv_slot_off_by_one": "tiny-llama",
    "gqa_head_mapping": "tiny-llama",
    "bias_dropped": "tiny-qwen2",
    "norm_eps": "tiny-llama",
    "rmsnorm_offset": "tiny-gemma",
    "logit_softcap_dropped": "tiny-gemma2",
    "attn_softcap_dropped": "tiny-gemma2",
    "sliding_window_ignored": "tiny-mistral",
    "tied_embeddings_untied": "tiny-qwen2",
    "activation_swapped": "tiny-gemma",
    "embedding_scale_dropped": "tiny-gemma",
    "expert_top_k": "tiny-mixtral",
}
# Past the 32-token sliding windows: every fault shows on its prompt positions.
LONG_PROMPT = max(EXAMPLE_PROMPTS, key=len)


@pytest.fixture(scope="module")
def engines() -> Iterator[dict[str, EngineRunner]]:
    """One engine per zoo model, loaded on first use and shared by this module's tests."""
    loaded: dict[str, EngineRunner] = {}

    class Engines(dict):
        def __missing__(self, name: str) -> EngineRunner:
            loaded[name] = self[name] = EngineRunner(str(zoo.model_path(name)))
            return loaded[name]

    yield Engines()
    for runner in loaded.values():
        runner.close()


def _snapshot(model: nn.Module) -> dict[str, object]:
    """Every tensor's values, every plain attribute and every hook of every module."""
    state: dict[str, object] = {}
    for name, module in model.named_modules():
        for key, value in vars(module).items():
            if isinstance(value, dict) and key.startswith("_forward"):
                state[f"{name}.{key}"] = len(value)
            elif isinstance(value, torch.Tensor):
                # Plain tensor attributes (the KV cache) change contents by design; the object must stay.
                state[f"{name}.{key}#id"] = id(value)
            elif not key.startswith("_"):
                state[f"{name}.{key}"] = value
        for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            state[f"{name}.{key}#id"] = id(tensor)
            state[f"{name}.{key}"] = tensor.detach().clone()
    return state


def _same(before: dict[str, object], after: dict[str, object]) -> list[str]:
    changed = []
    for key in before.keys() | after.keys():
        a, b = before.get(key), after.get(key)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            equal = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        else:
            equal = a is b or a == b
        if not equal:
            changed.append(key)
    return sorted(changed)


def _kernels() -> dict[str, object]:
    return {name: getattr(litmus_kernels.ops, name) for name in dir(litmus_kernels.ops) if not name.startswith("_")}


def test_catalogue_covers_the_issue_list():
    assert len(CATALOGUE) >= 12
    assert set(FAULT_MODELS) == set(CATALOGUE)


@pytest.mark.parametrize("fault", sorted(FAULT_MODELS))
def test_fault_changes_outputs_and_is_undone(engines, fault: str):
    engine = engines[FAULT_MODELS[fault]]
    ids = [engine.tokenizer(LONG_PROMPT).input_ids]
    model = engine.llm.apply_model(lambda m: m)[0]
    before, kernels_before = _snapshot(model), _kernels()
    clean = engine.prompt_nll(ids)[0]

    with inject(engine.llm, CATALOGUE[fault]) as planted:
        assert planted, "inject yielded no planted module"
        faulted = engine.prompt_nll(ids)[0]
        greedy = engine.generate_greedy(["The capital of France is"], 8)

    # More than the strict tier's per-logprob tolerance: the change is the fault's, not float noise.
    assert abs(faulted - clean) > DEFAULT_LOGPROB_ATOL, f"{fault} left the prompt NLL at {clean} ({faulted})"
    assert _same(before, _snapshot(model)) == [], f"{fault} left the model changed"
    assert _kernels() == kernels_before, f"{fault} left litmus_kernels.ops changed"
    assert engine.prompt_nll(ids)[0] == clean, "outputs after the fault differ from before it"
    assert greedy[0][0], "the faulted engine generated nothing"


@pytest.mark.parametrize("fault, model, reason", [
    ("bias_dropped", "tiny-llama", "bias in a decoder layer"),
    ("sliding_window_ignored", "tiny-llama", "sliding-window layer"),
    ("expert_top_k", "tiny-llama", "mixture-of-experts block"),
    ("logit_softcap_dropped", "tiny-qwen2", "final logit soft cap"),
])
def test_inapplicable_fault_is_refused_and_touches_nothing(engines, fault: str, model: str, reason: str):
    engine = engines[model]
    llm_model = engine.llm.apply_model(lambda m: m)[0]
    before = _snapshot(llm_model)
    assert planted_modules(engine.llm, CATALOGUE[fault]) == []
    with pytest.raises(FaultNotApplicable, match=reason):
        with inject(engine.llm, CATALOGUE[fault]):
            pass  # pragma: no cover - never entered
    assert _same(before, _snapshot(llm_model)) == []


def test_fault_undone_when_the_body_raises(engines):
    engine = engines["tiny-llama"]
    model = engine.llm.apply_model(lambda m: m)[0]
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with inject(engine.llm, CATALOGUE["rmsnorm_offset"]):
            raise RuntimeError("boom")
    assert _same(before, _snapshot(model)) == []


@pytest.mark.parametrize("name, site", [
    ("model.layers.3.self_attn.qkv_proj", "layers.3.self_attn"),
    ("model.layers.0.self_attn.attn", "layers.0.self_attn"),
    ("transformer.h.1.mlp.act", "layers.1.mlp"),
    ("model.embed_tokens", "embed"),
    ("model.norm", "final_norm"),
    ("lm_head", "logits"),
    ("", "logits"),
])
def test_site_of(name: str, site: str):
    assert site_of(name) == site


# --- the batch-invariance check ------------------------------------------------------------

def _padding_not_masked(op):
    """A batched-decode bug: every sequence attends over the longest context of the batch."""

    def decode(q, k_cache, v_cache, block_tables, context_lens, *args, **kwargs):
        return op(q, k_cache, v_cache, block_tables, torch.full_like(context_lens, int(context_lens.max())),
                  *args, **kwargs)

    return decode


def test_batch_invariance_check_catches_a_batch_dependent_bug(engines):
    from harness.selftest import suite_module

    suite = suite_module("strict", "test_batch_invariance.py")
    engine = engines["tiny-llama"]
    prompts = EXAMPLE_PROMPTS[:4]
    alone = [suite.generate(engine.llm, [p], [suite.MAX_TOKENS])[0] for p in prompts]
    record = RecordNotes("strict", "test", "tiny-llama")
    suite.check_same(alone, suite.together(engine.llm, prompts), "together", engine, record)
    assert record.metrics["differing_prompts"] == 0

    patch = Patch()
    patch.set(litmus_kernels.ops, "decode_attention", _padding_not_masked(litmus_kernels.ops.decode_attention))
    try:
        batched = suite.together(engine.llm, prompts)
        alone_again = [suite.generate(engine.llm, [p], [suite.MAX_TOKENS])[0] for p in prompts]
    finally:
        patch.undo()
    # Alone, the longest context is the sequence's own: the bug only shows among partners.
    assert [g.token_ids for g in alone_again] == [g.token_ids for g in alone]
    with pytest.raises(AssertionError, match="decode differently together than alone"):
        suite.check_same(alone, batched, "together", engine, record)
    assert record.metrics["differing_prompts"] > 0


# --- generation-config pitfalls ------------------------------------------------------------

def test_pitfalls_report_shipped_sampling_defaults(tiny_llama_dir):
    from harness.pitfalls import comparison_settings, generation_config_pitfalls

    pitfalls = {p.field: p for p in generation_config_pitfalls(tiny_llama_dir)}
    assert set(pitfalls) == {"do_sample", "temperature", "top_k", "repetition_penalty", "no_repeat_ngram_size"}
    assert pitfalls["temperature"].value == 0.7 and pitfalls["temperature"].active  # do_sample is on
    assert "repetition_penalty=1.3" in pitfalls["repetition_penalty"].message("m")
    used = comparison_settings(tiny_llama_dir, 16)
    assert used["hf"]["do_sample"] is False and used["engine"]["temperature"] == 0.0
    # Only the special token ids reach the reference's generate().
    assert set(used["hf"]["generation_config"]) <= {"bos_token_id", "eos_token_id", "pad_token_id"}


def test_sampling_fields_without_do_sample_apply_only_when_sampling(tmp_path):
    from harness.pitfalls import generation_config_pitfalls

    (tmp_path / "generation_config.json").write_text('{"temperature": 0.6, "top_p": 1.0, "repetition_penalty": 1.0}')
    assert [(p.field, p.active) for p in generation_config_pitfalls(tmp_path)] == [("temperature", False)]
    (tmp_path / "generation_config.json").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert generation_config_pitfalls(tmp_path) == []
