"""Litmus engine: a paged, continuously batched LLM inference engine with vLLM's offline API."""
from engine.layers.pooler import PoolerConfig, PoolingType
from engine.llm import LLM
from engine.outputs import (
    ClassificationRequestOutput,
    CompletionOutput,
    EmbeddingRequestOutput,
    Logprob,
    PoolingRequestOutput,
    RequestOutput,
    ScoringRequestOutput,
)
from engine.pooling_params import PoolingParams
from engine.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = [
    "LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "PoolingParams", "PoolerConfig",
    "PoolingType", "PoolingRequestOutput", "EmbeddingRequestOutput", "ClassificationRequestOutput",
    "ScoringRequestOutput", "__version__",
]
