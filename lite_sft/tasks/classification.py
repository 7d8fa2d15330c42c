"""Read sequence-classification data (a text, or a text pair, and a label) from CSV, TSV or JSONL.

    train, labels = read_classification("sst2/train.tsv", text_column="sentence")
    dev, _ = read_classification("sst2/dev.tsv", text_column="content", label_map=labels)
    train[0]            # ClassificationRecord(where='sst2/train.tsv line 2', text='hide new ...', label=0)

The training file builds the label mapping (labels.py: integer ids kept, names sorted); every other
file applies it, so a label the training data never had is an error, not a new class. Columns are
named per file: SST-2's train.tsv calls its text `sentence` and its dev.tsv `content`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lite_sft.config import setting as named  # class_weights' parameter `setting` is the user's value
from lite_sft.errors import ConfigError, ModelError
from lite_sft.tasks.base import Task, TaskData, all_sum, gather, max_tokens
from lite_sft.tasks.labels import LabelMap, build_label_map, label_kwargs, load_labels, parse_label, save_labels
from lite_sft.tasks.metrics import classification_metrics
from lite_sft.tasks.split import held_out
from lite_sft.tasks.table import read_table, text_field


@dataclass
class ClassificationRecord:
    where: str
    """The file and line: "train.tsv line 3"."""
    text: str
    label: int
    """The id under the file's LabelMap."""
    text_pair: str | None = None
    """The second text of a pair task (NLI, paraphrase), when `pair_column` is set."""


def read_classification(path: str | Path, *, text_column: str = "text", label_column: str = "label",
                        pair_column: str | None = None,
                        label_map: LabelMap | None = None) -> tuple[list[ClassificationRecord], LabelMap]:
    """Read one file; without `label_map` it is training data and builds the mapping, else the map is applied.

    Returns the records and the mapping they use (the one given, or the one built).
    """
    table = read_table(path)
    table.require(text_column, "task.text_column")
    if pair_column is not None:
        table.require(pair_column, "task.text_pair_column")
    table.require(label_column, "task.label_column")
    raw = [(row.where, row.fields.get(label_column)) for row in table.rows]
    if label_map is None:
        label_map = build_label_map(raw, table.name, label_column)
    records = []
    for row, (where, value) in zip(table.rows, raw):
        label = label_map.encode(parse_label(value, where, label_column), where, label_column)
        pair = text_field(row, pair_column) if pair_column is not None else None
        records.append(ClassificationRecord(where, text_field(row, text_column), label, pair))
    return records, label_map


@dataclass
class ClassificationRow:
    """One tokenised example: what the model reads, and its label id."""

    input_ids: list[int]
    label: int
    token_type_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def class_weights(setting: str, labels: list[int], n_classes: int) -> list[float] | None:
    """The loss weight of each label id: None for `none`; `balanced` weighs class c by n / (classes x n_c),
    scikit-learn's rule, so rare classes count as much in total as common ones; else the given list."""
    if setting == "none":
        return None
    if setting == "balanced":
        counts = [labels.count(c) for c in range(n_classes)]
        return [len(labels) / (n_classes * count) if count else 0.0 for count in counts]

    weights = [float(w) for w in setting.split(",")]
    if len(weights) != n_classes:
        raise ConfigError(f"{named('task.class_weights')} gives {len(weights)} weights for {n_classes} labels; give one per "
                          "label id, in id order")
    return weights


