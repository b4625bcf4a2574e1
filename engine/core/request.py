"""Per-sequence state. A request with n > 1 fans out into n sequences sharing its prompt; a
pooling request (PoolingParams) is one sequence that only prefills."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto

import torch

from engine.outputs import Logprob, PromptLogprobs, SampleLogprobs
from engine.pooling_params import PoolingParams
from engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams | PoolingParams
    generator: torch.Generator | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Tokens served from the prefix cache at the last admission (a metric, not state).
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Chained hashes of this sequence's full blocks, in order; grows as blocks fill.
    block_hashes: list[int] = field(default_factory=list)
    logprobs: SampleLogprobs | None = None
    prompt_logprobs: PromptLogprobs | None = None
    cumulative_logprob: float = 0.0
    output_text: str = ""
    # Incremental detokenization window over token_ids (see Detokenizer).
    prefix_offset: int = 0
    read_offset: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # Segment ids of a text pair for encoders that embed them (BERT cross-encoders).
    token_type_ids: list[int] | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.is_pooling:
            return
        if self.params.logprobs is not None:
            self.logprobs = []
        if self.wants_prompt_logprobs:
            self.prompt_logprobs = [None]

    @property
    def is_pooling(self) -> bool:
        return isinstance(self.params, PoolingParams)

    @property
    def wants_prompt_logprobs(self) -> bool:
        # Identical for every child of an n > 1 request, so only the first computes them.
        return not self.is_pooling and self.params.prompt_logprobs is not None and self.index == 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def prompt_logprobs_done(self) -> bool:
        return self.prompt_logprobs is None or len(self.prompt_logprobs) >= self.num_prompt_tokens

    def append_token(self, token_id: int, logprobs: dict[int, Logprob] | None) -> None:
        self.token_ids.append(token_id)
        if logprobs is not None:
            self.cumulative_logprob += logprobs[token_id].logprob
            if self.logprobs is not None:
                self.logprobs.append(logprobs)
