"""The HTTP application: routes, the API-key and body-size guards, error mapping, startup and shutdown.

    app = create_app(engine, ServerConfig(...))      # an `LLMEngine` already loaded
    run_server(EngineConfig(...), ServerConfig(...))  # `glm45 serve`: load, listen, drain on SIGTERM

Every error a client can cause leaves as the OpenAI error JSON (`{"error": {message, type, param, code}}`)
with its status, and is logged in one line without a traceback: 400 for malformed JSON, schema and value
errors, 401 for a missing or wrong API key, 404 for an unknown model or route, 408 for a body that stops
arriving (shorter than its Content-Length), 413 for a body over the limit. Only a bug in the server is a 500,
logged with its traceback; the error JSON escapes whatever it quotes, so no input can make the handler fail.

SIGTERM is handled by uvicorn: it stops accepting connections, lets in-flight requests (streams
included) finish for up to `shutdown_timeout` seconds, then runs the lifespan shutdown, which stops the
engine thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import threading
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

import glm45
from glm45.config import EngineConfig
from glm45.engine.engine import LLMEngine
from glm45.engine.host_memory import resident_bytes
from glm45.server.anthropic_protocol import ANTHROPIC_PREFIX, CountTokensRequest, MessagesRequest, anthropic_error
from glm45.server.async_engine import AsyncEngine
from glm45.server.config import ServerConfig, lora_requests
from glm45.server.errors import ClientDisconnected, RequestError
from glm45.server.metrics import ServerMetrics
from glm45.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from glm45.server.serving_chat import OpenAIServingChat
from glm45.server.serving_completion import OpenAIServingCompletion
from glm45.server.serving_messages import AnthropicServingMessages
from glm45.server.webchat import add_webchat

logger = logging.getLogger(__name__)

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, path: str = "") -> JSONResponse:
    """The error JSON a client of `path` expects: Anthropic's on /v1/messages, OpenAI's everywhere else."""
    if path.startswith(ANTHROPIC_PREFIX):
        return anthropic_error_response(status, message)
    return JSONResponse(RequestError(message, status, param, code, type).to_json(), status_code=status)


def anthropic_error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse(anthropic_error(status, message), status_code=status)


class BodyTooLarge(HTTPException):
    """Raised while reading a body; FastAPI lets its own HTTPException through body parsing unchanged."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than the limit of {limit} bytes")


class BodyTimeout(HTTPException):
    def __init__(self, timeout: float):
        super().__init__(408, f"the request body did not arrive within {timeout:g} seconds (is it shorter than its "
                              "Content-Length?)")


