"""`litmus serve` as a real subprocess on a free loopback port, for suites/serving and the server tests.

The server runs in its own interpreter with its own engine thread and real sockets, so what a
test sees is what a user of `litmus serve` sees. Its output goes to a log file; every error
raised here ends with the log's tail, so a server that died or never came up says why.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from harness.runners import TokensTextLogprobs

# The directory holding the engine and harness packages this process imported: the server
# must run the same code, installed or not.
_SOURCE_ROOT = Path(__file__).resolve().parents[1]


class ServerError(RuntimeError):
    """The server exited, or did not become healthy in time; the message ends with its log."""


@dataclass
class ServerProcess:
    port: int
    proc: subprocess.Popen
    log: Path
    api_key: str | None = None

    @classmethod
    def start(cls, model: str, log: Path, *args: str, api_key: str | None = None,
              env: dict[str, str] | None = None) -> Self:
        """Starts `litmus serve MODEL ARGS` on 127.0.0.1; call wait_ready before using it."""
        port = free_port()
        # engine.entrypoints.cli is what `litmus serve` runs, minus the harness's argument parser.
        argv = [sys.executable, "-m", "engine.entrypoints.cli", model, "--host", "127.0.0.1", "--port", str(port),
                *args]
        if api_key:
            argv += ["--api-key", api_key]
        path = os.pathsep.join(p for p in (str(_SOURCE_ROOT), os.environ.get("PYTHONPATH")) if p)
        with log.open("w") as out:
            proc = subprocess.Popen(argv, env={**os.environ, **(env or {}), "PYTHONPATH": path}, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        return cls(port, proc, log, api_key)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """What the openai client takes as base_url."""
        return f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self, timeout: float = 300.0) -> Self:
        """Waits until GET /health answers 200 (the model is loaded and the engine thread runs)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                # The log's last line leads: a one-line failure reason (a result record's) then says why.
                raise ServerError(f"litmus serve exited with status {self.proc.returncode}: {self._last_line()}\n"
                                  f"{self.log_tail()}")
            with contextlib.suppress(OSError):
                if self.request("GET", "/health")[0] == 200:
                    return self
            time.sleep(0.2)
        raise ServerError(f"litmus serve did not answer /health within {timeout:.0f}s\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, chars: int = 4000) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- litmus serve log ({self.log}) ---\n{text[-chars:]}"

    def _last_line(self) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines() if self.log.exists() else []
        return lines[-1] if lines else "(no output)"

    def headers(self, content_type: str | None = "application/json") -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return {**headers, "Content-Type": content_type} if content_type else headers

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 120.0) -> tuple[int, Any]:
        """One raw HTTP exchange: (status, the body parsed as JSON, else its bytes).

        For what the openai client cannot send or hides: bad bodies, headers, SSE framing.
        """
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        try:
            return resp.status, json.loads(data) if data else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return resp.status, data

    def engine_stats(self) -> dict[str, Any]:
        """The engine's state (GET /v1/debug/engine): KV blocks in use, requests, counters."""
        status, body = self.request("GET", "/v1/debug/engine", headers=self.headers(None))
        if status != 200:
            raise ServerError(f"/v1/debug/engine answered {status}: {body!r}")
        return body

    def wait_idle(self, timeout: float = 30.0) -> dict[str, Any]:
        """Waits until no request is in the engine and no KV block is held; returns the stats."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.engine_stats()
            if stats["num_requests"] == stats["kv_blocks_in_use"] == stats["num_running"] == stats["num_waiting"] == 0:
                return stats
            if time.monotonic() > deadline:
                raise ServerError(f"the server is not idle after {timeout:.0f}s: {stats}")
            time.sleep(0.02)


# --- answers as the runners' tuples (harness/runners.py), for the comparators -------------------------
# Requests send return_tokens_as_token_ids, so every logprob token reads "token_id:<id>": texts
# repeat across tokens (and may be partial UTF-8), ids do not.
def token_id(label: str) -> int:
    prefix, _, number = label.partition(":")
    if prefix != "token_id" or not number.lstrip("-").isdigit():
        raise ValueError(f"{label!r} is not a 'token_id:<id>' label: was return_tokens_as_token_ids sent?")
    return int(number)


def completion_result(choice: Any) -> TokensTextLogprobs:
    """A /v1/completions choice (or the concatenated chunks of one) as (ids, text, top logprobs)."""
    lp = choice.logprobs
    ids = [token_id(t) for t in lp.tokens]
    top = [{token_id(t): v for t, v in step.items()} for step in lp.top_logprobs]
    return ids, choice.text, top


def chat_result(choice: Any) -> TokensTextLogprobs:
    """A /v1/chat/completions choice as (ids, text, top logprobs)."""
    content = choice.logprobs.content
    ids = [token_id(item.token) for item in content]
    top = [{token_id(item.token): item.logprob, **{token_id(t.token): t.logprob for t in item.top_logprobs}}
           for item in content]
    return ids, choice.message.content, top


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # A server outliving a killed test run would hold its port and the CPU.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
