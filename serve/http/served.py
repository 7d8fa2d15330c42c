"""What every route handler shares: the served model and its engine, and the checks each request goes through.

    served = ServedModel(backend, tokenizer, engine, settings, latency, first_token)
    start, deadline = served.begin(body)               # 404 for another model's name; the request's clock starts
    ids = await served.off_loop(lambda: tokenize(text), deadline)    # tokenising never blocks the event loop

A route the served model's task does not answer is refused here (refuse: 400 naming the endpoints it does),
from the task's row in lite_sft.taskspec. On a server of several adapters a request's `model` picks one (pick);
on one of classifier adapters it picks the head too, so /v1/classify and /v1/ner each take only the adapters of
their task (scorer).
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor

from lite_sft.errors import UnknownAdapter
from lite_sft.taskspec import TASKS, serving

from ..backends.lora import BASE
from ..backends.protocol import ScoringAdapters, ServesAdapters
from .schemas import ApiError, Sampling, Scoring

CHARS_PER_TOKEN_LIMIT = 64  # a prompt this many characters per context token is refused before tokenising
TOKENIZE_THREADS = min(4, os.cpu_count() or 1)


class ServedModel:
    def __init__(self, backend, tokenizer, engine, settings, latency, first_token):
        self.backend, self.tokenizer, self.engine, self.settings = backend, tokenizer, engine, settings
        self.task = backend.task
        self.multi = isinstance(backend, ServesAdapters)  # several LoRA adapters: a request's `model` picks one
        self.scoring = isinstance(backend, ScoringAdapters)  # classifier adapters: each with its task and labels
        self.spec = TASKS[self.task]
        self.context = min(settings.max_context or backend.max_context, backend.max_context)
        self.latency, self.first_token = latency, first_token  # Histograms: request start to last / first token
        # Tokenising a context's worth of text, or rendering a chat template over it, takes long enough to stall
        # every other request if done on the event loop. A pool of its own bounds the threads: a flood of
        # prompts waits here for one, it does not start a thread each.
        self.tokenizing = ThreadPoolExecutor(TOKENIZE_THREADS, thread_name_prefix="lite-sft-tokenize")

    def close(self) -> None:
        self.tokenizing.shutdown(wait=False, cancel_futures=True)
        self.engine.close()

    def serves(self, path: str) -> bool:
        """Whether the model answers `path`; a server of classifier adapters answers both classifier routes,
        since an adapter of either task may be loaded while it runs (scorer refuses per adapter)."""
        if self.scoring:
            return any(not TASKS[task].generates for task in serving(path))
        return self.task in serving(path)

    def refuse(self, path: str) -> None:
        """A 400 naming what the model does serve, for an endpoint it does not."""
        if not self.serves(path):
            hint = ("; it has no chat template: send the source text as `prompt` to /v1/completions"
                    if self.spec.encoder_decoder and path == "/v1/chat/completions" else "")
            raise ApiError(400, f"{self.settings.model_name!r} is {self.spec.words}: it serves {self.spec.endpoints}, "
                           f"not {path}{hint}", code="unsupported_endpoint")

    def check_chars(self, chars: int, param: str) -> None:
        if chars > CHARS_PER_TOKEN_LIMIT * self.context:
            raise ApiError(400, f"the prompt is {chars} characters, far over the context of {self.context} tokens",
                           param=param, code="context_length_exceeded")

    def begin(self, body: Sampling | Scoring) -> tuple[float, float]:
        """(start, deadline) of a request: its time runs from here, tokenising included."""
        name = self.settings.model_name
        if self.scoring:
            pass  # the route's handler picked the adapter already (scorer)
        elif self.multi:
            self.pick(body.model)
        elif body.model not in (None, name):
            raise ApiError(404, f"model {body.model!r} does not exist; this server serves {name!r}",
                           param="model", code="model_not_found")
        return time.perf_counter(), asyncio.get_running_loop().time() + self.settings.timeout_s

    def pick(self, model: str | None) -> str | None:
        """The adapter a request's `model` names, None for the base (`base`, the server's name or none); a 404
        listing the names served for any other."""
        names = self.engine.adapter_names()
        if model in names:
            return model
        if model not in (None, BASE, self.settings.model_name):
            raise ApiError(404, f"model {model!r} does not exist; this server serves {', '.join([BASE, *names])}",
                           param="model", code="model_not_found")
        return None

    def scorer(self, path: str, model: str | None) -> tuple[str | None, list[str]]:
        """(the adapter, its labels) a /v1/classify or /v1/ner request runs with. On a server of classifier
        adapters: the one `model` names, whose task must serve `path` (else a 400 naming its task and route); no
        `model` (or the server's name): the only adapter serving `path` (else a 400 listing those that do); any
        other name a 404 listing the adapters. Elsewhere: (None, the model's labels)."""
        if not self.scoring:
            return None, self.backend.labels
        names = self.engine.adapter_names()
        tasks = {}
        for name in names:
            try:
                tasks[name] = self.backend.adapter_task(name)
            except UnknownAdapter:  # unloaded since adapter_names looked
                pass
        fits = [name for name, task in tasks.items() if path in TASKS[task].routes]
        if model in (None, self.settings.model_name, BASE):
            if len(fits) != 1 or model == BASE:
                said = (f"{BASE!r} is the shared encoder, which has no head of its own" if model == BASE else
                        f"{len(fits)} adapters here serve {path}" if fits else f"no adapter here serves {path}")
                raise ApiError(400, f"{said}: name one in `model`" + (f" ({', '.join(fits)})" if fits else
                               f"; served: {', '.join(f'{n} ({t})' for n, t in tasks.items()) or 'none'}"),
                               param="model", code="model_required")
            model = fits[0]
        elif model not in tasks:
            raise ApiError(404, f"model {model!r} does not exist; this server serves "
                           f"{', '.join(f'{n} ({t})' for n, t in tasks.items()) or 'no adapter'}",
                           param="model", code="model_not_found")
        elif model not in fits:
            spec = TASKS[tasks[model]]
            raise ApiError(400, f"adapter {model!r} is {spec.words} ({spec.name}): it serves {spec.endpoints}, "
                           f"not {path}", param="model", code="unsupported_endpoint")
        try:
            return model, self.backend.adapter_labels(model)
        except UnknownAdapter as err:
            raise ApiError(404, str(err), param="model", code="model_not_found") from err

    async def off_loop(self, work, deadline: float):
        """work() on a tokenizing thread; an ApiError it raises reaches the client as it would from here."""
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self.tokenizing, work), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise ApiError(504, "the request did not finish within the server's timeout", "timeout",
                           code="timeout") from None
