"""The FastAPI app: routes, the request guard (API key, body size), and OpenAI-shaped errors.

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions,
POST /v1/embeddings, GET /v1/debug/engine (JSON engine state) and GET /metrics (the same,
Prometheus text).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import TypeVar

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.core.async_engine import AsyncLLMEngine, EngineDeadError
from engine.entrypoints.openai.protocol import (
    DEFAULT_MAX_REQUEST_BYTES,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    validation_error,
)
from engine.entrypoints.openai.serving import ClientDisconnected, OpenAIServing

logger = logging.getLogger(__name__)
BodyT = TypeVar("BodyT", bound=BaseModel)

# EngineStats field -> (Prometheus type, help); /metrics names it litmus_<field>, counters with _total.
METRICS = {
    "num_requests": ("gauge", "Requests in the engine: added, neither finished nor aborted."),
    "num_running": ("gauge", "Sequences in the running batch."),
    "num_waiting": ("gauge", "Sequences queued for the running batch."),
    "kv_blocks_in_use": ("gauge", "KV cache blocks held by sequences."),
    "num_kv_blocks": ("gauge", "KV cache blocks in all."),
    "alive": ("gauge", "1 while the engine thread runs."),
    "num_steps": ("counter", "Engine steps run."),
    "num_finished_requests": ("counter", "Requests finished."),
    "num_aborted_requests": ("counter", "Requests aborted (client gone)."),
    "num_preemptions": ("counter", "Sequences preempted for lack of KV blocks (recomputed later)."),
    "prompt_tokens": ("counter", "Prompt tokens of the requests added."),
    "generation_tokens": ("counter", "Tokens generated."),
}


@dataclass
class ServerSettings:
    served_model_names: list[str]
    api_key: str | None = None
    chat_template: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES


def build_app(engine: AsyncLLMEngine, settings: ServerSettings) -> FastAPI:
    """The app; its lifespan starts the engine thread on the server's loop and stops it after."""
    serving = OpenAIServing(engine, settings.served_model_names, settings.chat_template)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="Litmus OpenAI-compatible server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serving = serving
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_alive:
            return _error(APIError(503, "the engine is not running"))
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse(serving.models())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _parse_body(request, CompletionRequest)
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await _parse_body(request, ChatCompletionRequest)
        return await serving.chat(body, request)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        body = await _parse_body(request, EmbeddingRequest)
        return await serving.embeddings(body, request)

    @app.get("/v1/debug/engine")
    async def debug_engine() -> Response:
        return JSONResponse(asdict(engine.stats))

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(prometheus_text(asdict(engine.stats)), media_type="text/plain; version=0.0.4")

    # Outermost, so oversized or unauthenticated requests never reach routing or parsing.
    app.add_middleware(RequestGuard, api_key=settings.api_key, max_request_bytes=settings.max_request_bytes)
    return app


def prometheus_text(stats: dict[str, int | bool]) -> str:
    lines = []
    for field, value in stats.items():
        kind, help_text = METRICS[field]
        name = f"litmus_{field}" + ("_total" if kind == "counter" else "")
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {int(value)}"]
    return "\n".join(lines) + "\n"


async def _parse_body(request: Request, model: type[BodyT]) -> BodyT:
    content_type = request.headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "application/json":
        raise APIError(415, f"Content-Type must be application/json, got {content_type or 'none'!r}")
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from exc


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> Response:
        return _error(exc)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, exc: EngineDeadError) -> Response:
        return _error(APIError(503, str(exc)))

    @app.exception_handler(ClientDisconnected)
    async def client_gone(_: Request, __: ClientDisconnected) -> Response:
        # Nobody reads this; 499 (nginx's "client closed request") keeps the access log honest.
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return _error(APIError(exc.status_code, str(exc.detail), code=None))

    @app.exception_handler(RequestValidationError)
    async def request_validation(_: Request, exc: RequestValidationError) -> Response:
        return _error(APIError(400, str(exc)))

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> Response:
        logger.exception("unhandled error")
        return _error(APIError(500, f"internal server error: {type(exc).__name__}: {exc}"))


class RequestGuard:
    """Pure ASGI middleware: checks the API key, then reads the body under a size limit.

    The body is read here in full (at most max_request_bytes) and replayed to the app, so an
    oversized request is refused with 413 before any of it is parsed or buffered beyond the
    limit. After the replay, receive() passes through, so the app still sees the disconnect.
    """

    def __init__(self, app: ASGIApp, api_key: str | None, max_request_bytes: int):
        self.app = app
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"].startswith("/v1") and not self._authorized(headers):
            await _send_error(send, APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                             code="invalid_api_key"))
            return
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_request_bytes:
            await _send_error(send, self._too_large())
            return
        body, disconnected = await self._read_body(receive)
        if body is None:
            await _send_error(send, self._too_large())
            return
        await self.app(scope, _replay(body, disconnected, receive), send)

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def _read_body(self, receive: Receive) -> tuple[bytes | None, bool]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks), True
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_request_bytes:
                return None, False
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than the limit of {self.max_request_bytes} bytes "
                             f"(--max-request-bytes)")


def _replay(body: bytes, disconnected: bool, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if disconnected:
            return {"type": "http.disconnect"}
        return await receive()

    return replay


async def _send_error(send: Send, exc: APIError) -> None:
    payload = json.dumps(exc.body()).encode()
    await send({"type": "http.response.start", "status": exc.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
