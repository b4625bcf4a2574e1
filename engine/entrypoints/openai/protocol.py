"""Request bodies of the OpenAI API, the errors we answer with, and their limits.

Pydantic checks the shape and the simple ranges (its error locations name the field);
checks that span fields or need the tokenizer live in serving.py and raise APIError too.
Unknown fields are ignored, as OpenAI-compatible servers commonly do, so clients that
send newer parameters keep working.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

# Limits chosen here (OpenAI's own are lower for some); each rejection names the field.
MAX_STOP_SEQUENCES = 16
MAX_LOGPROBS = 20
MAX_N = 128
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_ERROR_TYPES = {401: "authentication_error", 500: "server_error", 503: "server_error"}


class _Body(BaseModel):
    # strict: "3" is not an int and true is not 1; a client sending those has a bug to hear about.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    """Fields shared by completions and chat completions (OpenAI's plus common extensions)."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions (as in vLLM's server), all optional.
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Logprob tokens as "token_id:<id>": token texts repeat (and may be partial UTF-8), ids do not.
    return_tokens_as_token_ids: bool = False


class CompletionRequest(_SamplingFields):
    # A string, a batch of strings, one token-id list, or a batch of token-id lists.
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: int | None = Field(DEFAULT_COMPLETION_MAX_TOKENS, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: StrictStr
    content: StrictStr | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None
    # Extensions: a per-request template and the usual apply_chat_template switches.
    chat_template: str | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class EmbeddingRequest(_Body):
    model: str | None = None
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


def validation_error(exc: ValidationError) -> APIError:
    """The first pydantic error as a 400 naming the field (e.g. `top_p`, `messages.0.role`)."""
    errors = exc.errors(include_url=False)
    err = errors[0]
    loc = err.get("loc", ())
    param = _param_name(loc)
    message = err["msg"]
    # A union (prompt, stop, content) reports one error per member; name the members instead.
    branches = [e["loc"] for e in errors if _param_name(e["loc"][:len(loc)]) == param]
    members = list(dict.fromkeys(str(b[_depth(loc)]) for b in branches if len(b) > _depth(loc)))
    if len(members) > 1:
        message = f"must be one of: {', '.join(members)}"
    got = err.get("input")  # for a union, the first member saw the field's whole value
    shown = repr(got) if len(repr(got)) < 80 else f"{repr(got)[:77]}..."
    where = f"{param}: " if param else ""
    return APIError(400, f"{where}{message} (got {shown})", param=param)


def _depth(loc: tuple[Any, ...]) -> int:
    """Index of the first union tag in loc (where the members differ)."""
    for i, p in enumerate(loc):
        if not isinstance(p, int) and (p in _TYPE_TAGS or "[" in str(p)):
            return i
    return len(loc)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "TextPart"})


def _param_name(loc: tuple[Any, ...]) -> str | None:
    # Unions add the member's type to the location (`stop.list[str].0`); keep only real names.
    parts = [str(p) for p in loc if isinstance(p, int) or (p not in _TYPE_TAGS and "[" not in str(p))]
    return ".".join(parts) or None
