"""The server's engine and its queue, with a stand-in backend whose prefill waits for the test to open it: the
worker is provably busy while requests queue behind it, so what the queue holds is exact, not timing-bound."""

import asyncio
import threading
import time

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from lite_sft.serve.engine import Engine, QueueFull
from lite_sft.serve.generate import SamplingParams


class Gated:
    """Logits of zeros (greedy picks token 0); the first prefill holds the worker until `opened` is set."""

    max_context, vocab_size = 64, 8

    def __init__(self):
        self.opened = threading.Event()
        self.ran: list[int] = []  # each row's (one-token) prompt, in the order the worker ran them

    def prefill(self, ids, mask, capacity):
        self.ran += ids[:, -1].tolist()
        assert self.opened.wait(10), "the test never opened the gate"
        return np.zeros((len(ids), self.vocab_size), np.float32), None

    def decode(self, state, tokens):
        return np.zeros((len(tokens), self.vocab_size), np.float32)

    def keep(self, state, rows):
        return state


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


async def finish(job) -> list[str | None]:
    return [event.finish_reason async for _, event in job if event.finish_reason]


@pytest.fixture
def busy():
    """(engine, backend, registry): batch 1, queue 2, and the worker stuck in a first request's prefill."""
    backend, registry = Gated(), CollectorRegistry()
    engine = Engine(backend, None, max_batch=1, max_queue=2, registry=registry)
    yield engine, backend, registry
    backend.opened.set()
    engine.close()


def test_a_cancelled_request_leaves_the_queue_at_once(busy):
    engine, backend, registry = busy
    depth = lambda: registry.get_sample_value("lite_sft_queue_depth")  # noqa: E731

    async def main():
        first = engine.submit([[1]], [SamplingParams(2)])
        wait_for(lambda: engine.running_rows == 1)
        gone, waiting = engine.submit([[2]], [SamplingParams(2)]), engine.submit([[3]], [SamplingParams(2)])
        with pytest.raises(QueueFull):
            engine.submit([[4]], [SamplingParams(2)])
        gone.cancel()  # its client disconnected or timed out while it waited
        assert engine.queued == 1 and depth() == 1
        late = engine.submit([[5]], [SamplingParams(2)])  # the slot it held is free at once, not after the batch
        assert engine.queued == 2 and depth() == 2
        backend.opened.set()
        assert [await finish(job) for job in (first, waiting, late)] == [["length"]] * 3
        assert backend.ran == [1, 3, 5]  # the cancelled request never ran
        assert engine.queued == 0 and depth() == 0

    asyncio.run(main())


def test_cancelling_every_waiting_request_empties_the_queue(busy):
    engine, backend, registry = busy

    async def main():
        engine.submit([[1]], [SamplingParams(2)])
        wait_for(lambda: engine.running_rows == 1)
        jobs = [engine.submit([[i]], [SamplingParams(2)]) for i in (2, 3)]
        for job in jobs:
            job.cancel()
            job.cancel()  # twice, as the server's timeout and its disconnect watcher may both do
        assert engine.queued == 0 and registry.get_sample_value("lite_sft_queue_depth") == 0
        again = [engine.submit([[i]], [SamplingParams(2)]) for i in (6, 7)]
        backend.opened.set()
        assert [await finish(job) for job in again] == [["length"]] * 2
        assert backend.ran == [1, 6, 7]

    asyncio.run(main())


class Joinable:
    """A backend that can join states: greedy picks token 1 always; each decode takes `step_s` and records how
    many rows it ran. A prompt holding 99 fails its prefill; a decode of a row fed 98 fails."""

    max_context, vocab_size = 256, 8

    def __init__(self, step_s=0.004):
        self.step_s, self.rows_per_step = step_s, []

    def _logits(self, n):
        logits = np.zeros((n, self.vocab_size), np.float32)
        logits[:, 1] = 1.0
        return logits

    def prefill(self, ids, mask, capacity):
        if (ids == 99).any():
            raise RuntimeError("this prompt breaks the model")
        return self._logits(len(ids)), len(ids)

    def decode(self, state, tokens):
        time.sleep(self.step_s)
        self.rows_per_step.append(len(tokens))
        return self._logits(len(tokens))

    def keep(self, state, rows):
        return len(rows)

    def join(self, state, other):
        return state + other

    def release(self, state):
        pass


