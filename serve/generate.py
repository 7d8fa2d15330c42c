"""One generation loop on token ids for every backend: batched prompts of different lengths, sampling, stops,
and events as tokens are produced.

    python -m lite_sft.serve.generate exports/demo --prompt "Write 40817 backwards." --temperature 0.7 --seed 1

Prompts are left-padded to one length, so every row's next token sits in the same column; the backends
turn the attention mask into positions (padding takes no position). Each row keeps its own sampling
settings and seed, so a request samples the same tokens alone or batched with others. A row that stops
(stop id, stop string, max_new_tokens, or cancelled) leaves the batch at once: the backend drops its cache
rows, so later steps cost only what the live rows need.

Batch is that loop one step at a time, for the server's continuous batching (engine.py): rows join a running
batch between two steps (their prompts are prefilled, then backend.join puts their cache beside the batch's)
and leave it when done, so a request never waits for another to finish. generate() is a Batch that rows only
leave.

Sampling uses the logits processors sampling.py makes (repetition, presence and frequency penalties,
temperature, top-k, top-p), one list per row because rows differ; greedy rows without a penalty take the
argmax directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from lite_sft.errors import ServeError

from .backends.devices import DEVICES
from .backends.factory import load_backend
from .backends.folder import stop_ids
from .backends.protocol import Adapters, EncoderDecoder, GeneratingBackend, Joining
from .sampling import SamplingParams, processors


@dataclass
class Event:
    """What one step produced for one prompt."""

    index: int
    """Which prompt (its place in the list given to generate)."""
    token_id: int | None
    text: str
    """Text that became final with this token (held back while it could still become a stop string)."""
    finish_reason: str | None = None
    """None while going on; then "stop" (stop id or string), "length", "cancelled" or "error"."""
    error: Exception | None = None
    """What failed, when finish_reason is "error": this row's sampling or text, which ends this row alone."""


class TextStream:
    """Turns a row's tokens into text deltas, cutting at stop strings and holding back what could begin one.

    Incremental detokenisation as text-generation-inference does it: decode a short window of recent tokens
    twice (with and without the newest) and keep the difference, so each step costs the same however long
    the output, spaces that tokenizers merge come out right, and a window ending in U+FFFD (a character
    whose bytes have not all arrived) waits for the next token.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix = self.read = 0  # the window: ids[prefix:read] is decoded text already taken
        self.text = ""  # every complete character so far
        self.sent = 0  # of which this many were emitted
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _new_text(self) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def push(self, token_id: int) -> tuple[str, bool]:
        """(new final text, whether a stop string was reached)."""
        self.ids.append(token_id)
        self.text += self._new_text()
        text = self.text
        cut = min((i for i in (text.find(s, max(0, self.sent - self.hold)) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            delta, self.sent, self.stopped = text[self.sent:cut], cut, True
            return delta, True
        # Hold back only a tail that could still grow into a stop string ("EN" for "END"), never more.
        tail = max((k for s in self.stop for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:k])), default=0)
        safe = max(len(text) - tail, self.sent)
        delta, self.sent = text[self.sent:safe], safe
        return delta, False

    def flush(self) -> str:
        """Whatever was held back, at the end of generation (nothing after a stop string)."""
        if self.stopped:
            return ""
        rest = self._decode(self.ids[self.prefix:])[len(self._decode(self.ids[self.prefix:self.read])):]
        self.text += rest
        self.prefix = self.read = len(self.ids)
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta


class _Row:
    """One prompt's sampling state."""

    def __init__(self, index, prompt: list[int], params: SamplingParams, tokenizer):
        self.index, self.params, self.seen = index, params, list(prompt)
        self.generated = 0
        self.stops = set(params.stop_ids)
        self.text = TextStream(tokenizer, params.stop) if tokenizer is not None else None
        if params.stop and tokenizer is None:
            raise ServeError("stop strings need a tokenizer")
        self.greedy = params.greedy
        self.processors = processors(params, start=len(prompt))
        self.rng = torch.Generator().manual_seed(params.seed if params.seed is not None
                                                 else int(torch.randint(2**62, (1,))))

    def sample(self, logits: np.ndarray) -> int:
        if self.greedy and not self.processors:
            return int(logits.argmax())
        scores = self.processors(torch.tensor([self.seen]), torch.from_numpy(logits).unsqueeze(0))
        if self.greedy:
            return int(scores.argmax())
        probs = scores.softmax(-1)[0]
        if not torch.isfinite(probs).all():  # extreme settings overflowed: the most likely token is still defined
            return int(torch.nan_to_num(scores[0], nan=-torch.inf).argmax())
        return int(torch.multinomial(probs, 1, generator=self.rng))

    def step(self, token: int) -> Event:
        self.generated += 1
        self.seen.append(token)
        if token in self.stops:
            return Event(self.index, token, self.text.flush() if self.text else "", "stop")
        delta, stopped = self.text.push(token) if self.text else ("", False)
        if stopped:
            return Event(self.index, token, delta, "stop")
        if self.generated >= self.params.max_new_tokens:
            return Event(self.index, token, delta + (self.text.flush() if self.text else ""), "length")
        return Event(self.index, token, delta)


