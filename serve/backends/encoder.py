"""Encoder classifiers (a seq-cls or token-cls head) behind one call: logits for a batch of tokenised texts.

    backend, tokenizer = load_backend("exports/sst2")        # factory.py: OUT/onnx on onnxruntime, or merged/
    rows = [dict(tokenizer("a great film")), dict(tokenizer("awful"))]     # or text pairs
    backend.logits(rows)     # seq-cls: one (labels,) array per row; token-cls: one (tokens, labels) per row
    backend.labels           # the names of the logits' columns, config.json's id2label in id order

What the server makes of the logits (labels and scores, entity spans) is serve/http/classify.py's.

Rows are padded on the right: BERT and RoBERTa number positions from the first token, and a decoder's
sequence-classification head reads the last non-pad token, so right padding gives every row the positions
it has alone. There is no IO binding here, unlike the KV-cache decoder of ort.py: a batch is one run
that reads ids in and logits out, and nothing stays on the device between runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lite_sft.artifacts import MODEL_CONFIG, ONNX_FILE
from lite_sft.errors import ServeError
from lite_sft.taskspec import TASKS
from lite_sft.tasks.iob import split_tag  # a leaf module: tag grammar only, no training code

from .devices import DTYPES, onnx_precision, open_session, pick_device
from .folder import max_context


def read_labels(folder: Path, task: str) -> list[str]:
    """config.json's id2label as a list in id order; for token-cls every name must be an IOB2 tag, which is what
    /v1/ner reads entities from (a folder with other tags is refused when it loads, not on every request)."""
    config = json.loads((folder / MODEL_CONFIG).read_text())
    raw = config.get("id2label")
    if not isinstance(raw, dict) or not raw:
        raise ServeError(f"{folder / 'config.json'} has no id2label: a classifier exported by `lite-sft export` "
                         "names its labels there")
    try:
        by_id = {int(k): str(v) for k, v in raw.items()}
    except ValueError:
        by_id = {}
    if sorted(by_id) != list(range(len(raw))):
        raise ServeError(f"{folder / 'config.json'}: id2label keys must be the ids 0..{len(raw) - 1}, got {sorted(raw)}")
    return check_labels([by_id[i] for i in range(len(by_id))], task, f"{folder / 'config.json'}: id2label")


def check_labels(labels: list[str], task: str, where: str) -> list[str]:
    """`labels`, when `task` can serve them: for token-cls every name an IOB2 tag; else a ServeError that starts
    with `where` (the file and field they came from)."""
    if TASKS[task].per_token:
        for name in labels:
            try:
                split_tag(name)
            except ValueError as err:
                raise ServeError(f"{where} {name!r}: {err}; /v1/ner reads entities from IOB2 tags (O, B-TYPE, "
                                 "I-TYPE)") from None
    return labels


PASS_TOKENS = 16
"""What one more forward pass costs, in padded tokens, for length_groups: onnxruntime's fixed cost per run is a
fraction of a millisecond, a token of MiniLM about a quarter (benchmarks/classifiers_multi.py measures the split)."""


def length_groups(lengths: list[int], pass_tokens: int = PASS_TOKENS) -> list[list[int]]:
    """The rows of a batch (their indices) as passes of similar length: sorted by length and cut where the padding a
    cut saves is worth more than a pass, which matters when one batch holds short and long inputs (a sentence to
    classify beside a paragraph to tag). Exact: the least sum over passes of rows x longest + pass_tokens.

    >>> length_groups([5, 60, 6, 58])
    [[0, 2], [3, 1]]
    >>> length_groups([5, 6, 7])
    [[0, 1, 2]]
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best, cut = [0] + [None] * len(order), [0] * (len(order) + 1)  # best[j]: the cheapest passes of rows 0..j-1
    for j in range(1, len(order) + 1):
        longest = lengths[order[j - 1]]
        for i in range(j):  # sorted rows i..j-1 as one pass
            cost = best[i] + (j - i) * longest + pass_tokens
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def pad_right(rows: list[dict], pad_id: int) -> dict[str, np.ndarray]:
    """The rows' input_ids (and token_type_ids, when the tokenizer gives them) as (batch, longest) int64 arrays,
    with the attention mask.

    >>> {k: v.tolist() for k, v in pad_right([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}], 0).items()}
    {'input_ids': [[5, 6, 7], [8, 0, 0]], 'attention_mask': [[1, 1, 1], [1, 0, 0]]}
    """
    width = max(len(r["input_ids"]) for r in rows)
    batch = {"input_ids": np.full((len(rows), width), pad_id, dtype=np.int64),
             "attention_mask": np.zeros((len(rows), width), dtype=np.int64)}
    if "token_type_ids" in rows[0]:
        batch["token_type_ids"] = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        batch["input_ids"][i, :n], batch["attention_mask"][i, :n] = r["input_ids"], 1
        if "token_type_ids" in batch:
            batch["token_type_ids"][i, :n] = r["token_type_ids"]
    return batch


