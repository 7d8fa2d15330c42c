"""Token classification (NER): read CoNLL or JSONL, map tags to ids, move labels between words and sub-words.

    train = read_ner("conll2003/train.txt", tag_column=1) # lines "EU B-ORG 0"; [TaggedSentence(where, tokens, tags)]
    tag_map = build_tag_map(train, "conll2003/train.txt") # O, then B-/I- of every entity type
    enc = tokenizer(train[0].tokens, is_split_into_words=True, truncation=True, max_length=128)
    labels = align_labels(enc.word_ids(), encode_tags(train[0], tag_map))   # -100 off the words' first tokens

    # serving: text -> words -> model -> one tag per word -> character spans
    words, offsets = split_words("Peter Blackburn visited Brussels")
    tags = word_predictions(enc.word_ids(), [tag_map.names[i] for i in predicted_ids], len(words), fill="O")
    entity_spans(text, offsets, tags, scores)  # [{"entity": "PER", "start": 0, "end": 15, "text": ..., "score": ...}]

Only a word's first sub-token is trained and read back (the convention of BERT's NER recipe and of
transformers' token-classification examples), so training and prediction look at the same token.

The task behind `lite-sft tune --task token-cls` (TokenClassificationTask) is at the end:

    lite-sft tune --task token-cls --model bert-base-cased --data conll2003/train.txt --tag-column 1 \
        --validation-data conll2003/valid.txt --output-dir runs/ner
    lite-sft eval runs/ner --data conll2003/test.txt     # entity-level precision / recall / F1, per type
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from lite_sft.tasks.base import IGNORE_INDEX, DataError, Task, TaskData
from lite_sft.tasks.iob import entities, iob1_to_iob2, iob2_error, split_tag
from lite_sft.tasks.labels import LabelMap, load_labels, save_labels
from lite_sft.tasks.table import read_table

CONLL_SUFFIXES = (".txt", ".conll", ".iob", ".bio", ".tsv")
SCHEMES = ("iob2", "iob1")


@dataclass
class TaggedSentence:
    where: str
    """The file and the sentence's first line: "train.txt line 3"."""
    tokens: list[str]
    tags: list[str]
    """IOB2 tags, one per token."""
    lines: list[int] | None = None
    """For CoNLL files, each token's line, so later errors can point at it."""

    def token_where(self, i: int) -> str:
        if self.lines is None:
            return f"{self.where} token {i} ({self.tokens[i]!r})"
        return f"{self.where.rsplit(' line ', 1)[0]} line {self.lines[i]} ({self.tokens[i]!r})"


def read_ner(path: str | Path, *, tag_column: int = -1, tokens_key: str = "tokens", tags_key: str = "tags",
             scheme: str = "iob2", tag_names: Sequence[str] | None = None) -> list[TaggedSentence]:
    """Read a CoNLL file (`token ... tag` a line, blank line between sentences) or JSONL (`tokens`, `tags` lists).

    `tag_column` picks the CoNLL column holding the tag (default the last). `scheme="iob1"` converts
    IOB1 tags to IOB2; with the default, tags must already be IOB2 and a stray I- is an error.
    `tag_names` names JSONL tags given as integer ids (as Hugging Face's conll2003 stores them).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown tag scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    p, name = Path(path), str(path)
    if p.suffix.lower() == ".jsonl":
        sentences = _jsonl(p, tokens_key, tags_key, tag_names)
    elif p.suffix.lower() in CONLL_SUFFIXES:
        if not p.is_file():
            raise DataError(f"{name}: file not found")
        sentences = _conll(p, name, tag_column)
    else:
        raise DataError(f"{name}: unsupported file type {p.suffix or '(none)'!r}; use .jsonl or a CoNLL file "
                        f"({', '.join(CONLL_SUFFIXES)})")
    if not sentences:
        raise DataError(f"{name}: no sentences; the file is empty")
    for sentence in sentences:
        for i, tag in enumerate(sentence.tags):
            try:
                split_tag(tag)
            except ValueError as err:
                raise DataError(f"{sentence.token_where(i)}: {err}; check tag_column / tags_key") from None
        if scheme == "iob1":
            sentence.tags = iob1_to_iob2(sentence.tags)
        problem = iob2_error(sentence.tags)
        if problem is not None:
            i, reason = problem
            raise DataError(f"{sentence.token_where(i)}: {reason}")
    return sentences


def build_tag_map(sentences: Sequence[TaggedSentence], name: str) -> LabelMap:
    """O, then B- and I- of each entity type in sorted order: both, even if the data only shows B-X,
    so an evaluation file's multi-token X entity is not an unknown tag."""
    kinds = sorted({split_tag(tag)[1] for s in sentences for tag in s.tags} - {""})
    if not kinds:
        raise DataError(f"{name}: every tag is O, so there are no entities to learn; check tag_column / tags_key")
    return LabelMap(("O", *(f"{prefix}-{kind}" for kind in kinds for prefix in "BI")))