def pad_left(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask), both (batch, longest prompt), the prompts right-aligned.

    >>> pad_left([[7, 8, 9], [5]])[0].tolist(), pad_left([[7, 8, 9], [5]])[1].tolist()
    ([[7, 8, 9], [0, 0, 5]], [[1, 1, 1], [0, 0, 1]])
    """
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    return ids, mask



def over_context(prompt: int, new_tokens: int, backend) -> str | None:
    """Why `prompt` tokens + `new_tokens` do not fit the model, or None. A decoder-only model holds both in one
    context; an encoder-decoder reads the prompt with its encoder and writes the output with its decoder, each
    up to the context (after the tokens its decoder starts from)."""
    limit = backend.max_context
    start = backend.decoder_prompt if isinstance(backend, EncoderDecoder) else None
    if start is None:
        if prompt >= limit:  # no max_new_tokens would fit: the prompt is what is too long
            return f"the prompt is {prompt} tokens; the model's context of {limit} must also hold one new token"
        if prompt + new_tokens > limit:
            return f"{prompt} tokens + max_new_tokens {new_tokens} exceed the model's context of {limit} tokens"
    elif prompt > limit:
        return f"the prompt is {prompt} tokens, over the encoder's limit of {limit} tokens"
    elif len(start) + new_tokens > limit:
        return f"max_new_tokens {new_tokens} exceeds the decoder's limit of {limit - len(start)} tokens"
    return None


def check_prompts(backend, keys: list, prompts: list[list[int]], params: list[SamplingParams]) -> None:
    """A ServeError naming the prompt (by its key) that is empty, asks for bad settings or does not fit."""
    for key, p, sp in zip(keys, prompts, params):
        sp.validate()
        if not p:
            raise ServeError(f"prompt {key} is empty: give at least one token")
        problem = over_context(len(p), sp.max_new_tokens, backend)
        if problem:
            raise ServeError(f"prompt {key}: {problem}")


class Batch:
    """Rows generating together, which join and leave between steps (iteration-level scheduling).

        batch = Batch(backend, tokenizer)
        batch.add(["a", "b"], prompts, params)     # prefill; their first tokens come with the next step
        for event in batch.step(): ...              # one token per row, then one decode for the rows going on
        batch.add(["c"], [prompt], [params])        # joins at the next step
        batch.close()                               # the backend takes its buffers back

    Rows are named by the keys given to add (Event.index). A row whose sampling or text fails ends alone with
    finish_reason "error"; a failing prefill fails only the rows being added, and the batch goes on without them.
    A failing decode leaves the batch empty (its cache is unusable) and raises.
    """

    def __init__(self, backend: GeneratingBackend, tokenizer=None):
        self.backend, self.tokenizer = backend, tokenizer
        # An encoder-decoder reads the prompt (its source) with the encoder; its decoder starts from its own tokens.
        self.decoder_prompt = backend.decoder_prompt if isinstance(backend, EncoderDecoder) else None
        self.rows: list[_Row] = []
        self.state = None
        self.logits: np.ndarray | None = None  # (rows, vocab): each row's next-token logits

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def can_join(self) -> bool:
        """Whether rows can be added to a running batch (the backend can join states; seq2seq cannot)."""
        return isinstance(self.backend, Joining)

    def add(self, keys: list, prompts: list[list[int]], params: list[SamplingParams],
            adapters: list[str | None] | None = None) -> None:
        """Prefill `prompts` and add their rows; a ServeError (nothing added) when one is refused. `adapters`
        names each row's LoRA adapter (None: the base) on a backend that serves several (protocol.Adapters)."""
        if not prompts:
            return
        if adapters is not None and any(adapters) and not isinstance(self.backend, Adapters):
            raise ServeError(f"{type(self.backend).__name__} serves one model, not adapters "
                             f"{sorted(set(adapters) - {None})}")
        if self.rows and not self.can_join:
            raise ServeError(f"{type(self.backend).__name__} cannot add rows to a running batch")
        check_prompts(self.backend, keys, prompts, params)
        rows = [_Row(key, p if self.decoder_prompt is None else self.decoder_prompt, sp, self.tokenizer)
                for key, p, sp in zip(keys, prompts, params)]
        ids, mask = pad_left(prompts)
        capacity = ids.shape[1] + max(sp.max_new_tokens for sp in params)
        if isinstance(self.backend, Adapters):
            logits, state = self.backend.prefill(ids, mask, capacity, adapters)  # (batch, vocab)
        else:
            logits, state = self.backend.prefill(ids, mask, capacity)
        if self.state is None:
            self.state, self.logits = state, logits
        else:
            self.state = self.backend.join(self.state, state)
            self.logits = np.concatenate([self.logits, logits])
        self.rows += rows

    def step(self, cancelled: Callable[[object], bool] | None = None) -> Iterator[Event]:
        """One token for every row, each as an event as soon as it is sampled; then the rows that go on are
        decoded (when the caller asks for the event after the last: events reach clients before the decode).
        `cancelled(key)` is asked per row: one that says yes ends with "cancelled"."""
        tokens, live = [], []  # the tokens fed to the rows going on, and those rows' places in the batch
        for place, (row, row_logits) in enumerate(zip(self.rows, self.logits)):
            if cancelled is not None and cancelled(row.index):
                yield Event(row.index, None, "", "cancelled")
                continue
            try:
                token = row.sample(row_logits)
                event = row.step(token)
            except Exception as err:  # noqa: BLE001  (one row's failure is that row's, not the batch's)
                yield Event(row.index, None, "", "error", err)
                continue
            yield event
            if event.finish_reason is None:
                tokens.append(token)
                live.append(place)
        if not live:
            self.close()
            return
        if len(live) < len(self.rows):
            self.state = self.backend.keep(self.state, live)
        self.rows = [self.rows[place] for place in live]
        try:
            self.logits = self.backend.decode(self.state, np.array(tokens, dtype=np.int64))
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        """End the batch: the backend takes back its buffers."""
        if self.state is not None and isinstance(self.backend, Joining):
            self.backend.release(self.state)
        self.rows, self.state, self.logits = [], None, None


