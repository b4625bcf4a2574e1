"""Native decoder families against Transformers, beyond what the strict suite runs.

- Every zoo model of these families, and the config variants the zoo has no model for (Falcon
  7B / RW layouts, multi-head GPTBigCode, pre-LN OPT, ...), gives Transformers' greedy tokens and
  logprobs with the engine squeezed: several prompts per batch, chunked prefill, preemption.
- Each zoo recipe exercises its architecture's distinctive feature: switching the feature off in
  the engine moves the output off Transformers'.
- The shared layers equal Transformers' own modules.
- Loading names a missing or misshapen tensor by its checkpoint name (parameters are built
  without the random fill, which loading overwrites), and refuses by name the
  variants the engine does not implement.
"""
from __future__ import annotations

import dataclasses
import functools
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

import harness.zoo as zoo
from engine.layers.attention import Attention, get_alibi_slopes
from engine.layers.moe import GroupedTopK
from engine.layers.norm import GemmaRMSNorm, LayerNorm
from engine.layers.rotary import rope_inv_freq
from engine.llm import LLM
from engine.loader import WeightsError
from engine.models.stablelm import StableLmLayerNormPerHead
from engine.models.utils import built_for_loading
from harness.compare import ComparisonError, check_logprobs_close
from harness.runners import EngineRunner, HfRunner, TokensTextLogprobs
from harness.zoo import synthetic
from harness.zoo.store import build_atomically

FAMILY_MODELS = [
    "tiny-gemma", "tiny-gemma2", "tiny-gemma3", "tiny-gpt2", "tiny-gpt-bigcode", "tiny-gpt-neox", "tiny-persimmon",
    "tiny-granite", "tiny-phi3", "tiny-glm", "tiny-nemotron", "tiny-olmo", "tiny-olmo2", "tiny-starcoder2",
    "tiny-cohere", "tiny-cohere2", "tiny-phi", "tiny-gptj", "tiny-stablelm", "tiny-opt", "tiny-bloom", "tiny-falcon",
    "tiny-mpt", "tiny-mixtral", "tiny-qwen2-moe", "tiny-olmoe", "tiny-phimoe", "tiny-granitemoe",
    "tiny-dbrx", "tiny-deepseek-v2", "tiny-deepseek-v3",
]
# Config variants the zoo has no model for: (zoo recipe, config overrides).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "falcon-7b-layout": ("tiny-falcon", {"new_decoder_architecture": False, "multi_query": True,
                                         "parallel_attn": True}),
    "falcon-rw-layout": ("tiny-falcon", {"new_decoder_architecture": False, "multi_query": False,
                                         "num_kv_heads": 4, "parallel_attn": False, "bias": True}),
    "falcon-one-norm": ("tiny-falcon", {"num_ln_in_parallel_attn": 1}),
    "gpt-bigcode-multi-head": ("tiny-gpt-bigcode", {"multi_query": False}),
    "opt-pre-ln": ("tiny-opt", {"do_layer_norm_before": True, "word_embed_proj_dim": 64}),
    "gpt-neox-sequential": ("tiny-gpt-neox", {"use_parallel_residual": False}),
    "bloom-residual-from-norm": ("tiny-bloom", {"apply_residual_connection_post_layernorm": True}),
    "stablelm-parallel": ("tiny-stablelm", {"use_parallel_residual": True}),
    "gpt2-tied-untied": ("tiny-gpt2", {"tie_word_embeddings": False, "scale_attn_by_inverse_layer_idx": False}),
    # DeepSeek-V2-Lite's shape: q straight from hidden (no q LoRA), ungrouped routing, a dense first layer.
    "deepseek-v2-lite-layout": ("tiny-deepseek-v2", {
        "q_lora_rank": None, "topk_method": "greedy", "first_k_dense_replace": 1,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }),
    "deepseek-v3-neox-rope": ("tiny-deepseek-v3", {"rope_interleave": False}),
}
PROMPTS = [
    "Yes",
    "The tallest mountain on Earth is",
    # Longer than the 32-token sliding windows of the recipes (and than the 7-token prefill
    # budget below many times over), so windows and chunk boundaries really cut.
    "The river rose all night, and by morning the bridge into town was under water. The baker, the "
    "blacksmith and the schoolteacher met on the hill above the square to decide what to do, and",
    "for i in range(10):\n    if i % 3 == 0:\n        print(i)",
    "2, 4, 8, 16, 32,",
]
MAX_TOKENS = 16
NUM_LOGPROBS = 3
# 25 blocks of 4 tokens hold 100: any one sequence fits, the five together do not, so sequences
# are preempted and recomputed; a 7-token budget cuts every longer prompt into chunks.
SQUEEZED = dict(max_model_len=100, block_size=4, num_kv_blocks=25, max_num_batched_tokens=7)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@functools.cache
def variant_path(name: str) -> Path:
    """A variant's checkpoint, built once per process next to the zoo's cache."""
    recipe_name, overrides = VARIANTS[name]
    base = synthetic.RECIPES[recipe_name]
    recipe = dataclasses.replace(base, config={**base.config, **overrides})
    directory = zoo.cache_dir() / "test-variants" / f"{name}-{synthetic.fingerprint(recipe)}"
    return build_atomically(directory, functools.partial(synthetic.build, recipe))