def encode_tags(sentence: TaggedSentence, tag_map: LabelMap) -> list[int]:
    """Tag ids for one sentence; a tag the training data never had is a DataError naming its line."""
    return [tag_map.encode(tag, sentence.token_where(i), "tags") for i, tag in enumerate(sentence.tags)]


def align_labels(word_ids: Sequence[int | None], word_labels: Sequence[int]) -> list[int]:
    """One label per sub-token: the word's label on its first sub-token, IGNORE_INDEX elsewhere.

        tokens       [CLS]  peter  black  ##burn  visited  [SEP]
        word_ids     None   0      1      1       2        None
        word_labels         3      4              0               (B-PER, I-PER, O in build_tag_map's ids)
        ->           -100   3      4      -100    0        -100

    `word_ids` is a fast tokenizer's `encoding.word_ids()` for words given with is_split_into_words=True.
    Truncation-safe: words cut off the end simply get no token; a word cut in the middle keeps its
    label on the first sub-token, which is still there. One window per sentence: with overflowing
    windows (stride), a window that starts inside a word would label that word's continuation.
    """
    labels, previous = [], None
    for word in word_ids:
        if word is None or word == previous:
            labels.append(IGNORE_INDEX)
        elif not 0 <= word < len(word_labels):
            raise ValueError(f"word id {word} but only {len(word_labels)} word labels; tokenize the same words "
                             "the labels belong to")
        else:
            labels.append(word_labels[word])
        previous = word
    return labels


T = TypeVar("T")