def generate(backend: GeneratingBackend, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             tokenizer=None, cancelled: Callable[[int], bool] | None = None) -> Iterator[Event]:
    """Events for every prompt, in step order, until each has finished.

    `tokenizer` is needed for text (and stop strings); without it events carry token ids only.
    `cancelled(index)` is asked every step: a row that says yes finishes with "cancelled" and leaves the batch.
    A row whose sampling fails raises here (the server's engine, which runs Batch itself, fails that row alone).
    """
    if not prompts:
        return
    params = params if isinstance(params, list) else [params] * len(prompts)
    batch = Batch(backend, tokenizer)
    try:
        batch.add(list(range(len(prompts))), prompts, params)
        while batch:
            for event in batch.step(cancelled):
                if event.error is not None:
                    raise event.error
                yield event
    finally:
        batch.close()


def generate_ids(backend: GeneratingBackend, prompts: list[list[int]],
                 params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
    """The generated ids per prompt (stop token included); a convenience over generate()."""
    out: list[list[int]] = [[] for _ in prompts]
    for event in generate(backend, prompts, params):
        if event.token_id is not None:
            out[event.index].append(event.token_id)
    return out


def main() -> None:
    import argparse
    import time

    parser = argparse.ArgumentParser(prog="python -m lite_sft.serve.generate", description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--prompt", action="append", required=True, help="a user message (repeat for a batch)")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int)
    args = parser.parse_args()
    backend, tokenizer = load_backend(args.folder, args.device)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             return_dict=False)
               if tokenizer.chat_template else tokenizer(p)["input_ids"] for p in args.prompt]
    params = SamplingParams(args.max_new_tokens, args.temperature, top_p=args.top_p, seed=args.seed,
                            stop_ids=stop_ids(backend.folder, tokenizer))
    texts = [""] * len(prompts)
    start = time.perf_counter()
    for event in generate(backend, prompts, params, tokenizer):
        texts[event.index] += event.text
    print(f"{backend.describe()}, {time.perf_counter() - start:.2f} s")
    for prompt, text in zip(args.prompt, texts):
        print(f"> {prompt}\n{text}")


if __name__ == "__main__":
    main()
