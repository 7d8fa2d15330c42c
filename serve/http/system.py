"""GET /health, /metrics and /v1/models: what the server runs, how busy it is, and Prometheus' counters.

    curl -s 127.0.0.1:8000/health       # {"status": "ok", "model": ..., "task": ..., "queued": 0, ...}
    curl -s 127.0.0.1:8000/metrics      # Prometheus text: requests, latency, batch rows, queue depth
    curl -s 127.0.0.1:8000/v1/models    # OpenAI's model list: this one model, its context and task

/health and /metrics need no key; /health names the backend and its folder only to callers that send it.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..backends.lora import BASE
from .auth import ApiKey
from .served import ServedModel


class SystemHandler:
    def __init__(self, served: ServedModel, api_key: ApiKey, registry):
        self.served, self.api_key, self.registry = served, api_key, registry

    def router(self, keyed: list) -> APIRouter:
        router = APIRouter()
        router.add_api_route("/health", self.health, methods=["GET"])
        router.add_api_route("/metrics", self.metrics, methods=["GET"], response_class=PlainTextResponse)
        router.add_api_route("/v1/models", self.models, methods=["GET"], dependencies=keyed)
        return router

    async def health(self, request: Request):
        served, engine = self.served, self.served.engine
        # The backend's description names the model's folder: with a key set, only its holders see it.
        about = {}
        if self.api_key.caller_has_it(request):
            about = {"backend": served.backend.describe(),
                     **({} if served.spec.generates or served.scoring else {"labels": served.backend.labels}),
                     **({"adapters": engine.adapter_names()} if served.multi else {})}
        return {"status": "ok", "model": served.settings.model_name, "task": served.task, **about,
                "context": served.context, "queued": engine.queued, "running_rows": engine.running_rows,
                "max_batch": engine.max_batch}

    async def metrics(self):
        return PlainTextResponse(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self):
        served = self.served
        if served.multi:  # the bare base, then each adapter by its manifest name, with its rank and targets
            loaded = served.backend.served_adapters()
            # A classifier adapter has its own task (and labels); their shared encoder alone has none.
            base = {"task": None} if served.scoring else {}
            entries = [(BASE, base)] + [(name, {"adapter": loaded[name], **({"task": loaded[name]["task"]}
                                                                           if served.scoring else {})})
                                        for name in served.engine.adapter_names() if name in loaded]
            return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "lite-sft",
                                                "max_model_len": served.context, "task": served.task, **extra}
                                               for name, extra in entries]}
        return {"object": "list", "data": [{"id": served.settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "lite-sft", "max_model_len": served.context,
                                            "task": served.task}]}
