"""token-cls: a tag for each word (named entities) with an encoder and a fresh token-classification head.

    lite-sft tune --task token-cls --model bert-base-cased --data conll2003/train.txt --tag-column 1 \
        --validation-data conll2003/valid.txt --output-dir runs/ner
    lite-sft eval runs/ner --data conll2003/test.txt     # entity-level precision / recall / F1, per type

Reading, tags and the alignment between words and sub-tokens are in ner.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lite_sft.errors import ModelError
from lite_sft.tasks.base import IGNORE_INDEX, Task, TaskData, all_sum, gather, is_decoder_only, max_tokens
from lite_sft.tasks.labels import LabelMap, label_kwargs, load_labels, save_labels
from lite_sft.tasks.iob import entities
from lite_sft.tasks.metrics import entity_metrics
from lite_sft.tasks.ner import (TaggedSentence, align_labels, build_tag_map, encode_tags, read_ner,
                                word_predictions)
from lite_sft.tasks.split import held_out


@dataclass
class TokenRow:
    """One tokenised sentence: what the model reads and is trained on, and what evaluation reads back."""

    input_ids: list[int]
    labels: list[int]
    """One per sub-token: its word's tag id on the word's first sub-token, IGNORE_INDEX elsewhere."""
    word_ids: list[int | None]
    tags: list[int]
    """Every word's tag id, words cut off by truncation included: evaluation scores whole sentences."""
    token_type_ids: list[int] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def prefix_space_for_words(tokenizer) -> None:
    """Make a byte-level BPE tokenizer (RoBERTa, GPT-2 style) read pre-split words as it reads running text.

    Byte-level BPE learns a word with the space before it ("Ġvisited"); words handed over one by one have
    none unless the pre-tokenizer adds it, and transformers turns that off unless the tokenizer is loaded
    with add_prefix_space=True (RoBERTa's tokenizer refuses is_split_into_words without it). This sets it in
    place, as that argument would, so the tokenizer the run directory saves reads words the same way later.
    WordPiece and SentencePiece pre-tokenizers have no such setting and are left as they are.
    """
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    if pre is None or "add_prefix_space" not in json.loads(pre.__getstate__()):
        return
    pre.add_prefix_space = True
    tokenizer.add_prefix_space = True
    tokenizer.init_kwargs["add_prefix_space"] = True  # what save_pretrained writes to tokenizer_config.json


def tokenize_sentences(sentences: Sequence[TaggedSentence], tag_map: LabelMap, tokenizer,
                       max_len: int) -> tuple[list[TokenRow], int]:
    """Rows for `sentences` (a tag `tag_map` lacks is a DataError naming its line) and how many were truncated."""
    tags = [encode_tags(s, tag_map) for s in sentences]
    rows, truncated = [], 0
    for start in range(0, len(sentences), 1024):  # in batches, which the fast tokenizer encodes in parallel
        enc = tokenizer([s.tokens for s in sentences[start:start + 1024]], is_split_into_words=True,
                        truncation=True, max_length=max_len)
        for i, encoding in enumerate(enc.encodings):
            word_tags = tags[start + i]
            truncated += bool(encoding.overflowing)
            type_ids = encoding.type_ids if "token_type_ids" in enc else None
            rows.append(TokenRow(encoding.ids, align_labels(encoding.word_ids, word_tags), encoding.word_ids,
                                 word_tags, type_ids))
    return rows, truncated


