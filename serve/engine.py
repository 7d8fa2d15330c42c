"""The server's engine: a bounded queue of requests and one worker thread that runs them in batches.

    engine = Engine(backend, tokenizer, max_batch=8, max_queue=32)
    job = engine.submit([prompt_ids], [SamplingParams(max_new_tokens=16)], loop)   # QueueFull when full
    async for choice, event in job: ...

Continuous batching (the default for a decoder-only model): between two decode steps the worker takes the
waiting requests whose rows fit beside the running ones (up to `max_batch` rows; a request asking n choices
is n rows, taken whole and in arrival order), prefills them and joins them to the batch (generate.Batch); a
row leaves the batch the step it ends. A short request that arrives during a long one starts at the next step
instead of waiting for it, and the batch stays full under load. Static batching (`continuous=False`, and
always for an encoder-decoder, whose backend cannot join caches) runs each batch to its end and forms the next
from what queued meanwhile, as lite-sft did before; `lite-sft serve --batching static` keeps it for comparison
(benchmarks/continuous_batching.py).

Failures stay where they happen: a request refused at prefill (or whose prefill fails) fails alone and the
batch goes on; a row whose sampling or text fails fails its request, whose other rows leave; only a failed
decode step, which leaves the batch's cache unusable, fails every request in the batch.

A waiting request that is cancelled (its client left or timed out) leaves the queue at once: `max_queue`
counts only requests someone still waits for; a running one's rows leave the batch at the next step.

Several LoRA adapters of one base (a backend that is protocol.ServesAdapters): a job names its adapter, its rows
keep it in the batch beside other adapters' rows, and loading or unloading one (load_adapter, unload_adapter) is done
by the worker between two steps, never under a running one; an adapter unloaded with `drain` takes no new job
and goes when its last running or waiting job ends.

One worker, one model: onnxruntime and torch release the GIL while they compute, so the asyncio loop keeps
answering (health, metrics, new requests and 429s) while a batch runs.

ScoreEngine is the same queue and worker for an encoder classifier: a request's rows are its tokenised texts,
and a batch (the waiting requests' rows, up to `max_batch`) is one forward pass whose logits go back per row.
Classifier adapters of one base (protocol.ScoringAdapters) share that pass: each row goes with its job's adapter.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from lite_sft.errors import AdapterConflict, ServeError, UnknownAdapter

from .backends.protocol import GeneratingBackend, Joining, ScoringAdapters, ScoringBackend, ServesAdapters
from .generate import Batch, SamplingParams

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
    adapter: str | None = None
    """The LoRA adapter its rows run with (None: the base), on a backend that serves several."""

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
    def __init__(self, backend: GeneratingBackend | ScoringBackend, tokenizer, max_batch: int = 8, max_queue: int = 32,
                 registry=None, continuous: bool = True):
        from prometheus_client import Counter, Gauge, Histogram

        if max_batch < 1 or max_queue < 1:
            raise ServeError("max_batch and max_queue must be at least 1")
        self.backend, self.tokenizer = backend, tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.continuous = continuous and isinstance(backend, Joining)
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._changes: collections.deque[tuple[Callable, Future]] = collections.deque()  # run between two steps
        self._draining: set[str] = set()  # adapters being unloaded: no new requests; gone when their last ends
        self._running: Batch | None = None
        self._last_rows = 0
        self.running_rows = 0
        self.batch_size = Histogram("lite_sft_batch_rows", "Rows in each step the worker ran", registry=registry,
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

    def submit(self, prompts: list[list[int]], params: list[SamplingParams], loop=None,
               adapter: str | None = None) -> Job:
        """Queue a request; `adapter` names the LoRA adapter its rows use (UnknownAdapter when not served)."""
        if len(prompts) > self.max_batch:
            raise ServeError(f"{len(prompts)} choices in one request: at most {self.max_batch} (the batch size)")
        job = Job(prompts, params, loop or asyncio.get_running_loop(), withdraw=self._withdraw, adapter=adapter)
        with self._cond:
            if self._stopping:
                raise ServeError("the server is shutting down")
            if adapter is not None and adapter not in self.adapter_names():
                raise UnknownAdapter(f"adapter {adapter!r} is not served (or is being unloaded); served: "
                                     f"{', '.join(self.adapter_names()) or 'none'}")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (queue limit {self.max_queue}); "
                                "retry shortly")
            self._waiting.append(job)
            self._cond.notify()
        return job

    # -- adapters (a backend serving several, protocol.ServesAdapters) ------------------------------------------

    def adapter_names(self) -> list[str]:
        """The adapters a new request may pick: those loaded, less those being unloaded."""
        if not isinstance(self.backend, ServesAdapters):
            return []
        return [name for name in self.backend.served_adapters() if name not in self._draining]

    def add_adapter(self, adapter) -> Future:
        """Add an adapter the backend has read (ServesAdapters.read_adapter) between two steps; the future's result is
        its description (rank, targets)."""
        return self._change(lambda: self.backend.add_adapter(adapter))

    def unload_adapter(self, name: str, drain: bool = False) -> Future:
        """Unload between two steps. With requests in flight: AdapterConflict naming the count, or with `drain`
        the name takes no new request and its columns go once the last ends. Result: (unloaded now, in flight)."""
        def unload():
            if name not in self.adapter_names():
                raise UnknownAdapter(f"adapter {name!r} is not served" + (" (it is being unloaded)" if name in
                                     self._draining else f"; served: {', '.join(self.adapter_names()) or 'none'}"))
            users = self._users(name)
            if not users:
                self.backend.unload_adapter(name)
                return True, 0
            if not drain:
                raise AdapterConflict(f"adapter {name!r} has {users} request{'s' if users > 1 else ''} in flight: "
                                      "retry when they end, or DELETE with ?drain=true to unload it after them")
            with self._cond:
                self._draining.add(name)
            return False, users
        return self._change(unload)

    def _change(self, work: Callable) -> Future:
        future: Future = Future()
        with self._cond:
            if self._stopping:
                raise ServeError("the server is shutting down")
            self._changes.append((work, future))
            self._cond.notify()
        return future

    def _users(self, name: str) -> int:
        """Requests that use adapter `name`: waiting, or with rows in the running batch (worker thread only)."""
        with self._cond:
            waiting = sum(1 for job in self._waiting if job.adapter == name and not job.cancelled)
        running = {id(row.index[0]) for row in (self._running.rows if self._running is not None else [])
                   if row.index[0].adapter == name}
        return waiting + len(running)

    def _apply_changes(self) -> None:
        """Bank changes, between two steps: loads and unloads asked for, then drained adapters whose last
        request has ended."""
        while self._changes:
            with self._cond:
                work, future = self._changes.popleft()
            try:
                future.set_result(work())
            except Exception as err:  # noqa: BLE001  (the caller hears it; the server goes on)
                future.set_exception(err)
        for name in [n for n in self._draining if not self._users(n)]:
            try:
                self.backend.unload_adapter(name)
            except Exception:  # noqa: BLE001
                log.exception("unloading adapter %r failed", name)
            with self._cond:
                self._draining.discard(name)
            log.info("adapter %r drained and unloaded", name)

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
        while self._changes:
            _, future = self._changes.popleft()
            if not future.done():
                future.set_exception(ServeError("the server is shutting down"))

    def _take(self, running: int) -> list[Job]:
        """The waiting jobs to start now, in arrival order, as many as fit beside `running` rows; waits for one
        while nothing runs. Static batching starts jobs only when nothing runs."""
        with self._cond:
            while not running and not self._waiting and not self._stopping and not self._changes:
                self._cond.wait()
            if self._stopping or (running and not self.continuous):
                return []
            gather = (not self.continuous and self._last_rows > 1
                      and sum(len(j.prompts) for j in self._waiting) < self.max_batch)
        if gather:
            # Static batching under load: the clients of the batch that just ended send their next requests a
            # moment apart; without this pause the first would run alone and the rest wait a whole batch behind it
            # (measured: a third less throughput at 8 clients). An idle server (last batch one row) answers at
            # once. Continuous batching needs no pause: a request a moment late joins at the next step.
            time.sleep(GATHER_S)
        with self._cond:
            jobs, rows = [], running
            while self._waiting and rows + len(self._waiting[0].prompts) <= self.max_batch:
                job = self._waiting.popleft()
                if not job.cancelled:
                    jobs.append(job)
                    rows += len(job.prompts)
        return jobs

    def _work(self) -> None:
        batch = self._running = self._batch()
        while not (self._stopping and not batch):
            self._apply_changes()
            for job in self._take(len(batch)):
                self._start(batch, job)
            if batch:
                self._step(batch)
            self.running_rows = len(batch)
        batch.close()

    def _batch(self):
        return Batch(self.backend, self.tokenizer)

    def _start(self, batch, job: Job) -> None:
        """Prefill the job's rows into the batch; a job refused or failing there fails alone."""
        job.started = time.perf_counter()
        self.queue_wait.observe(job.started - job.submitted)
        self.running_rows = len(batch) + len(job.prompts)  # its prefill is running
        try:
            batch.add([(job, i) for i in range(len(job.prompts))], job.prompts, job.params,
                      None if job.adapter is None else [job.adapter] * len(job.prompts))
        except Exception as err:  # noqa: BLE001  (the batch goes on without this job)
            if not isinstance(err, ServeError):
                log.exception("starting a request of %d rows failed", len(job.prompts))
            job.put(err if isinstance(err, ServeError) else ServeError(f"generation failed: {err}"))
        self._last_rows = self.running_rows = len(batch)

    def _step(self, batch) -> None:
        """One step of the batch: each row's event goes to its job."""
        jobs = {row.index[0] for row in batch.rows}
        self.batch_size.observe(len(batch))
        try:
            for event in batch.step(cancelled=lambda key: self._stopping or key[0].cancelled):
                job, i = event.index
                if event.token_id is not None:
                    self.tokens.inc()
                if event.error is not None:
                    log.error("choice %d of a request failed: %r", i, event.error)
                    if not job.cancelled:
                        job.put(ServeError(f"generation failed: {event.error}"))
                    job.cancelled = True  # its other rows leave the batch at the next step
                elif not job.cancelled:
                    job.put((i, replace(event, index=i)))  # numbered within its own request
        except Exception as err:  # noqa: BLE001  (a failed decode fails the batch's requests, never the worker)
            log.exception("a decode step of %d rows failed", len(jobs))
            for job in jobs:
                job.put(err if isinstance(err, ServeError) else ServeError(f"generation failed: {err}"))


