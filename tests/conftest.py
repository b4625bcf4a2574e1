"""Fixtures shared by the unit tests: a tiny Llama checkpoint built offline in a temp dir."""
from __future__ import annotations

from pathlib import Path

import pytest

_CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "1, 2, 3, 5, 8, 13, 21, 34, 55, 89",
    "Le café est très chaud. ¿Dónde está la estación? 東京は大きい都市です。",
]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded 2-layer Llama with a byte-level BPE tokenizer, saved as an HF directory.

    Its generation config asks for sampling with penalties, as real checkpoints often do,
    so a reference that leaked those settings into greedy decoding would show it.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _byte_level_tokenizer()
    tokenizer.save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        # Wider than the default 0.02 so logits are peaked and greedy choices are not near-ties.
        initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.update(
        do_sample=True, temperature=0.7, top_k=3, repetition_penalty=1.3, no_repeat_ngram_size=2
    )
    model.save_pretrained(path)
    return path


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(_CORPUS, trainer)
    # Like Llama's tokenizer, prepend BOS, so the runners' "special tokens added" path is used.
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
