"""The on-disk zoo cache: content-keyed directories that are either complete or absent."""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PROVENANCE_FILE = "litmus_provenance.json"


def cache_dir() -> Path:
    return Path(os.environ.get("LITMUS_CACHE_DIR") or "~/.cache/litmus").expanduser()


def zoo_dir() -> Path:
    return cache_dir() / "zoo"


def is_complete(directory: Path) -> bool:
    # Provenance is written last and the directory only appears by rename, so its presence
    # means the whole build finished.
    return (directory / PROVENANCE_FILE).is_file()


def build_atomically(target: Path, build: Callable[[Path], dict[str, Any]], force: bool = False) -> Path:
    """Run `build(tmp)` in a temporary sibling of `target`, then move it into place in one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target):
        if is_complete(target) and not force:
            return target  # another process built it while we waited for the lock
        _remove_leftovers(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
        try:
            provenance = build(tmp)
            write_json(tmp / PROVENANCE_FILE, provenance)
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
            _replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def file_sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    # size and mtime_ns are part of the cache key only: a replaced file is hashed afresh.
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def _exclusive(target: Path) -> Iterator[None]:
    # pytest-xdist workers asking for the same model must not all build it at once.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_leftovers(target: Path) -> None:
    """Temp directories of builds that died; safe to delete because we hold this target's lock."""
    for prefix in (".tmp-", ".old-"):
        for stale in target.parent.glob(f"{prefix}{target.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
    if target.exists() and not is_complete(target):
        shutil.rmtree(target)


def _replace(new: Path, target: Path) -> None:
    if not target.exists():
        new.rename(target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent))
    target.rename(old / "previous")
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)
