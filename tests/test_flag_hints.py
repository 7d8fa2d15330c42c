"""Error hints name the command-line flag beside the config field, so either kind of user can act on them."""

from __future__ import annotations

import json

import pytest
import typer.main

from lite_sft.cli import FLAG_FIELDS, app
from lite_sft.config import setting
from lite_sft.errors import DataError
from lite_sft.tasks.causal_lm.data import load_samples
from lite_sft.tasks.split import split_validation
from lite_sft.tasks.classification import read_classification
from lite_sft.tasks.ner import read_ner


def test_every_field_with_a_flag_is_named_by_the_flag_tune_takes():
    options = {p.name: p.opts for p in typer.main.get_command(app).commands["tune"].params}
    for param, field in FLAG_FIELDS.items():
        assert setting(field) == f"{options[param][0]} ({field})"
    assert setting("data.validation_fraction", 0) == "--validation-fraction 0 (data.validation_fraction=0)"


def test_a_missing_column_names_the_flag_and_the_field(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\ngood\tpos\n")
    with pytest.raises(DataError, match=r"set --text-column \(task.text_column\) to the column"):
        read_classification(path)


def test_a_wrong_tag_column_names_the_flag_and_the_field(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("Peter B-PER 0\nvisited O 0\n")
    with pytest.raises(DataError, match=r"set --tag-column 1 \(task.tag_column=1\)"):
        read_ner(path, tag_column=2)


def test_data_hints_name_the_flag_and_the_field(tmp_path):
    with pytest.raises(DataError, match=r"--validation-fraction 0 \(data.validation_fraction=0\)"):
        split_validation([object()], 0.5, seed=0)
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"question": "a", "reply": "b"}) + "\n")
    with pytest.raises(DataError, match=r"set --format \(data.format\)"):
        load_samples(str(path))