def model_path(name: str) -> Path:
    return variant_path(name) if name in VARIANTS else zoo.model_path(name)


@functools.cache
def hf_outputs(name: str) -> list[TokensTextLogprobs]:
    with HfRunner(str(model_path(name))) as hf:
        return hf.generate_greedy_logprobs(PROMPTS, MAX_TOKENS, NUM_LOGPROBS)


def engine_outputs(name: str, mutate: Callable[[nn.Module], Any] | None = None,
                   **llm_kwargs: Any) -> tuple[list[TokensTextLogprobs], LLM]:
    with EngineRunner(str(model_path(name)), **llm_kwargs) as runner:
        if mutate is not None:
            runner.llm.apply_model(mutate)
        return runner.generate_greedy_logprobs(PROMPTS, MAX_TOKENS, NUM_LOGPROBS), runner.llm


@pytest.mark.parametrize("name", FAMILY_MODELS + list(VARIANTS))
def test_squeezed_engine_matches_transformers(name: str) -> None:
    outputs, llm = engine_outputs(name, **SQUEEZED)
    architecture = llm.llm_engine.config.hf_config.architectures[0]
    assert llm.apply_model(lambda m: type(m).__name__) == [architecture], "not the native implementation"
    assert llm.llm_engine.scheduler.num_preemptions > 0
    comparison = check_logprobs_close(hf_outputs(name), outputs, "hf", "engine", warn_on_mismatch=False)
    # Float32 on both sides: a near-tie flip is possible in principle, but none of these models has one.
    assert comparison.metrics()["identical_prompts"] == len(PROMPTS)


# --- each recipe exercises its architecture's distinctive feature --------------------------------

