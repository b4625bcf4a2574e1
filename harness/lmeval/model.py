"""The `litmus` lm-eval model: likelihoods from the engine's prompt logprobs, generations
from its sampler, tokenization exactly as lm-eval's `hf` model does it (so the two backends
score the same token sequences and differ only in the model underneath).
"""
from __future__ import annotations

import logging
from typing import Any

from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from engine import LLM, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)

# (request strings or None for rolling windows, context token ids, continuation token ids)
TokenRequest = tuple[tuple[str, str] | None, list[int], list[int]]

# Generation kwargs lm-eval tasks may set that map one to one onto SamplingParams.
_SAMPLING_KWARGS = ("temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty",
                    "presence_penalty", "frequency_penalty")


@register_model("litmus")
class LitmusLM(TemplateLM):
    """model_args: pretrained (a model directory, .gguf file or cached hub id, as LLM takes),
    dtype, max_length (the engine's max_model_len: the most tokens one scored or generating
    sequence holds), max_gen_toks, add_bos_token / prefix_token_id (as lm-eval's hf model),
    seed; any other engine.LLM argument (block_size, max_num_seqs, ...) passes through.

    lm-eval's batch_size, max_batch_size and device are accepted and not used: the engine
    batches whatever is queued (continuous batching) and places the model itself.
    """

    def __init__(
        self,
        pretrained: str,
        dtype: str = "auto",
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        seed: int = 1234,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        device: str | None = None,
        **llm_kwargs: Any,
    ) -> None:
        super().__init__()
        self.llm = LLM(pretrained, dtype=dtype, max_model_len=max_length, seed=seed, **llm_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        config = self.llm.llm_engine.config
        self.max_length = config.max_model_len
        self._max_gen_toks = max_gen_toks
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.pretrained = pretrained
        if device is not None and device != str(config.device):
            logger.info("litmus runs the model on %s; lm-eval's device %r is not used", config.device, device)

    # --- what lm-eval asks of a model ----------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # As lm-eval's hf model: what an empty context and each rolling window start from.
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token if self.add_bos_token is not None else True
            # A context that already starts with BOS text must not get a second BOS.
            if has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
                add_special_tokens = False
        return self.tokenizer(string, add_special_tokens=add_special_tokens).input_ids

    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        prompts = [self._scored_prompt(context, continuation) for _, context, continuation in requests]
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=not disable_tqdm)
        results = []
        for (strings, _, continuation), output in zip(requests, outputs):
            result = _continuation_score(output, len(continuation))
            if strings is not None:
                self.cache_hook.add_partial("loglikelihood", strings, result)
            results.append(result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        windows: list[TokenRequest] = []
        owners: list[int] = []
        for index, (text,) in enumerate(request.args for request in requests):
            # One position fewer than max_length: the engine scores only tokens inside its
            # prompt, so a window's last predicted token must fit in it too.
            pairs = get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length - 1, 1)
            for context, continuation in map(make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        prompts, params, stops = [], [], []
        for context, gen_kwargs in (request.args for request in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            if max_gen_toks >= self.max_length:
                raise ValueError(f"max_gen_toks={max_gen_toks} leaves no room for a context within "
                                 f"max_length={self.max_length}")
            # Left-truncated, as lm-eval's hf model does, so the generated tokens fit too.
            prompts.append({"prompt_token_ids": self.tok_encode(context)[-(self.max_length - max_gen_toks):]})
            params.append(_sampling_params(kwargs, max_gen_toks, until))
            stops.append(until)
        outputs = self.llm.generate(prompts, params, use_tqdm=not disable_tqdm)
        texts = []
        for request, output, until in zip(requests, outputs, stops):
            # The engine already cut at the first stop string; this also cuts a stop string that
            # only the skipped special tokens would have formed.
            text = postprocess_generated_text(output.outputs[0].text, until, None)
            self.cache_hook.add_partial("generate_until", request.args, text)
            texts.append(text)
        return texts

    def get_model_info(self) -> dict[str, Any]:
        config = self.llm.llm_engine.config
        return {"model_name": self.pretrained, "model_dtype": str(config.dtype), "max_model_len": self.max_length}

    # --- helpers ---------------------------------------------------------------------------
    def _scored_prompt(self, context: list[int], continuation: list[int]) -> list[int]:
        if not continuation or not context:
            raise ValueError("a loglikelihood request needs a non-empty context and continuation")
        if len(continuation) >= self.max_length:
            raise ValueError(f"a continuation of {len(continuation)} tokens cannot be scored within "
                             f"max_length={self.max_length} (it needs at least one context token too)")
        # Left-truncated to the engine's limit; the continuation is always kept whole.
        return (context + continuation)[-self.max_length:]


def _continuation_score(output: RequestOutput, num_tokens: int) -> tuple[float, bool]:
    """(summed logprob of the prompt's last num_tokens tokens, whether each was the argmax)."""
    tokens = output.prompt_token_ids[-num_tokens:]
    steps = output.prompt_logprobs[-num_tokens:]
    chosen = [step[token] for token, step in zip(tokens, steps)]
    return sum(lp.logprob for lp in chosen), all(lp.rank == 1 for lp in chosen)


def _sampling_params(kwargs: dict[str, Any], max_tokens: int, stop: list[str]) -> SamplingParams:
    kwargs = dict(kwargs)
    # normalize_gen_kwargs has decided do_sample; greedy must not fall back to SamplingParams'
    # default temperature of 1.
    if not kwargs.pop("do_sample", False):
        kwargs["temperature"] = 0.0
    unknown = sorted(set(kwargs) - set(_SAMPLING_KWARGS))
    if unknown:
        raise ValueError(f"generation kwargs {unknown} are not supported by litmus; "
                         f"supported: until, max_gen_toks, do_sample, {', '.join(_SAMPLING_KWARGS)}")
    return SamplingParams(max_tokens=max_tokens, stop=[s for s in stop if s], **kwargs)