class GuardMiddleware:
    """API key on the protected paths, then the request-body size limit (by header, and while reading a
    body sent without one), and a time limit on each piece of the body. Pure ASGI, so streaming responses pass
    through untouched."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int, body_timeout: float = 30.0):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    def _authorized(self, headers: dict[str, str]) -> bool:
        """`Authorization: Bearer KEY` (OpenAI's clients) or `x-api-key: KEY` (Anthropic's)."""
        key = self.api_key.encode()
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key):
            return True
        return "x-api-key" in headers and hmac.compare_digest(headers["x-api-key"].strip().encode(), key)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        if self.api_key is not None and path.startswith(PROTECTED_PREFIXES) and not self._authorized(headers):
            logger.info("%s %s -> 401: missing or wrong API key", scope["method"], path)
            message = "Incorrect or missing API key. Send `Authorization: Bearer <key>` or `x-api-key: <key>`."
            if path.startswith(ANTHROPIC_PREFIX):
                response = anthropic_error_response(401, message)
            else:
                response = error_response(401, message, code="invalid_api_key")
            await response(scope, receive, send)
            return
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                await error_response(400, f"invalid Content-Length header {length!r}", path=path)(scope, receive, send)
                return
            if int(length) > self.max_body_bytes:
                logger.info("%s %s -> 413: body of %s bytes", scope["method"], path, length)
                await error_response(413, str(BodyTooLarge(self.max_body_bytes).detail), path=path)(scope, receive,
                                                                                                  send)
                return
        received, body_done = 0, False

        async def limited_receive():
            nonlocal received, body_done
            if body_done:  # e.g. a handler waiting for the client to disconnect: no time limit
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout)
            except asyncio.TimeoutError:
                logger.info("%s %s -> 408: body incomplete after %gs", scope["method"], path, self.body_timeout)
                raise BodyTimeout(self.body_timeout) from None  # FastAPI passes HTTPExceptions through
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            else:
                body_done = True
            return message

        await self.app(scope, limited_receive, send)


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for item in error.errors():
        loc = [str(x) for x in item.get("loc", ()) if x != "body"]
        if item.get("type") == "unusable_input":
            return str(item["ctx"]["message"]), item["ctx"]["param"] or None
        if item.get("type") == "json_invalid":
            return f"the request body is not valid JSON: {item.get('ctx', {}).get('error', item.get('msg'))}", None
        where = ".".join(loc)
        param = param or where or None
        parts.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
    return "; ".join(parts) or "invalid request", param


def create_app(engine: LLMEngine, config: ServerConfig | None = None, model_names: list[str] | None = None) -> FastAPI:
    """The FastAPI app serving `engine`. The engine thread starts and stops with the app's lifespan."""
    config = config or ServerConfig()
    names = model_names or config.served_model_name or [engine.model_path.name]
    metrics = ServerMetrics(names[0], lambda: async_engine.stats(), lambda: resident_bytes(engine.kv_cache))
    async_engine = AsyncEngine(engine, metrics)
    chat = OpenAIServingChat(async_engine, config, names)
    completion = OpenAIServingCompletion(async_engine, config, names)
    messages = AnthropicServingMessages(async_engine, config, names)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        logger.info("serving %s as %s (max_model_len %d)", engine.model_path, ", ".join(names), engine.max_model_len)
        try:
            yield
        finally:
            if async_engine.num_in_flight:
                logger.info("shutting down: aborting %d unfinished requests", async_engine.num_in_flight)
            async_engine.stop()
            logger.info("engine stopped")

    app = FastAPI(title="glm45", version=glm45.__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.async_engine = async_engine
    app.state.metrics = metrics
    app.add_middleware(GuardMiddleware, api_key=config.api_key, max_body_bytes=config.max_request_body_bytes,
                       body_timeout=config.request_body_timeout)
    add_error_handlers(app)
    add_routes(app, engine, async_engine, metrics, chat, completion, names)
    add_anthropic_routes(app, messages)
    add_webchat(app)  # the chat page at `/`
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every failure becomes the OpenAI error JSON with its status; a bug is a logged 500, never a traceback."""

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, exc: RequestError):
        logger.info("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        if request.url.path.startswith(ANTHROPIC_PREFIX):
            return anthropic_error_response(exc.status, exc.message)
        return JSONResponse(exc.to_json(), status_code=exc.status)

    @app.exception_handler(ClientDisconnected)
    async def on_client_gone(request: Request, exc: ClientDisconnected):
        logger.info("%s %s: the client disconnected; request %s aborted", request.method, request.url.path, exc)
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        logger.info("%s %s -> 400: %s", request.method, request.url.path, message)
        return error_response(400, message, param=param, path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        logger.info("%s %s -> %d: %s", request.method, request.url.path, exc.status_code, exc.detail)
        code = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
                413: "request_too_large"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), code=code, path=request.url.path)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception):
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error: {type(exc).__name__}", type="server_error",
                              path=request.url.path)


def add_routes(app: FastAPI, engine: LLMEngine, async_engine: AsyncEngine, metrics: ServerMetrics,
               chat: OpenAIServingChat, completion: OpenAIServingCompletion, names: list[str]) -> None:
    @app.get("/health")
    async def health() -> Response:
        if not async_engine.is_alive:
            return error_response(503, "the engine is not running", type="service_unavailable")
        try:
            engine.check_health()  # e.g. a tensor-parallel worker that died since the last step
        except Exception as e:
            logger.error("health check failed: %s", e)
            return error_response(503, f"the engine is unhealthy: {e}", type="service_unavailable")
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": glm45.__version__}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models():
        listed = [name for name in names if "*" not in name and "?" not in name] or names
        cards = [ModelCard(id=name, root=str(engine.model_path), max_model_len=engine.max_model_len) for name in listed]
        cards += [ModelCard(id=lora.lora_name, root=lora.lora_path, parent=names[0], max_model_len=engine.max_model_len)
                  for lora in engine.list_loras()]
        return ModelList(data=cards).model_dump(mode="json")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest, raw: Request):
        return await chat.create_chat_completion(request, raw)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, raw: Request):
        return await completion.create_completion(request, raw)

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest):
        chat.check_model(request.model)
        if engine.tokenizer is None:
            raise RequestError("this model has no tokenizer")
        if (request.prompt is None) == (request.messages is None):
            raise RequestError("send exactly one of `prompt` and `messages`", param="prompt")
        if request.messages is None:
            text, where = request.prompt, "prompt"
        else:
            text, where = (await asyncio.to_thread(chat.plan_chat, request)).prompt, "messages"
        tokens = await chat.prompt_ids(text, None, where, check=False)
        return TokenizeResponse(count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens)

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest):
        chat.check_model(request.model)
        if engine.tokenizer is None:
            raise RequestError("this model has no tokenizer")
        vocab = engine.tokenizer.vocab_size

        def decode() -> str:  # in a worker thread: a body may hold millions of ids
            bad = [t for t in request.tokens if not 0 <= t < vocab]
            if bad:
                raise RequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})", param="tokens")
            return engine.tokenizer.decode(request.tokens, skip_special_tokens=False)

        return DetokenizeResponse(prompt=await asyncio.to_thread(decode))


def add_anthropic_routes(app: FastAPI, messages: AnthropicServingMessages) -> None:
    """The Anthropic Messages API (Claude Code and the `anthropic` SDK): `serving_messages.py`."""

    @app.post("/v1/messages")
    async def create_message(request: MessagesRequest, raw: Request):
        return await messages.create_message(request, raw)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: CountTokensRequest):
        return await messages.count_tokens(request)


def run_server(engine_config: EngineConfig, config: ServerConfig) -> None:
    """Load the model, serve until SIGTERM/SIGINT, drain in-flight requests, exit."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises SIGTERM once it has shut down, so a server that drained cleanly would still
            # exit "killed by signal"; this one exits with status 0. A second Ctrl-C still forces the exit.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    engine = LLMEngine(engine_config)
    try:
        for lora in lora_requests(config.lora_modules):  # --lora-modules: loaded now, served by name
            engine.add_lora(lora)
        names = config.served_model_name or [engine_config.model or Path(engine.model_path).name]
        app = create_app(engine, config, names)
        Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=config.uvicorn_log_level,
                              timeout_graceful_shutdown=config.shutdown_timeout, access_log=True)).run()
    finally:
        engine.shutdown()  # the tensor-parallel workers, if any
