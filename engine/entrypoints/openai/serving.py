"""From OpenAI requests to engine requests, and from engine outputs to OpenAI responses.

Everything a request can get wrong is checked here, before anything reaches the engine,
so a bad request is one 4xx answer and never touches other requests' batches.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from engine.core.async_engine import AsyncLLMEngine, EngineDeadError, GenerateRequest
from engine.entrypoints.openai.protocol import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    MAX_STOP_SEQUENCES,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from engine.outputs import CompletionOutput, EmbeddingRequestOutput, Logprob, RequestOutput
from engine.pooling_params import PoolingParams
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# JSON has no infinities; OpenAI reports "impossible" tokens with this floor instead.
_LOGPROB_FLOOR = -9999.0


@dataclass
class PreparedRequest:
    """One HTTP request, checked and turned into engine requests (one per prompt)."""

    request_id: str
    model: str
    created: int
    engine_requests: list[GenerateRequest]
    n: int
    num_logprobs: int | None  # None: no logprobs in the answer
    tokens_as_ids: bool  # logprob tokens as "token_id:<id>"
    stream: bool
    include_usage: bool
    holdback: int  # characters a stream withholds until a stop string can no longer match


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, served_model_names: list[str], chat_template: str | None = None):
        self.engine = engine
        self.served_model_names = served_model_names
        self.chat_template = chat_template
        self.tokenizer = engine.engine.tokenizer
        self.max_model_len = engine.engine.config.max_model_len
        self.created = int(time.time())

    # --- /v1/models -------------------------------------------------------------------------
    def models(self) -> dict[str, Any]:
        root = str(self.engine.engine.config.model)
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": self.created, "owned_by": "litmus", "root": root,
                 "max_model_len": self.max_model_len}
                for name in self.served_model_names
            ],
        }

    def check_model(self, model: str | None) -> str:
        if model is None:
            return self.served_model_names[0]
        if model not in self.served_model_names:
            raise APIError(
                404, f"the model {model!r} does not exist; this server serves: {', '.join(self.served_model_names)}",
                param="model", code="model_not_found",
            )
        return model

    # --- /v1/completions ----------------------------------------------------------------------
    def check_engine(self) -> None:
        # Checked before a stream starts: once its 200 is sent, errors can only go in-band.
        if not self.engine.is_alive:
            raise APIError(503, "the engine is not running")

    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        self.check_engine()
        prep = self.prepare_completion(req)
        if prep.stream:
            return _sse(self._completion_chunks(prep))
        finals = await _collect_or_abort(raw, self.engine.generate_many(prep.engine_requests))
        choices = [
            {
                "index": p * prep.n + c.index, "text": c.text,
                "logprobs": completion_logprobs(c.token_ids, c.logprobs, prep.num_logprobs, prep.tokens_as_ids)[0]
                if prep.num_logprobs is not None else None,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
            }
            for p, out in sorted(finals.items()) for c in out.outputs
        ]
        return JSONResponse({
            "id": prep.request_id, "object": "text_completion", "created": prep.created, "model": prep.model,
            "choices": choices, "usage": _usage(finals.values()), "system_fingerprint": None,
        })

    def prepare_completion(self, req: CompletionRequest) -> PreparedRequest:
        model = self.check_model(req.model)
        self.check_task("generate", "/v1/completions")
        if req.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if req.suffix is not None:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, f"best_of must equal n ({req.n}) if given: best-of selection is not supported",
                           param="best_of")
        prompts = self._prompts(req.prompt, "prompt")
        explicit = "max_tokens" in req.model_fields_set and req.max_tokens is not None
        request_id = f"cmpl-{uuid.uuid4().hex}"
        engine_requests = []
        for i, (text, ids) in enumerate(prompts):
            max_tokens = self._max_tokens(len(ids), req.max_tokens if explicit else None, "max_tokens", "prompt",
                                          default=DEFAULT_COMPLETION_MAX_TOKENS)
            params = _sampling_params(req, max_tokens, req.logprobs)
            engine_requests.append(GenerateRequest(f"{request_id}-{i}", text, ids, params))
        return self._prepared(req, request_id, model, engine_requests, req.logprobs)

    def _prompts(self, prompt: Any, param: str) -> list[tuple[str | None, list[int]]]:
        """A string, a batch of strings, one token-id list or a batch of them, as (text, ids) pairs."""
        if isinstance(prompt, str):
            items: list[str | list[int]] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            items = [prompt]
        else:
            items = list(prompt)
        if not items:
            raise APIError(400, f"{param} is empty: give a string, a token-id list, or a non-empty list of them",
                           param=param)
        prompts = []
        for item in items:
            if isinstance(item, str):
                if not item:
                    raise APIError(400, f"{param} is empty: it must contain at least one character", param=param)
                prompts.append((item, self.engine.engine.tokenize(item)))
            else:
                prompts.append((None, list(item)))
            self._validate_prompt(prompts[-1][1], param)
        return prompts

    # --- /v1/chat/completions -----------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        self.check_engine()
        prep = self.prepare_chat(req)
        if prep.stream:
            return _sse(self._chat_chunks(prep))
        finals = await _collect_or_abort(raw, self.engine.generate_many(prep.engine_requests))
        out = finals[0]
        choices = [
            {
                "index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(c.token_ids, c.logprobs, prep.num_logprobs, prep.tokens_as_ids)
                if prep.num_logprobs is not None else None,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
            }
            for c in out.outputs
        ]
        return JSONResponse({
            "id": prep.request_id, "object": "chat.completion", "created": prep.created, "model": prep.model,
            "choices": choices, "usage": _usage([out]), "system_fingerprint": None,
        })

    def prepare_chat(self, req: ChatCompletionRequest) -> PreparedRequest:
        model = self.check_model(req.model)
        self.check_task("generate", "/v1/chat/completions")
        if req.tools:
            raise APIError(400, "tools are not supported by this server", param="tools")
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format {\"type\": \"text\"} is supported", param="response_format")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        ids = self._render_chat(req)
        self._validate_prompt(ids, "messages")
        which = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self._max_tokens(len(ids), req.max_completion_tokens or req.max_tokens, which, "messages")
        num_logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = _sampling_params(req, max_tokens, num_logprobs)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        engine_requests = [GenerateRequest(request_id, None, ids, params)]
        return self._prepared(req, request_id, model, engine_requests, num_logprobs)

    def _render_chat(self, req: ChatCompletionRequest) -> list[int]:
        template = req.chat_template or self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise APIError(400, "the model has no chat template: pass chat_template in the request or start the "
                                "server with --chat-template", param="chat_template")
        messages = [
            {"role": m.role, "content": _message_text(m.content), **({"name": m.name} if m.name else {})}
            for m in req.messages
        ]
        try:
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message, **(req.chat_template_kwargs or {}),
            )
        except Exception as exc:  # noqa: BLE001 - a template failing on these messages is the client's 400
            raise APIError(400, f"the chat template cannot render these messages: {exc}", param="messages") from exc
        # The rendered template already holds BOS and other special tokens.
        return self.tokenizer(text, add_special_tokens=False).input_ids

    # --- /v1/embeddings ---------------------------------------------------------------------------
    async def embeddings(self, req: EmbeddingRequest, raw: Request) -> Response:
        self.check_engine()
        model = self.check_model(req.model)
        self.check_task("embed", "/v1/embeddings")
        prompts = self._prompts(req.input, "input")
        try:
            params = PoolingParams(dimensions=req.dimensions)
            self.engine.engine.validate_pooling_params(params)
        except ValueError as exc:
            raise APIError(400, str(exc), param="dimensions") from exc
        request_id = f"embd-{uuid.uuid4().hex}"
        engine_requests = [GenerateRequest(f"{request_id}-{i}", text, ids, params)
                           for i, (text, ids) in enumerate(prompts)]
        finals = await _collect_or_abort(raw, self.engine.generate_many(engine_requests))
        data = [
            {"object": "embedding", "index": i,
             "embedding": _embedding(EmbeddingRequestOutput.from_base(out).outputs.embedding, req.encoding_format)}
            for i, out in sorted(finals.items())
        ]
        tokens = sum(len(out.prompt_token_ids) for out in finals.values())
        return JSONResponse({"object": "list", "data": data, "model": model,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    def check_task(self, task: str, endpoint: str) -> None:
        served = self.engine.engine.config.task
        if served != task:
            raise APIError(400, f"the model is served for task={served!r}; {endpoint} needs task={task!r}",
                           param="model", code="unsupported_task")

    # --- shared checks --------------------------------------------------------------------------
    def _validate_prompt(self, ids: list[int], param: str) -> None:
        try:
            self.engine.engine.validate_prompt(ids)
        except ValueError as exc:
            raise APIError(400, str(exc), param=param) from exc

    def _max_tokens(self, prompt_len: int, requested: int | None, param: str, prompt_param: str,
                    default: int | None = None) -> int:
        room = self.max_model_len - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens, which leaves no room for output within "
                                f"max_model_len={self.max_model_len}", param=prompt_param)
        if requested is None:
            # Not asked for: as much as fits (chat), or the default cut to what fits (completions).
            return room if default is None else min(default, room)
        if requested > room:
            raise APIError(400, f"{param}={requested} plus the prompt's {prompt_len} tokens exceeds "
                                f"max_model_len={self.max_model_len}", param=param)
        return requested

    def _prepared(self, req: CompletionRequest | ChatCompletionRequest, request_id: str, model: str,
                  engine_requests: list[GenerateRequest], num_logprobs: int | None) -> PreparedRequest:
        stop = engine_requests[0].params.stop
        return PreparedRequest(
            request_id=request_id, model=model, created=int(time.time()), engine_requests=engine_requests,
            n=req.n, num_logprobs=num_logprobs, tokens_as_ids=req.return_tokens_as_token_ids, stream=req.stream,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            holdback=max((len(s) for s in stop), default=1) - 1,
        )

    # --- streaming ------------------------------------------------------------------------------
    async def _completion_chunks(self, prep: PreparedRequest) -> AsyncIterator[dict[str, Any]]:
        def chunk(choices: list[dict[str, Any]], usage: dict | None = None) -> dict[str, Any]:
            body = {"id": prep.request_id, "object": "text_completion", "created": prep.created,
                    "model": prep.model, "choices": choices}
            if prep.include_usage:
                body["usage"] = usage
            return body

        finals: dict[int, RequestOutput] = {}
        cursors: dict[int, _Cursor] = {}
        async with contextlib.aclosing(self.engine.generate_many(prep.engine_requests)) as outputs:
            async for p, out in outputs:
                finals[p] = out
                for c in out.outputs:
                    cursor = cursors.setdefault(p * prep.n + c.index, _Cursor())
                    delta = cursor.advance(c, prep.holdback, tokens_matter=prep.num_logprobs is not None)
                    if delta is None:
                        continue
                    text, first, last = delta
                    logprobs = None
                    if prep.num_logprobs is not None:
                        logprobs, cursor.token_chars = completion_logprobs(
                            c.token_ids[first:last], c.logprobs[first:last], prep.num_logprobs, prep.tokens_as_ids,
                            text_offset=cursor.token_chars)
                    yield chunk([{"index": p * prep.n + c.index, "text": text, "logprobs": logprobs,
                                  "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}])
        if prep.include_usage:
            yield chunk([], _usage(finals.values()))

    async def _chat_chunks(self, prep: PreparedRequest) -> AsyncIterator[dict[str, Any]]:
        def chunk(choices: list[dict[str, Any]], usage: dict | None = None) -> dict[str, Any]:
            body = {"id": prep.request_id, "object": "chat.completion.chunk", "created": prep.created,
                    "model": prep.model, "choices": choices}
            if prep.include_usage:
                body["usage"] = usage
            return body

        # The role comes first, once per choice, as OpenAI streams it.
        for i in range(prep.n):
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        final: RequestOutput | None = None
        cursors: dict[int, _Cursor] = {}
        async with contextlib.aclosing(self.engine.generate_many(prep.engine_requests)) as outputs:
            async for _, out in outputs:
                final = out
                for c in out.outputs:
                    cursor = cursors.setdefault(c.index, _Cursor())
                    delta = cursor.advance(c, prep.holdback, tokens_matter=prep.num_logprobs is not None)
                    if delta is None:
                        continue
                    text, first, last = delta
                    logprobs = None
                    if prep.num_logprobs is not None:
                        logprobs = chat_logprobs(c.token_ids[first:last], c.logprobs[first:last], prep.num_logprobs,
                                                 prep.tokens_as_ids)
                    yield chunk([{"index": c.index, "delta": {"content": text} if text else {},
                                  "logprobs": logprobs, "finish_reason": c.finish_reason,
                                  "stop_reason": c.stop_reason}])
        if prep.include_usage and final is not None:
            yield chunk([], _usage([final]))


@dataclass
class _Cursor:
    """How much of one choice a stream has sent."""

    chars: int = 0
    tokens: int = 0
    token_chars: int = 0  # running text_offset for completion logprobs
    done: bool = False

    def advance(self, c: CompletionOutput, holdback: int, tokens_matter: bool) -> tuple[str, int, int] | None:
        """(new text, first new token, end) or None when there is nothing to send yet.

        New tokens whose text is not out yet are worth a chunk only if it carries their logprobs.

        Until the choice finishes, the last `holdback` characters stay back: a stop string
        that completes in a later step truncates the text there, and what was already sent
        cannot be taken back. The engine only truncates within that window, so the streamed
        text always equals the final text.
        """
        if self.done:
            return None
        finished = c.finish_reason is not None
        end = len(c.text) if finished else max(self.chars, len(c.text) - holdback)
        text = c.text[self.chars:end]
        first, last = self.tokens, len(c.token_ids)
        if not finished and not text and (first == last or not tokens_matter):
            return None
        self.chars, self.tokens, self.done = end, last, finished
        return text, first, last


# --- response pieces ----------------------------------------------------------------------------
def _sampling_params(req: CompletionRequest | ChatCompletionRequest, max_tokens: int,
                     num_logprobs: int | None) -> SamplingParams:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_SEQUENCES:
        raise APIError(400, f"stop has {len(stop)} sequences; at most {MAX_STOP_SEQUENCES} are allowed",
                       param="stop")
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    try:
        return SamplingParams(
            n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0,
            min_p=req.min_p or 0.0, seed=req.seed, max_tokens=max_tokens, min_tokens=req.min_tokens,
            stop=stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
            include_stop_str_in_output=req.include_stop_str_in_output, logprobs=num_logprobs,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            skip_special_tokens=req.skip_special_tokens,
        )
    except ValueError as exc:
        # SamplingParams names the field as "SamplingParams.<name>=..."; pass the name on.
        message = str(exc)
        name = message.split("SamplingParams.", 1)[-1].split("=", 1)[0] if "SamplingParams." in message else None
        raise APIError(400, message, param=name) from exc


def _embedding(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        # OpenAI's packing (what its client decodes): little-endian float32.
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


def _message_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part.text for part in content)


def _usage(outputs: Any) -> dict[str, int]:
    outputs = list(outputs)
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finite(x: float) -> float:
    return x if math.isfinite(x) else _LOGPROB_FLOOR


def _top(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    return sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= k),
                  key=lambda item: item[1].rank)[:k]


def _label(token: int, lp: Logprob, as_ids: bool) -> str:
    return f"token_id:{token}" if as_ids else lp.decoded_token or ""


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]] | None, k: int, as_ids: bool,
                        text_offset: int = 0) -> tuple[dict[str, list], int]:
    """The legacy completions shape (parallel lists, top_logprobs keyed by token), and the
    text offset just past these tokens."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for token, entry in zip(token_ids, logprobs or []):
        chosen = entry[token]
        label = _label(token, chosen, as_ids)
        tokens.append(label)
        token_logprobs.append(_finite(chosen.logprob))
        top: dict[str, float] = {label: _finite(chosen.logprob)}
        for t, lp in _top(entry, k):
            top.setdefault(_label(t, lp, as_ids), _finite(lp.logprob))
        top_logprobs.append(top)
        offsets.append(text_offset)
        text_offset += len(chosen.decoded_token or "")
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}, text_offset


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]] | None, k: int,
                  as_ids: bool) -> dict[str, list]:
    """The chat shape: one object per token with its top-k alternatives."""
    def item(token: int, lp: Logprob) -> dict[str, Any]:
        return {"token": _label(token, lp, as_ids), "logprob": _finite(lp.logprob),
                "bytes": list((lp.decoded_token or "").encode("utf-8"))}

    content = []
    for token, entry in zip(token_ids, logprobs or []):
        content.append({**item(token, entry[token]), "top_logprobs": [item(t, lp) for t, lp in _top(entry, k)]})
    return {"content": content}


