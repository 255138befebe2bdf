"""An OpenAI-compatible local HTTP server over any `GenerationEngine`.

Endpoints: `/health`, `/v1/models`, `/v1/completions`, `/v1/chat/completions`, with
`stream: true` as server-sent events in OpenAI's chunk shape ending with `data: [DONE]`. Errors
use OpenAI's body, {"error": {"message", "type", "param", "code"}}, so OpenAI clients raise their
usual exceptions. Requests run one at a time on a worker thread (`memtool.serve.worker`); up to
`max_queue` wait, the rest get 503 at once. A client that goes away stops its generation.

Why FastAPI on uvicorn rather than a hand-written server on the standard library: the parts
that go wrong in an HTTP server are the ones a model server does not want to own. Request
parsing (h11/httptools: chunked bodies, header limits, keep-alive, pipelining), noticing that a
client disconnected in the middle of a stream, graceful shutdown with streams open, and typed
validation of JSON bodies (pydantic) are each small to write and easy to get subtly wrong, and
the failures are security-relevant even on localhost, where every local process and every web
page the user opens can reach the port. These libraries are widely deployed and tested against
exactly those cases; what is left here is the OpenAI protocol itself.

By default the server binds 127.0.0.1 and, bound to loopback, accepts only loopback Host headers:
a web page cannot reach it through DNS rebinding. Binding other addresses exposes it on the
network; set an API key then.
"""

import asyncio
import contextlib
import hmac
import json
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.middleware.trustedhost import TrustedHostMiddleware

from memtool.errors import MemtoolError
from memtool.serve.engine import (
    DEFAULT_MAX_TOKENS,
    ContextLengthError,
    GenerationEngine,
    plan_max_tokens,
)
from memtool.serve.openai_api import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    ResponseShape,
    add_error_handlers,
    error_body,
)
from memtool.serve.worker import GenerationWorker, Job, QueueFullError

log = logging.getLogger(__name__)
_LOOPBACK_BINDS = ("127.0.0.1", "localhost", "::1")
_LOOPBACK_HOST_HEADERS = ["127.0.0.1", "localhost"]


