"""Where the engine's steps spend their wall time, by phase: the model's compute against the
scheduler and Python around it (what `litmus bench` reports as per-step overhead)."""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

# schedule: the scheduler picks the step's sequences; prepare: they become input tensors and
# attention metadata; model: the forward pass and the LM head; sample: sampling, logprobs and
# prompt logprobs; output: tokens appended, detokenized, stops checked, request outputs built.
PHASES = ("schedule", "prepare", "model", "sample", "output")
OVERHEAD_PHASES = ("schedule", "prepare", "sample", "output")


@dataclass
class StepStats:
    """Wall seconds per phase, summed over the steps since the last reset."""

    steps: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def reset(self) -> None:
        self.steps = 0
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def summary(self) -> dict[str, float]:
        """Milliseconds per step by phase, and the share of step time outside the model."""
        total = sum(self.seconds.values())
        per_step = {f"{name}_ms": 1e3 * s / max(self.steps, 1) for name, s in self.seconds.items()}
        overhead = sum(self.seconds[name] for name in OVERHEAD_PHASES)
        return {"steps": self.steps, "step_ms": 1e3 * total / max(self.steps, 1), **per_step,
                "overhead_ms": 1e3 * overhead / max(self.steps, 1),
                "overhead_pct": 100.0 * overhead / total if total else 0.0}