class EncoderBackend:
    """What both encoder backends share: the task, the labels, padding and the per-row cut of the logits."""

    def __init__(self, task: str, folder: Path, labels: list[str], pad_id: int, max_context: int, name: str,
                 precision: str, provider: str):
        self.task, self.folder, self.labels, self.pad_id = task, folder, labels, pad_id
        self.per_token = TASKS[task].per_token  # token-cls: logits per token, else one row per input
        self.max_context, self.name, self.precision, self.provider = max_context, name, precision, provider
        self.vocab_size = json.loads((folder / MODEL_CONFIG).read_text()).get("vocab_size")
        self.pass_tokens = PASS_TOKENS  # length_groups' price of a pass (a benchmark sets it huge: one pass a batch)

    def describe(self) -> str:
        return f"{self.folder} on {self.provider} ({self.precision}), {self.task} with {len(self.labels)} labels"

    def check_tokenizer(self, tokenizer) -> None:
        """The tokenizer can do what this task's endpoint asks of it; also caps the context at its limit."""
        if self.per_token and not tokenizer.is_fast:
            raise ServeError(f"{self.folder}: /v1/ner maps sub-words back to words with a fast tokenizer's word ids; "
                             "save the model's tokenizer.json beside it")
        self.max_context = max_context(self.folder, tokenizer)

    def logits(self, rows: list[dict]) -> list[np.ndarray]:
        """float32 logits per row: (labels,) for seq-cls, (the row's tokens, labels) for token-cls; rows of very
        different lengths in passes of their own (length_groups)."""
        out: list = [None] * len(rows)
        for group in length_groups([len(r["input_ids"]) for r in rows], self.pass_tokens):
            # (n, labels), or (n, longest, labels) for token-cls
            scored = self._forward(pad_right([rows[i] for i in group], self.pad_id))
            for k, i in enumerate(group):
                out[i] = scored[k, :len(rows[i]["input_ids"])] if self.per_token else scored[k]
        return out

    def _forward(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError


def config_pad_id(folder: Path) -> int:
    """config.json's pad_token_id, 0 when it names none."""
    pad = json.loads((folder / MODEL_CONFIG).read_text()).get("pad_token_id")
    return pad if isinstance(pad, int) else 0


class OrtEncoderBackend(EncoderBackend):
    """An exported classifier (`lite-sft export` of a seq-cls or token-cls run: logits out) under onnxruntime."""

    def __init__(self, folder: str | Path, task: str, device: str = "auto", threads: int | None = None):
        folder = Path(folder)
        self.session = open_session(folder / ONNX_FILE, device, threads)
        self.inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        rank = 3 if TASKS[task].per_token else 2
        if not {"input_ids", "attention_mask"} <= self.inputs or "logits" not in outputs \
                or len(outputs["logits"].shape) != rank:
            raise ServeError(f"{folder / ONNX_FILE} is not a {task} classifier (inputs {sorted(self.inputs)}, outputs "
                             f"{sorted(outputs)}): export it with `lite-sft export` from a {task} run")
        fp16 = outputs["logits"].type == "tensor(float16)"
        super().__init__(task, folder, read_labels(folder, task), config_pad_id(folder), max_context(folder),
                         f"onnx-{folder.name}", onnx_precision(folder, fp16), self.session.get_providers()[0])
        width = outputs["logits"].shape[-1]
        if isinstance(width, int) and width != len(self.labels):
            raise ServeError(f"{folder / ONNX_FILE} gives {width} logits but config.json's id2label names "
                             f"{len(self.labels)} labels: re-export the model")

    def weight_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir() if ".onnx" in p.name)

    def _forward(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        if "token_type_ids" in self.inputs and "token_type_ids" not in batch:  # a tokenizer that gives none
            batch["token_type_ids"] = np.zeros_like(batch["input_ids"])
        feed = {name: value for name, value in batch.items() if name in self.inputs}
        return self.session.run(["logits"], feed)[0].astype(np.float32, copy=False)


class TorchEncoderBackend(EncoderBackend):
    """A Hugging Face classifier folder (OUT/merged) in eager PyTorch: the baseline the ONNX rows are measured against."""

    def __init__(self, model, folder: Path, task: str, precision: str):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        super().__init__(task, folder, read_labels(folder, task), config_pad_id(folder), max_context(folder),
                         "torch-merged", precision, f"torch {self.device.type}")

    @classmethod
    def from_folder(cls, folder: str | Path, task: str, device: str = "auto", dtype: str | None = None,
                    threads: int | None = None) -> "TorchEncoderBackend":
        import transformers

        folder, dev = Path(folder), pick_device(device)
        if threads:
            torch.set_num_threads(threads)
        precision = dtype or ("bf16" if dev.type == "cuda" else "fp32")
        auto = getattr(transformers, TASKS[task].auto_class)
        try:
            model = auto.from_pretrained(folder, dtype=DTYPES[precision]).to(dev)
        except (OSError, ValueError) as err:
            raise ServeError(f"could not load the PyTorch {task} model in {folder}: {err}") from err
        return cls(model, folder, task, precision)

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @torch.inference_mode()
    def _forward(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        inputs = {name: torch.from_numpy(value).to(self.device) for name, value in batch.items()}
        return self.model(**inputs).logits.float().cpu().numpy()