async def collect(job):
    """(tokens per choice, finish reasons), or the exception the job raised."""
    out = {}
    try:
        async for i, event in job:
            out.setdefault(i, []).append(event.finish_reason)
    except Exception as err:  # noqa: BLE001
        return err
    return out


@pytest.mark.parametrize("continuous", [True, False])
def test_a_request_joins_a_running_batch_at_the_next_step(continuous):
    backend = Joinable()
    engine = Engine(backend, None, max_batch=4, max_queue=4, registry=CollectorRegistry(), continuous=continuous)

    async def main():
        long = engine.submit([[1, 2, 3]], [SamplingParams(60)])
        wait_for(lambda: len(backend.rows_per_step) >= 3)
        short = engine.submit([[4]], [SamplingParams(3)])
        done = []
        for coro in asyncio.as_completed([_named("long", long), _named("short", short)]):
            done.append((await coro)[0])
        return done

    try:
        done = asyncio.run(main())
    finally:
        engine.close()
    if continuous:  # the short request ran beside the long one and finished first
        assert done == ["short", "long"] and max(backend.rows_per_step) == 2
    else:  # it waited for the long one's batch to end
        assert done == ["long", "short"] and max(backend.rows_per_step) == 1


async def _named(name, job):
    return name, await collect(job)


def test_a_failing_request_fails_alone_and_the_batch_goes_on(monkeypatch):
    import lite_sft.serve.generate as generate

    backend = Joinable()
    engine = Engine(backend, None, max_batch=4, max_queue=8, registry=CollectorRegistry())
    sample = generate._Row.sample

    def broken(row, logits):  # this row's sampling fails (a bad logits processor, say)
        if row.params.seed == 13 and row.generated == 2:
            raise ValueError("sampling broke")
        return sample(row, logits)

    monkeypatch.setattr(generate._Row, "sample", broken)

    async def main():
        fine = engine.submit([[1], [2]], [SamplingParams(30), SamplingParams(30)])
        wait_for(lambda: len(backend.rows_per_step) >= 2)
        bad_prefill = engine.submit([[99]], [SamplingParams(5)])
        bad_row = engine.submit([[3], [4]], [SamplingParams(20, seed=13), SamplingParams(20)])
        return await asyncio.gather(*(collect(j) for j in (fine, bad_prefill, bad_row)))

    try:
        fine, bad_prefill, bad_row = asyncio.run(main())
        assert fine == {0: [None] * 29 + ["length"], 1: [None] * 29 + ["length"]}
        assert "this prompt breaks the model" in str(bad_prefill)
        assert "sampling broke" in str(bad_row)
        # its other row left with it, in the same step: 2 decode steps ran all 4 rows, not the 18 it asked for
        assert sum(n > 2 for n in backend.rows_per_step) == 2
        # and the engine still serves
        again = asyncio.run(_one(engine))
        assert again == {0: [None, None, "length"]}
    finally:
        engine.close()


async def _one(engine):
    return await collect(engine.submit([[5]], [SamplingParams(3)]))


def test_a_failed_decode_fails_its_batch_but_not_the_engine():
    backend = Joinable()
    engine = Engine(backend, None, max_batch=4, max_queue=8, registry=CollectorRegistry())
    decode = backend.decode
    backend.decode = lambda state, tokens: (_ for _ in ()).throw(RuntimeError("device lost"))

    async def main():
        return await asyncio.gather(*(collect(engine.submit([[i]], [SamplingParams(4)])) for i in (1, 2)))

    try:
        results = asyncio.run(main())
        assert all("device lost" in str(r) for r in results)
        backend.decode = decode
        assert asyncio.run(_one(engine)) == {0: [None, None, "length"]}
    finally:
        engine.close()
