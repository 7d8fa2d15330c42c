"""The OpenAI-compatible HTTP server: FastAPI routes over the batching engine, run by uvicorn.

    lite-sft serve exports/demo                      # http://127.0.0.1:8000, ONNX on CUDA if there is one
    curl -s 127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Write 40817 backwards."}], "max_tokens": 8}'

Endpoints: POST /v1/completions and /v1/chat/completions (JSON, or server-sent events with "stream": true) for a
causal LM, /v1/completions alone for a seq2seq model (the prompt is the source text), POST /v1/classify for a
sequence classifier and /v1/ner for a token classifier (classify.py); GET /v1/models, /health, /metrics
(Prometheus text) and /openapi.json. An endpoint the served model does not do answers 400 naming the ones it does,
and /openapi.json lists only those (there is no /docs page: FastAPI's loads its scripts from a CDN). With an API
key, /v1/* want `Authorization: Bearer KEY` (auth.py), and /health names the backend and its folder only to
callers that send it. Every error has OpenAI's shape, {"error": {"message", "type", "param", "code"}}:
400 for a request that cannot be served as asked (bad JSON, unknown field, value out of range, prompt over
the context), 401 without the key, 404 for another model's name, 429 when the queue is full, 504 when a
request outlives its timeout. A client that disconnects, streaming or not, has its rows dropped from the batch,
or its place in the queue given up if it was still waiting. Prompts are tokenised and chat templates rendered
on a few threads of their own, so a long prompt never holds up the event loop (health, metrics, streams).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from starlette.exceptions import HTTPException

from . import ServeError
from .auth import ApiKey
from .classify import Api, add_routes
from .engine import Engine, QueueFull, ScoreEngine
from lite_sft.artifacts import variant_line
from lite_sft.options import ServerSettings
from .generate import SamplingParams
from .runtime import ENDPOINTS
from .schemas import ApiError, ChatRequest, CompletionRequest, Sampling, validation_message
from .stream import JobStream, events, until_done

log = logging.getLogger(__name__)
CHARS_PER_TOKEN_LIMIT = 64  # a prompt this many characters per context token is refused before tokenising
TOKENIZE_THREADS = min(4, os.cpu_count() or 1)
TASK_WORDS = {"causal-lm": "a causal language model", "seq2seq": "an encoder-decoder (seq2seq) model",
              "seq-cls": "a sequence classifier", "token-cls": "a token classifier (NER)"}
SERVED = {"/v1/completions": ("causal-lm", "seq2seq"), "/v1/chat/completions": ("causal-lm",),
          "/v1/classify": ("seq-cls",), "/v1/ner": ("token-cls",)}


def create_app(backend, tokenizer, settings: ServerSettings, stop_ids: list[int] | None = None) -> FastAPI:
    from contextlib import asynccontextmanager

    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

    registry = CollectorRegistry()
    task = getattr(backend, "task", "causal-lm")
    scoring = task in SERVED["/v1/classify"] + SERVED["/v1/ner"]
    engine = (ScoreEngine(backend, tokenizer, settings.max_batch, settings.max_queue, registry=registry) if scoring
              else Engine(backend, tokenizer, settings.max_batch, settings.max_queue, registry=registry,
                          continuous=settings.batching == "continuous"))
    context = min(settings.max_context or backend.max_context, backend.max_context)
    stop_ids = list(stop_ids or [])
    requests = Counter("lite_sft_requests", "HTTP requests by route and status", ["route", "status"], registry=registry)
    first_token = Histogram("lite_sft_time_to_first_token_seconds", "Request start to first token", registry=registry)
    latency = Histogram("lite_sft_request_seconds", "Request start to last token", registry=registry)
    routes = {"/health", "/metrics", "/v1/models", *SERVED}
    api_key = ApiKey(settings.api_key)
    # Tokenising a context's worth of text, or rendering a chat template over it, takes long enough to stall
    # every other request if done on the event loop. A pool of its own bounds the threads: a flood of
    # prompts waits here for one, it does not start a thread each.
    tokenizing = ThreadPoolExecutor(TOKENIZE_THREADS, thread_name_prefix="lite-sft-tokenize")

    @asynccontextmanager
    async def lifespan(_app):
        yield
        tokenizing.shutdown(wait=False, cancel_futures=True)
        engine.close()

    # No /docs or /redoc: FastAPI's pages load their scripts from a CDN, so they are blank offline.
    # /openapi.json is the schema itself, for any OpenAPI viewer.
    app = FastAPI(title="lite-sft", summary="OpenAI-compatible completions over an exported model",
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.settings = engine, settings
    keyed = api_key.routes()

    app.add_middleware(_CountRequests, counter=requests, routes=routes)

    @app.exception_handler(ApiError)
    async def api_error(_request, err: ApiError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, err: RequestValidationError):
        message, param = validation_message(err)
        return ApiError(400, message, param=param).response()

    @app.exception_handler(HTTPException)
    async def http_error(_request, err: HTTPException):
        return ApiError(err.status_code, str(err.detail), "invalid_request_error" if err.status_code < 500 else
                        "server_error", headers=getattr(err, "headers", None)).response()

    @app.exception_handler(Exception)
    async def crashed(_request, err: Exception):
        log.exception("unexpected error")
        return ApiError(500, f"internal error: {type(err).__name__}", "server_error").response()

    @app.get("/health")
    async def health(details: bool = Depends(api_key.caller_has_it)):
        # The backend's description names the model's folder: with a key set, only its holders see it.
        about = ({"backend": backend.describe(), **({"labels": backend.labels} if scoring else {})} if details
                 else {})
        return {"status": "ok", "model": settings.model_name, "task": task, **about, "context": context,
                "queued": engine.queued, "running_rows": engine.running_rows, "max_batch": engine.max_batch}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=keyed)
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "lite-sft", "max_model_len": context, "task": task}]}

    def serves(path: str) -> bool:
        return task in SERVED[path]

    def refuse(path: str) -> None:
        """A 400 naming what the model does serve, for an endpoint it does not."""
        if not serves(path):
            hint = ("; it has no chat template: send the source text as `prompt` to /v1/completions"
                    if task == "seq2seq" and path == "/v1/chat/completions" else "")
            raise ApiError(400, f"{settings.model_name!r} is {TASK_WORDS[task]}: it serves {ENDPOINTS[task]}, "
                           f"not {path}{hint}", code="unsupported_endpoint")

    def over_context(prompt: int, max_tokens: int, field: str, prompt_field: str) -> None:
        # A prompt that alone fills what the model reads is the prompt's fault, whatever max_tokens says.
        room = context if task == "seq2seq" else context - 1  # a decoder-only model must still write one token
        if prompt > room:
            raise ApiError(400, f"the prompt is {prompt} tokens; this model reads at most {room} in the prompt "
                           f"(a context of {context} tokens). Shorten the prompt.", param=prompt_field,
                           code="context_length_exceeded")
        if task == "seq2seq":  # the encoder reads the prompt; the decoder writes after its start tokens
            start = len(backend.decoder_prompt)
            if start + max_tokens <= context:
                return
            message = (f"this model's maximum context length is {context - start} tokens for the completion; "
                       f"the request asks for {max_tokens}")
        else:
            if prompt + max_tokens <= context:
                return
            message = (f"this model's maximum context length is {context} tokens; the request asks for "
                       f"{prompt + max_tokens} ({prompt} in the prompt, {max_tokens} for the completion)")
        fix = f"lower {field}" if task == "seq2seq" else f"shorten the prompt or lower {field}"
        raise ApiError(400, f"{message}. {fix[0].upper()}{fix[1:]}.", param=field,
                       code="context_length_exceeded")

    def check_chars(chars: int, param: str) -> None:
        if chars > CHARS_PER_TOKEN_LIMIT * context:
            raise ApiError(400, f"the prompt is {chars} characters, far over the context of {context} tokens",
                           param=param, code="context_length_exceeded")

    def begin(body: Sampling) -> tuple[float, float]:
        """(start, deadline) of a request: its time runs from here, tokenising included."""
        if body.model not in (None, settings.model_name):
            raise ApiError(404, f"model {body.model!r} does not exist; this server serves {settings.model_name!r}",
                           param="model", code="model_not_found")
        return time.perf_counter(), asyncio.get_running_loop().time() + settings.timeout_s

    async def off_loop(work, deadline: float):
        """work() on a tokenizing thread; an ApiError it raises reaches the client as it would from here."""
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(tokenizing, work), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise ApiError(504, "the request did not finish within the server's timeout", "timeout",
                           code="timeout") from None

    def encode(texts: list[str]) -> list[list[int]]:
        try:
            return [tokenizer(text)["input_ids"] for text in texts]
        except Exception as err:  # noqa: BLE001  (the Rust tokenizer refuses e.g. lone surrogates)
            raise ApiError(400, f"the prompt cannot be tokenised: {err}", param="prompt") from err

    @app.post("/v1/completions", dependencies=keyed, include_in_schema=serves("/v1/completions"))
    async def completions(body: CompletionRequest, request: Request):
        refuse("/v1/completions")
        start, deadline = begin(body)
        p = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if all(isinstance(x, str) for x in p):
            for text in p:
                check_chars(len(text), "prompt")
            prompts = await off_loop(lambda: encode(p), deadline)
        elif all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        else:
            prompts = [list(x) for x in p]
        for ids in prompts:
            if not ids:
                raise ApiError(400, "a prompt is empty (no tokens)", param="prompt")
            if any(not 0 <= t < backend.vocab_size for t in ids):
                raise ApiError(400, f"token ids must lie in [0, {backend.vocab_size})", param="prompt")
        return await respond(request, body, prompts, body.max_tokens or 16, "max_tokens", False, start, deadline)

    def render(messages: list[dict]) -> list[int]:
        try:
            # return_dict=False: transformers 5 returns a BatchEncoding by default, 4.x a list of ids
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        except Exception as err:  # noqa: BLE001  (jinja's TemplateError, or the template's raise_exception)
            raise ApiError(400, f"the chat template refused these messages: {err}", param="messages") from err
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    @app.post("/v1/chat/completions", dependencies=keyed, include_in_schema=serves("/v1/chat/completions"))
    async def chat(body: ChatRequest, request: Request):
        refuse("/v1/chat/completions")
        start, deadline = begin(body)
        if not tokenizer.chat_template:
            raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        check_chars(sum(len(m["content"]) for m in messages), "messages")
        ids = await off_loop(lambda: render(messages), deadline)
        asked = body.max_completion_tokens or body.max_tokens
        limit = asked or max(1, min(settings.default_max_tokens, context - len(ids)))
        return await respond(request, body, [ids], limit, "max_completion_tokens" if body.max_completion_tokens
                             else "max_tokens", True, start, deadline)

    async def respond(request: Request, body: Sampling, prompts: list[list[int]], max_tokens: int, field: str,
                      chat: bool, start: float, deadline: float):
        for ids in prompts:
            over_context(len(ids), max_tokens, field, "messages" if chat else "prompt")
        rows = [ids for ids in prompts for _ in range(body.n)]
        if len(rows) > engine.max_batch:
            raise ApiError(400, f"{len(prompts)} prompts x n={body.n} is {len(rows)} choices; this server takes at "
                           f"most {engine.max_batch} per request", param="n")
        params = [SamplingParams(max_tokens, body.temperature, body.top_k, body.top_p, body.repetition_penalty,
                                 None if body.seed is None else body.seed + j, list(body.stop or []),
                                 [] if body.ignore_eos else stop_ids, body.presence_penalty, body.frequency_penalty)
                  for j in range(len(rows))]
        try:
            job = engine.submit(rows, params)
        except QueueFull as err:
            raise ApiError(429, str(err), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from err
        except ServeError as err:
            raise ApiError(503, str(err), "server_error") from err
        usage = {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": 0}
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": settings.model_name}
        state = {"first": None}

        def on_token() -> None:
            usage["completion_tokens"] += 1
            if state["first"] is None:
                state["first"] = time.perf_counter()
                first_token.observe(state["first"] - start)

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = events(job, request, deadline, head, chat, len(rows), usage, include_usage, on_token,
                             lambda: latency.observe(time.perf_counter() - start))
            return JobStream(job, stream, media_type="text/event-stream",
                              headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts, reasons = [""] * len(rows), ["length"] * len(rows)

        async def consume():
            async for i, event in job:
                texts[i] += event.text
                if event.token_id is not None:
                    on_token()
                if event.finish_reason:
                    reasons[i] = event.finish_reason

        await until_done(consume(), job, request, deadline)
        latency.observe(time.perf_counter() - start)
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r,
                        "logprobs": None} for i, (t, r) in enumerate(zip(texts, reasons))]
        else:
            choices = [{"index": i, "text": t, "finish_reason": r, "logprobs": None}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        return {**head, "choices": choices, "usage": usage}

    add_routes(app, Api(engine, backend, tokenizer, settings.model_name, context, keyed, refuse, serves, begin,
                        off_loop, check_chars, latency))
    return app


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


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, bound before uvicorn starts so a port in use is a clear error, not a log line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free; a listening one is not
    # Accepted connections inherit this. Without it, a response written in two pieces (headers, then body or
    # a streamed chunk) waits for the client's delayed ACK: 40 ms a request (measured, keep-alive clients).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {err.strerror or err}"
                         + ("; another process is using it: pass --port" if err.errno == 98 else "")) from err
    sock.listen(2048)
    return sock


def build_server(folder: str | Path, *, host: str = "127.0.0.1", port: int = 8000, device: str = "auto",
                 variant: str | None = None, threads: int | None = None, model_name: str | None = None,
                 log_level: str = "info", **settings):
    """(uvicorn.Server, its bound socket, the app): load the model, bind the port, build the app. Run with
    server.run(sockets=[sock]); tests run it in a thread and set server.should_exit."""
    import uvicorn

    from .runtime import load_backend, stop_ids

    given = Path(folder).resolve()
    # exports/qwen/onnx-int8 is "qwen" too: the export's name, not the variant folder's
    name = model_name or (given.parent.name if given.name in ("merged", "onnx", "onnx-int8", "onnx-int4") else given.name)
    server_settings = ServerSettings(name, **settings)  # bad settings are refused before anything is loaded
    sock = bind(host, port)  # first: a port in use should not wait for the model to load
    try:
        backend, tokenizer = load_backend(folder, device, threads, variant)
    except BaseException:
        sock.close()
        raise
    app = create_app(backend, tokenizer, server_settings, stop_ids(backend.folder, tokenizer))
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    return uvicorn.Server(config), sock, app


def serve(folder: str | Path, say=print, **options) -> None:
    """Load, bind and serve until interrupted (Ctrl-C)."""
    server, sock, app = build_server(folder, **options)
    host, port = sock.getsockname()[:2]
    settings: ServerSettings = app.state.settings
    say(f"serving {settings.model_name!r}: {app.state.engine.backend.describe()}")
    if served := variant_line(Path(folder), options.get("variant")):
        say(f"  {served}")
    if host not in ("127.0.0.1", "::1", "localhost") and not settings.api_key:
        say(f"warning: listening on {host} without --api-key: anyone who can reach this port can use the model")
    engine = app.state.engine
    batching = "continuous" if engine.continuous else "one-pass" if isinstance(engine, ScoreEngine) else "static"
    say(f"  http://{host}:{port}/v1  ({batching} batching of {settings.max_batch} rows, queue {settings.max_queue}, "
        f"timeout {settings.timeout_s:g} s" + (", API key required" if settings.api_key else "") + ")")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