# --- transport ------------------------------------------------------------------------------------
def _sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        try:
            async for body in chunks:
                yield f"data: {json.dumps(body, allow_nan=False)}\n\n"
        except Exception as exc:  # noqa: BLE001 - the status line is sent; the stream must still end well
            # Headers are out already, so the error travels in the stream, as OpenAI does.
            error = APIError(503, str(exc)) if isinstance(exc, EngineDeadError) else \
                APIError(500, f"internal server error: {type(exc).__name__}: {exc}")
            if error.status == 500:
                logger.exception("stream failed")
            yield f"data: {json.dumps(error.body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class ClientDisconnected(Exception):
    """The client went away before its (non-streaming) answer was ready."""


async def _collect_or_abort(raw: Request,
                            outputs: AsyncIterator[tuple[int, RequestOutput]]) -> dict[int, RequestOutput]:
    """Runs a request to the end, unless the client disconnects first: then it is aborted.

    A non-streaming handler would otherwise keep generating for nobody, holding KV blocks.
    """
    async def collect() -> dict[int, RequestOutput]:
        finals: dict[int, RequestOutput] = {}
        async with contextlib.aclosing(outputs) as stream:
            async for i, out in stream:
                finals[i] = out
        return finals

    work = asyncio.ensure_future(collect())
    gone = asyncio.ensure_future(_wait_for_disconnect(raw.receive))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, gone):
            if not task.done():
                task.cancel()
    if not work.done() or work.cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            await work  # lets the generator's cleanup (the abort) run now
        raise ClientDisconnected()
    return work.result()


async def _wait_for_disconnect(receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    # The body was read already, so the next message the server has for us is the disconnect.
    while (await receive())["type"] != "http.disconnect":
        pass
