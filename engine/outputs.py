"""Request outputs, shaped like vLLM's so code written against vLLM reads ours unchanged."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per position: token id -> Logprob (the chosen token plus the top-N).
SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: SampleLogprobs | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False


# --- pooling ---------------------------------------------------------------------------------

@dataclass
class PoolingOutput:
    """The pooler's raw output for one prompt: a vector, or one row per token (ALL / STEP)."""
    data: torch.Tensor


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class ClassificationOutput:
    probs: list[float]

    @property
    def num_classes(self) -> int:
        return len(self.probs)


@dataclass
class ScoringOutput:
    score: float


OutputT = TypeVar("OutputT")


@dataclass
class PoolingRequestOutput(Generic[OutputT]):
    request_id: str
    outputs: OutputT
    prompt_token_ids: list[int]
    finished: bool = True


class EmbeddingRequestOutput(PoolingRequestOutput[EmbeddingOutput]):
    @classmethod
    def from_base(cls, out: PoolingRequestOutput[PoolingOutput]) -> EmbeddingRequestOutput:
        return cls(out.request_id, EmbeddingOutput(_vector(out, "an embedding")), out.prompt_token_ids, out.finished)


class ClassificationRequestOutput(PoolingRequestOutput[ClassificationOutput]):
    @classmethod
    def from_base(cls, out: PoolingRequestOutput[PoolingOutput]) -> ClassificationRequestOutput:
        return cls(out.request_id, ClassificationOutput(_vector(out, "class probabilities")), out.prompt_token_ids,
                   out.finished)


class ScoringRequestOutput(PoolingRequestOutput[ScoringOutput]):
    pass


def _vector(out: PoolingRequestOutput[PoolingOutput], what: str) -> list[float]:
    data = out.outputs.data
    if data.dim() != 1:
        raise ValueError(f"{what} is one vector; the pooler gave shape {tuple(data.shape)}")
    return data.tolist()
