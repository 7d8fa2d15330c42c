"""The FastAPI app: the routers of completions.py, classify.py and system.py over one engine, and every error
answered in OpenAI's shape.

    app = create_app(backend, tokenizer, ServerSettings("demo"), stop_ids)     # server.py runs it under uvicorn

Each router's handler object holds the ServedModel (served.py): the backend, its engine, the settings and the
checks every request goes through. Every error has OpenAI's shape, {"error": {"message", "type", "param",
"code"}}: an ApiError a handler raises, a request FastAPI's validation refuses, an HTTPException (404, 405) and
anything unexpected (500, logged). Requests are counted by route and status.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.exceptions import HTTPException

from lite_sft.taskspec import ROUTES, TASKS

from ..engine import Engine, ScoreEngine
from ..backends.protocol import ServesAdapters
from .adapters import AdapterHandler
from .auth import ApiKey
from .classify import ScoreHandler
from .completions import CompletionHandler
from .schemas import ApiError, validation_message
from .served import ServedModel
from .system import SystemHandler

log = logging.getLogger(__name__)


def create_app(backend, tokenizer, settings, stop_ids: list[int] | None = None) -> FastAPI:
    """The app for `backend` (its task's routes answer; the others say which it serves); `settings` is a
    server.ServerSettings, `stop_ids` where generation stops (none: only max_tokens and stop strings)."""
    registry = CollectorRegistry()
    engine = (Engine(backend, tokenizer, settings.max_batch, settings.max_queue, registry=registry,
                     continuous=settings.batching == "continuous") if TASKS[backend.task].generates
              else ScoreEngine(backend, tokenizer, settings.max_batch, settings.max_queue, registry=registry))
    requests = Counter("lite_sft_requests", "HTTP requests by route and status", ["route", "status"], registry=registry)
    first_token = Histogram("lite_sft_time_to_first_token_seconds", "Request start to first token", registry=registry)
    latency = Histogram("lite_sft_request_seconds", "Request start to last token", registry=registry)
    served = ServedModel(backend, tokenizer, engine, settings, latency, first_token)
    api_key = ApiKey(settings.api_key)

    @asynccontextmanager
    async def lifespan(_app):
        yield
        served.close()

    # No /docs or /redoc: FastAPI's pages load their scripts from a CDN, so they are blank offline.
    # /openapi.json is the schema itself, for any OpenAPI viewer.
    app = FastAPI(title="lite-sft", summary="OpenAI-compatible completions over an exported model",
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.settings = engine, settings
    app.add_middleware(_CountRequests, counter=requests, routes={"/health", "/metrics", "/v1/models", "/v1/adapters",
                                                                 *ROUTES})
    for error, handler in ((ApiError, api_error), (RequestValidationError, invalid), (HTTPException, http_error),
                           (Exception, crashed)):
        app.add_exception_handler(error, handler)
    keyed = api_key.routes()
    for handler in (SystemHandler(served, api_key, registry), CompletionHandler(served, stop_ids or []),
                    ScoreHandler(served)):
        app.include_router(handler.router(keyed))
    if isinstance(backend, ServesAdapters):  # several LoRA adapters of one base: load and unload them while serving
        app.include_router(AdapterHandler(served, api_key).router(keyed))
    return app


async def api_error(_request, err: ApiError):
    return err.response()


async def invalid(_request, err: RequestValidationError):
    message, param = validation_message(err)
    return ApiError(400, message, param=param).response()


async def http_error(_request, err: HTTPException):
    return ApiError(err.status_code, str(err.detail), "invalid_request_error" if err.status_code < 500 else
                    "server_error", headers=getattr(err, "headers", None)).response()


async def crashed(_request, err: Exception):
    log.exception("unexpected error")
    return ApiError(500, f"internal error: {type(err).__name__}", "server_error").response()


class _CountRequests:
    """Requests by route and status. Plain ASGI rather than @app.middleware("http"): Starlette's
    BaseHTTPMiddleware wraps `receive` so that Request.is_disconnected() never sees a client leave, and a
    client that gave up must free its place in the queue."""

    def __init__(self, app, counter, routes: set[str]):
        self.app, self.counter, self.routes = app, counter, routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = "500"  # unless a response starts: an exception reaches the crash handler, which answers 500

        async def counted(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            self.counter.labels(scope["path"] if scope["path"] in self.routes else "other", status).inc()
