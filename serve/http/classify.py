"""POST /v1/classify and /v1/ner: an encoder classifier's labels and entities, its rows batched by ScoreEngine.

    lite-sft serve exports/sst2
    curl -s 127.0.0.1:8000/v1/classify -H 'content-type: application/json' -d '{"input": ["a great film", "awful"]}'
    # {"object": "list", "data": [{"index": 0, "label": "pos", "score": 0.97, "labels": [{"label": "pos",
    #  "score": 0.97}, {"label": "neg", "score": 0.03}]}, ...], "usage": {"prompt_tokens": 7, "total_tokens": 7}}
    curl -s 127.0.0.1:8000/v1/ner -H 'content-type: application/json' -d '{"input": "Peter visited Paris"}'
    # {"object": "list", "data": [{"index": 0, "entities": [{"entity": "PER", "start": 0, "end": 5,
    #  "text": "Peter", "score": 0.91}, {"entity": "LOC", "start": 14, "end": 19, ...}]}], ...}

On a server of classifier adapters (one encoder, several tuned heads), `"model": "sentiment"` picks the adapter
and so its labels; /v1/classify takes the seq-cls adapters and /v1/ner the token-cls ones (served.py's scorer).

Scores are the softmax over config.json's id2label (an adapter's labels in adapters.json). NER reads the text
as whitespace-separated words, as the model was trained on words (CoNLL tokens), tags each word by its first
sub-word (the one trained) and reads entities from the tags with conlleval's rules; each entity is a span of
the text as sent (start, end in characters, end exclusive) with the mean score of its words. lite_sft.tasks.ner does those steps for
training and evaluation, so serving uses the very same functions.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import numpy as np
from fastapi import APIRouter, Request

from lite_sft.errors import ServeError, UnknownAdapter
from lite_sft.tasks.ner import entity_spans, split_words, word_predictions

from ..engine import QueueFull
from .schemas import ApiError, ClassifyRequest, NerRequest
from .served import ServedModel
from .stream import until_done


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def ranked(logits: np.ndarray, labels: list[str], top_k: int | None = None) -> dict:
    """One input's answer: the best label and its score, and the top_k labels (default all), most likely first."""
    probs = softmax(logits)
    order = np.argsort(-probs, kind="stable")[:top_k]
    listed = [{"label": labels[i], "score": float(probs[i])} for i in order]
    return {"label": listed[0]["label"], "score": listed[0]["score"], "labels": listed}


def entities(text: str, offsets: list[tuple[int, int]], word_ids: list[int | None], logits: np.ndarray,
             labels: list[str]) -> list[dict]:
    """Entity spans of `text` from one row's token logits (tokens, labels); see the module docstring."""
    probs = softmax(logits)
    best = probs.argmax(-1)
    per_token = [(labels[b], float(probs[t, b])) for t, b in enumerate(best)]
    # Words left without a token (cut off by truncate) are read as O.
    per_word = word_predictions(word_ids, per_token, len(offsets), fill=("O", 0.0))
    return entity_spans(text, offsets, [tag for tag, _ in per_word], [score for _, score in per_word])


@dataclass
class Encoded:
    row: dict
    """What the model reads: input_ids (and token_type_ids when the tokenizer makes them)."""
    word_ids: list[int | None] | None = None
    offsets: list[tuple[int, int]] | None = None


def encode(tokenizer, texts: list[str], pairs: list[str] | None, limit: int, truncate: bool,
           words: bool) -> list[Encoded]:
    """Each text (and its pair) tokenised as the model was trained: whole texts for classify, whitespace words
    for NER. A text over `limit` tokens is a 400 naming it, unless `truncate`."""
    out = []
    for i, text in enumerate(texts):
        try:
            if words:
                split, offsets = split_words(text)
                enc = tokenizer(split, is_split_into_words=True, truncation=truncate,
                                max_length=limit if truncate else None)
            else:
                enc = tokenizer(text, pairs[i] if pairs else None, truncation=truncate,
                                max_length=limit if truncate else None)
        except Exception as err:  # noqa: BLE001  (the Rust tokenizer refuses e.g. lone surrogates)
            raise ApiError(400, f"input {i} cannot be tokenised: {err}", param="input") from err
        n = len(enc["input_ids"])
        if n > limit:
            raise ApiError(400, f"input {i} is {n} tokens; this model reads at most {limit}. Shorten it, or send "
                           '"truncate": true to cut it', param="input", code="context_length_exceeded")
        row = {key: list(enc[key]) for key in ("input_ids", "token_type_ids") if key in enc}
        out.append(Encoded(row, enc.word_ids(), offsets) if words else Encoded(row))
    return out


