"""HF architecture name -> engine implementation (imported lazily), with the docs metadata."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelImpl:
    module: str  # engine.models.<module>
    class_name: str
    tasks: tuple[str, ...] = ("generate",)
    # A decoder checkpoint laid out other than as its causal LM (engine/models/adapters.py):
    # "body" (XModel) or "score" (XForSequenceClassification); class_name is then the causal LM.
    adapter: str | None = None

    def load_class(self) -> type[nn.Module]:
        return getattr(importlib.import_module(f"engine.models.{self.module}"), self.class_name)


_NATIVE: dict[str, ModelImpl] = {
    "LlamaForCausalLM": ModelImpl("llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ModelImpl("llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ModelImpl("llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ModelImpl("llama", "Qwen3ForCausalLM"),
    "GraniteForCausalLM": ModelImpl("llama", "GraniteForCausalLM"),
    "Phi3ForCausalLM": ModelImpl("llama", "Phi3ForCausalLM"),
    "GlmForCausalLM": ModelImpl("llama", "GlmForCausalLM"),
    "NemotronForCausalLM": ModelImpl("llama", "NemotronForCausalLM"),
    "OlmoForCausalLM": ModelImpl("llama", "OlmoForCausalLM"),
    "Olmo2ForCausalLM": ModelImpl("llama", "Olmo2ForCausalLM"),
    "Starcoder2ForCausalLM": ModelImpl("llama", "Starcoder2ForCausalLM"),
    "MixtralForCausalLM": ModelImpl("llama", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ModelImpl("llama", "Qwen2MoeForCausalLM"),
    "OlmoeForCausalLM": ModelImpl("llama", "OlmoeForCausalLM"),
    "PhimoeForCausalLM": ModelImpl("llama", "PhimoeForCausalLM"),
    "GraniteMoeForCausalLM": ModelImpl("llama", "GraniteMoeForCausalLM"),
    "DbrxForCausalLM": ModelImpl("dbrx", "DbrxForCausalLM"),
    "DeepseekV2ForCausalLM": ModelImpl("deepseek", "DeepseekV2ForCausalLM"),
    "DeepseekV3ForCausalLM": ModelImpl("deepseek", "DeepseekV3ForCausalLM"),
    "GemmaForCausalLM": ModelImpl("gemma", "GemmaForCausalLM"),
    "Gemma2ForCausalLM": ModelImpl("gemma", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ModelImpl("gemma", "Gemma3ForCausalLM"),
    "GPT2LMHeadModel": ModelImpl("gpt2", "GPT2LMHeadModel"),
    "GPTBigCodeForCausalLM": ModelImpl("gpt2", "GPTBigCodeForCausalLM"),
    "GPTNeoXForCausalLM": ModelImpl("gpt_neox", "GPTNeoXForCausalLM"),
    "PersimmonForCausalLM": ModelImpl("gpt_neox", "PersimmonForCausalLM"),
    "CohereForCausalLM": ModelImpl("cohere", "CohereForCausalLM"),
    "Cohere2ForCausalLM": ModelImpl("cohere", "Cohere2ForCausalLM"),
    "PhiForCausalLM": ModelImpl("phi", "PhiForCausalLM"),
    "GPTJForCausalLM": ModelImpl("gptj", "GPTJForCausalLM"),
    "StableLmForCausalLM": ModelImpl("stablelm", "StableLmForCausalLM"),
    "OPTForCausalLM": ModelImpl("opt", "OPTForCausalLM"),
    "BloomForCausalLM": ModelImpl("bloom", "BloomForCausalLM"),
    "FalconForCausalLM": ModelImpl("falcon", "FalconForCausalLM"),
    "MptForCausalLM": ModelImpl("mpt", "MptForCausalLM"),
    # Pooling models (engine/models/bert.py; decoders through engine/models/adapters.py).
    "BertModel": ModelImpl("bert", "BertModel", ("embed", "score")),
    "RobertaModel": ModelImpl("bert", "RobertaModel", ("embed", "score")),
    "XLMRobertaModel": ModelImpl("bert", "XLMRobertaModel", ("embed", "score")),
    # A masked-LM checkpoint (all-roberta-large-v1) embeds with its encoder; the LM head is not loaded.
    "RobertaForMaskedLM": ModelImpl("bert", "RobertaModel", ("embed", "score")),
    "BertForSequenceClassification": ModelImpl("bert", "BertForSequenceClassification", ("classify", "score")),
    "RobertaForSequenceClassification": ModelImpl("bert", "RobertaForSequenceClassification", ("classify", "score")),
    "XLMRobertaForSequenceClassification": ModelImpl(
        "bert", "XLMRobertaForSequenceClassification", ("classify", "score")
    ),
    "Qwen2ForSequenceClassification": ModelImpl("llama", "Qwen2ForCausalLM", ("classify", "score"), adapter="score"),
    "LlamaModel": ModelImpl("llama", "LlamaForCausalLM", ("embed", "score", "reward"), adapter="body"),
    "MistralModel": ModelImpl("llama", "MistralForCausalLM", ("embed", "score", "reward"), adapter="body"),
    "Qwen2Model": ModelImpl("llama", "Qwen2ForCausalLM", ("embed", "score", "reward"), adapter="body"),
    "Gemma2Model": ModelImpl("gemma", "Gemma2ForCausalLM", ("embed", "score", "reward"), adapter="body"),
}

# vLLM's spellings of architectures Transformers names differently (remote-code checkpoints' config.json
# use them): they run the Transformers name's implementation, and are not listed on their own, so each
# implementation is swept once.
_ALIASES: dict[str, str] = {"OLMoEForCausalLM": "OlmoeForCausalLM", "PhiMoEForCausalLM": "PhimoeForCausalLM"}


# How LLM(model_impl=...) chooses: "auto" takes the native implementation when there is one,
# else the Transformers backend (engine/models/transformers_backend.py).
MODEL_IMPLS = ("auto", "native", "transformers")


class UnsupportedArchitectureError(ValueError):
    pass


def supported_architectures() -> list[str]:
    return sorted(_NATIVE)


def get_model_impl(architectures: list[str] | None) -> tuple[str, ModelImpl]:
    """The first of a config's architectures that the engine implements."""
    for arch in architectures or []:
        arch = _ALIASES.get(arch, arch)
        if arch in _NATIVE:
            return arch, _NATIVE[arch]
    raise UnsupportedArchitectureError(
        f"architecture {architectures!r} is not supported by the engine; "
        f"supported: {', '.join(supported_architectures())}"
    )


def check_model_impl(model_impl: str) -> None:
    if model_impl not in MODEL_IMPLS:
        raise ValueError(f"model_impl={model_impl!r} is invalid; use one of {', '.join(MODEL_IMPLS)}")


def resolve_model_impl(architectures: list[str] | None, model_impl: str) -> str:
    """Which implementation runs the model: "native" or "transformers"."""
    check_model_impl(model_impl)
    if model_impl == "transformers":
        return "transformers"
    if any(_ALIASES.get(arch, arch) in _NATIVE for arch in architectures or []):
        return "native"
    if model_impl == "auto":
        return "transformers"
    raise UnsupportedArchitectureError(
        f"architecture {architectures!r} has no native implementation in the engine (native: "
        f"{', '.join(supported_architectures())}); model_impl='transformers' or 'auto' runs it through the "
        f"Transformers backend"
    )


# A native causal LM also runs as these pooling tasks (engine/models/adapters.py); "score" is the
# cosine of its embeddings, as for the XModel embedders.
DECODER_POOLING_TASKS = ("embed", "score", "reward")


def supported_tasks(impl: ModelImpl) -> tuple[str, ...]:
    return impl.tasks + DECODER_POOLING_TASKS if "generate" in impl.tasks else impl.tasks
