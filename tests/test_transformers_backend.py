"""The Transformers backend (engine/models/transformers_backend.py) and LLM(model_impl=...).

The backend must be the same model as the native implementation and as Transformers' own
generate(): same greedy tokens, logprobs within 1e-4, whatever the batching (several prompts at
once, chunked prefill, preemption by recompute); it must run an architecture the engine has no
native code for; and a model_impl that cannot be honoured must say why.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers import AttentionInterface, AutoTokenizer

import harness.zoo as zoo
from engine.llm import LLM
from engine.models.registry import UnsupportedArchitectureError
from engine.models.transformers_backend import ATTN_IMPLEMENTATION, TransformersForCausalLM, litmus_attention
from harness.runners import EngineRunner, HfRunner, TokensTextLogprobs

ZOO_MODELS = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3"]
PROMPTS = [
    "Hi",
    "The capital of France is",
    # Longer than tiny-mistral's 32-token sliding window, so the window really cuts.
    "Once upon a time, in a small village by the sea, there lived an old fisherman who went out every "
    "morning before dawn and came back every evening with a boat full of fish, except on one strange day when",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)",
    "1, 2, 3, 5, 8, 13,",
]
MAX_TOKENS = 16
NUM_LOGPROBS = 3
# 24 blocks of 4 tokens hold 96: any one sequence fits, the five together do not, so sequences
# are preempted and recomputed; a 7-token budget cuts every longer prompt into chunks.
SQUEEZED = dict(max_model_len=96, block_size=4, num_kv_blocks=24, max_num_batched_tokens=7)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_engine(path: Path, **llm_kwargs: Any) -> tuple[list[TokensTextLogprobs], LLM]:
    with EngineRunner(str(path), **llm_kwargs) as runner:
        return runner.generate_greedy_logprobs(PROMPTS, MAX_TOKENS, NUM_LOGPROBS), runner.llm


def run_hf(path: Path) -> list[TokensTextLogprobs]:
    with HfRunner(str(path)) as runner:
        return runner.generate_greedy_logprobs(PROMPTS, MAX_TOKENS, NUM_LOGPROBS)


def assert_same_greedy(got: list[TokensTextLogprobs], want: list[TokensTextLogprobs]) -> None:
    """Token for token equal, and at every step the same top logprobs within 1e-4."""
    for i, ((ids, _, top), (want_ids, _, want_top)) in enumerate(zip(got, want, strict=True)):
        assert ids == want_ids, f"prompt {i}: tokens differ"
        assert len(top) == len(want_top) == len(ids)
        for step, (entry, want_entry) in enumerate(zip(top, want_top)):
            assert entry == pytest.approx(want_entry, abs=1e-4), f"prompt {i}, step {step}"


def implementation(llm: LLM) -> type:
    return llm.apply_model(lambda m: m.__class__)[0]


# --- the zoo's tiny models: backend == native == Transformers ------------------------------

@functools.cache
def backend_run(name: str) -> list[TokensTextLogprobs]:
    """The backend with room for everything: all prompts in one batch, no chunking, no preemption."""
    return run_engine(zoo.model_path(name), model_impl="transformers", max_model_len=256)[0]


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_backend_matches_native_and_transformers(name: str) -> None:
    path = zoo.model_path(name)
    llm = LLM(str(path), model_impl="transformers", max_model_len=64)
    assert implementation(llm) is TransformersForCausalLM
    num_layers = llm.llm_engine.config.hf_config.num_hidden_layers
    assert len(llm.llm_engine.model_runner.attention_layers) == num_layers
    native, native_llm = run_engine(path, model_impl="native", max_model_len=256)
    assert implementation(native_llm).__name__ == llm.llm_engine.config.hf_config.architectures[0]
    assert_same_greedy(backend_run(name), native)
    assert_same_greedy(backend_run(name), run_hf(path))


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_chunked_prefill_and_preemption_give_the_same_output(name: str) -> None:
    squeezed, llm = run_engine(zoo.model_path(name), model_impl="transformers", **SQUEEZED)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert_same_greedy(squeezed, backend_run(name))


def test_auto_prefers_native_and_backend_is_reported() -> None:
    path = str(zoo.model_path("tiny-llama"))
    assert implementation(LLM(path, max_model_len=64)).__name__ == "LlamaForCausalLM"
    backend = LLM(path, model_impl="transformers", max_model_len=64)
    hf_model = backend.apply_model(lambda m: m.model)[0]
    assert hf_model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert type(hf_model) is transformers.LlamaForCausalLM


def test_transformers_builds_no_attention_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    """Masking is the engine's: every layer must get attention_mask=None, never an [n, n] tensor."""
    llm = LLM(str(zoo.model_path("tiny-mistral")), model_impl="transformers", max_model_len=256,
              max_num_batched_tokens=40)
    registered = AttentionInterface._global_mapping[ATTN_IMPLEMENTATION]
    masks: list[Any] = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return registered(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, ATTN_IMPLEMENTATION, spy)
    llm.generate(PROMPTS, use_tqdm=False)
    assert masks and all(mask is None for mask in masks)


