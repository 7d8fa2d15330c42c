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

from lite_sft.tasks.labels import LabelMap, build_label_map, parse_label
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
    table.require(text_column, "text_column")
    if pair_column is not None:
        table.require(pair_column, "pair_column")
    table.require(label_column, "label_column")
    raw = [(row.where, row.fields.get(label_column)) for row in table.rows]
    if label_map is None:
        label_map = build_label_map(raw, table.name, label_column)
    records = []
    for row, (where, value) in zip(table.rows, raw):
        label = label_map.encode(parse_label(value, where, label_column), where, label_column)
        pair = text_field(row, pair_column) if pair_column is not None else None
        records.append(ClassificationRecord(where, text_field(row, text_column), label, pair))
    return records, label_map
