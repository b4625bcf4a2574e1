"""Run the same prompts through Hugging Face Transformers and through the engine.

Both runners expose the same methods and return plain Python data, so the comparators
never know which side produced an output.
"""
from __future__ import annotations

import gc
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Self

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

# (generated token ids, generated text)
TokensText = tuple[list[int], str]
# Per generated position: token id -> logprob for the top-k, always holding the chosen token.
TopLogprobs = list[dict[int, float]]
TokensTextLogprobs = tuple[list[int], str, TopLogprobs]


class _Runner(ABC):
    """What both runners share: the public methods and freeing the model on exit."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._release()
        # Models hold hundreds of MB; freeing them at once keeps a run over many models flat.
        gc.collect()

    def generate_greedy(self, prompts: Sequence[str], max_tokens: int) -> list[TokensText]:
        return [(ids, text) for ids, text, _ in self._generate(prompts, max_tokens, None)]

    def generate_greedy_logprobs(
        self, prompts: Sequence[str], max_tokens: int, num_logprobs: int
    ) -> list[TokensTextLogprobs]:
        return self._generate(prompts, max_tokens, num_logprobs)

    @abstractmethod
    def _generate(
        self, prompts: Sequence[str], max_tokens: int, num_logprobs: int | None
    ) -> list[TokensTextLogprobs]: ...

    @abstractmethod
    def _release(self) -> None: ...


class HfRunner(_Runner):
    """The reference: Transformers' own generate(), one prompt at a time, so no padding."""

    def __init__(self, model_path: str, dtype: torch.dtype = torch.float32) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
        self.eos_token_ids = _as_id_list(self.model.generation_config.eos_token_id)
        self.model.generation_config = _stopping_only(self.model.generation_config)

    def _release(self) -> None:
        del self.model

    def _generate(
        self, prompts: Sequence[str], max_tokens: int, num_logprobs: int | None
    ) -> list[TokensTextLogprobs]:
        return [self._generate_one(prompt, max_tokens, num_logprobs) for prompt in prompts]

    @torch.inference_mode()
    def _generate_one(self, prompt: str, max_tokens: int, num_logprobs: int | None) -> TokensTextLogprobs:
        input_ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_tokens,
            output_logits=num_logprobs is not None,
            return_dict_in_generate=True,
        )
        out = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
        token_ids = out.sequences[0, input_ids.shape[1]:].tolist()
        top = []
        if num_logprobs is not None:
            # output_logits are the raw model logits; `scores` would be after the logits processors.
            top = [_top_logprobs(step[0], token, num_logprobs) for step, token in zip(out.logits, token_ids)]
        return token_ids, self.tokenizer.decode(token_ids, skip_special_tokens=True), top


class EngineRunner(_Runner):
    """The system under test, driven through the offline API a user calls."""

    def __init__(self, model_path: str, dtype: str = "auto", **llm_kwargs: Any) -> None:
        # Imported here so the HF reference stays usable while the engine cannot import.
        from engine import LLM

        self.llm = LLM(model_path, dtype=dtype, **llm_kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def _release(self) -> None:
        del self.llm

    def _generate(
        self, prompts: Sequence[str], max_tokens: int, num_logprobs: int | None
    ) -> list[TokensTextLogprobs]:
        from engine import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=num_logprobs)
        outputs = self.llm.generate(list(prompts), params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise AssertionError(f"the engine returned {len(outputs)} outputs for {len(prompts)} prompts")
        return [_completion_result(request.outputs[0]) for request in outputs]


def _completion_result(completion: Any) -> TokensTextLogprobs:
    top = [{token: lp.logprob for token, lp in step.items()} for step in completion.logprobs or []]
    return list(completion.token_ids), completion.text, top


def _top_logprobs(logits: torch.Tensor, chosen: int, k: int) -> dict[int, float]:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top_ids = torch.topk(logprobs, k).indices.tolist() if k > 0 else []
    return {token: logprobs[token].item() for token in [*top_ids, chosen]}


def _as_id_list(token_ids: int | list[int] | None) -> list[int]:
    if token_ids is None:
        return []
    return [token_ids] if isinstance(token_ids, int) else list(token_ids)


def _stopping_only(model_config: GenerationConfig) -> GenerationConfig:
    """A generation config that keeps only the model's special token ids.

    generate() fills every field its caller leaves unset from the model's own generation
    config, so a checkpoint shipping temperature / top_k / repetition_penalty /
    no_repeat_ngram_size would quietly change the reference's greedy choices. With only the
    ids left, HF stops where the model says and otherwise takes the raw argmax.
    """
    eos_ids = _as_id_list(model_config.eos_token_id)
    pad = model_config.pad_token_id
    if pad is None and eos_ids:
        # generate() would pick the first EOS itself, after a warning on every call.
        pad = eos_ids[0]
    return GenerationConfig(
        bos_token_id=model_config.bos_token_id, eos_token_id=model_config.eos_token_id, pad_token_id=pad
    )
