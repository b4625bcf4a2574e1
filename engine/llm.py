"""The offline API: LLM(model=...).generate(prompts, SamplingParams(...)), as in vLLM."""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

PromptType = str | dict[str, Any]
R = TypeVar("R")


class LLM:
    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        task: str = "generate",
        dtype: str | torch.dtype = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        enable_prefix_caching: bool = False,
        hf_overrides: dict[str, Any] | Callable | None = None,
        trust_remote_code: bool = False,
        revision: str | None = None,
        model_impl: str = "auto",
    ):
        config = EngineConfig.create(
            model=model, tokenizer=tokenizer, task=task, dtype=dtype, seed=seed, max_model_len=max_model_len,
            block_size=block_size, num_kv_blocks=num_kv_blocks, kv_cache_memory_bytes=kv_cache_memory_bytes,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching, hf_overrides=hf_overrides,
            trust_remote_code=trust_remote_code, revision=revision, model_impl=model_impl,
        )
        self.llm_engine = LLMEngine(config)
        self._request_ids = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def apply_model(self, fn: Callable[[torch.nn.Module], R]) -> list[R]:
        """Runs fn on the model (one entry per worker, as in vLLM; there is one worker here)."""
        return [fn(self.llm_engine.model_runner.model)]

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        params = self._params_per_prompt(sampling_params, len(prompts))
        # Everything is tokenized and validated before anything is queued, so one bad prompt
        # rejects the call without leaving half of it in the engine.
        parsed = [self._parse_prompt(p) for p in prompts]
        for _, ids in parsed:
            self.llm_engine.validate_prompt(ids)
        for sp in params:
            self.llm_engine.validate_params(sp)
        ids = [str(next(self._request_ids)) for _ in parsed]
        for request_id, (text, token_ids), sp in zip(ids, parsed, params):
            self.llm_engine.add_request(request_id, text, token_ids, sp)
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tokenizer = self.get_tokenizer()
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(
                conversation, chat_template=chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                **(chat_template_kwargs or {}),
            )
            # The template already holds BOS/special tokens; tokenizing with them would double BOS.
            ids = tokenizer(text, add_special_tokens=False).input_ids
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _parse_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.llm_engine.tokenize(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return prompt["prompt"], self.llm_engine.tokenize(prompt["prompt"])
        raise ValueError(
            f"a prompt must be a str, {{'prompt': str}} or {{'prompt_token_ids': [...]}}; got {prompt!r:.80}"
        )

    @staticmethod
    def _params_per_prompt(sampling_params, count: int) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        params = list(sampling_params)
        if len(params) != count:
            raise ValueError(f"got {len(params)} SamplingParams for {count} prompts; pass one, or one per prompt")
        return params

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm) as bar:
            while engine.has_unfinished_requests():
                outputs = engine.step()
                for out in outputs:
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
                engine.pop_finished(outputs)
        return [finished[r] for r in request_ids]
