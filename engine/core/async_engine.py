"""AsyncLLMEngine: LLMEngine behind one background thread, for asyncio callers (the server).

LLMEngine is not thread-safe, so exactly one thread (the engine thread) ever calls
add_request / step / abort_request on it. Callers talk to that thread through a command
queue; the engine thread hands each step's outputs back to the callers' asyncio queues
through the event loop (call_soon_threadsafe). While any request is unfinished the thread
steps continuously, so requests that arrive at different times share batches (continuous
batching); when nothing is left it sleeps until a command arrives.

Outputs are cumulative snapshots (RequestOutput), so a slow consumer may skip to the
latest one without losing anything; streaming deltas are computed by the consumer. A request
with PoolingParams (a pooling model's) gets one PoolingRequestOutput, in the step that runs it.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.outputs import PoolingRequestOutput, RequestOutput
from engine.pooling_params import PoolingParams
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

Output = RequestOutput | PoolingRequestOutput
# (request_id, output or the exception that ended the request)
_SinkItem = tuple[str, Output | BaseException]


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (shut down, or crashed); no request can be served."""


@dataclass
class GenerateRequest:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    params: SamplingParams | PoolingParams


@dataclass
class _Add:
    request: GenerateRequest
    sink: asyncio.Queue[_SinkItem]


@dataclass
class _Abort:
    request_id: str


@dataclass(frozen=True)
class EngineStats:
    """A consistent snapshot, taken by the engine thread between steps."""

    num_kv_blocks: int
    kv_blocks_in_use: int
    num_running: int  # sequences
    num_waiting: int  # sequences
    num_requests: int  # requests added and neither finished nor aborted
    num_preemptions: int
    num_steps: int
    num_finished_requests: int
    num_aborted_requests: int
    prompt_tokens: int  # of every request added
    generation_tokens: int  # generated so far, by every request
    alive: bool


@dataclass
class _Counters:
    steps: int = 0
    finished: int = 0
    aborted: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0