# --- an architecture the engine does not implement natively --------------------------------

def _arcee(vocab: dict[str, int]) -> transformers.PretrainedConfig:
    # A non-gated relu^2 MLP and yarn-free plain rope: a Llama cousin the engine has no file for.
    return transformers.ArceeConfig(
        **vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, tie_word_embeddings=False,
    )


def _smollm3(vocab: dict[str, int]) -> transformers.PretrainedConfig:
    # Every second layer skips rope (NoPE): the module decides, the engine only attends.
    return transformers.SmolLM3Config(
        **vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, no_rope_layer_interval=2, initializer_range=0.1,
    )


def _mixtral(vocab: dict[str, int]) -> transformers.PretrainedConfig:
    # MoE: the head reads the body's router_logits, which the backend's stand-in body must answer.
    return transformers.MixtralConfig(
        **vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, num_local_experts=4, num_experts_per_tok=2,
        initializer_range=0.1,
    )


def _opt(vocab: dict[str, int]) -> transformers.PretrainedConfig:
    # The head calls its body's sub-module (model.decoder), not the body itself.
    return transformers.OPTConfig(
        **vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, word_embed_proj_dim=64, init_std=0.1,
    )


@pytest.fixture(scope="module", params=[_arcee, _smollm3, _mixtral, _opt], ids=["arcee", "smollm3", "mixtral", "opt"])
def foreign_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded tiny checkpoint of an architecture run through the backend (missing from the
    engine's registry, or forced with model_impl="transformers")."""
    return build_tiny(request.param, tmp_path_factory)


def build_tiny(make_config: Callable[[dict[str, int]], transformers.PretrainedConfig],
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer = AutoTokenizer.from_pretrained(zoo.model_path("tiny-llama"))
    config = make_config(dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = transformers.AutoModelForCausalLM.from_config(config)
    path = tmp_path_factory.mktemp(config.model_type)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_foreign_architecture_matches_transformers(foreign_model: Path) -> None:
    auto, llm = run_engine(foreign_model, max_model_len=256, model_impl="transformers")
    assert implementation(llm) is TransformersForCausalLM
    assert_same_greedy(auto, run_hf(foreign_model))
    squeezed, llm = run_engine(foreign_model, model_impl="transformers", **SQUEEZED)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert_same_greedy(squeezed, auto)


@pytest.mark.parametrize("name", ["tiny-minicpm3", "tiny-deepseek-v2"])
def test_values_narrower_than_queries_and_keys(name: str) -> None:
    """Latent attention (v_head_dim 12 < 24): V is cached zero-padded and the output cut back."""
    path = zoo.model_path(name)
    got, llm = run_engine(path, model_impl="transformers", max_model_len=256)
    attention = next(m for m in llm.apply_model(lambda m: list(m.modules()))[0] if hasattr(m, "v_head_dim")
                     and hasattr(m, "attention"))
    assert (attention.v_head_dim, attention.attention.head_dim) == (12, 24)
    assert_same_greedy(got, run_hf(path))


# --- model_impl errors -----------------------------------------------------------------------

def test_unknown_model_impl_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"model_impl='vllm' is invalid; use one of auto, native, transformers"):
        LLM(str(zoo.model_path("tiny-llama")), model_impl="vllm")


def test_auto_runs_the_backend_without_a_native_implementation(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = build_tiny(_arcee, tmp_path_factory)
    _, llm = run_engine(path, max_model_len=256)
    assert implementation(llm) is TransformersForCausalLM
    with pytest.raises(UnsupportedArchitectureError, match=r"has no native implementation.*model_impl='transformers'"):
        LLM(str(path), model_impl="native", max_model_len=64)


def _config_only_model(tmp_path: Path, config: dict[str, Any]) -> str:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


# Decoder-only classes without a native implementation here whose attention Transformers did not
# route through its attention interface when last checked; releases keep converting them
# (CodeGen was until transformers 5.25), so the test takes the first that still lacks it.
_WITHOUT_ATTENTION_BACKEND = (
    ("GPTNeoConfig", "GPTNeoForCausalLM", {"num_layers": 1, "attention_types": [[["global"], 1]]}),
    ("BioGptConfig", "BioGptForCausalLM", {"num_hidden_layers": 1}),
    ("CodeGenConfig", "CodeGenForCausalLM", {"n_layer": 1}),
)


@pytest.mark.parametrize("model_impl", ["auto", "transformers"])
def test_class_without_attention_backend_support_is_named(tmp_path: Path, model_impl: str) -> None:
    candidates = [(getattr(transformers, config), name, sizes) for config, name, sizes in _WITHOUT_ATTENTION_BACKEND
                  if not getattr(transformers, name)._supports_attention_backend]
    if not candidates:
        pytest.skip(f"transformers {transformers.__version__} supports its attention interface in every candidate "
                    f"({', '.join(name for _, name, _ in _WITHOUT_ATTENTION_BACKEND)})")
    config_class, name, sizes = candidates[0]
    config = config_class(vocab_size=100, hidden_size=32, num_attention_heads=2, **sizes).to_dict()
    path = _config_only_model(tmp_path, {**config, "architectures": [name]})
    tokenizer = str(zoo.model_path("tiny-llama"))
    with pytest.raises(UnsupportedArchitectureError, match=rf"run {name}.*_supports_attention_backend"):
        LLM(path, tokenizer=tokenizer, model_impl=model_impl, max_model_len=64)


def test_state_space_model_is_named(tmp_path: Path) -> None:
    mamba = transformers.MambaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1).to_dict()
    path = _config_only_model(tmp_path, {**mamba, "architectures": ["MambaForCausalLM"]})
    with pytest.raises(UnsupportedArchitectureError, match=r"no attention layers \(a state-space model\)"):
        LLM(path, tokenizer=str(zoo.model_path("tiny-llama")), max_model_len=64)


def test_hybrid_state_space_model_is_named(tmp_path: Path) -> None:
    jamba = transformers.JambaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, attn_layer_period=2,
                                     attn_layer_offset=1).to_dict()
    path = _config_only_model(tmp_path, {**jamba, "architectures": ["JambaForCausalLM"]})
    with pytest.raises(UnsupportedArchitectureError, match=r"JambaForCausalLM: it has layer types .*linear_attention"):
        LLM(path, tokenizer=str(zoo.model_path("tiny-llama")), max_model_len=64)


def test_architecture_unknown_to_transformers_is_named(tmp_path: Path) -> None:
    llama = json.loads((zoo.model_path("tiny-llama") / "config.json").read_text())
    path = _config_only_model(tmp_path, {**llama, "architectures": ["MadeUpForCausalLM"]})
    with pytest.raises(UnsupportedArchitectureError, match=r"\['MadeUpForCausalLM'\] is not a class of Transformers"):
        LLM(path, tokenizer=str(zoo.model_path("tiny-llama")), model_impl="transformers", max_model_len=64)


def test_attention_the_engine_cannot_compute_is_rejected() -> None:
    """GPT-OSS passes attention sinks (s_aux); silently dropping them would give another model."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, litmus_attention)
    config = transformers.GptOssConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1,
    )
    model = transformers.GptOssForCausalLM._from_config(config, attn_implementation=ATTN_IMPLEMENTATION)
    with pytest.raises(UnsupportedArchitectureError, match=r"GptOssAttention: .*does not implement: s_aux"):
        TransformersForCausalLM(model)
