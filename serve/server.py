"""The OpenAI-compatible HTTP server: the app of serve/http/ over a loaded model, run by uvicorn.

    lite-sft serve exports/demo                      # http://127.0.0.1:8000, ONNX on CUDA if there is one
    curl -s 127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Write 40817 backwards."}], "max_tokens": 8}'

Endpoints: POST /v1/completions and /v1/chat/completions (JSON, or server-sent events with "stream": true) for a
causal LM, /v1/completions alone for a seq2seq model (the prompt is the source text), POST /v1/classify for a
sequence classifier and /v1/ner for a token classifier (http/classify.py); GET /v1/models, /health, /metrics
(Prometheus text) and /openapi.json. An endpoint the served model does not do answers 400 naming the ones it does,
and /openapi.json lists only those (there is no /docs page: FastAPI's loads its scripts from a CDN). With an API
key, /v1/* want `Authorization: Bearer KEY` (http/auth.py), and /health names the backend and its folder only to
callers that send it. Every error has OpenAI's shape, {"error": {"message", "type", "param", "code"}}:
400 for a request that cannot be served as asked (bad JSON, unknown field, value out of range, prompt over
the context), 401 without the key, 404 for another model's name, 429 when the queue is full, 504 when a
request outlives its timeout. A multi-adapter export serves each adapter by name beside `base`, and
POST /v1/adapters and DELETE /v1/adapters/{name} load and unload them while serving (http/adapters.py).
A client that disconnects, streaming or not, has its rows dropped from the batch, or its place in the queue
given up if it was still waiting. Prompts are tokenised and chat templates rendered on a few threads of their
own, so a long prompt never holds up the event loop (health, metrics, streams).
"""

from __future__ import annotations

import socket
from pathlib import Path

from lite_sft.artifacts import variant_line
from lite_sft.errors import ServeError
from lite_sft.options import BATCHING, ServerSettings  # noqa: F401  (BATCHING, ServerSettings: imported from here by callers)

from .backends.factory import load_backend
from .backends.protocol import ScoringAdapters, ServesAdapters
from .backends.folder import stop_ids
from .engine import ScoreEngine
from .http.app import create_app

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
    backend = app.state.engine.backend
    if isinstance(backend, ServesAdapters):  # a multi-adapter export: which names a request's `model` may give
        loaded = backend.served_adapters()
        say("  adapters: " + (", ".join(f"{name} ({a['task'] + ', ' if 'task' in a else ''}rank {a['rank']}: "
                                        f"{', '.join(a['targets'])})" for name, a in loaded.items()) or "none yet")
            + ("; `model` picks one (none: the only one of the route's task)" if isinstance(backend, ScoringAdapters)
               else "; `base` picks the bare base") + ("; POST /v1/adapters loads more" if settings.api_key else
                                                "; set an API key to load and unload adapters while serving"))
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
