"""Run the same prompts through Hugging Face Transformers and through the engine.

Both runners expose the same methods and return plain Python data, so the comparators
never know which side produced an output.
"""
from __future__ import annotations

import contextlib
import gc
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Self

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
)

# (generated token ids, generated text)
TokensText = tuple[list[int], str]
# Per generated position: token id -> logprob for the top-k, always holding the chosen token.
TopLogprobs = list[dict[int, float]]
TokensTextLogprobs = tuple[list[int], str, TopLogprobs]
# Per prompt position: token id -> logprob for the top-k plus the prompt's own token there,
# given the tokens before it; None at position 0, which nothing predicts (vLLM's shape).
PromptTopLogprobs = list[dict[int, float] | None]
# (prompt token ids, their prompt logprobs)
TokensPromptLogprobs = tuple[list[int], PromptTopLogprobs]


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
    def prompt_logprobs(
        self, prompts: Sequence[str | Sequence[int]], num_logprobs: int
    ) -> list[TokensPromptLogprobs]:
        """Each prompt's token ids (a str is tokenized as for generation) and its prompt
        logprobs with the top `num_logprobs` tokens at every position."""

    def prompt_nll(self, prompts: Sequence[Sequence[int]]) -> list[float]:
        """Summed negative log-likelihood (nats) of each prompt's tokens after the first, each
        given all tokens before it: the numerator of a perplexity."""
        prompts = [list(ids) for ids in prompts]
        short = [i for i, ids in enumerate(prompts) if len(ids) < 2]
        if short:
            raise ValueError(f"prompts {short[:5]} have fewer than 2 tokens, so no token of theirs is predicted")
        return self._prompt_nll(prompts)

    @abstractmethod
    def _generate(
        self, prompts: Sequence[str], max_tokens: int, num_logprobs: int | None
    ) -> list[TokensTextLogprobs]: ...

    @abstractmethod
    def _prompt_nll(self, prompts: list[list[int]]) -> list[float]: ...

    @abstractmethod
    def _release(self) -> None: ...


class HfRunner(_Runner):
    """The reference: Transformers' own generate(), one prompt at a time, so no padding."""

    def __init__(self, model_path: str, dtype: torch.dtype = torch.float32, task: str = "generate",
                 pooling_type: str | None = None) -> None:
        """task other than "generate": a pooling reference. Embeddings are the base model's last
        hidden states pooled by pooling_type (CLS, LAST or MEAN; required for "embed" and for
        "score" on an embedding model); classes are a sequence classifier's logits."""
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        if task != "generate":
            self._init_pooling(model_path, dtype, task, pooling_type)
            return
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
        self.eos_token_ids = _as_id_list(self.model.generation_config.eos_token_id)
        self.model.generation_config = _stopping_only(self.model.generation_config)

    def _release(self) -> None:
        del self.model

    def _init_pooling(self, model_path: str, dtype: torch.dtype, task: str, pooling_type: str | None) -> None:
        architecture = (AutoConfig.from_pretrained(model_path).architectures or [""])[0]
        self.cross_encoder = architecture.endswith("ForSequenceClassification")
        # Rewards are per-token outputs: a causal LM's logits, else the body's hidden states.
        self.lm_head_rewards = task == "reward" and architecture.endswith("ForCausalLM")
        auto = (AutoModelForSequenceClassification if self.cross_encoder
                else AutoModelForCausalLM if self.lm_head_rewards else AutoModel)
        self.model = auto.from_pretrained(model_path, dtype=dtype).eval()
        if task != "reward" and not self.cross_encoder and pooling_type not in _HF_POOLING:
            raise ValueError(f"HfRunner(task={task!r}) on {architecture} needs pooling_type, one of "
                             f"{', '.join(_HF_POOLING)}; got {pooling_type!r}")
        self.pooling_type = pooling_type

    @torch.inference_mode()
    def embed(self, prompts: Sequence[str], normalize: bool | None = None,
              dimensions: int | None = None) -> list[list[float]]:
        vectors = []
        for prompt in prompts:
            hidden = self.model(**self.tokenizer(prompt, return_tensors="pt")).last_hidden_state[0].float()
            x = _HF_POOLING[self.pooling_type](hidden)[:dimensions]
            vectors.append((F.normalize(x, dim=-1) if normalize in (None, True) else x).tolist())
        return vectors

    @torch.inference_mode()
    def reward(self, prompts: Sequence[str]) -> list[list[list[float]]]:
        """Per prompt, one output vector per token."""
        outputs = [self.model(**self.tokenizer(prompt, return_tensors="pt")) for prompt in prompts]
        return [(out.logits if self.lm_head_rewards else out.last_hidden_state)[0].float().tolist() for out in outputs]

    @torch.inference_mode()
    def classify(self, prompts: Sequence[str], softmax: bool | None = None) -> list[list[float]]:
        logits = [self.model(**self.tokenizer(prompt, return_tensors="pt")).logits[0].float() for prompt in prompts]
        return [(_class_probs(x) if softmax in (None, True) else x).tolist() for x in logits]

    @torch.inference_mode()
    def score(self, text_1: str | Sequence[str], text_2: str | Sequence[str]) -> list[float]:
        pairs = _score_pairs(text_1, text_2)
        if self.cross_encoder:
            return [_class_probs(self.model(**self.tokenizer(a, b, return_tensors="pt")).logits[0].float()).item()
                    for a, b in pairs]
        return [F.cosine_similarity(*map(torch.tensor, self.embed([a, b])), dim=0).item() for a, b in pairs]

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

    @torch.inference_mode()
    def prompt_logprobs(
        self, prompts: Sequence[str | Sequence[int]], num_logprobs: int
    ) -> list[TokensPromptLogprobs]:
        results = []
        for prompt in prompts:
            ids = self.tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
            input_ids = torch.tensor([ids])
            logits = self.model(input_ids, attention_mask=torch.ones_like(input_ids)).logits[0]
            # Row pos - 1 of the logits is the distribution the prompt token at pos was drawn from.
            steps = [_top_logprobs(logits[pos - 1], ids[pos], num_logprobs) for pos in range(1, len(ids))]
            results.append((ids, [None, *steps]))
        return results

    @torch.inference_mode()
    def _prompt_nll(self, prompts: list[list[int]]) -> list[float]:
        nlls = []
        for ids in prompts:
            input_ids = torch.tensor([ids])
            # Transformers' own loss: the mean cross-entropy over the len - 1 predicted positions.
            loss = self.model(input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids).loss
            nlls.append(loss.item() * (len(ids) - 1))
        return nlls


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
        return [_completion_result(request.outputs[0]) for request in self._run(list(prompts), params)]

    def prompt_logprobs(
        self, prompts: Sequence[str | Sequence[int]], num_logprobs: int
    ) -> list[TokensPromptLogprobs]:
        from engine import SamplingParams

        # One generated token is the least a request asks for; only the prompt's logprobs are kept.
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=num_logprobs)
        inputs = [prompt if isinstance(prompt, str) else {"prompt_token_ids": list(prompt)} for prompt in prompts]
        return [
            (
                list(request.prompt_token_ids),
                [None if step is None else _as_floats(step) for step in request.prompt_logprobs or []],
            )
            for request in self._run(inputs, params)
        ]

    def embed(self, prompts: Sequence[str], normalize: bool | None = None,
              dimensions: int | None = None) -> list[list[float]]:
        from engine import PoolingParams

        outputs = self.llm.embed(list(prompts), PoolingParams(normalize=normalize, dimensions=dimensions),
                                 use_tqdm=False)
        return [out.outputs.embedding for out in outputs]

    def classify(self, prompts: Sequence[str], softmax: bool | None = None) -> list[list[float]]:
        from engine import PoolingParams

        outputs = self.llm.classify(list(prompts), PoolingParams(softmax=softmax), use_tqdm=False)
        return [out.outputs.probs for out in outputs]

    def score(self, text_1: str | Sequence[str], text_2: str | Sequence[str]) -> list[float]:
        return [out.outputs.score for out in self.llm.score(text_1, text_2, use_tqdm=False)]

    def reward(self, prompts: Sequence[str]) -> list[list[list[float]]]:
        return [out.outputs.data.tolist() for out in self.llm.reward(list(prompts), use_tqdm=False)]

    def _run(self, prompts: list[Any], params: Any) -> list[Any]:
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        if len(outputs) != len(prompts):
            raise AssertionError(f"the engine returned {len(outputs)} outputs for {len(prompts)} prompts")
        return outputs

    def _prompt_nll(self, prompts: list[list[int]]) -> list[float]:
        from engine import SamplingParams

        # prompt_logprobs=0 still reports each prompt token's own logprob; one generated token is the minimum.
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
        return [-sum(step[token].logprob for token, step in zip(ids[1:], out.prompt_logprobs[1:]))
                for ids, out in zip(prompts, outputs)]


