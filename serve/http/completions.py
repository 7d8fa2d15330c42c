"""POST /v1/completions and /v1/chat/completions: OpenAI's text and chat completions over the batching engine.

    curl -s 127.0.0.1:8000/v1/completions -H 'content-type: application/json' -d '{"prompt": "12+3=", "max_tokens": 4}'
    curl -s 127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Write 40817 backwards."}], "max_tokens": 8}'

A causal LM answers both; a seq2seq model /v1/completions alone (the prompt is the source text). A prompt is
text (tokenised off the event loop), a list of texts, or token ids; a chat is rendered with the tokenizer's
template. Each prompt's `n` choices are rows of one engine job, streamed as server-sent events with
"stream": true or gathered into one answer.
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from lite_sft.errors import ServeError, UnknownAdapter

from ..engine import QueueFull
from ..sampling import SamplingParams
from .schemas import ApiError, ChatRequest, CompletionRequest, Sampling
from .served import ServedModel
from .stream import JobStream, events, until_done


class CompletionHandler:
    """The two generating endpoints; `stop_ids` end every row unless a request sends `ignore_eos`."""

    def __init__(self, served: ServedModel, stop_ids: list[int]):
        self.served, self.stop_ids = served, list(stop_ids)

    def router(self, keyed: list) -> APIRouter:
        """The routes, listed in the OpenAPI schema only where the model does them (any other answers 400)."""
        router = APIRouter()
        for path, endpoint in (("/v1/completions", self.completions), ("/v1/chat/completions", self.chat)):
            router.add_api_route(path, endpoint, methods=["POST"], dependencies=keyed,
                                 include_in_schema=self.served.serves(path))
        return router

    async def completions(self, body: CompletionRequest, request: Request):
        served = self.served
        served.refuse("/v1/completions")
        start, deadline = served.begin(body)
        p = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if all(isinstance(x, str) for x in p):
            for text in p:
                served.check_chars(len(text), "prompt")
            prompts = await served.off_loop(lambda: self.encode(p), deadline)
        elif all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        else:
            prompts = [list(x) for x in p]
        vocab = served.backend.vocab_size
        for ids in prompts:
            if not ids:
                raise ApiError(400, "a prompt is empty (no tokens)", param="prompt")
            if any(not 0 <= t < vocab for t in ids):
                raise ApiError(400, f"token ids must lie in [0, {vocab})", param="prompt")
        return await self.respond(request, body, prompts, body.max_tokens or 16, "max_tokens", False, start, deadline)

    async def chat(self, body: ChatRequest, request: Request):
        served = self.served
        served.refuse("/v1/chat/completions")
        start, deadline = served.begin(body)
        if not served.tokenizer.chat_template:
            raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        served.check_chars(sum(len(m["content"]) for m in messages), "messages")
        ids = await served.off_loop(lambda: self.render(messages), deadline)
        asked = body.max_completion_tokens or body.max_tokens
        limit = asked or max(1, min(served.settings.default_max_tokens, served.context - len(ids)))
        return await self.respond(request, body, [ids], limit, "max_completion_tokens" if body.max_completion_tokens
                                  else "max_tokens", True, start, deadline)

    def encode(self, texts: list[str]) -> list[list[int]]:
        try:
            return [self.served.tokenizer(text)["input_ids"] for text in texts]
        except Exception as err:  # noqa: BLE001  (the Rust tokenizer refuses e.g. lone surrogates)
            raise ApiError(400, f"the prompt cannot be tokenised: {err}", param="prompt") from err

    def render(self, messages: list[dict]) -> list[int]:
        try:
            # return_dict=False: transformers 5 returns a BatchEncoding by default, 4.x a list of ids
            ids = self.served.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                            return_dict=False)
        except Exception as err:  # noqa: BLE001  (jinja's TemplateError, or the template's raise_exception)
            raise ApiError(400, f"the chat template refused these messages: {err}", param="messages") from err
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    def over_context(self, prompt: int, max_tokens: int, field: str, prompt_field: str) -> None:
        # A prompt that alone fills what the model reads is the prompt's fault, whatever max_tokens says.
        context, seq2seq = self.served.context, self.served.spec.encoder_decoder
        room = context if seq2seq else context - 1  # a decoder-only model must still write one token
        if prompt > room:
            raise ApiError(400, f"the prompt is {prompt} tokens; this model reads at most {room} in the prompt "
                           f"(a context of {context} tokens). Shorten the prompt.", param=prompt_field,
                           code="context_length_exceeded")
        if seq2seq:  # the encoder reads the prompt; the decoder writes after its start tokens
            start = len(self.served.backend.decoder_prompt)
            if start + max_tokens <= context:
                return
            message = (f"this model's maximum context length is {context - start} tokens for the completion; "
                       f"the request asks for {max_tokens}")
        else:
            if prompt + max_tokens <= context:
                return
            message = (f"this model's maximum context length is {context} tokens; the request asks for "
                       f"{prompt + max_tokens} ({prompt} in the prompt, {max_tokens} for the completion)")
        fix = f"lower {field}" if seq2seq else f"shorten the prompt or lower {field}"
        raise ApiError(400, f"{message}. {fix[0].upper()}{fix[1:]}.", param=field,
                       code="context_length_exceeded")

    async def respond(self, request: Request, body: Sampling, prompts: list[list[int]], max_tokens: int, field: str,
                      chat: bool, start: float, deadline: float):
        served, engine = self.served, self.served.engine
        for ids in prompts:
            self.over_context(len(ids), max_tokens, field, "messages" if chat else "prompt")
        rows = [ids for ids in prompts for _ in range(body.n)]
        if len(rows) > engine.max_batch:
            raise ApiError(400, f"{len(prompts)} prompts x n={body.n} is {len(rows)} choices; this server takes at "
                           f"most {engine.max_batch} per request", param="n")
        params = [SamplingParams(max_tokens, body.temperature, body.top_k, body.top_p, body.repetition_penalty,
                                 None if body.seed is None else body.seed + j, list(body.stop or []),
                                 [] if body.ignore_eos else self.stop_ids, body.presence_penalty,
                                 body.frequency_penalty)
                  for j in range(len(rows))]
        adapter = served.pick(body.model) if served.multi else None
        try:
            job = engine.submit(rows, params, adapter=adapter)
        except UnknownAdapter as err:  # unloaded since `begin` looked
            raise ApiError(404, str(err), param="model", code="model_not_found") from err
        except QueueFull as err:
            raise ApiError(429, str(err), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from err
        except ServeError as err:
            raise ApiError(503, str(err), "server_error") from err
        usage = {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": 0}
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": (body.model or served.settings.model_name) if served.multi else served.settings.model_name}
        state = {"first": None}

        def on_token() -> None:
            usage["completion_tokens"] += 1
            if state["first"] is None:
                state["first"] = time.perf_counter()
                served.first_token.observe(state["first"] - start)

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = events(job, request, deadline, head, chat, len(rows), usage, include_usage, on_token,
                            lambda: served.latency.observe(time.perf_counter() - start))
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
        served.latency.observe(time.perf_counter() - start)
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r,
                        "logprobs": None} for i, (t, r) in enumerate(zip(texts, reasons))]
        else:
            choices = [{"index": i, "text": t, "finish_reason": r, "logprobs": None}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        return {**head, "choices": choices, "usage": usage}
