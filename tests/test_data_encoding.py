"""Data files as other machines save them: a UTF-8 BOM is read past, bytes that are not UTF-8 name their line."""

from __future__ import annotations

import json

import pytest

from lite_sft.tasks.causal_lm.data import load_samples
from lite_sft.errors import DataError
from lite_sft.tasks.classification import read_classification
from lite_sft.tasks.ner import read_ner

BOM = "\ufeff".encode()
PC = {"prompt": "what is two plus two", "completion": " four"}


@pytest.mark.parametrize("suffix, text", [
    (".jsonl", json.dumps(PC) + "\n" + json.dumps(PC) + "\n"),
    (".json", json.dumps([PC, PC])),
    (".csv", "prompt,completion\nwhat is two plus two, four\nwhat is two plus two, four\n"),
])
def test_a_byte_order_mark_is_read_past(tmp_path, suffix, text):
    path = tmp_path / f"train{suffix}"
    path.write_bytes(BOM + text.encode())
    fmt, samples = load_samples(str(path))
    assert fmt == "prompt_completion" and [s.prompt for s in samples] == ["what is two plus two"] * 2


@pytest.mark.parametrize("suffix, text", [
    (".tsv", "sentence\tlabel\ngood film\tpos\nbad film\tneg\n"),
    (".csv", "sentence,label\ngood film,pos\nbad film,neg\n"),
    (".jsonl", '{"sentence": "good film", "label": "pos"}\n{"sentence": "bad film", "label": "neg"}\n'),
])
def test_a_byte_order_mark_is_read_past_by_the_task_readers(tmp_path, suffix, text):
    path = tmp_path / f"train{suffix}"
    path.write_bytes(BOM + text.encode())
    records, labels = read_classification(path, text_column="sentence")
    assert [r.text for r in records] == ["good film", "bad film"] and set(labels.names) == {"pos", "neg"}


def test_a_byte_order_mark_is_read_past_by_the_conll_reader(tmp_path):
    path = tmp_path / "train.txt"
    path.write_bytes(BOM + b"Peter B-PER\nvisited O\nParis B-LOC\n")
    [sentence] = read_ner(path)
    assert sentence.tokens == ["Peter", "visited", "Paris"]


LATIN1 = "caf\xe9".encode("latin-1")  # "café" as Windows-1252 / Latin-1 writes it: 0xe9 is no UTF-8


@pytest.mark.parametrize("suffix, good, bad", [
    (".jsonl", json.dumps(PC).encode() + b"\n", b'{"prompt": "' + LATIN1 + b'", "completion": " x"}\n'),
    (".csv", b"prompt,completion\n", LATIN1 + b", x\n"),
    (".json", b'[{"prompt": "a", "completion": " b"},\n', b'{"prompt": "' + LATIN1 + b'", "completion": " x"}]\n'),
])
def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path, suffix, good, bad):
    path = tmp_path / f"train{suffix}"
    path.write_bytes(good * 2 + bad)
    with pytest.raises(DataError) as err:
        load_samples(str(path))
    message = str(err.value)
    assert f"{path} line 3:" in message and "UTF-8" in message and "0xe9" in message, message
    assert "\n" not in message


@pytest.mark.parametrize("name, good, bad, read", [
    ("train.tsv", b"sentence\tlabel\ngood\tpos\n", LATIN1 + b"\tneg\n", lambda p: read_classification(p, text_column="sentence")),
    ("train.jsonl", b'{"sentence": "good", "label": "pos"}\n' * 2, b'{"sentence": "' + LATIN1 + b'", "label": "x"}\n',
     lambda p: read_classification(p, text_column="sentence")),
    ("train.txt", b"Peter B-PER\n\n", LATIN1 + b" O\n", read_ner),
])
def test_task_readers_name_the_line_that_is_not_utf8(tmp_path, name, good, bad, read):
    path = tmp_path / name
    path.write_bytes(good + bad)
    with pytest.raises(DataError) as err:
        read(path)
    assert f"{path} line 3:" in str(err.value) and "save the file as UTF-8" in str(err.value), str(err.value)