@dataclass(frozen=True)
class ServerConfig:
    """How the server listens and what requests get by default.

    Attributes:
        host: address to bind; 127.0.0.1 keeps the server on this machine.
        port: TCP port; 0 picks a free one.
        api_key: when set, /v1 requests need `Authorization: Bearer <api_key>`.
        max_queue: requests that may wait while one is generating; more get 503.
        default_max_tokens: max_tokens for requests that set none (less where the context is
            shorter).
        default_temperature: temperature for requests that set none (OpenAI's default is 1).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int = 8
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    default_temperature: float = 1.0

    def validate(self) -> None:
        """Raises MemtoolError on a value out of range."""
        if not 0 <= self.port <= 65535:
            raise MemtoolError(f"port must be in 0..65535, not {self.port}")
        if self.max_queue < 0:
            raise MemtoolError(f"max_queue must be 0 or more, not {self.max_queue}")
        if self.default_max_tokens < 1:
            raise MemtoolError(f"max_tokens must be at least 1, not {self.default_max_tokens}")
        if not 0 <= self.default_temperature <= 2:
            raise MemtoolError(f"temperature must be in 0..2, not {self.default_temperature}")
        if self.api_key is not None and not self.api_key.strip():
            raise MemtoolError("the API key is empty")


def create_app(engine: GenerationEngine, config: ServerConfig | None = None) -> FastAPI:
    """The server as an ASGI app; run it with uvicorn (or `serve`), or test it with TestClient.

    The generation worker starts and stops with the app's lifespan (`with TestClient(app)`).
    """
    config = config or ServerConfig()
    config.validate()
    worker = GenerationWorker(engine, config.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="memtool serve-local", lifespan=lifespan)
    if config.host in _LOOPBACK_BINDS:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=_LOOPBACK_HOST_HEADERS)
    add_error_handlers(app)

    async def require_api_key(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), config.api_key.encode()
        ):
            raise ApiError(
                401,
                "invalid or missing API key: send it as 'Authorization: Bearer KEY'",
                code="invalid_api_key",
            )

    def check_model(name: str | None) -> None:
        if name is not None and name != engine.model_name:
            raise ApiError(
                404,
                f"the model '{name}' does not exist: this server serves '{engine.model_name}'",
                param="model",
                code="model_not_found",
            )

    def model_card() -> dict:
        return {"id": engine.model_name, "object": "model", "created": 0, "owned_by": "memtool"}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": engine.model_name}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

    @v1.get("/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{name:path}")
    async def get_model(name: str) -> dict:
        check_model(name)
        return model_card()

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompt_ids = engine.tokenize(body.prompt)
        return await _answer(request, body, body.max_tokens, prompt_ids, chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        if not engine.has_chat_template:
            raise ApiError(
                400,
                f"model {engine.model_name} has no chat template in its tokenizer, so chat "
                "messages cannot be rendered: use /v1/completions with a plain prompt",
                param="messages",
                code="chat_template_missing",
            )
        try:
            prompt_ids = engine.render_chat([m.as_template_input() for m in body.messages])
        except MemtoolError as exc:
            raise ApiError(400, str(exc), param="messages") from exc
        return await _answer(request, body, body.requested_max_tokens, prompt_ids, chat=True)

    async def _answer(request, body, requested, prompt_ids: list[int], chat: bool):
        try:
            limit = plan_max_tokens(
                requested, len(prompt_ids), engine.context_length, config.default_max_tokens
            )
        except ContextLengthError as exc:
            param = exc.param or ("messages" if chat else "prompt")
            raise ApiError(400, str(exc), param=param, code="context_length_exceeded") from exc
        params = body.params(limit, config.default_temperature)
        try:
            params.validate()
            job = worker.submit(prompt_ids, params)
        except MemtoolError as exc:
            raise ApiError(400, str(exc)) from exc
        except QueueFullError:
            raise ApiError(
                503,
                f"the server is busy: one request is generating and {config.max_queue} are "
                "waiting; retry later",
                type="server_error",
                code="queue_full",
            ) from None
        shape = ResponseShape(chat, engine.model_name)
        if body.stream:
            events = _sse(job, shape, len(prompt_ids), body.include_usage)
            return _JobStream(job, events)
        return await _collect(request, job, shape, len(prompt_ids))

    app.include_router(v1)
    return app


async def _collect(request: Request, job: Job, shape: ResponseShape, prompt_tokens: int):
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    pieces, count, finish_reason = [], 0, None
    try:
        async for event in job.events():
            count += 1
            pieces.append(event.text)
            finish_reason = event.finish_reason or finish_reason
    except Exception as exc:
        raise ApiError(500, f"generation failed: {exc}", type="server_error") from exc
    finally:
        watcher.cancel()
        job.cancel()
    if finish_reason is None:
        raise ApiError(
            503, "the server stopped before the answer was complete", type="server_error"
        )
    return shape.whole("".join(pieces), finish_reason, prompt_tokens, count)


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel the job when the client hangs up. The body is read by now, so the next ASGI
    message is the disconnect (uvicorn also sends it once the response is complete)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel()


def _event(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def _sse(
    job: Job, shape: ResponseShape, prompt_tokens: int, include_usage: bool
) -> AsyncIterator[str]:
    count = 0
    try:
        if (first := shape.first_chunk()) is not None:
            yield _event(first)
        async for event in job.events():
            count += 1
            if (chunk := shape.chunk(event)) is not None:
                yield _event(chunk)
        if include_usage:
            yield _event(shape.usage_chunk(prompt_tokens, count))
    except Exception as exc:
        # Headers are sent: the status cannot change, so the error travels as an event, which
        # OpenAI's clients raise as an APIError.
        yield _event(error_body(f"generation failed: {exc}", "server_error"))
    finally:
        job.cancel()
    yield _event("[DONE]")


class _JobStream(StreamingResponse):
    """An SSE response that cancels its job however it ends: completed, client gone (Starlette
    cancels the body task), or failed before the first byte."""

    def __init__(self, job: Job, content: AsyncIterator[str]) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._job.cancel()


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on host:port (port 0: a free one). Connections made before the
    server runs wait in the backlog instead of being refused.

    Raises:
        MemtoolError: the address cannot be bound (in use, not local, no permission).
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # uvicorn's default backlog
    except OSError as exc:
        raise MemtoolError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def serve(
    engine: GenerationEngine,
    config: ServerConfig,
    sock: socket.socket | None = None,
    log_level: str = "info",
) -> None:
    """Serve until interrupted (Ctrl-C). `sock` is a socket from `bind_socket`; by default one
    is bound from the config's host and port."""
    import uvicorn

    config.validate()
    sock = sock or bind_socket(config.host, config.port)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(engine, config),
            log_level=log_level,
            # Open streams must not hold Ctrl-C hostage; the worker stops them on shutdown.
            timeout_graceful_shutdown=5,
        )
    )
    # uvicorn shuts down cleanly on Ctrl-C and then raises the signal again for its caller; for
    # a server that is the normal way to stop, so it ends here rather than as an interruption.
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