class ScoreHandler:
    """/v1/classify and /v1/ner on every server (a model that does neither says which endpoint it serves)."""

    def __init__(self, served: ServedModel):
        self.served = served

    def router(self, keyed: list) -> APIRouter:
        """The routes, listed in the OpenAPI schema only where the model does the task."""
        router = APIRouter()
        for path, endpoint in (("/v1/classify", self.classify), ("/v1/ner", self.ner)):
            router.add_api_route(path, endpoint, methods=["POST"], dependencies=keyed,
                                 include_in_schema=self.served.serves(path))
        return router

    async def classify(self, body: ClassifyRequest, request: Request):
        served = self.served
        served.refuse("/v1/classify")
        adapter, labels = served.scorer("/v1/classify", body.model)
        start, deadline = served.begin(body)
        texts = self.texts_of(body)
        pairs = None if body.text_pair is None else [body.text_pair] if isinstance(body.text_pair, str) \
            else list(body.text_pair)
        for text in pairs or []:
            served.check_chars(len(text), "text_pair")
        encoded = await served.off_loop(lambda: encode(served.tokenizer, texts, pairs, served.context, body.truncate,
                                                       False), deadline)
        logits = await self.score(request, [e.row for e in encoded], deadline, adapter)
        data = [{"index": i, **ranked(row, labels, body.top_k)} for i, row in enumerate(logits)]
        return self.answer("classify", data, encoded, start, adapter)

    async def ner(self, body: NerRequest, request: Request):
        served = self.served
        served.refuse("/v1/ner")
        adapter, labels = served.scorer("/v1/ner", body.model)
        start, deadline = served.begin(body)
        texts = self.texts_of(body)
        encoded = await served.off_loop(lambda: encode(served.tokenizer, texts, None, served.context, body.truncate,
                                                       True), deadline)
        logits = await self.score(request, [e.row for e in encoded], deadline, adapter)
        data = [{"index": i, "entities": entities(text, e.offsets, e.word_ids, row, labels)}
                for i, (text, e, row) in enumerate(zip(texts, encoded, logits))]
        return self.answer("ner", data, encoded, start, adapter)

    async def score(self, request: Request, rows: list[dict], deadline: float,
                    adapter: str | None = None) -> list[np.ndarray]:
        try:
            job = self.served.engine.submit(rows, [None] * len(rows), adapter=adapter)
        except UnknownAdapter as err:  # unloaded since scorer looked
            raise ApiError(404, str(err), param="model", code="model_not_found") from err
        except QueueFull as err:
            raise ApiError(429, str(err), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from err
        except ServeError as err:
            raise ApiError(503, str(err), "server_error") from err
        out: list = [None] * len(rows)

        async def consume():
            async for i, scored in job:
                out[i] = scored.logits

        await until_done(consume(), job, request, deadline)
        return out

    def texts_of(self, body) -> list[str]:
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        max_batch = self.served.engine.max_batch
        if len(texts) > max_batch:
            raise ApiError(400, f"{len(texts)} inputs in one request; this server takes at most "
                           f"{max_batch} (its --max-batch)", param="input")
        for text in texts:
            self.served.check_chars(len(text), "input")
        return texts

    def answer(self, kind: str, data: list[dict], encoded: list[Encoded], start: float,
               adapter: str | None = None) -> dict:
        self.served.latency.observe(time.perf_counter() - start)
        tokens = sum(len(e.row["input_ids"]) for e in encoded)
        return {"id": f"{kind}-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": adapter or self.served.settings.model_name, "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
