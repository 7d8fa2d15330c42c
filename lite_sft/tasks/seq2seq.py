"""Read seq2seq data (translation, summarisation: an input text and its target text) from CSV, TSV or JSONL.

    pairs = read_seq2seq("news.jsonl", source_column="document", target_column="summary")
    pairs[0]            # Seq2SeqRecord(where='news.jsonl line 1', source='...', target='...')

Both texts must be non-empty: an empty target teaches the model to stop at once, an empty source
gives it nothing to condition on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lite_sft.tasks.table import read_table, text_field


@dataclass
class Seq2SeqRecord:
    where: str
    """The file and line: "train.jsonl line 3"."""
    source: str
    target: str


def read_seq2seq(path: str | Path, *, source_column: str = "source",
                 target_column: str = "target") -> list[Seq2SeqRecord]:
    table = read_table(path)
    table.require(source_column, "source_column")
    table.require(target_column, "target_column")
    return [Seq2SeqRecord(row.where, text_field(row, source_column), text_field(row, target_column))
            for row in table.rows]
