"""Per-request pooling parameters (vLLM's PoolingParams), validated at construction and again
against the task and model before a request is queued."""
from __future__ import annotations

from dataclasses import dataclass

POOLING_TASKS = ("embed", "classify", "score", "reward")
# Which request fields each task reads; a field set for another task would be silently ignored.
_FIELDS_OF_TASK = {
    "embed": ("dimensions", "normalize"),
    "classify": ("softmax",),
    "score": ("softmax",),
    "reward": ("softmax",),
}


@dataclass
class PoolingParams:
    """dimensions: keep the first N features of an embedding (Matryoshka), before normalizing.
    normalize / softmax: None keeps the model's pooler configuration, a bool overrides it per
    request (softmax means sigmoid for a single-logit head)."""

    dimensions: int | None = None
    normalize: bool | None = None
    softmax: bool | None = None

    def __post_init__(self) -> None:
        if self.dimensions is not None and (
            not isinstance(self.dimensions, int) or isinstance(self.dimensions, bool) or self.dimensions < 1
        ):
            self._bad("dimensions", "must be an integer >= 1")
        for name in ("normalize", "softmax"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                self._bad(name, "must be a bool, or None for the model's default")

    def verify(self, task: str, embedding_size: int) -> None:
        """Fields the task does not use, and dimensions beyond the model's embedding, are errors."""
        for name in ("dimensions", "normalize", "softmax"):
            if getattr(self, name) is not None and name not in _FIELDS_OF_TASK[task]:
                self._bad(name, f"task {task!r} does not use it (it uses: {', '.join(_FIELDS_OF_TASK[task])})")
        if self.dimensions is not None and self.dimensions > embedding_size:
            self._bad("dimensions", f"larger than the model's embedding size {embedding_size}")

    def _bad(self, name: str, why: str) -> None:
        raise ValueError(f"PoolingParams.{name}={getattr(self, name)!r} is invalid: {why}")
