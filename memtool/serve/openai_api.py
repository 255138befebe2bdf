"""The slice of the OpenAI API that `memtool serve-local` speaks: request bodies, response and
stream-chunk shapes, and the error body (for every error, the framework's own included).

Requests are validated strictly (a string where a number belongs is an error, not a guess), and
options this server cannot honour (several answers per request, log probabilities, tools) are
refused with a 400 naming them rather than ignored. Unknown fields are ignored, as OpenAI-style
clients send extras freely.
"""

import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from memtool.serve.engine import GenerationParams, TokenEvent


class ApiError(Exception):
    """An error answered with OpenAI's error body: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


def _refuse_if_set(cls, value, info):
    """A field validator for OpenAI options this server cannot honour: set means a 400."""
    if value:
        raise ValueError(f"{info.field_name} is not supported by this server")
    return value


class _GenerationRequest(BaseModel):
    model_config = ConfigDict(strict=True)

    model: str | None = None  # optional: a local server has one model
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = Field(None, max_length=4)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported: the engine generates one answer at a time")
        return n

    def params(self, max_tokens: int | None, default_temperature: float) -> GenerationParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return GenerationParams(
            max_tokens=max_tokens,
            temperature=default_temperature if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=tuple(stop),
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions."""

    prompt: str
    echo: bool = False
    logprobs: int | None = None

    _unsupported = field_validator("echo", "logprobs")(_refuse_if_set)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)
    # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_template_input(self) -> dict[str, str]:
        text = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # newer name of max_tokens
    logprobs: bool | None = None
    tools: list | None = None

    _unsupported = field_validator("logprobs", "tools")(_refuse_if_set)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ResponseShape:
    """Builds one response's bodies, whole or as stream chunks, for the completions API
    (`chat=False`) or the chat completions API (`chat=True`)."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, object_: str, choices: list[dict]) -> dict:
        return {
            "id": self.id,
            "object": object_,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def whole(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int):
        if self.chat:
            choice = {"message": {"role": "assistant", "content": text}}
        else:
            choice = {"text": text}
        choice.update(index=0, finish_reason=finish_reason, logprobs=None)
        body = self._envelope("chat.completion" if self.chat else "text_completion", [choice])
        return {**body, "usage": usage(prompt_tokens, completion_tokens)}

    def first_chunk(self) -> dict | None:
        """Chat streams open by naming the speaker; completion streams need no opening."""
        if not self.chat:
            return None
        delta = {"role": "assistant", "content": ""}
        return self._chunk({"delta": delta, "finish_reason": None})

    def chunk(self, event: TokenEvent) -> dict | None:
        """The chunk for one token event; None when it releases no text and ends nothing."""
        if not event.text and event.finish_reason is None:
            return None
        if self.chat:
            choice = {"delta": {"content": event.text} if event.text else {}}
        else:
            choice = {"text": event.text}
        choice["finish_reason"] = event.finish_reason
        return self._chunk(choice)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """The extra last chunk `stream_options.include_usage` asks for: no choices, usage."""
        body = self._envelope(self._chunk_object, [])
        return {**body, "usage": usage(prompt_tokens, completion_tokens)}

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _chunk(self, choice: dict) -> dict:
        return self._envelope(self._chunk_object, [{"index": 0, "logprobs": None, **choice}])


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error, the framework's own included, with OpenAI's error body."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0]
        path = [str(part) for part in first["loc"] if part != "body"]
        if first["type"] == "json_invalid":
            path = []  # its location is a character offset, not a field
            message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error')}"
        elif not path and isinstance(first.get("input"), bytes | str):
            message = "the request body must be JSON: send it with Content-Type: application/json"
        elif not path:
            message = f"the request body must be a JSON object: {first['msg']}"
        else:
            reason = first["msg"].removeprefix("Value error, ")
            message = f"{'.'.join(path)}: {reason}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problems)"
        param = path[0] if path else None
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(
            error_body(message, "invalid_request_error"),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )
