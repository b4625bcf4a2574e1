"""LLMEngine: requests in, one scheduler step at a time, RequestOutputs out (PoolingRequestOutputs
for a pooling task: each prompt runs whole in one step and is pooled, nothing is sampled)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from engine.config import EngineConfig
from engine.core.block_manager import BlockManager
from engine.core.request import Sequence
from engine.core.scheduler import Scheduler, SchedulerOutput
from engine.detokenizer import Detokenizer
from engine.loader import load_tokenizer
from engine.outputs import CompletionOutput, Logprob, PoolingOutput, PoolingRequestOutput, RequestOutput
from engine.pooling_params import PoolingParams
from engine.sampling_params import SamplingParams
from engine.stats import StepStats
from engine.worker.model_runner import ModelRunner, PromptLogprobsChunk, StepResult


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.tokenizer = load_tokenizer(
            config.tokenizer or config.source, trust_remote_code=config.trust_remote_code,
            revision=config.revision,
        )
        self.eos_token_ids = eos_token_ids(config, self.tokenizer)
        self.block_manager = BlockManager(config.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   enable_chunked_prefill=not config.is_pooling)
        # Per-phase step times (engine.stats), shared with the model runner.
        self.stats = StepStats()
        self.model_runner = ModelRunner(config, self.eos_token_ids, stats=self.stats)
        self.detokenizer = Detokenizer(self.tokenizer)
        self.requests: dict[str, RequestState] = {}
        self._seq_ids = itertools.count()
        # Unseeded sampling requests draw their seeds from here, so a whole run is reproducible.
        self._seed_rng = torch.Generator().manual_seed(config.seed)

    # --- requests -------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt).input_ids

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        if not prompt_token_ids:
            raise ValueError("the prompt is empty: it must contain at least one token")
        vocab = self.config.hf_config.vocab_size
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are out of the vocabulary [0, {vocab})")
        if len(prompt_token_ids) > self.config.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_token_ids)} tokens, longer than max_model_len="
                f"{self.config.max_model_len}"
            )

    def validate_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: values bounded by this model's vocabulary.
        Caught here, before queuing, since inside a step they would fail the whole batch."""
        if self.config.is_pooling:
            raise ValueError(f"generation needs task='generate'; this model runs the pooling task "
                             f"{self.config.task!r} (use encode / embed / classify / score / reward)")
        vocab = self.config.hf_config.vocab_size
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > vocab:
                raise ValueError(f"SamplingParams.{name}={k} is invalid: more than the vocabulary size {vocab}")
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise ValueError(f"SamplingParams.stop_token_ids {bad[:5]} are out of the vocabulary [0, {vocab})")

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None,
                    params: SamplingParams) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("a request needs a prompt or prompt_token_ids")
            prompt_token_ids = self.tokenize(prompt)
        self.validate_prompt(prompt_token_ids)
        self.validate_params(params)
        seqs = [
            Sequence(next(self._seq_ids), request_id, i, list(prompt_token_ids), params, self._generator(params, i))
            for i in range(params.n)
        ]
        self.requests[request_id] = RequestState(request_id, prompt, list(prompt_token_ids), seqs)
        for seq in seqs:
            self.detokenizer.start(seq)
            self.scheduler.add(seq)

    def validate_pooling_params(self, params: PoolingParams) -> None:
        if not isinstance(params, PoolingParams):
            raise ValueError(f"a pooling request takes PoolingParams, not {type(params).__name__}")
        # The pooler's task: `score` on an embedding model takes embedding parameters.
        params.verify(self.model_runner.model.pooler.task, self.config.hf_config.hidden_size)

    def add_pooling_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                            params: PoolingParams, token_type_ids: list[int] | None = None) -> None:
        if not self.config.is_pooling:
            raise ValueError(f"the engine runs task={self.config.task!r}; pooling requests need a pooling task "
                             f"(embed, classify, score, reward)")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate_prompt(prompt_token_ids)
        self.validate_pooling_params(params)
        if token_type_ids is not None:
            self._validate_token_type_ids(token_type_ids, len(prompt_token_ids))
        seq = Sequence(next(self._seq_ids), request_id, 0, list(prompt_token_ids), params,
                       token_type_ids=None if token_type_ids is None else list(token_type_ids))
        self.requests[request_id] = RequestState(request_id, prompt, list(prompt_token_ids), [seq])
        self.scheduler.add(seq)

    def _validate_token_type_ids(self, token_type_ids: list[int], num_tokens: int) -> None:
        if len(token_type_ids) != num_tokens:
            raise ValueError(f"token_type_ids has {len(token_type_ids)} entries for {num_tokens} tokens")
        types = getattr(self.config.hf_config, "type_vocab_size", None)
        if self.model_runner.model.uses_token_type_ids and types is not None:
            bad = sorted({t for t in token_type_ids if not isinstance(t, int) or not 0 <= t < types})
            if bad:
                raise ValueError(f"token type ids {bad[:5]} are out of the model's range [0, {types})")

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        if params.greedy:
            return None
        if params.seed is not None:
            seed = params.seed + index
        else:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_rng))
        return torch.Generator().manual_seed(seed)

    def abort_request(self, request_id: str) -> None:
        state = self.requests.pop(request_id, None)
        if state is None:
            return
        for seq in state.seqs:
            if not seq.is_finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- stepping ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput] | list[PoolingRequestOutput]:
        """Runs one batch; returns the outputs of requests that got new tokens or finished."""
        with self.stats.phase("schedule"):
            sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        self.stats.steps += 1
        if self.config.is_pooling:
            return self._pooling_step(sched)
        result = self.model_runner.execute(sched.scheduled)
        with self.stats.phase("output"):
            return self._process_step(sched, result)

    def _process_step(self, sched: SchedulerOutput, result: StepResult) -> list[RequestOutput]:
        self.scheduler.update_after_step(sched)
        for chunk in result.prompt_logprobs:
            self._append_prompt_logprobs(chunk)
        touched: dict[str, None] = {}
        if result.sampler_output is not None:
            out = result.sampler_output
            for seq, token, lp in zip(result.sampled, out.token_ids, out.logprobs):
                seq.append_token(token, self._logprob_dict(token, lp))
                new_text = self.detokenizer.step(seq)
                self._check_stop(seq, new_text)
                if seq.finish_reason is not None:
                    if not isinstance(seq.stop_reason, str):  # a stop string already cut the text
                        self.detokenizer.flush(seq)
                    self.scheduler.finish(seq)
                touched[seq.request_id] = None
        return [self._output(self.requests[r]) for r in touched if r in self.requests]

    def _pooling_step(self, sched: SchedulerOutput) -> list[PoolingRequestOutput]:
        pooled = self.model_runner.execute_pooling(sched.scheduled)
        with self.stats.phase("output"):
            self.scheduler.update_after_step(sched)
            outputs = []
            for s, data in zip(sched.scheduled, pooled):
                self.scheduler.finish(s.seq)
                outputs.append(PoolingRequestOutput(s.seq.request_id, PoolingOutput(data), s.seq.prompt_token_ids))
            return outputs

    def pop_finished(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.finished:
                self.requests.pop(out.request_id, None)

    def _logprob_dict(self, token: int, lp) -> dict[int, Logprob] | None:
        if lp is None:
            return None
        chosen, rank, top_ids, top_lps = lp
        decode = self.detokenizer.decode_token
        entries = {token: Logprob(chosen, rank, decode(token))}
        for r, (tid, tlp) in enumerate(zip(top_ids, top_lps), start=1):
            entries.setdefault(tid, Logprob(tlp, r, decode(tid)))
        return entries

    def _append_prompt_logprobs(self, chunk: PromptLogprobsChunk) -> None:
        seq = chunk.seq
        targets = seq.prompt_token_ids[chunk.first_position:chunk.first_position + len(chunk.stats)]
        seq.prompt_logprobs.extend(self._logprob_dict(token, stats) for token, stats in zip(targets, chunk.stats))

    def _check_stop(self, seq: Sequence, new_text: str) -> None:
        p = seq.params
        token = seq.token_ids[-1]
        if seq.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and token in self.eos_token_ids:
                seq.finish_reason = "stop"
            elif token in p.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
            elif p.stop and new_text:
                self._check_stop_strings(seq, new_text)
        if seq.finish_reason is None:
            if p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
                seq.finish_reason = "length"
            elif seq.num_tokens >= self.config.max_model_len:
                seq.finish_reason = "length"

    @staticmethod
    def _check_stop_strings(seq: Sequence, new_text: str) -> None:
        text = seq.output_text
        longest = max(len(s) for s in seq.params.stop)
        start = max(0, len(text) - len(new_text) - longest + 1)
        hits = [(text.find(s, start), s) for s in seq.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return
        i, stop = min(hits)
        end = i + len(stop) if seq.params.include_stop_str_in_output else i
        seq.output_text = text[:end]
        seq.finish_reason, seq.stop_reason = "stop", stop

    def _output(self, state: RequestState) -> RequestOutput:
        first = state.seqs[0]
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            prompt_logprobs=first.prompt_logprobs,
            outputs=[
                CompletionOutput(
                    index=s.index, text=s.output_text, token_ids=s.output_token_ids,
                    cumulative_logprob=s.cumulative_logprob if s.params.logprobs is not None else None,
                    logprobs=s.logprobs, finish_reason=s.finish_reason, stop_reason=s.stop_reason,
                )
                for s in state.seqs
            ],
            finished=state.finished,
        )


def eos_token_ids(config: EngineConfig, tokenizer) -> frozenset[int]:
    """EOS as Transformers' generate sees it: the generation config's, else the tokenizer's."""
    ids = None
    try:
        ids = GenerationConfig.from_pretrained(config.source.path).eos_token_id
    except (OSError, ValueError):
        pass
    if ids is None:
        ids = getattr(config.hf_config, "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return frozenset()
    return frozenset([ids] if isinstance(ids, int) else ids)