# The reference's pooling of a prompt's last hidden states [n, H] (one prompt, no padding).
_HF_POOLING = {"CLS": lambda h: h[0], "LAST": lambda h: h[-1], "MEAN": lambda h: h.mean(0)}


def _class_probs(logits: torch.Tensor) -> torch.Tensor:
    """A classifier's probabilities: sigmoid of a single logit (a cross-encoder's relevance), else softmax."""
    return torch.sigmoid(logits) if logits.numel() == 1 else torch.softmax(logits, dim=-1)


def _score_pairs(text_1: str | Sequence[str], text_2: str | Sequence[str]) -> list[tuple[str, str]]:
    first = [text_1] if isinstance(text_1, str) else list(text_1)
    second = [text_2] if isinstance(text_2, str) else list(text_2)
    return list(zip(first * len(second) if len(first) == 1 else first, second, strict=True))


def _completion_result(completion: Any) -> TokensTextLogprobs:
    top = [_as_floats(step) for step in completion.logprobs or []]
    return list(completion.token_ids), completion.text, top


def _as_floats(step: dict[int, Any]) -> dict[int, float]:
    """The engine's token id -> Logprob dict as the runners' token id -> logprob."""
    return {token: lp.logprob for token, lp in step.items()}


def _top_logprobs(logits: torch.Tensor, chosen: int, k: int) -> dict[int, float]:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top_ids = torch.topk(logprobs, k).indices.tolist() if k > 0 else []
    return {token: logprobs[token].item() for token in [*top_ids, chosen]}


def in_batches(prompts: Sequence[Any], batch_size: int | None, run: Callable[[list[Any]], list]) -> list:
    """run over prompts batch_size at a time (None: all at once), the outputs concatenated."""
    size = batch_size or len(prompts)
    return [output for start in range(0, len(prompts), size) for output in run(list(prompts[start:start + size]))]


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Torch's intra-op thread count set to `count` for a while. One thread is the fast choice on
    a machine shared with other processes (or xdist workers): two spinning threads per process
    on 2 busy cores made a SmolLM2 decode step ~6x slower in CPU time (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