@dataclass
class _Inbox:
    """Commands for the engine thread; a Condition so the idle thread can sleep on it."""

    cond: threading.Condition = field(default_factory=threading.Condition)
    commands: deque[_Add | _Abort] = field(default_factory=deque)
    stopping: bool = False
    closed: bool = False  # the engine thread has exited; nothing submitted now would be seen


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox = _Inbox()
        self._sinks: dict[str, asyncio.Queue[_SinkItem]] = {}  # engine thread only
        self._counters = _Counters()  # engine thread only
        self._generated: dict[str, int] = {}  # engine thread only: tokens each request has generated so far
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stats = self._snapshot(alive=False)

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncLLMEngine":
        return cls(LLMEngine(config))

    # --- lifecycle ------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Starts the engine thread; outputs are delivered on `loop` (default: the running one)."""
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        self._loop = loop or asyncio.get_running_loop()
        # Tokenize once before the thread starts: the first call configures the fast
        # tokenizer's truncation state, which must not race the engine thread's decodes.
        self.engine.tokenize("warm up")
        self._thread = threading.Thread(target=self._run, name="litmus-engine", daemon=True)
        self._stats = self._snapshot(alive=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        with self._inbox.cond:
            self._inbox.stopping = True
            self._inbox.cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    @property
    def stats(self) -> EngineStats:
        return self._stats

    # --- requests (any thread; generate needs the event loop given to start) ----------------
    def prepare(self, request: GenerateRequest) -> None:
        """Tokenizes and validates in the caller's thread, so bad input fails before queueing.

        Only read-only engine state (config, tokenizer encode) is used here.
        """
        if request.prompt_token_ids is None:
            if request.prompt is None:
                raise ValueError("a request needs a prompt or prompt_token_ids")
            request.prompt_token_ids = self.engine.tokenize(request.prompt)
        self.engine.validate_prompt(request.prompt_token_ids)
        if isinstance(request.params, PoolingParams):
            self.engine.validate_pooling_params(request.params)

    async def generate(self, request_id: str, prompt: str | None, prompt_token_ids: list[int] | None,
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        async for _, output in self.generate_many([GenerateRequest(request_id, prompt, prompt_token_ids, params)]):
            yield output

    async def generate_many(self, requests: list[GenerateRequest]) -> AsyncIterator[tuple[int, Output]]:
        """Yields (index into requests, latest output) until every request has finished.

        All requests are validated before any is queued, so one bad prompt rejects the call
        whole. Leaving the iteration early (break, cancellation, client gone) aborts the
        unfinished requests, which frees their KV blocks.
        """
        self._check_alive()
        for request in requests:
            self.prepare(request)
        index = {r.request_id: i for i, r in enumerate(requests)}
        if len(index) != len(requests):
            raise ValueError("request ids within one call must be distinct")
        sink: asyncio.Queue[_SinkItem] = asyncio.Queue()
        pending = set(index)
        self._submit(*(_Add(r, sink) for r in requests))
        try:
            while pending:
                batch = [await sink.get()]
                while not sink.empty():
                    batch.append(sink.get_nowait())
                latest: dict[str, Output] = {}
                for request_id, item in batch:
                    if isinstance(item, BaseException):
                        # This request is not in the engine (or the engine is gone); aborting its
                        # id could only hit another caller's request that holds the same id.
                        pending.discard(request_id)
                        raise item
                    latest[request_id] = item  # cumulative: only the newest matters
                for request_id, output in latest.items():
                    if output.finished:
                        pending.discard(request_id)
                    yield index[request_id], output
        finally:
            for request_id in pending:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._submit(_Abort(request_id))

    def _submit(self, *commands: _Add | _Abort) -> None:
        with self._inbox.cond:
            if self._inbox.closed:
                if any(isinstance(c, _Add) for c in commands):
                    raise self._dead_error()
                return  # an abort for a dead engine has nothing left to do
            self._inbox.commands.extend(commands)
            self._inbox.cond.notify()

    def _check_alive(self) -> None:
        if self._thread is None:
            raise EngineDeadError("the engine is not started")
        if not self.is_alive or self._inbox.stopping:
            raise self._dead_error()

    def _dead_error(self) -> EngineDeadError:
        if self._error is not None:
            return EngineDeadError(f"the engine has stopped: {self._error!r}")
        return EngineDeadError("the engine has shut down")

    # --- the engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                commands = self._take_commands(wait=not self.engine.has_unfinished_requests())
                if commands is None:
                    break
                for command in commands:
                    self._apply(command)
                if self.engine.has_unfinished_requests():
                    self._step()
                else:
                    self._stats = self._snapshot(alive=True)
        except BaseException as exc:  # noqa: BLE001 - any crash must reach every waiting caller
            logger.exception("engine thread crashed")
            self._error = exc
        finally:
            with self._inbox.cond:
                # Closed under the lock: a later _submit raises instead of queueing into the void,
                # and requests queued before this point are answered below.
                self._inbox.closed = True
                unapplied = [c for c in self._inbox.commands if isinstance(c, _Add)]
                self._inbox.commands.clear()
            reason = self._dead_error()
            deliveries = [(sink, rid, reason) for rid, sink in self._sinks.items()]
            deliveries += [(c.sink, c.request.request_id, reason) for c in unapplied]
            self._deliver(deliveries)
            self._sinks.clear()
            self._stats = self._snapshot(alive=False)

    def _take_commands(self, wait: bool) -> list[_Add | _Abort] | None:
        inbox = self._inbox
        with inbox.cond:
            while wait and not inbox.commands and not inbox.stopping:
                inbox.cond.wait()
            if inbox.stopping:
                return None
            commands = list(inbox.commands)
            inbox.commands.clear()
        return commands

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            if self._sinks.pop(command.request_id, None) is not None:
                self.engine.abort_request(command.request_id)
                self._generated.pop(command.request_id, None)
                self._counters.aborted += 1
            return
        r = command.request
        add = self.engine.add_pooling_request if isinstance(r.params, PoolingParams) else self.engine.add_request
        try:
            add(r.request_id, r.prompt, r.prompt_token_ids, r.params)
        except ValueError as exc:  # e.g. a request id still in use: fails this request only
            self._deliver([(command.sink, r.request_id, exc)])
            return
        self._sinks[r.request_id] = command.sink
        self._counters.prompt_tokens += len(r.prompt_token_ids)

    def _step(self) -> None:
        outputs = self.engine.step()
        self.engine.pop_finished(outputs)
        self._counters.steps += 1
        deliveries = []
        for output in outputs:
            sink = self._sinks.get(output.request_id)
            if sink is None:
                continue
            if isinstance(output, RequestOutput):
                self._count_generated(output)
            if output.finished:
                del self._sinks[output.request_id]
                self._counters.finished += 1
            deliveries.append((sink, output.request_id, output))
        # Published before the answers go out: a client holding its answer must not read stats
        # from before its request (it would see the engine idle with the request uncounted).
        self._stats = self._snapshot(alive=True)
        self._deliver(deliveries)

    def _count_generated(self, output: RequestOutput) -> None:
        # Outputs are cumulative, so what is new is the growth since the last one.
        total = sum(len(c.token_ids) for c in output.outputs)
        self._counters.generation_tokens += total - self._generated.get(output.request_id, 0)
        if output.finished:
            self._generated.pop(output.request_id, None)
        else:
            self._generated[output.request_id] = total

    def _deliver(self, deliveries: list[tuple[asyncio.Queue[_SinkItem], str, Output | BaseException]]) -> None:
        if not deliveries or self._loop is None:
            return
        try:
            # One hop into the loop per step, not one per request.
            self._loop.call_soon_threadsafe(_put_all, deliveries)
        except RuntimeError:
            pass  # the loop is closed: nobody is left to read these

    def _snapshot(self, alive: bool) -> EngineStats:
        sched = self.engine.scheduler
        bm = self.engine.block_manager
        return EngineStats(
            num_kv_blocks=bm.num_blocks, kv_blocks_in_use=bm.num_used_blocks,
            num_running=len(sched.running), num_waiting=len(sched.waiting), num_requests=len(self._sinks),
            num_preemptions=sched.num_preemptions, num_steps=self._counters.steps,
            num_finished_requests=self._counters.finished, num_aborted_requests=self._counters.aborted,
            prompt_tokens=self._counters.prompt_tokens, generation_tokens=self._counters.generation_tokens,
            alive=alive,
        )


def _put_all(deliveries: list[tuple[asyncio.Queue[_SinkItem], str, Output | BaseException]]) -> None:
    for sink, request_id, item in deliveries:
        sink.put_nowait((request_id, item))
