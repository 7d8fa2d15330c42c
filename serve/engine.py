"""The server's engine: a bounded queue of requests and one worker thread that runs them in batches.

    engine = Engine(backend, tokenizer, max_batch=8, max_queue=32)
    job = engine.submit([prompt_ids], [SamplingParams(max_new_tokens=16)], loop)   # QueueFull when full
    async for choice, event in job: ...

Batching: the worker takes every waiting request up to `max_batch` rows (a request asking n choices is n
rows) and runs them as one left-padded batch through generate(); while it runs, new requests queue and form
the next batch. Batch 1 decode is bound by reading the weights once per token, so a batch of 8 costs
little more per step than one and throughput grows with load (benchmarks/results/serve-*.json). Requests
do not join a batch already running (no continuous batching): a short request that arrives during a long
one waits for it, which `max_batch` and the request timeout bound. A waiting request that is cancelled (its
client left or timed out) leaves the queue at once: `max_queue` counts only requests someone still waits for.

One worker, one model: onnxruntime and torch release the GIL while they compute, so the asyncio loop keeps
answering (health, metrics, new requests and 429s) while a batch runs.

ScoreEngine is the same queue and worker for an encoder classifier: a request's rows are its tokenised texts,
and a batch (the waiting requests' rows, up to `max_batch`) is one forward pass whose logits go back per row.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import numpy as np

from . import ServeError
from .generate import Event, SamplingParams, generate

log = logging.getLogger(__name__)


GATHER_S = 0.005


class QueueFull(ServeError):
    """Too many requests are waiting; the client should retry later."""


@dataclass(eq=False)  # jobs are told apart by identity: the queue removes exactly the one cancelled
class Job:
    """One request: its rows, and the events the worker sends back to the request's event loop."""

    prompts: list
    """Its rows: token ids to generate from (Engine), or a text's encoding to classify (ScoreEngine)."""
    params: list[SamplingParams | None]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    withdraw: Callable[[Job], None] | None = field(default=None, repr=False)
    """Takes the job out of its engine's queue (set by Engine.submit)."""

    def put(self, item) -> None:
        """From the worker thread: hand an (index, Event) or an exception to the waiting request."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the request's loop is gone (server shutting down): nobody is listening
            self.cancelled = True

    def cancel(self) -> None:
        """The client went away or timed out: a waiting job leaves the queue now (its place goes to the next
        client), a running one's rows are dropped at the worker's next step."""
        self.cancelled = True
        if self.withdraw is not None:
            self.withdraw(self)

    def __aiter__(self):
        return self._events()

    async def _events(self):
        open_rows = len(self.prompts)
        while open_rows:
            item = await self.events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item[1].finish_reason is not None:
                open_rows -= 1


class Engine:
    def __init__(self, backend, tokenizer, max_batch: int = 8, max_queue: int = 32, registry=None):
        from prometheus_client import Counter, Gauge, Histogram

        if max_batch < 1 or max_queue < 1:
            raise ServeError("max_batch and max_queue must be at least 1")
        self.backend, self.tokenizer = backend, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._last_rows = 0
        self.running_rows = 0
        self.batch_size = Histogram("lite_sft_batch_rows", "Rows per batch the worker ran", registry=registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.tokens = Counter("lite_sft_generated_tokens", "Tokens generated", registry=registry)
        self.queue_wait = Histogram("lite_sft_queue_wait_seconds", "Time a request waited for a batch",
                                    registry=registry)
        Gauge("lite_sft_queue_depth", "Requests waiting for a batch", registry=registry).set_function(
            lambda: len(self._waiting))
        Gauge("lite_sft_running_rows", "Rows in the batch now running", registry=registry).set_function(
            lambda: self.running_rows)
        self._thread = threading.Thread(target=self._work, name="lite-sft-engine", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def submit(self, prompts: list[list[int]], params: list[SamplingParams], loop=None) -> Job:
        if len(prompts) > self.max_batch:
            raise ServeError(f"{len(prompts)} choices in one request: at most {self.max_batch} (the batch size)")
        job = Job(prompts, params, loop or asyncio.get_running_loop(), withdraw=self._withdraw)
        with self._cond:
            if self._stopping:
                raise ServeError("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (queue limit {self.max_queue}); "
                                "retry shortly")
            self._waiting.append(job)
            self._cond.notify()
        return job

    def _withdraw(self, job: Job) -> None:
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:  # already taken by the worker, or withdrawn before
                pass

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking work, fail what waits, let the running batch end (its rows are cancelled)."""
        with self._cond:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            self._cond.notify()
        for job in waiting:
            job.put(ServeError("the server is shutting down"))
        self._thread.join(timeout)

    def _take(self) -> list[Job]:
        with self._cond:
            while not self._waiting and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return []
            gather = self._last_rows > 1 and sum(len(j.prompts) for j in self._waiting) < self.max_batch
        if gather:
            # Under load, the clients of the batch that just ended send their next requests a moment apart;
            # without this pause the first would run alone and the rest wait a whole batch behind it (measured:
            # a third less throughput at 8 clients). An idle server (last batch one row) answers at once.
            time.sleep(GATHER_S)
        with self._cond:
            jobs, rows = [], 0
            while self._waiting and rows + len(self._waiting[0].prompts) <= self.max_batch:
                job = self._waiting.popleft()
                if not job.cancelled:
                    jobs.append(job)
                    rows += len(job.prompts)
        return jobs

    def _work(self) -> None:
        while not self._stopping:
            jobs = self._take()
            if jobs:
                self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        rows = [(job, i) for job in jobs for i in range(len(job.prompts))]
        now = time.perf_counter()
        for job in jobs:
            job.started = now
            self.queue_wait.observe(now - job.submitted)
        self.batch_size.observe(len(rows))
        self._last_rows = len(rows)
        self.running_rows = len(rows)
        try:
            for index, result in self._results(rows):
                job, i = rows[index]
                if result.finish_reason is not None:
                    self.running_rows -= 1
                if not job.cancelled:
                    job.put((i, replace(result, index=i)))  # numbered within its own request
        except Exception as err:  # noqa: BLE001  (a failed batch fails its requests, never the worker)
            log.exception("a batch of %d rows failed", len(rows))
            for job in jobs:
                job.put(err if isinstance(err, ServeError) else ServeError(f"generation failed: {err}"))
        finally:
            self.running_rows = 0

    def _results(self, rows: list[tuple[Job, int]]) -> Iterator[tuple[int, Event]]:
        """(the row's place in the batch, what it produced), as produced; a row's last has a finish_reason."""
        events = generate(self.backend, [job.prompts[i] for job, i in rows], [job.params[i] for job, i in rows],
                          self.tokenizer, cancelled=lambda r: self._stopping or rows[r][0].cancelled)
        for event in events:
            if event.token_id is not None:
                self.tokens.inc()
            yield event.index, event


@dataclass
class Scored:
    """One row's logits from an encoder classifier: (labels,) for seq-cls, (tokens, labels) for token-cls."""

    index: int
    logits: np.ndarray
    finish_reason: str = "stop"  # a row is done in one pass


class ScoreEngine(Engine):
    """The engine of an encoder classifier: each batch is one forward pass over the rows still wanted."""

    def _results(self, rows: list[tuple[Job, int]]) -> Iterator[tuple[int, Scored]]:
        wanted = [r for r, (job, _) in enumerate(rows) if not job.cancelled]
        if wanted:
            logits = self.backend.logits([rows[r][0].prompts[rows[r][1]] for r in wanted])
            for r, row_logits in zip(wanted, logits):
                yield r, Scored(r, row_logits)
