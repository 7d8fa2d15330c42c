"""The parity gate for the classic tasks: seq-cls, token-cls and seq2seq.

    lite-sft export runs/sentiment --out exports/sentiment --quantize int8   # parity.json: merge, onnx, int8

The examples are the run's held-out validation rows, read as its task reads them (the task's eval_rows on
data.validation_path, or the seeded split its prepare makes) and collated by the task itself, so the gate
sees the inputs the run was validated on. What is compared, reference against candidate, with
parity.compare and the thresholds of the task's row (lite_sft/taskspec.py; agreement is the
`greedy_agreement` figure of parity.json):

  seq-cls    each example's label logits: one position per example, agreement = the same label
  token-cls  the label logits of every token of each example: agreement = the same label, token by token
  seq2seq    the reference greedily generates `new_tokens` from each source (EOS held back, so every
             example has as many positions); both then score that decoder sequence teacher-forced, and
             agreement = the same next token at each position. An ONNX candidate runs its encoder once and
             its decoder one token at a time through the cache, as generation does (the exporter's runner:
             exporters/torch_seq2seq.py's Runner, encode then step).

Each ONNX gate also runs the examples as one padded batch (seq2seq: the shortest and the longest source
together), as a server batches them, and judges every row with the same thresholds.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lite_sft.artifacts import CONFIG_FILE
from lite_sft.errors import ModelError
from lite_sft.taskspec import TASKS

from . import ExportError
from .parity import Reference

# What an encoder reads; a task's collate also returns its labels, which no model is given here.
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# How many examples the gate compares by default (a classifier is cheap to run, a generator is not), what its
# agreement counts and the thresholds it holds each precision to: the task's row in lite_sft/taskspec.py.


@dataclass
class TaskReference:
    """What the reference model did on the held-out examples, and the inputs to run every candidate on."""

    task: str
    inputs: list[dict]
    """Each example's encoder inputs: input_ids, attention_mask (and token_type_ids), each (1, length)."""
    logits: list[torch.Tensor]
    """seq-cls (1, labels); token-cls (length, labels); seq2seq (1 + new tokens, vocab), teacher-forced."""
    decoder_ids: list[torch.Tensor] = field(default_factory=list)
    """seq2seq: each (1, 1 + new tokens), the decoder start token and the reference's greedy tokens."""
    batch_rows: list[int] = field(default_factory=list)
    """The examples the batched check runs together."""
    batch: dict = field(default_factory=dict)
    """Their inputs, padded into one batch by the task's collate."""

    @property
    def generates(self) -> bool:
        """seq2seq: the reference generated a continuation, which every candidate scores teacher-forced."""
        return TASKS[self.task].generates

    def as_reference(self) -> Reference:
        """For parity.compare: every position of each example is compared (its `prompt` is one position)."""
        sequences = self.decoder_ids or [inputs["input_ids"] for inputs in self.inputs]
        return Reference(sequences, [1] * len(self.logits), self.logits)

    def lengths(self, rows: list[int]) -> list[int]:
        return [self.inputs[i]["input_ids"].shape[1] for i in rows]


def held_out_rows(task, run_dir: Path, cfg, tokenizer, n: int) -> tuple[list, str]:
    """The first `n` held-out rows, as the run's task reads them, and where they came from. A run that held
    nothing out is compared on its first training rows (the gate checks the export, not the model's skill)."""
    d = cfg.data
    try:
        if d.validation_path:
            rows = task.eval_rows(cfg, tokenizer, d.validation_path, run_dir)
            source = f"validation data {d.validation_path}"
        else:
            data = task.prepare(cfg, tokenizer)
            rows, source = data.validation, (f"held-out split of {d.path} (fraction {d.validation_fraction}, "
                                             f"seed {cfg.train.seed})")
            if not rows:
                rows, source = data.train, f"training examples of {d.path} (the run held out no validation data)"
    except (OSError, ValueError, ModelError) as err:  # the project's DataError and ConfigError are ValueErrors
        where = d.validation_path or d.path
        raise ExportError(f"the parity gate compares on the run's held-out examples, but {where} (the data in "
                          f"{Path(run_dir) / CONFIG_FILE}) cannot be read: {err}. Put the data back where the "
                          "run read it") from err
    rows = [row for row in rows if len(row)][:n]
    if not rows:
        raise ExportError(f"{d.validation_path or d.path} gives the parity gate no example to compare on")
    return rows, source