def _attention_layers(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def _set_on_attention(field: str, value: Any) -> Callable[[nn.Module], None]:
    def mutate(model: nn.Module) -> None:
        for layer in _attention_layers(model):
            setattr(layer, field, value)
    return mutate


def _set_on_modules(field: str, value: Any) -> Callable[[nn.Module], None]:
    def mutate(model: nn.Module) -> None:
        for module in model.modules():
            if hasattr(module, field):
                setattr(module, field, value)
    return mutate


def _rope_of_first_layer_everywhere(model: nn.Module) -> None:
    """Every layer takes layer 0's rope (Gemma 3: the local one; Cohere2: rope where there was none)."""
    layers = model.model.layers
    for layer in layers[1:]:
        layer.self_attn.rotary_emb = layers[0].self_attn.rotary_emb


FEATURES = {
    "gemma2 attention soft cap": ("tiny-gemma2", _set_on_attention("logits_soft_cap", None)),
    "gemma2 final soft cap": ("tiny-gemma2", _set_on_modules("final_soft_cap", None)),
    "gemma2 sliding window": ("tiny-gemma2", _set_on_attention("sliding_window", None)),
    "gemma3 global rope": ("tiny-gemma3", _rope_of_first_layer_everywhere),
    "cohere2 no rope on global layers": ("tiny-cohere2", _rope_of_first_layer_everywhere),
    "starcoder2 sliding window": ("tiny-starcoder2", _set_on_attention("sliding_window", None)),
    "phi3 sliding window": ("tiny-phi3", _set_on_attention("sliding_window", None)),
    "olmo clip_qkv": ("tiny-olmo", _set_on_modules("clip_qkv", None)),
    "mpt clip_qkv": ("tiny-mpt", _set_on_modules("clip_qkv", None)),
    "mpt alibi": ("tiny-mpt", _set_on_attention("alibi_slopes", None)),
    "bloom alibi": ("tiny-bloom", _set_on_attention("alibi_slopes", None)),
    "granite residual multiplier": ("tiny-granite", _set_on_modules("residual_multiplier", 1.0)),
    # MoE: one expert per token instead of two (PhiMoE always routes two: a zero sparsemixer
    # threshold leaves each pick alone instead).
    "mixtral top-2 routing": ("tiny-mixtral", _set_on_modules("top_k", 1)),
    "qwen2-moe top-2 routing": ("tiny-qwen2-moe", _set_on_modules("top_k", 1)),
    "olmoe top-2 routing": ("tiny-olmoe", _set_on_modules("top_k", 1)),
    "granitemoe top-2 routing": ("tiny-granitemoe", _set_on_modules("top_k", 1)),
    "phimoe sparsemixer threshold": ("tiny-phimoe", _set_on_modules("jitter_eps", 0.0)),
    "olmoe clip_qkv": ("tiny-olmoe", _set_on_modules("clip_qkv", None)),
    "dbrx top-2 routing": ("tiny-dbrx", _set_on_modules("top_k", 1)),
    "dbrx clip_qkv": ("tiny-dbrx", _set_on_modules("clip_qkv", None)),
    "deepseek-v2 group-limited routing": ("tiny-deepseek-v2", _set_on_modules("grouped", GroupedTopK(
        routed_scaling_factor=1.5))),
    "deepseek-v2 interleaved rope pairs": ("tiny-deepseek-v2", _set_on_modules("is_neox_style", True)),
    "deepseek-v2 yarn mscale on the softmax scale": ("tiny-deepseek-v2", _set_on_attention("scale", 24 ** -0.5)),
    "deepseek-v3 score correction bias": ("tiny-deepseek-v3", _set_on_modules("score_bias", None)),
    "deepseek-v3 group-limited routing": ("tiny-deepseek-v3", _set_on_modules("grouped", GroupedTopK(
        routed_scaling_factor=2.5))),
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_recipe_exercises_its_feature(feature: str) -> None:
    name, mutate = FEATURES[feature]
    outputs, _ = engine_outputs(name, mutate, max_model_len=256)
    with pytest.raises(ComparisonError):
        check_logprobs_close(hf_outputs(name), outputs, "hf", "engine without the feature", warn_on_mismatch=False)


# --- shared layers equal Transformers' modules -----------------------------------------------

def _randomised(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5 + 1.0)
    return module


def _copy_params(src: nn.Module, dst: nn.Module) -> None:
    dst.load_state_dict(src.state_dict())


@pytest.mark.parametrize("case", ["layernorm", "layernorm-no-bias", "olmo", "nemotron", "cohere-per-head",
                                  "gemma-rms"])
def test_norm_equals_transformers(case: str) -> None:
    from transformers.models.cohere.modeling_cohere import CohereLayerNorm
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.nemotron.modeling_nemotron import NemotronLayerNorm1P
    from transformers.models.olmo.modeling_olmo import OlmoLayerNorm

    hidden, heads = 64, 4
    reference, ours = {
        "layernorm": (nn.LayerNorm(hidden, eps=1e-5), LayerNorm(hidden, 1e-5)),
        "layernorm-no-bias": (nn.LayerNorm(hidden, eps=1e-6, bias=False), LayerNorm(hidden, 1e-6, bias=False)),
        "olmo": (OlmoLayerNorm(hidden), LayerNorm(hidden, 1e-5, affine=False)),
        "nemotron": (NemotronLayerNorm1P(hidden, eps=1e-5), LayerNorm(hidden, 1e-5, weight_offset=1.0)),
        "cohere-per-head": (CohereLayerNorm((heads, hidden // heads), eps=1e-5),
                            LayerNorm((heads, hidden // heads), 1e-5, bias=False)),
        "gemma-rms": (Gemma2RMSNorm(hidden, eps=1e-6), GemmaRMSNorm(hidden, 1e-6)),
    }[case]
    _copy_params(_randomised(reference, 0), ours)
    x, residual = torch.randn(2, 7, hidden).unbind(0)
    if case == "cohere-per-head":
        want = reference(x.view(7, heads, -1)).view(7, hidden)
    else:
        want = reference(x)
    torch.testing.assert_close(ours(x), want, rtol=0, atol=1e-5)
    normed, summed = ours(x, residual)
    torch.testing.assert_close(summed, x + residual, rtol=0, atol=0)
    torch.testing.assert_close(normed, ours(x + residual), rtol=0, atol=0)


def test_stablelm_per_head_norm_equals_transformers() -> None:
    from transformers.models.stablelm.modeling_stablelm import StableLmLayerNormPerHead as HfPerHead

    reference = _randomised(HfPerHead(16, 4, eps=1e-5), 1)
    ours = StableLmLayerNormPerHead(16, 4, 1e-5)
    _copy_params(reference, ours)
    x = torch.randn(7, 4 * 16)
    want = reference(x.view(1, 7, 4, 16).transpose(1, 2)).transpose(1, 2).reshape(7, -1)
    torch.testing.assert_close(ours(x), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("num_heads", [1, 2, 3, 4, 5, 6, 8, 12, 16, 20])
def test_alibi_slopes_equal_transformers(num_heads: int) -> None:
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    # BLOOM's tensor holds slope * key position; MPT's slope * (key position - last position).
    # The two formulas differ but agree on every head count, so both models use one function.
    bloom = build_alibi_tensor(torch.ones(1, 4, dtype=torch.long), num_heads, torch.float32)
    torch.testing.assert_close(get_alibi_slopes(num_heads), bloom[:, 0, 1], rtol=1e-6, atol=0)
    mpt = build_mpt_alibi_tensor(num_heads, 4)
    torch.testing.assert_close(get_alibi_slopes(num_heads), -mpt[:, 0, -2].float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("recipe, overrides", [
    ("tiny-deepseek-v2", {}),
    ("tiny-deepseek-v3", {}),
    # No mscale pair: the attention factor from `factor` alone; an untruncated correction range.
    ("tiny-deepseek-v3", {"mscale": None, "mscale_all_dim": None, "truncate": False, "beta_fast": 16}),
    ("tiny-deepseek-v3", {"attention_factor": 0.9}),
])
def test_yarn_rope_equals_transformers(recipe: str, overrides: dict[str, Any]) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = synthetic.RECIPES[recipe].hf_config()
    config.rope_parameters = {k: v for k, v in {**config.rope_parameters, **overrides}.items() if v is not None}
    want_inv_freq, want_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    inv_freq, factor = rope_inv_freq(config.qk_rope_head_dim, config.rope_parameters, config.max_position_embeddings)
    assert factor == pytest.approx(want_factor, rel=1e-12)
    torch.testing.assert_close(inv_freq, want_inv_freq, rtol=0, atol=0)
    # The recipes put rope's frequencies in all three regimes: kept, blended, divided by factor.
    plain = rope_inv_freq(config.qk_rope_head_dim, {"rope_theta": config.rope_parameters["rope_theta"]}, 2048)[0]
    ratio = (plain / inv_freq).tolist()
    assert ratio[0] == 1 and 1 < ratio[1] < ratio[-1] == pytest.approx(config.rope_parameters["factor"])


# --- loading -------------------------------------------------------------------------------

def _edited_copy(name: str, tmp_path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> str:
    """The zoo model's directory with its tensors passed through edit."""
    source = zoo.model_path(name)
    for file in source.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, tmp_path / file.name)
    tensors = load_file(source / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return str(tmp_path)


def test_modules_built_for_loading_skip_the_random_fill_only_inside() -> None:
    originals = {name: getattr(nn.init, name) for name in ("normal_", "kaiming_uniform_", "uniform_")}
    ones = torch.ones(3, 3)
    with pytest.raises(RuntimeError, match="constructor failed"), built_for_loading(torch.device("cpu")):
        nn.init.normal_(ones)
        nn.init.kaiming_uniform_(ones)
        assert torch.equal(ones, torch.ones(3, 3))  # the fill is the loader's, not the constructor's
        raise RuntimeError("constructor failed")
    assert {name: getattr(nn.init, name) for name in originals} == originals
    nn.init.normal_(ones)
    assert not torch.equal(ones, torch.ones(3, 3))


def test_missing_tensor_is_named_as_in_the_checkpoint(tmp_path: Path) -> None:
    # Persimmon's names are renamed on load; the error must still use the checkpoint's.
    missing = "model.layers.1.self_attn.query_key_value.weight"
    path = _edited_copy("tiny-persimmon", tmp_path, lambda t: t.pop(missing))
    with pytest.raises(WeightsError, match=rf"missing tensors the model needs: {missing}"):
        LLM(path, max_model_len=64)


def test_misshapen_tensor_is_named(tmp_path: Path) -> None:
    name = "transformer.h.0.attn.c_attn.weight"  # a GPT-2 Conv1D weight, transposed on load

    def truncate(tensors: dict[str, torch.Tensor]) -> None:
        tensors[name] = tensors[name][:, :-16].contiguous()

    path = _edited_copy("tiny-gpt2", tmp_path, truncate)
    with pytest.raises(WeightsError, match=rf"{name}' has shape \(64, 176\), but the model expects \(64, 192\)"):
        LLM(path, max_model_len=64)


@pytest.mark.parametrize("name, override, message", [
    ("tiny-falcon", {"alibi": True}, r"FalconForCausalLM with alibi=True is not supported"),
    ("tiny-gemma3", {"use_bidirectional_attention": True},
     r"Gemma3ForCausalLM with use_bidirectional_attention=True is not supported"),
    ("tiny-phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                                       "long_factor": [1.0] * 8, "original_max_position_embeddings": 1024}},
     r"rope_type 'longrope' is not implemented"),
    ("tiny-deepseek-v2", {"topk_method": "noaux_tc"}, r"DeepSeek-V2 topk_method='noaux_tc' is not supported"),
])
def test_unsupported_variant_is_refused_by_name(name: str, override: dict[str, Any], message: str) -> None:
    with pytest.raises(NotImplementedError, match=message):
        LLM(str(zoo.model_path(name)), max_model_len=64, model_impl="native", hf_overrides=override)


def test_zoo_builds_only_declared_config_fields() -> None:
    """Recipes of older config classes leave out the Llama-style fields those classes lack."""
    config = transformers.AutoConfig.from_pretrained(zoo.model_path("tiny-gpt2"))
    assert not hasattr(config, "num_key_value_heads") and not hasattr(config, "rms_norm_eps")
