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