class SequenceClassificationTask(Task):
    """seq-cls: a text (or a text pair) to one of a fixed set of labels, with a fresh classification head."""

    name = "seq-cls"
    head_names = ("classifier", "score")  # BERT-style encoders, and decoders' sequence-classification heads
    unit_name = "examples"

    def __init__(self):
        self.weights: list[float] | None = None
        self.labels: LabelMap | None = None

    def model_kwargs(self, data: TaskData) -> dict:
        return label_kwargs(data.labels)

    def saved_model_kwargs(self, run_dir) -> dict:
        labels = load_labels(run_dir)
        if labels is None:
            raise ModelError(f"{run_dir} has no labels.json: it was not written by `lite-sft tune --task {self.name}`")
        return label_kwargs(labels)

    def prepare(self, cfg, tokenizer) -> TaskData:
        k, d = cfg.task, cfg.data
        records, labels = read_classification(d.path, text_column=k.text_column, label_column=k.label_column,
                                              pair_column=k.text_pair_column)
        rule = held_out(d, cfg.train.seed)
        if rule.kind == "file":
            held, _ = read_classification(rule.path, text_column=k.validation_text_column or k.text_column,
                                          label_column=k.label_column, pair_column=k.text_pair_column,
                                          label_map=labels)
        else:
            records, held = rule.split(records)
        self.labels = labels
        self.weights = class_weights(k.class_weights, [r.label for r in records], len(labels.names))
        limit = max_tokens(cfg, tokenizer)
        train, cut = self.tokenize(records, tokenizer, limit)
        validation, cut_val = self.tokenize(held, tokenizer, limit)
        counts = ", ".join(f"{name} {sum(r.label == i for r in records)}" for i, name in enumerate(labels.names))
        summary = (f"{len(train)} train / {len(validation)} validation examples, {len(labels.names)} labels ({counts}); "
                   f"{cut + cut_val} truncated to {limit} tokens")
        return TaskData(train, validation, "classification", summary, (len(train), len(validation)), labels=labels)

    def write_run_files(self, run_dir, cfg, tokenizer, model, data: TaskData) -> None:
        save_labels(run_dir, data.labels)

    def eval_rows(self, cfg, tokenizer, path: str, run_dir) -> list:
        self.labels = load_labels(run_dir)
        if self.labels is None:
            raise ModelError(f"{run_dir} has no labels.json: it was not written by `lite-sft tune --task {self.name}`")
        k = cfg.task
        records, _ = read_classification(path, text_column=k.validation_text_column or k.text_column,
                                         label_column=k.label_column, pair_column=k.text_pair_column,
                                         label_map=self.labels)
        return self.tokenize(records, tokenizer, max_tokens(cfg, tokenizer))[0]

    @staticmethod
    def tokenize(records: list[ClassificationRecord], tokenizer, max_len: int) -> tuple[list[ClassificationRow], int]:
        rows, truncated = [], 0
        for r in records:
            full = tokenizer(r.text, r.text_pair, truncation=False, verbose=False)
            enc = tokenizer(r.text, r.text_pair, truncation=True, max_length=max_len) if len(full["input_ids"]) > max_len else full
            truncated += enc is not full
            rows.append(ClassificationRow(list(enc["input_ids"]), r.label, enc.get("token_type_ids")))
        return rows, truncated

    def collate(self, rows: list[ClassificationRow], tokenizer) -> dict:
        import torch

        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id
        batch = {"input_ids": torch.tensor([r.input_ids + [pad] * (width - len(r)) for r in rows]),
                 "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
                 "labels": torch.tensor([r.label for r in rows])}
        if rows[0].token_type_ids is not None:
            batch["token_type_ids"] = torch.tensor([r.token_type_ids + [0] * (width - len(r)) for r in rows])
        return batch

    def units(self, batch: dict) -> float:
        if self.weights is None:
            return len(batch["labels"])
        return float(sum(self.weights[i] for i in batch["labels"].tolist()))

    def logits(self, model, batch: dict, device):
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        return model(**inputs).logits.float()  # (batch, labels)

    def loss_sum(self, model, batch: dict, device, loss_impl: str = "full", chunk: int = 0):
        return self._loss(self.logits(model, batch, device), batch["labels"].to(device))

    def _loss(self, logits, labels):
        """Cross-entropy summed over the examples, each weighted by its class's weight when there are weights."""
        import torch
        import torch.nn.functional as F

        ce = F.cross_entropy(logits, labels, reduction="none")
        if self.weights is None:
            return ce.sum()
        return (ce * torch.tensor(self.weights, device=logits.device)[labels]).sum()

    def evaluate(self, model, rows: list, tokenizer, accelerator, micro_batch_size: int,
                 loss_impl: str = "full", chunk: int = 0) -> dict:
        import torch

        model.eval()
        total, units, predicted, truth = 0.0, 0.0, [], []
        with torch.no_grad():
            for _, batch in self.shard_batches(rows, tokenizer, accelerator, micro_batch_size):
                with accelerator.autocast():
                    logits = self.logits(model, batch, accelerator.device)
                total += float(self._loss(logits, batch["labels"].to(accelerator.device)))
                units += self.units(batch)
                predicted += logits.argmax(-1).tolist()
                truth += batch["labels"].tolist()
        predicted, truth = gather(accelerator, predicted), gather(accelerator, truth)
        metrics = classification_metrics(truth, predicted, self.labels.names)
        return {"val_loss": all_sum(accelerator, total) / max(all_sum(accelerator, units), 1e-9), **metrics}


TASK = SequenceClassificationTask  # what lite_sft.tasks.base.get_task builds for the row of taskspec.TASKS naming this module
