"""Result records: one JSON line per check, the only input the matrix and the docs read.

A record carries enough provenance (engine version and git sha, library versions, device,
dtype) that a verdict can be traced to the code and environment that produced it.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

OUTCOMES = ("pass", "fail", "skip", "error")
# The support levels in order (DESIGN.md), then serving: a column of its own, not a level,
# since working behind the API says nothing about the levels above strict.
LEVELS = ("smoke", "strict", "sensibility", "community")
TIERS = (*LEVELS, "serving")
RECORDS_FILE = "results.jsonl"


@lru_cache(maxsize=1)
def environment() -> dict[str, str]:
    import torch
    import transformers

    import engine

    return {
        "engine_version": engine.__version__,
        "git_sha": git_sha(),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
    }


def git_sha() -> str:
    """The checkout's commit (with '+dirty' for local changes), or 'unknown' outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


@dataclass
class ResultRecord:
    model: str
    architecture: str | None
    task: str | None
    tier: str
    check: str
    outcome: str
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    # The implementation the engine ran the model with ("native" or "transformers"); empty where
    # the check runs no engine (community) or the engine could not run the architecture at all.
    model_impl: str = ""
    duration_s: float = 0.0
    nodeid: str = ""
    engine_version: str = ""
    git_sha: str = ""
    transformers: str = ""
    torch: str = ""
    device: str = ""
    timestamp: str = ""

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome {self.outcome!r} is not one of {OUTCOMES}")
        if self.outcome == "skip" and not self.reason:
            raise ValueError(f"a skip needs a reason ({self.model} {self.tier}/{self.check})")
        env = environment()
        for key in ("engine_version", "git_sha", "transformers", "torch", "device"):
            if not getattr(self, key):
                setattr(self, key, env[key])
        if not self.timestamp:
            self.timestamp = datetime.now(timezone.utc).isoformat(timespec="seconds")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=jsonable)


def jsonable(value: Any) -> Any:
    """json.dumps' fallback: numpy / torch scalars as their Python value, anything else as text."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def append_record(path: Path, record: ResultRecord) -> None:
    """Appends one line; a single O_APPEND write keeps concurrent writers' lines whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (record.to_json() + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_records(*paths: Path) -> list[ResultRecord]:
    """Records from results.jsonl files or directories holding them (recursively)."""
    records = []
    for path in paths:
        files = sorted(Path(path).rglob(RECORDS_FILE)) if Path(path).is_dir() else [Path(path)]
        for file in files:
            for n, line in enumerate(file.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    records.append(ResultRecord(**json.loads(line)))
                except (json.JSONDecodeError, TypeError, ValueError) as e:
                    raise ValueError(f"{file}:{n}: not a valid result record: {e}") from None
    return records
