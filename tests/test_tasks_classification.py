"""Sequence-classification and seq2seq readers: columns, labels and the errors users see."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lite_sft.errors import DataError
from lite_sft.tasks.classification import read_classification
from lite_sft.tasks.labels import LabelMap, build_label_map
from lite_sft.tasks.seq2seq import read_seq2seq

# The shared data sets sit beside the project (README of ../shared/data); tests that read them skip without.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def jsonl(path: Path, *records) -> str:
    return write(path, "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


# --- classification: formats and label mappings ---------------------------------------------------

def test_csv_tsv_and_jsonl_give_the_same_records(tmp_path):
    csv_path = write(tmp_path / "d.csv", 'text,label\n"good, really",pos\nbad,neg\n')
    tsv_path = write(tmp_path / "d.tsv", "text\tlabel\ngood, really\tpos\nbad\tneg\n")
    jsonl_path = jsonl(tmp_path / "d.jsonl", {"text": "good, really", "label": "pos"}, {"text": "bad", "label": "neg"})
    for path in (csv_path, tsv_path, jsonl_path):
        records, labels = read_classification(path)
        assert labels == LabelMap(("neg", "pos"))
        assert [(r.text, r.label, r.text_pair) for r in records] == [("good, really", 1, None), ("bad", 0, None)]
        assert records[1].where == (f"{path} line 2" if path == jsonl_path else f"{path} line 3")  # after the header


def test_label_names_are_sorted_so_row_order_does_not_change_the_ids(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", {"text": "x", "label": "pos"}, {"text": "y", "label": "neg"},
              {"text": "z", "label": "neutral"})
    b = jsonl(tmp_path / "b.jsonl", {"text": "z", "label": "neutral"}, {"text": "y", "label": "neg"},
              {"text": "x", "label": "pos"})
    assert read_classification(a)[1].names == read_classification(b)[1].names == ("neg", "neutral", "pos")


def test_integer_labels_keep_their_ids_whether_json_ints_or_csv_digits(tmp_path):
    tsv = write(tmp_path / "d.tsv", "label\ttext\n2\tthree stars\n0\tone star\n")
    records, labels = read_classification(tsv)
    assert labels == LabelMap(("0", "1", "2"), ids=True)  # id 1 never occurs but keeps its place
    assert [r.label for r in records] == [2, 0]
    records, labels = read_classification(jsonl(tmp_path / "d.jsonl", {"text": "a", "label": 2},
                                                {"text": "b", "label": 0}))
    assert labels.ids and [r.label for r in records] == [2, 0]


def test_a_given_map_names_integer_ids_and_accepts_names_too(tmp_path):
    named = LabelMap(("negative", "positive"), ids=True)
    tsv = write(tmp_path / "d.tsv", "label\ttext\n1\tfine\n0\tawful\npositive\tgreat\n")
    records, labels = read_classification(tsv, label_map=named)
    assert labels is named and [r.label for r in records] == [1, 0, 1]


def test_text_pairs(tmp_path):
    path = jsonl(tmp_path / "nli.jsonl", {"premise": "a dog runs", "hypothesis": "an animal moves", "label": "entail"},
                 {"premise": "a dog runs", "hypothesis": "a cat sleeps", "label": "contradict"})
    records, labels = read_classification(path, text_column="premise", pair_column="hypothesis")
    assert [(r.text, r.text_pair, labels.names[r.label]) for r in records] == [
        ("a dog runs", "an animal moves", "entail"), ("a dog runs", "a cat sleeps", "contradict")]


def test_tsv_fields_are_not_unquoted(tmp_path):
    # TSV has no quoting: a sentence that starts with a quote keeps it, and the next line is its own row.
    path = write(tmp_path / "d.tsv", 'text\tlabel\n"hello\t1\nworld"\t0\n')
    records, _ = read_classification(path)
    assert [r.text for r in records] == ['"hello', 'world"']


def test_header_names_are_stripped(tmp_path):
    records, _ = read_classification(write(tmp_path / "d.csv", "label, sentence\n1,a\n0,b\n"), text_column="sentence")
    assert [r.text for r in records] == ["a", "b"]


# --- classification: errors -----------------------------------------------------------------------

def test_a_missing_column_names_the_columns_the_file_has(tmp_path):
    path = write(tmp_path / "dev.tsv", "label\tcontent\n0\tbad\n1\tgood\n")
    with pytest.raises(DataError, match=r"dev\.tsv: no column 'sentence'; its columns are label, "
                                        r"content; set --text-column \(task\.text_column\)"):
        read_classification(path, text_column="sentence")
    path = jsonl(tmp_path / "d.jsonl", {"text": "a", "label": 0}, {"txt": "b", "label": 1})
    with pytest.raises(DataError, match=r"d\.jsonl line 2: no field 'text'; the line has txt, label; set --text-column"):
        read_classification(path)


@pytest.mark.parametrize("content, where", [
    ("text\tlabel\na\t1\n \t0\n", "line 3: column 'text' is empty"),
    ("text\tlabel\na\t1\nb\n", "line 3: column 'label' must be a label name or an integer id, got nothing"),
    ("text\tlabel\na\t1\nb\t\n", r"line 3: column 'label' \(the label\) is empty"),
    ("text\tlabel\na\t1\nb\t0\textra\n", "line 3: 3 fields but the header names 2"),
    ("text\ttext\na\tb\n", "the header names 'text' more than once"),
    ("", "no header row"),
    ("text\tlabel\n", "no records"),
])
def test_bad_rows_name_the_line_and_the_column(tmp_path, content, where):
    with pytest.raises(DataError, match=where):
        read_classification(write(tmp_path / "d.tsv", content))


def test_a_single_class_in_training_data_is_an_error(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", {"text": "a", "label": "pos"}, {"text": "b", "label": "pos"})
    with pytest.raises(DataError, match=r"d\.jsonl: column 'label' has only the label 'pos'.*at least two classes"):
        read_classification(path)


def test_evaluation_data_may_hold_one_class(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", {"text": "a", "label": "pos"}, {"text": "b", "label": "pos"})
    records, _ = read_classification(path, label_map=LabelMap(("neg", "pos")))
    assert [r.label for r in records] == [1, 1]


def test_an_unknown_label_in_evaluation_data_names_it_and_the_known_ones(tmp_path):
    train = jsonl(tmp_path / "train.jsonl", {"text": "a", "label": "pos"}, {"text": "b", "label": "neg"})
    dev = jsonl(tmp_path / "dev.jsonl", {"text": "a", "label": "pos"}, {"text": "b", "label": "neutral"})
    _, labels = read_classification(train)
    with pytest.raises(DataError, match=r"dev\.jsonl line 2: unknown label 'neutral' in column 'label'; the training "
                                        r"data's labels are names \(neg, pos\)"):
        read_classification(dev, label_map=labels)
    ids = LabelMap(("0", "1"), ids=True)
    with pytest.raises(DataError, match=r"d\.tsv line 3: unknown label 2 .* ids 0\.\.1 \(0, 1\) and this is an id"):
        read_classification(write(tmp_path / "d.tsv", "text\tlabel\na\t1\nb\t2\n"), label_map=ids)


def test_ids_and_names_do_not_mix(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", {"text": "a", "label": 1}, {"text": "b", "label": "pos"})
    with pytest.raises(DataError, match=r"mixes integer ids \(1 at .*line 1\) and names \('pos' at .*line 2\)"):
        read_classification(path)


def test_names_are_not_read_as_ids_of_a_named_map(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", {"text": "a", "label": 0})
    with pytest.raises(DataError, match="unknown label 0 .* names \\(neg, pos\\) and this is an id"):
        read_classification(path, label_map=LabelMap(("neg", "pos")))


def test_negative_and_boolean_labels_are_errors():
    with pytest.raises(DataError, match="label id -1 .* is negative"):
        build_label_map([("t line 2", "-1"), ("t line 3", "1")], "t", "label")
    with pytest.raises(DataError, match="t line 2: column 'label' must be a label name or an integer id, got bool"):
        build_label_map([("t line 2", True), ("t line 3", False)], "t", "label")


def test_file_errors(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_classification(tmp_path / "missing.csv")
    with pytest.raises(DataError, match=r"unsupported file type '\.parquet'"):
        read_classification(write(tmp_path / "d.parquet", ""))
    with pytest.raises(DataError, match=r"d\.jsonl line 2: not valid JSON"):
        read_classification(jsonl(tmp_path / "d.jsonl", {"text": "a", "label": 0}, "{oops"))


@pytest.mark.skipif(not (SHARED_DATA / "sst2").is_dir(), reason="the shared SST-2 files are not beside the project")
def test_sst2_train_and_dev_name_their_text_columns_differently():
    train, labels = read_classification(SHARED_DATA / "sst2" / "train.tsv", text_column="sentence")
    dev, _ = read_classification(SHARED_DATA / "sst2" / "dev.tsv", text_column="content", label_map=labels)
    assert (len(train), len(dev)) == (67349, 872)
    assert labels == LabelMap(("0", "1"), ids=True)
    assert (train[0].text, train[0].label) == ("hide new secretions from the parental units", 0)
    with pytest.raises(DataError, match=r"its columns are label, content; set --text-column \(task.text_column\)"):
        read_classification(SHARED_DATA / "sst2" / "dev.tsv", text_column="sentence", label_map=labels)


# --- seq2seq --------------------------------------------------------------------------------------

def test_seq2seq_reads_configured_columns_from_every_format(tmp_path):
    rows = [{"en": "Hello.", "de": "Hallo."}, {"en": "Thank you.", "de": "Danke."}]
    paths = [jsonl(tmp_path / "d.jsonl", *rows), write(tmp_path / "d.csv", "en,de\nHello.,Hallo.\nThank you.,Danke.\n"),
             write(tmp_path / "d.tsv", "en\tde\nHello.\tHallo.\nThank you.\tDanke.\n")]
    for path in paths:
        pairs = read_seq2seq(path, source_column="en", target_column="de")
        assert [(p.source, p.target) for p in pairs] == [("Hello.", "Hallo."), ("Thank you.", "Danke.")]
    assert read_seq2seq(paths[0], source_column="en", target_column="de")[1].where == f"{paths[0]} line 2"


def test_seq2seq_errors_name_the_line_and_column(tmp_path):
    with pytest.raises(DataError, match=r"line 2: column 'target' is empty"):
        read_seq2seq(jsonl(tmp_path / "a.jsonl", {"source": "a", "target": "b"}, {"source": "c", "target": " "}))
    with pytest.raises(DataError, match=r"line 1: column 'source' is empty"):
        read_seq2seq(jsonl(tmp_path / "b.jsonl", {"source": "", "target": "b"}))
    with pytest.raises(DataError, match=r"line 1: column 'source' must be a string, got int"):
        read_seq2seq(jsonl(tmp_path / "c.jsonl", {"source": 3, "target": "b"}))
    with pytest.raises(DataError, match=r"no column 'summary'; its columns are document, abstract; set --target-column"):
        read_seq2seq(write(tmp_path / "d.csv", "document,abstract\na,b\n"), source_column="document",
                     target_column="summary")
