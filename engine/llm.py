"""The offline API: LLM(model=...).generate(prompts, SamplingParams(...)), as in vLLM; pooling
models (task="embed" | "classify" | "score" | "reward") answer encode / embed / classify /
score / reward instead."""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.layers.pooler import PoolerConfig
from engine.outputs import (
    ClassificationRequestOutput,
    EmbeddingRequestOutput,
    PoolingRequestOutput,
    RequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from engine.pooling_params import PoolingParams
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
        override_pooler_config: PoolerConfig | dict[str, Any] | str | None = None,
        enforce_eager: bool = True,
    ):
        config = EngineConfig.create(
            model=model, tokenizer=tokenizer, task=task, dtype=dtype, seed=seed, max_model_len=max_model_len,
            block_size=block_size, num_kv_blocks=num_kv_blocks, kv_cache_memory_bytes=kv_cache_memory_bytes,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching, hf_overrides=hf_overrides,
            trust_remote_code=trust_remote_code, revision=revision, model_impl=model_impl,
            override_pooler_config=override_pooler_config, enforce_eager=enforce_eager,
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
    def _params_per_prompt(params, count: int, kind: type = SamplingParams) -> list:
        """One kind (SamplingParams, PoolingParams) for all prompts, or one per prompt; None: the defaults."""
        if params is None:
            params = kind()
        if isinstance(params, kind):
            return [params] * count
        params = list(params)
        if len(params) != count:
            raise ValueError(f"got {len(params)} {kind.__name__} for {count} prompts; pass one, or one per prompt")
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

    # --- pooling -----------------------------------------------------------------------------
    def encode(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[PoolingRequestOutput]:
        """The pooler's output for each prompt, whatever the pooling task."""
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        return self._encode([self._parse_prompt(p) + (None,) for p in prompts], pooling_params, use_tqdm)

    def embed(self, prompts: PromptType | Sequence[PromptType],
              pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
              use_tqdm: bool = True) -> list[EmbeddingRequestOutput]:
        self._require_task("embed", ("embed",))
        return [EmbeddingRequestOutput.from_base(o) for o in self.encode(prompts, pooling_params, use_tqdm)]

    def classify(self, prompts: PromptType | Sequence[PromptType],
                 pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
                 use_tqdm: bool = True) -> list[ClassificationRequestOutput]:
        self._require_task("classify", ("classify",))
        return [ClassificationRequestOutput.from_base(o) for o in self.encode(prompts, pooling_params, use_tqdm)]

    def reward(self, prompts: PromptType | Sequence[PromptType],
               pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
               use_tqdm: bool = True) -> list[PoolingRequestOutput]:
        self._require_task("reward", ("reward",))
        return self.encode(prompts, pooling_params, use_tqdm)

    def score(
        self,
        text_1: str | Sequence[str],
        text_2: str | Sequence[str],
        pooling_params: PoolingParams | None = None,
        use_tqdm: bool = True,
    ) -> list[ScoringRequestOutput]:
        """One score per (text_1, text_2) pair; a single text_1 is paired with every text_2.
        A cross-encoder reads each pair as one input; an embedding model scores the cosine
        similarity of the two texts' embeddings."""
        self._require_task("score", ("score", "embed"))
        pairs = self._score_pairs(text_1, text_2)
        if self.llm_engine.model_runner.model.pooler.task == "score":
            return self._cross_encode(pairs, pooling_params, use_tqdm)
        return self._embedding_similarity(pairs, pooling_params, use_tqdm)

    def _require_task(self, method: str, tasks: tuple[str, ...]) -> None:
        task = self.llm_engine.config.task
        if task not in tasks:
            raise ValueError(f"LLM.{method} needs a model loaded with task={' or '.join(map(repr, tasks))}; this one "
                             f"runs task={task!r}")

    @staticmethod
    def _score_pairs(text_1, text_2) -> list[tuple[str, str]]:
        first = [text_1] if isinstance(text_1, str) else list(text_1)
        second = [text_2] if isinstance(text_2, str) else list(text_2)
        if len(first) == 1:
            first = first * len(second)
        if not second or len(first) != len(second):
            raise ValueError(f"score pairs text_1 with text_2: got {len(first)} and {len(second)} texts; give one "
                             f"text_1 for all, or as many as text_2 (at least one)")
        return list(zip(first, second))

    def _cross_encode(self, pairs, pooling_params, use_tqdm) -> list[ScoringRequestOutput]:
        tokenizer = self.get_tokenizer()
        inputs = []
        for a, b in pairs:
            encoded = tokenizer(a, text_pair=b)
            inputs.append((f"{a}\n{b}", list(encoded.input_ids), encoded.get("token_type_ids")))
        outputs = self._encode(inputs, pooling_params, use_tqdm)
        return [ScoringRequestOutput(o.request_id, ScoringOutput(o.outputs.data.item()), o.prompt_token_ids)
                for o in outputs]

    def _embedding_similarity(self, pairs, pooling_params, use_tqdm) -> list[ScoringRequestOutput]:
        texts = list(dict.fromkeys(t for pair in pairs for t in pair))
        embedded = dict(zip(texts, self._encode([self._parse_prompt(t) + (None,) for t in texts], pooling_params,
                                                use_tqdm)))
        results = []
        for a, b in pairs:
            x, y = embedded[a], embedded[b]
            similarity = F.cosine_similarity(x.outputs.data, y.outputs.data, dim=-1).item()
            results.append(ScoringRequestOutput(f"{x.request_id}_{y.request_id}", ScoringOutput(similarity),
                                                x.prompt_token_ids + y.prompt_token_ids))
        return results

    def _encode(self, inputs: list[tuple[str | None, list[int], list[int] | None]],
                pooling_params, use_tqdm: bool) -> list[PoolingRequestOutput]:
        """inputs: (prompt, token ids, token type ids or None); all validated before any is queued."""
        engine = self.llm_engine
        params = self._params_per_prompt(pooling_params, len(inputs), PoolingParams)
        for _, ids, _ in inputs:
            engine.validate_prompt(ids)
        for p in params:
            engine.validate_pooling_params(p)
        ids = [str(next(self._request_ids)) for _ in inputs]
        for request_id, (text, token_ids, types), p in zip(ids, inputs, params):
            engine.add_pooling_request(request_id, text, token_ids, p, types)
        return self._run(ids, use_tqdm)

