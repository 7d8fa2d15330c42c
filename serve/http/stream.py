"""Waiting on a job for a request: a plain answer (until_done) or server-sent events (events, JobStream), each
stopping the job's rows when the client goes away or the request outlives its deadline.

    await until_done(consume(), job, request, deadline)      # 504 past the deadline, 499 when the client left
    return JobStream(job, events(job, request, deadline, ...), media_type="text/event-stream")
"""

from __future__ import annotations

import asyncio
import json

from fastapi import Request
from fastapi.responses import StreamingResponse

from lite_sft.errors import ServeError
from .schemas import ApiError


class JobStream(StreamingResponse):
    """A streamed answer that gives up its job however the response ends, even when the client left before the
    body began (then the event generator never starts, and its own cleanup never runs)."""

    def __init__(self, job, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


async def watch(request: Request, job, task: asyncio.Task | None = None) -> None:
    """Drop the job's rows (and stop waiting for it) as soon as the client goes away."""
    while not job.cancelled:
        if await request.is_disconnected():
            job.cancel()
            if task is not None:
                task.cancel()
            return
        await asyncio.sleep(0.1)


async def until_done(consume, job, request: Request, deadline: float) -> None:
    task = asyncio.ensure_future(consume)
    watcher = asyncio.ensure_future(watch(request, job, task))
    try:
        done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - asyncio.get_running_loop().time()))
        if task not in done:
            job.cancel()
            task.cancel()
            raise ApiError(504, "the request did not finish within the server's timeout", "timeout", code="timeout")
        if task.cancelled():
            raise ApiError(499, "the client closed the request")
        err = task.exception()
        if isinstance(err, ServeError):
            raise ApiError(500, str(err), "server_error")
        if err is not None:
            raise err
    finally:
        watcher.cancel()
        job.cancel()  # no-op when it finished; frees its rows when it did not


async def events(job, request: Request, deadline: float, head: dict, chat: bool, n: int, usage: dict,
                  include_usage: bool, on_token, on_done):
    """Server-sent events: one chunk per token, one with each choice's finish_reason, then [DONE]."""
    loop = asyncio.get_running_loop()
    watcher = asyncio.ensure_future(watch(request, job))
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(i: int, text: str | None, reason: str | None = None, role: bool = False) -> str:
        if chat:
            delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": text} if text else {})
            choice = {"index": i, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": i, "text": text or "", "finish_reason": reason, "logprobs": None}
        return "data: " + json.dumps({**head, "object": obj, "choices": [choice]}) + "\n\n"

    events = job.__aiter__()
    try:
        if chat:
            for i in range(n):
                yield chunk(i, None, role=True)
        while True:
            try:
                i, event = await asyncio.wait_for(events.__anext__(), max(0.0, deadline - loop.time()))
            except StopAsyncIteration:
                break
            if event.token_id is not None:
                on_token()
            if event.text or event.token_id is not None:
                # One chunk per token, even when its text is held back (part of a character or of a possible
                # stop string): clients see progress, and a departed client is noticed at the next token.
                yield chunk(i, event.text)
            if event.finish_reason:
                yield chunk(i, None, event.finish_reason)
        on_done()
        if include_usage:
            total = {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}
            yield "data: " + json.dumps({**head, "object": obj, "choices": [], "usage": total}) + "\n\n"
        yield "data: [DONE]\n\n"
    except asyncio.TimeoutError:
        yield "data: " + json.dumps({"error": {"message": "the request did not finish within the server's timeout",
                                               "type": "timeout", "param": None, "code": "timeout"}}) + "\n\n"
    except ServeError as err:
        yield "data: " + json.dumps({"error": {"message": str(err), "type": "server_error", "param": None,
                                               "code": None}}) + "\n\n"
    finally:
        watcher.cancel()
        job.cancel()
