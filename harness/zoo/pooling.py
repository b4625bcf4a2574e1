"""Tiny seeded pooling checkpoints: BERT-family encoders and cross-encoders with all-MiniLM's real
WordPiece tokenizer, decoder embedders and classifiers with SmolLM2's.

Weights are drawn as for the generative recipes (harness/zoo/synthetic.py: far from
Transformers' tiny init, every norm weight away from 1). Learned position and token-type
embeddings are drawn at unit scale like the word embeddings, so a wrong position or segment
changes the output visibly; the projections feeding a tanh (BERT's pooler, RoBERTa's head) are
kept at unit gain so it does not saturate.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.zoo import minilm, smollm2, synthetic

_BERT_VOCAB = 30522  # all-MiniLM-L6-v2's uncased WordPiece vocabulary
_ENCODER = {
    "vocab_size": _BERT_VOCAB, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128,
    "hidden_act": "gelu", "layer_norm_eps": 1e-12,
}
# At hidden size 64 the 1/sqrt(fan_in) draw of a learned embedding table is 1/8 of unit scale.
_ENCODER_SCALES = {
    "position_embeddings.weight": 8.0, "token_type_embeddings.weight": 8.0,
    # Undo synthetic's branch-output gain where it is not a branch output.
    "intermediate.dense.weight": 1 / 3, "pooler.dense.weight": 1 / 3, "classifier.dense.weight": 1 / 3,
}


@dataclass(frozen=True)
class PoolingRecipe:
    model_class: str  # the transformers class, written as config.json's architecture
    config_class: str
    config: Mapping[str, Any]
    seed: int
    # "bert" (all-MiniLM-L6-v2's), "bert-single-segment" (the same without token type ids, as
    # RoBERTa's tokenizers: these models have one token type) or "smollm2".
    tokenizer: str
    scales: Mapping[str, float] = field(default_factory=dict)

    def hf_config(self):
        import transformers

        config = getattr(transformers, self.config_class)(**self.config)
        config.architectures = [self.model_class]
        return config

    def as_dict(self) -> dict[str, Any]:
        return {
            "model_class": self.model_class, "config_class": self.config_class, "config": dict(self.config),
            "seed": self.seed, "tokenizer": self.tokenizer, "scales": dict(self.scales),
            "init_scheme": synthetic.INIT_SCHEME,
        }


def _decoder(recipe: str, model_class: str, seed: int, **extra: Any) -> PoolingRecipe:
    """A generative recipe's config as another head (an XModel body, a sequence classifier)."""
    base = synthetic.RECIPES[recipe]
    return PoolingRecipe(model_class, base.config_class, {**base.config_dict(), **extra}, seed, "smollm2",
                         base.scales)