@torch.no_grad()
def make_reference(model, task, rows: list, tokenizer, new_tokens: int, generation=None) -> TaskReference:
    """Run `model` (PyTorch: the adapter model or the merged one) on each row alone. seq2seq also generates
    `new_tokens` greedy tokens from each source, with the run's `generation` settings' special ids."""
    model.eval()
    ref = TaskReference(task.name, [_inputs(task.collate([row], tokenizer)) for row in rows], [])
    if ref.generates:
        gen = copy.deepcopy(generation)
        gen.update(max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=1, do_sample=False)
        ref.decoder_ids = [model.generate(**inputs, generation_config=gen) for inputs in ref.inputs]
        # Two rows of different lengths, so the shorter source is padded: the shortest and the longest.
        order = sorted(range(len(rows)), key=lambda i: (len(rows[i].input_ids), i))
        ref.batch_rows = [order[0], order[-1]] if len(order) > 1 else order
    else:
        ref.batch_rows = list(range(len(rows)))
    ref.batch = _inputs(task.collate([rows[i] for i in ref.batch_rows], tokenizer))
    ref.logits = torch_logits(model, ref)
    return ref


@torch.no_grad()
def torch_logits(model, ref: TaskReference) -> list[torch.Tensor]:
    """A PyTorch model's logits on each reference example alone."""
    model.eval()
    if ref.generates:
        return [model(**inputs, decoder_input_ids=ids, use_cache=False).logits[0].float()
                for inputs, ids in zip(ref.inputs, ref.decoder_ids)]
    return [_per_example(model(**inputs).logits.float(), 0, inputs) for inputs in ref.inputs]


@torch.no_grad()
def ort_logits(ort_model, ref: TaskReference) -> list[torch.Tensor]:
    """The exported model's logits on each reference example alone: `ort_model` is the runner its exporter's
    open() gives (seq-cls, token-cls: called as runner(**inputs).logits; seq2seq: encode and step through the
    decoder's cache, _ort_decode)."""
    if ref.generates:
        return [_ort_decode(ort_model, inputs, ids)[0] for inputs, ids in zip(ref.inputs, ref.decoder_ids)]
    return [_per_example(ort_model(**inputs).logits.float(), 0, inputs) for inputs in ref.inputs]


@torch.no_grad()
def ort_batch_logits(ort_model, ref: TaskReference) -> list[torch.Tensor]:
    """ort_logits for ref.batch_rows run as one padded batch; each row cut back to its own length."""
    rows = ref.batch_rows
    if ref.generates:
        # Every decoder sequence has 1 + new_tokens ids (make_reference holds EOS back), so they stack.
        logits = _ort_decode(ort_model, ref.batch, torch.cat([ref.decoder_ids[i] for i in rows]))
        return [logits[b] for b in range(len(rows))]
    logits = ort_model(**ref.batch).logits.float()
    return [_per_example(logits, b, ref.inputs[i]) for b, i in enumerate(rows)]


def _inputs(batch: dict) -> dict:
    return {name: batch[name] for name in INPUTS if name in batch}


def _per_example(logits: torch.Tensor, row: int, inputs: dict) -> torch.Tensor:
    """One example's logits out of a batch's: seq-cls's (batch, labels) give (1, labels); token-cls's
    (batch, sequence, labels) its own tokens (length, labels)."""
    if logits.dim() == 2:
        return logits[row:row + 1]
    return logits[row, :inputs["input_ids"].shape[1]]


def _ort_decode(runner, inputs: dict, decoder_ids: torch.Tensor) -> torch.Tensor:
    """The exported encoder-decoder teacher-forced as generation drives it: the encoder once, then the decoder
    one token per call on its cache (the runner of exporters/torch_seq2seq.py). (batch, decoder length, vocab)"""
    mask = inputs["attention_mask"]
    cache = runner.encode(inputs["input_ids"], mask)
    steps = []
    for t in range(decoder_ids.shape[1]):
        logits, cache = runner.step(decoder_ids[:, t:t + 1], mask, cache)
        steps.append(logits)
    return torch.cat(steps, dim=1)