@dataclass
class Scored:
    """One row's logits from an encoder classifier: (labels,) for seq-cls, (tokens, labels) for token-cls."""

    index: object
    logits: np.ndarray
    finish_reason: str = "stop"  # a row is done in one pass
    token_id: None = None  # as generate.Event has: the engine counts tokens and errors on these
    error: None = None


class ScoreEngine(Engine):
    """The engine of an encoder classifier: each batch is one forward pass over the rows still wanted."""

    def __init__(self, backend: ScoringBackend, tokenizer, max_batch: int = 8, max_queue: int = 32, registry=None):
        super().__init__(backend, tokenizer, max_batch, max_queue, registry, continuous=False)

    def _batch(self):
        return _ScoreBatch(self.backend)


class _ScoreBatch:
    """A Batch (generate.py) whose rows each end in one step: the step is one forward pass over every row."""

    def __init__(self, backend):
        self.backend, self.rows = backend, []

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, keys: list, encodings: list, _params, adapters: list[str] | None = None) -> None:
        """`adapters` names each row's adapter on a backend of classifier adapters (protocol.ScoringAdapters)."""
        if adapters is not None and not isinstance(self.backend, ScoringAdapters):
            raise ServeError(f"{type(self.backend).__name__} serves one model, not adapters {sorted(set(adapters))}")
        names = adapters if adapters is not None else [None] * len(keys)
        self.rows += [_Scoring(key, encoding, name) for key, encoding, name in zip(keys, encodings, names)]

    def step(self, cancelled):
        rows, self.rows = self.rows, []
        wanted = [row for row in rows if not cancelled(row.index)]
        if not wanted:
            return
        encodings = [row.encoding for row in wanted]
        scored = (self.backend.logits(encodings, [row.adapter for row in wanted])
                  if isinstance(self.backend, ScoringAdapters) else self.backend.logits(encodings))
        for row, logits in zip(wanted, scored):
            yield Scored(row.index, logits)

    def close(self) -> None:
        self.rows = []


@dataclass
class _Scoring:
    index: object
    encoding: dict
    adapter: str | None = None