RECIPES: dict[str, PoolingRecipe] = {
    "tiny-bert": PoolingRecipe("BertModel", "BertConfig", {
        **_ENCODER, "num_hidden_layers": 2, "max_position_embeddings": 512, "type_vocab_size": 2, "pad_token_id": 0,
    }, seed=301, tokenizer="bert", scales=_ENCODER_SCALES),
    # RoBERTa's layout: positions from pad_token_id + 1 = 2, one token type.
    "tiny-roberta": PoolingRecipe("RobertaModel", "RobertaConfig", {
        **_ENCODER, "num_hidden_layers": 2, "max_position_embeddings": 514, "type_vocab_size": 1, "pad_token_id": 1,
    }, seed=302, tokenizer="bert-single-segment", scales=_ENCODER_SCALES),
    # all-roberta-large-v1's layout: the encoder under a masked-LM head, no pooler.
    "tiny-roberta-mlm": PoolingRecipe("RobertaForMaskedLM", "RobertaConfig", {
        **_ENCODER, "num_hidden_layers": 2, "max_position_embeddings": 514, "type_vocab_size": 1, "pad_token_id": 1,
    }, seed=315, tokenizer="bert-single-segment", scales=_ENCODER_SCALES),
    "tiny-xlm-roberta": PoolingRecipe("XLMRobertaModel", "XLMRobertaConfig", {
        **_ENCODER, "num_hidden_layers": 3, "max_position_embeddings": 514, "type_vocab_size": 1, "pad_token_id": 1,
    }, seed=303, tokenizer="bert-single-segment", scales=_ENCODER_SCALES),
    # ms-marco-MiniLM's shape: one relevance logit; text pairs carry token types 0 / 1.
    "tiny-bert-cross-encoder": PoolingRecipe("BertForSequenceClassification", "BertConfig", {
        **_ENCODER, "num_hidden_layers": 2, "max_position_embeddings": 512, "type_vocab_size": 2, "pad_token_id": 0,
        "num_labels": 1,
    }, seed=304, tokenizer="bert", scales=_ENCODER_SCALES),
    # bge-reranker's shape: XLM-RoBERTa with one relevance logit.
    "tiny-xlm-roberta-cross-encoder": PoolingRecipe("XLMRobertaForSequenceClassification", "XLMRobertaConfig", {
        **_ENCODER, "num_hidden_layers": 2, "max_position_embeddings": 514, "type_vocab_size": 1, "pad_token_id": 1,
        "num_labels": 1,
    }, seed=305, tokenizer="bert-single-segment", scales=_ENCODER_SCALES),
    "tiny-roberta-classifier": PoolingRecipe("RobertaForSequenceClassification", "RobertaConfig", {
        **_ENCODER, "num_hidden_layers": 2, "max_position_embeddings": 514, "type_vocab_size": 1, "pad_token_id": 1,
        "num_labels": 3,
    }, seed=306, tokenizer="bert-single-segment", scales=_ENCODER_SCALES),
    "tiny-roberta-cross-encoder": PoolingRecipe("RobertaForSequenceClassification", "RobertaConfig", {
        **_ENCODER, "num_hidden_layers": 2, "max_position_embeddings": 514, "type_vocab_size": 1, "pad_token_id": 1,
        "num_labels": 1,
    }, seed=312, tokenizer="bert-single-segment", scales=_ENCODER_SCALES),
    "tiny-qwen2-classifier": _decoder("tiny-qwen2", "Qwen2ForSequenceClassification", 307, num_labels=3),
    "tiny-llama-embed": _decoder("tiny-llama", "LlamaModel", 308),
    "tiny-mistral-embed": _decoder("tiny-mistral", "MistralModel", 309),
    "tiny-qwen2-embed": _decoder("tiny-qwen2", "Qwen2Model", 310),
    "tiny-gemma2-embed": _decoder("tiny-gemma2", "Gemma2Model", 311),
    # Whole causal LMs, LM head included, run as embedders (task="embed"): the head goes unused.
    "tiny-llama-lm-embed": _decoder("tiny-llama", "LlamaForCausalLM", 313),
    "tiny-qwen2-lm-embed": _decoder("tiny-qwen2", "Qwen2ForCausalLM", 314),
    "tiny-llama-lm-reward": _decoder("tiny-llama", "LlamaForCausalLM", 316),
}


def _tokenizer(recipe: PoolingRecipe):
    if recipe.tokenizer == "bert-single-segment":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(minilm.source_dir(), model_input_names=["input_ids", "attention_mask"])
    return minilm.tokenizer() if recipe.tokenizer == "bert" else smollm2.tokenizer()


def _uses_minilm(recipe: PoolingRecipe) -> bool:
    return recipe.tokenizer.startswith("bert")


def _tokenizer_sha256(recipe: PoolingRecipe) -> str:
    return minilm.sha256() if _uses_minilm(recipe) else smollm2.gguf_sha256()


def fingerprint(recipe: PoolingRecipe) -> str:
    key = {**recipe.as_dict(), "tokenizer_sha256": _tokenizer_sha256(recipe)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def build(recipe: PoolingRecipe, directory: Path) -> dict[str, Any]:
    import transformers

    tokenizer = _tokenizer(recipe)
    config = recipe.hf_config()
    if len(tokenizer) > config.vocab_size:
        raise RuntimeError(f"{recipe.model_class}: the tokenizer has {len(tokenizer)} tokens, the config "
                           f"vocab_size={config.vocab_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = getattr(transformers, recipe.model_class)(config).to(torch.float32)
    synthetic._reinitialise(model, torch.Generator().manual_seed(recipe.seed), recipe.scales)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    source = minilm.source_provenance() if _uses_minilm(recipe) else smollm2.source_provenance()
    return {"recipe": recipe.as_dict(), "recipe_fingerprint": fingerprint(recipe), "tokenizer_source": source}