def word_predictions(word_ids: Sequence[int | None], token_predictions: Sequence[T], num_words: int,
                     fill: T) -> list[T]:
    """Back from sub-tokens to words: each word takes its first sub-token's prediction (the one trained).

    `fill` stands in for words with no token (cut off by truncation, or tokenised to nothing).
    """
    if len(word_ids) != len(token_predictions):
        raise ValueError(f"{len(word_ids)} word ids but {len(token_predictions)} token predictions; "
                         "pass the predictions of the same encoding")
    words: list[Any] = [fill] * num_words
    previous = None
    for word, prediction in zip(word_ids, token_predictions):
        if word is not None and word != previous:
            words[word] = prediction
        previous = word
    return words


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Whitespace-separated words and their (start, end) character offsets, for is_split_into_words."""
    found = list(re.finditer(r"\S+", text))
    return [m.group() for m in found], [m.span() for m in found]


def entity_spans(text: str, word_offsets: Sequence[tuple[int, int]], tags: Sequence[str],
                 scores: Sequence[float] | None = None) -> list[dict[str, Any]]:
    """Entities as character spans of `text`: {"entity", "start", "end", "text"} and, with `scores`, "score".

    `tags` holds one predicted tag per word and `word_offsets` each word's (start, end) in `text`.
    Entities are read with conlleval's rules (iob.entities), as the metrics read them, so an I-X
    after O is an entity here too. An entity's score is the mean of its words' scores.
    """
    if len(word_offsets) != len(tags) or (scores is not None and len(scores) != len(tags)):
        raise ValueError(f"{len(tags)} tags, {len(word_offsets)} word offsets"
                         + ("" if scores is None else f" and {len(scores)} scores") + "; give one of each per word")
    spans = []
    for kind, first, last in entities(tags):
        start, end = word_offsets[first][0], word_offsets[last - 1][1]
        span: dict[str, Any] = {"entity": kind, "start": start, "end": end, "text": text[start:end]}
        if scores is not None:
            span["score"] = sum(scores[first:last]) / (last - first)
        spans.append(span)
    return spans


def _conll(p: Path, name: str, tag_column: int) -> list[TaggedSentence]:
    sentences: list[TaggedSentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    lines: list[int] = []

    def end_sentence():
        if tokens:
            sentences.append(TaggedSentence(f"{name} line {lines[0]}", tokens.copy(), tags.copy(), lines.copy()))
            tokens.clear(), tags.clear(), lines.clear()

    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            fields = line.split()
            if not fields or fields[0] == "-DOCSTART-":  # document markers carry no tokens
                end_sentence()
                continue
            if len(fields) < 2:
                raise DataError(f"{name} line {n}: one field {fields[0]!r}, but a CoNLL line is `token ... tag` "
                                "separated by whitespace; add the tag (a blank line ends a sentence)")
            try:
                tag = fields[tag_column]
            except IndexError:
                raise DataError(f"{name} line {n}: no column {tag_column} (tag_column) in a line of "
                                f"{len(fields)} columns; set tag_column to the tag's column") from None
            try:
                split_tag(tag)
            except ValueError as err:
                raise DataError(f"{name} line {n}: {err}{_tag_column_hint(fields, tag_column)}") from None
            tokens.append(fields[0])
            tags.append(tag)
            lines.append(n)
    end_sentence()
    return sentences


def _tag_column_hint(fields: list[str], tag_column: int) -> str:
    """Point at the column that holds a tag when tag_column picked another (`token TAG 0` files)."""
    for i, value in enumerate(fields[1:], start=1):
        try:
            split_tag(value)
        except ValueError:
            continue
        return (f"; tag_column={tag_column} reads {fields[tag_column]!r} of {' '.join(fields)!r}, but column {i} "
                f"holds {value!r}: set tag_column={i} (columns count from 0)")
    return "; set tag_column to the column that holds the IOB2 tag"


def _jsonl(p: Path, tokens_key: str, tags_key: str, tag_names: Sequence[str] | None) -> list[TaggedSentence]:
    table = read_table(p)
    table.require(tokens_key, "tokens_key")
    table.require(tags_key, "tags_key")
    sentences = []
    for row in table.rows:
        tokens, tags = row.fields[tokens_key], row.fields[tags_key]
        for key, values in ((tokens_key, tokens), (tags_key, tags)):
            if not isinstance(values, list) or not values:
                raise DataError(f"{row.where}: field {key!r} must be a non-empty list, got {values!r:.60}")
        if len(tokens) != len(tags):
            raise DataError(f"{row.where}: {len(tokens)} {tokens_key} but {len(tags)} {tags_key}; "
                            "give exactly one tag per token")
        for i, token in enumerate(tokens):
            if not isinstance(token, str) or not token.strip():
                raise DataError(f"{row.where}: {tokens_key}[{i}] must be a non-empty string, got {token!r:.60}")
        sentences.append(TaggedSentence(row.where, tokens, [_tag(row.where, tags_key, i, t, tag_names)
                                                            for i, t in enumerate(tags)]))
    return sentences


def _tag(where: str, key: str, i: int, tag: object, tag_names: Sequence[str] | None) -> str:
    if isinstance(tag, str):
        return tag
    if isinstance(tag, int) and not isinstance(tag, bool):
        if tag_names is None:
            raise DataError(f"{where}: {key}[{i}] is the id {tag}; pass tag_names (the tag of each id, in order) "
                            "to read tags given as ids")
        if 0 <= tag < len(tag_names):
            return tag_names[tag]
        raise DataError(f"{where}: {key}[{i}] is the id {tag}, but tag_names has {len(tag_names)} names")
    raise DataError(f"{where}: {key}[{i}] must be a tag name (or an id with tag_names), got {tag!r:.60}")


# --- the token-cls task ------------------------------------------------------------------------------

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
    peft_task_type = "TOKEN_CLS"
    auto_class = "AutoModelForTokenClassification"
    head_names = ("classifier", "score")  # what transformers names the head: `classifier` in encoders
    unit_name = "labelled_tokens"

    def __init__(self):
        self.labels: LabelMap | None = None

    def check_model(self, config, name: str) -> None:
        from lite_sft.model import ModelError
        from lite_sft.tasks.base import is_decoder_only

        if is_decoder_only(config):
            raise ModelError(f"{name} is a causal language model ({config.model_type}): it reads left to right, so "
                             "each word's tag would be predicted without the words after it; use an encoder for "
                             "token-cls (BERT, RoBERTa, DeBERTa)")

    def model_kwargs(self, data: TaskData) -> dict:
        from lite_sft.tasks.classification import label_kwargs

        return label_kwargs(data.labels)

    def saved_model_kwargs(self, run_dir) -> dict:
        from lite_sft.tasks.classification import label_kwargs

        return label_kwargs(self._saved_labels(run_dir))

    def prepare(self, cfg, tokenizer) -> TaskData:
        from lite_sft.data import split_validation

        d = cfg.data
        sentences = self.read(d.path, cfg)
        labels = build_tag_map(sentences, d.path)
        if d.validation_path:
            held = self.read(d.validation_path, cfg)
        else:
            sentences, held = split_validation(sentences, d.validation_fraction, cfg.train.seed)
        self.labels = labels
        train, cut = self.tokenize(sentences, tokenizer, cfg)
        validation, cut_val = self.tokenize(held, tokenizer, cfg)
        found = [kind for s in sentences for kind, _, _ in entities(s.tags)]
        counts = ", ".join(f"{kind} {found.count(kind)}" for kind in sorted(set(found)))
        labelled = sum(len(r) - r.labels.count(IGNORE_INDEX) for r in train)
        summary = (f"{len(train)} train / {len(validation)} validation sentences, {labelled} labelled tokens, "
                   f"entities {counts}; {cut + cut_val} sentences truncated to {self.max_len(cfg, tokenizer)} tokens "
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

    @staticmethod
    def max_len(cfg, tokenizer) -> int:
        """data.max_seq_len, or the tokenizer's model_max_length when smaller: an encoder has no position
        beyond it (BERT's 512), and a longer row would fail inside the model."""
        return min(cfg.data.max_seq_len, tokenizer.model_max_length)

    def tokenize(self, sentences: list[TaggedSentence], tokenizer, cfg) -> tuple[list[TokenRow], int]:
        from lite_sft.model import ModelError

        if not tokenizer.is_fast:
            raise ModelError(f"{type(tokenizer).__name__} is a slow (Python) tokenizer; token-cls needs a fast one, "
                             "which says which word each sub-token belongs to: use a model that ships tokenizer.json")
        prefix_space_for_words(tokenizer)
        return tokenize_sentences(sentences, self.labels, tokenizer, self.max_len(cfg, tokenizer))

    def _saved_labels(self, run_dir) -> LabelMap:
        from lite_sft.model import ModelError

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

        from lite_sft.tasks.base import all_sum, gather
        from lite_sft.tasks.metrics import entity_metrics

        names = self.labels.names
        model.eval()
        mine = rows[accelerator.process_index::accelerator.num_processes]
        total, units, unread, predicted, truth = 0.0, 0, 0, [], []
        with torch.no_grad():
            for i in range(0, len(mine), micro_batch_size):
                part = mine[i:i + micro_batch_size]
                batch = self.collate(part, tokenizer)
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