class TokenClassificationTask(Task):
    """token-cls: a tag per word (named entities) from an encoder with a fresh token-classification head.

    The loss is cross-entropy summed over the labelled sub-tokens (each word's first). Evaluation reads one
    tag per word back from that sub-token and scores entities under IOB2 with conlleval's rules (micro and
    per type). A word with no sub-token (cut off by truncation) counts as predicted O, so its entity is
    missed rather than dropped from the score; `unread_words` says how many there were.
    """

    name = "token-cls"
    head_names = ("classifier", "score")  # what transformers names the head: `classifier` in encoders
    unit_name = "labelled_tokens"

    def __init__(self):
        self.labels: LabelMap | None = None

    def check_model(self, config, name: str) -> None:
        if is_decoder_only(config):
            raise ModelError(f"{name} is a causal language model ({config.model_type}): it reads left to right, so "
                             "each word's tag would be predicted without the words after it; use an encoder for "
                             "token-cls (BERT, RoBERTa, DeBERTa)")

    def model_kwargs(self, data: TaskData) -> dict:
        return label_kwargs(data.labels)

    def saved_model_kwargs(self, run_dir) -> dict:
        return label_kwargs(self._saved_labels(run_dir))

    def prepare(self, cfg, tokenizer) -> TaskData:
        d = cfg.data
        sentences = self.read(d.path, cfg)
        labels = build_tag_map(sentences, d.path)
        rule = held_out(d, cfg.train.seed)
        if rule.kind == "file":
            held = self.read(rule.path, cfg)
        else:
            sentences, held = rule.split(sentences)
        self.labels = labels
        train, cut = self.tokenize(sentences, tokenizer, cfg)
        validation, cut_val = self.tokenize(held, tokenizer, cfg)
        found = [kind for s in sentences for kind, _, _ in entities(s.tags)]
        counts = ", ".join(f"{kind} {found.count(kind)}" for kind in sorted(set(found)))
        labelled = sum(len(r) - r.labels.count(IGNORE_INDEX) for r in train)
        summary = (f"{len(train)} train / {len(validation)} validation sentences, {labelled} labelled tokens, "
                   f"entities {counts}; {cut + cut_val} sentences truncated to {max_tokens(cfg, tokenizer)} tokens "
                   "(their cut-off words count as predicted O in evaluation)")
        kind = "jsonl" if Path(d.path).suffix.lower() == ".jsonl" else "conll"
        return TaskData(train, validation, kind, summary, (len(train), len(validation)), labels=labels)

    def write_run_files(self, run_dir, cfg, tokenizer, model, data: TaskData) -> None:
        save_labels(run_dir, data.labels)

    def eval_rows(self, cfg, tokenizer, path: str, run_dir) -> list:
        self.labels = self._saved_labels(run_dir)
        return self.tokenize(self.read(path, cfg), tokenizer, cfg)[0]

    @staticmethod
    def read(path: str, cfg) -> list[TaggedSentence]:
        k = cfg.task
        return read_ner(path, tag_column=k.tag_column, tokens_key=k.tokens_key, tags_key=k.tags_key,
                        scheme=k.tag_scheme)

    def tokenize(self, sentences: list[TaggedSentence], tokenizer, cfg) -> tuple[list[TokenRow], int]:
        if not tokenizer.is_fast:
            raise ModelError(f"{type(tokenizer).__name__} is a slow (Python) tokenizer; token-cls needs a fast one, "
                             "which says which word each sub-token belongs to: use a model that ships tokenizer.json")
        prefix_space_for_words(tokenizer)
        return tokenize_sentences(sentences, self.labels, tokenizer, max_tokens(cfg, tokenizer))

    def _saved_labels(self, run_dir) -> LabelMap:
        labels = load_labels(run_dir)
        if labels is None:
            raise ModelError(f"{run_dir} has no labels.json: it was not written by `lite-sft tune --task {self.name}`")
        return labels

    def collate(self, rows: list[TokenRow], tokenizer) -> dict:
        """Pad to the longest row: ids with the pad id, labels with IGNORE_INDEX, attention mask 0 there.

            rows    [2, 4, 5, 3] labels [-100, 1, 0, -100];  [2, 6, 3] labels [-100, 0, -100];  pad id 0
            ->      input_ids [[2, 4, 5, 3], [2, 6, 3, 0]]  labels [[-100, 1, 0, -100], [-100, 0, -100, -100]]
                    attention_mask [[1, 1, 1, 1], [1, 1, 1, 0]]  (and token_type_ids, 0-padded, when the rows have them)
        """
        import torch

        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id

        def padded(values, fill):
            return [list(v) + [fill] * (width - len(v)) for v in values]

        batch = {"input_ids": torch.tensor(padded([r.input_ids for r in rows], pad)),
                 "attention_mask": torch.tensor(padded([[1] * len(r) for r in rows], 0)),
                 "labels": torch.tensor(padded([r.labels for r in rows], IGNORE_INDEX))}
        if rows[0].token_type_ids is not None:
            batch["token_type_ids"] = torch.tensor(padded([r.token_type_ids for r in rows], 0))
        return batch

    def units(self, batch: dict) -> float:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def logits(self, model, batch: dict, device):
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        return model(**inputs).logits.float()  # (batch, seq, tags)

    def loss_sum(self, model, batch: dict, device, loss_impl: str = "full", chunk: int = 0):
        return _loss(self.logits(model, batch, device), batch["labels"].to(device))

    def evaluate(self, model, rows: list, tokenizer, accelerator, micro_batch_size: int,
                 loss_impl: str = "full", chunk: int = 0) -> dict:
        import torch

        names = self.labels.names
        model.eval()
        total, units, unread, predicted, truth = 0.0, 0, 0, [], []
        with torch.no_grad():
            for part, batch in self.shard_batches(rows, tokenizer, accelerator, micro_batch_size):
                with accelerator.autocast():
                    logits = self.logits(model, batch, accelerator.device)
                total += float(_loss(logits, batch["labels"].to(accelerator.device)))
                units += self.units(batch)
                for row, ids in zip(part, logits.argmax(-1).tolist()):
                    per_token = [names[t] for t in ids[:len(row)]]
                    predicted.append(word_predictions(row.word_ids, per_token, len(row.tags), fill="O"))
                    truth.append([names[t] for t in row.tags])
                    unread += len(row.tags) - len({w for w in row.word_ids if w is not None})
        predicted, truth = gather(accelerator, predicted), gather(accelerator, truth)
        metrics = entity_metrics(truth, predicted)
        return {"val_loss": all_sum(accelerator, total) / max(all_sum(accelerator, units), 1), **metrics,
                "unread_words": all_sum(accelerator, unread)}


def _loss(logits, labels):
    """Cross-entropy summed over the labelled sub-tokens (the loop divides by their count over the step)."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


TASK = TokenClassificationTask  # what lite_sft.tasks.base.get_task builds for the row of taskspec.TASKS naming this module
