"""What the engine, the HTTP layer and bench may ask of a backend: typed protocols, all on token ids.

    backend, tokenizer = load_backend("exports/demo")          # factory.py: a GeneratingBackend here
    logits, state = backend.prefill(ids, mask, capacity)       # (batch, vocab)
    logits = backend.decode(state, next_tokens)                # (batch, vocab)

Every generating backend (ort.py's OrtBackend, pytorch.py's TorchBackend, seq2seq.py's Seq2SeqBackend) answers
    prefill(ids (batch, seq), mask (batch, seq), capacity) -> (logits (batch, vocab), state)
    decode(state, tokens (batch,))                         -> logits (batch, vocab)
    keep(state, rows)                                       -> state with only those rows (finished rows leave)
and the decoder-only ones (Joining) two more, for continuous batching:
    join(state, other)                                      -> one state: state's rows, then other's
    release(state)                                          -> its buffers go back for the next batch
Prompts come left-padded (mask 0 on the padding), so every row's next token sits in the same column; a backend
whose model wants the tokens first moves them with align_left. Rows in one state share one cache length; join
right-aligns both states' rows at the longer length, and keep drops the leading columns no remaining row attends
to, so a batch that rows keep joining and leaving never holds more columns than its longest live row.

An encoder-decoder (EncoderDecoder) reads the prompt with its encoder and starts its decoder from
`decoder_prompt` (decoder_start_token_id, maybe a forced first token); a repetition penalty sees those tokens.

A scoring backend (encoder.py: a seq-cls or token-cls head) answers `logits` for a batch of tokenised rows
instead, and names the logits' columns in `labels`.

A decoder serving several adapters of one base (Adapters) takes each row's adapter at prefill; classifiers of
one base (ScoringAdapters) take each row's adapter at `logits`, and its head gives that row's task and labels.
Both load and unload adapters the same way (ServesAdapters).

The engine and the generation loop type their backends with these and ask `isinstance(backend, Joining)` where
a capability differs (runtime_checkable), rather than probing attribute names one by one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


class Backend(Protocol):
    """What every backend says about itself (health, bench rows, start-up lines)."""

    task: str
    """A name in lite_sft.taskspec.TASKS."""
    name: str
    """The bench row's name: torch-merged, onnx-onnx-int8, ..."""
    folder: Path | None
    """The model folder it loaded (None for a model handed over in memory)."""
    provider: str
    precision: str
    max_context: int
    """Tokens the model reads at most."""
    vocab_size: int | None

    def describe(self) -> str: ...

    def weight_bytes(self) -> int: ...


class GeneratingBackend(Backend, Protocol):
    """A model that writes tokens: causal-lm and seq2seq."""

    def prefill(self, ids: np.ndarray, mask: np.ndarray, capacity: int) -> tuple[np.ndarray, Any]: ...

    def decode(self, state: Any, tokens: np.ndarray) -> np.ndarray: ...

    def keep(self, state: Any, rows: list[int]) -> Any: ...


@runtime_checkable
class Joining(Protocol):
    """A generating backend whose states can be joined: rows enter a running batch (continuous batching)."""

    def join(self, state: Any, other: Any) -> Any: ...

    def release(self, state: Any) -> None: ...


@runtime_checkable
class ServesAdapters(Protocol):
    """A backend serving several LoRA adapters of one base, decoder (Adapters) or classifiers (ScoringAdapters):
    read_adapter reads and checks a file on any thread; add_adapter (or load_adapter, both at once) and
    unload_adapter change what is served, and the engine calls them between steps, never under a running one."""

    def served_adapters(self) -> dict[str, dict]: ...

    def read_adapter(self, name: str, path: str | Path) -> Any: ...

    def add_adapter(self, adapter: Any) -> dict: ...

    def load_adapter(self, name: str, path: str | Path) -> dict: ...

    def unload_adapter(self, name: str) -> None: ...


@runtime_checkable
class Adapters(ServesAdapters, Protocol):
    """A generating backend serving several LoRA adapters of one base (lora.py's LoraOrtBackend): each row of a
    prefill names its adapter (None: the bare base) and keeps it through keep and join."""

    def prefill(self, ids: np.ndarray, mask: np.ndarray, capacity: int,
                adapters: list[str | None] | None = None) -> tuple[np.ndarray, Any]: ...


@runtime_checkable
class ScoringAdapters(ServesAdapters, Protocol):
    """Classifiers of one base sharing its trunk (lora_encoder.py's LoraEncoderBackend): each row of a `logits`
    call names its adapter, whose head (and so task and labels) answers it; there is no bare base to score with."""

    def logits(self, rows: list[dict], adapters: list[str] | None = None) -> list[np.ndarray]: ...

    def adapter_task(self, name: str) -> str: ...

    def adapter_labels(self, name: str) -> list[str]: ...


@runtime_checkable
class EncoderDecoder(Protocol):
    """A generating backend whose decoder starts from tokens of its own rather than from the prompt."""

    decoder_prompt: list[int]


class ScoringBackend(Backend, Protocol):
    """An encoder classifier: seq-cls (one row of logits per input) or token-cls (one per token)."""

    labels: list[str]
    """The names of the logits' columns, config.json's id2label in id order."""

    def logits(self, rows: list[dict]) -> list[np.ndarray]: ...

    def check_tokenizer(self, tokenizer) -> None: ...


def align_left(ids: np.ndarray, mask: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded rows as right-padded ones (the tokens first).

    >>> [a.tolist() for a in align_left(np.array([[0, 7, 8], [5, 6, 9]]), np.array([[0, 1, 1], [1, 1, 1]]), 0)]
    [[[7, 8, 0], [5, 6, 9]], [[1, 1, 0], [1, 1, 1]]]
    """
    out, out_mask = np.full_like(ids, pad_id), np.zeros_like(mask)
    for i, (row, keep) in enumerate(zip(ids, mask.astype(bool))):
        tokens = row[keep]
        out[i, :len(tokens)], out_mask[i, :len(tokens)] = tokens, 1
    return out, out_mask
