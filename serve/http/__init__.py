"""The HTTP layer: FastAPI routers with a handler object each, over one engine (app.py assembles them).

    app = create_app(backend, tokenizer, ServerSettings("demo"), stop_ids)

completions.py answers /v1/completions and /v1/chat/completions, classify.py /v1/classify and /v1/ner,
system.py /health, /metrics and /v1/models; served.py holds what every handler checks (the task's routes,
the context, the key), schemas.py the request and error shapes, stream.py server-sent events, auth.py the key.
"""
