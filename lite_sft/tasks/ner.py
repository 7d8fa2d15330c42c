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

The task behind `lite-sft tune --task token-cls` is in token_cls.py; this module is what the server needs
too (split_words, word_predictions, entity_spans), and imports no training code.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from lite_sft.config import setting
from lite_sft.errors import DataError
from lite_sft.tasks.base import IGNORE_INDEX
from lite_sft.tasks.iob import entities, iob1_to_iob2, iob2_error, split_tag
from lite_sft.tasks.labels import LabelMap
from lite_sft.tasks.table import open_text, read_table

CHECK_TAGS = f"check {setting('task.tag_column')} / {setting('task.tags_key')}"
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
                raise DataError(f"{sentence.token_where(i)}: {err}; {CHECK_TAGS}") from None
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
        raise DataError(f"{name}: every tag is O, so there are no entities to learn; {CHECK_TAGS}")
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

    with open_text(p, name) as f:
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
                raise DataError(f"{name} line {n}: no column {tag_column} in a line of {len(fields)} columns; "
                                f"set {setting('task.tag_column')} to the tag's column") from None
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
                f"holds {value!r}: set {setting('task.tag_column', i)} (columns count from 0)")
    return f"; set {setting('task.tag_column')} to the column that holds the IOB2 tag"


def _jsonl(p: Path, tokens_key: str, tags_key: str, tag_names: Sequence[str] | None) -> list[TaggedSentence]:
    table = read_table(p)
    table.require(tokens_key, "task.tokens_key")
    table.require(tags_key, "task.tags_key")
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
