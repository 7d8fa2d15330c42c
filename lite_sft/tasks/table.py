"""Rows of a CSV, TSV or JSONL file, for the readers whose records are flat (classification, seq2seq, NER JSONL).

    table = read_table("train.tsv")
    table.require("sentence", "task.text_column") # DataError naming the columns the file has
    row = table.rows[0]
    row.where, text_field(row, "sentence")        # "train.tsv line 2", "hide new secretions ..."

Every row knows its line in the file, so the readers' errors point at it. Every text data file is opened
with `open_text`, which reads past a UTF-8 byte order mark and names the line of a byte that is not UTF-8.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from lite_sft.config import setting
from lite_sft.errors import DataError

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")


@dataclass
class Row:
    where: str
    """The file and line, for messages: "train.tsv line 3"."""
    fields: dict[str, Any]


@dataclass
class Table:
    name: str
    rows: list[Row]
    header: list[str] | None
    """The CSV/TSV header; None for JSONL, whose lines each have their own keys."""

    def require(self, column: str, field: str) -> None:
        """DataError unless every row has `column`; `field` is the setting that named it (task.text_column)."""
        fix = f"set {setting(field)} to the column that holds it (each file can name its own)"
        if self.header is not None:
            if column not in self.header:
                raise DataError(f"{self.name}: no column {column!r}; its columns are "
                                f"{', '.join(self.header)}; {fix}")
            return
        for row in self.rows:
            if column not in row.fields:
                raise DataError(f"{row.where}: no field {column!r}; the line has "
                                f"{', '.join(row.fields) or 'no fields'}; {fix}")


def read_table(path: str | Path) -> Table:
    """Read a .csv, .tsv (both with a header row) or .jsonl file (one object a line)."""
    p, name = Path(path), str(path)
    if not p.is_file():
        raise DataError(f"{name}: file not found")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        table = Table(name, _jsonl_rows(p, name), None)
    elif suffix in (".csv", ".tsv"):
        table = _delimited(p, name, "\t" if suffix == ".tsv" else ",")
    else:
        raise DataError(f"{name}: unsupported file type {p.suffix or '(none)'!r}; "
                        f"use one of {', '.join(TABLE_SUFFIXES)}")
    if not table.rows:
        raise DataError(f"{name}: no records; the file is empty")
    return table


def text_field(row: Row, column: str) -> str:
    """The non-empty string in `column`, else DataError naming the line and the column."""
    value = row.fields.get(column)
    if value is None:
        # csv.DictReader fills the columns a short line lacks with None.
        raise DataError(f"{row.where}: column {column!r} is missing on this line; fill it in or remove the line")
    if not isinstance(value, str):
        raise DataError(f"{row.where}: column {column!r} must be a string, got {type(value).__name__} {value!r:.60}")
    if not value.strip():
        raise DataError(f"{row.where}: column {column!r} is empty; fill it in or remove the line")
    return value


@contextmanager
def open_text(p: Path, name: str, newline: str | None = None) -> Iterator[IO[str]]:
    """`p` opened as UTF-8 text. A byte order mark at the start is skipped (-sig: Windows editors and
    spreadsheets write one); a byte that is not UTF-8, met anywhere while reading, raises DataError naming its line."""
    try:
        with p.open(encoding="utf-8-sig", newline=newline) as f:
            yield f
    except UnicodeDecodeError:
        raise _not_utf8(p, name) from None


def _not_utf8(p: Path, name: str) -> DataError:
    # The decoder reads in blocks, so its error knows no line: find it. A line is decodable on its own,
    # as UTF-8 never uses the byte of a newline inside a character.
    with p.open("rb") as f:
        for n, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                return DataError(f"{name} line {n}: byte {line[err.start]:#04x} at column {err.start + 1} is not UTF-8; "
                                 "save the file as UTF-8 (an editor's Save As, or `iconv -f cp1252 -t utf-8`)")
    return DataError(f"{name}: not UTF-8 text; save the file as UTF-8")


def _jsonl_rows(p: Path, name: str) -> list[Row]:
    rows = []
    # Iterating the file, not str.splitlines(), which also splits at U+2028 inside JSON strings.
    with open_text(p, name) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{name} line {n}: not valid JSON ({err}); fix or remove the line") from err
            if not isinstance(fields, dict):
                raise DataError(f"{name} line {n}: expected an object with named fields, got {type(fields).__name__}")
            rows.append(Row(f"{name} line {n}", fields))
    return rows


def _delimited(p: Path, name: str, delimiter: str) -> Table:
    # TSV has no quoting (IANA text/tab-separated-values; GLUE's files are written so): a sentence may
    # start with '"' and must stay as it is. CSV keeps the usual quoting rules.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with open_text(p, name, newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
        if not reader.fieldnames:
            raise DataError(f"{name}: no header row; the first line must name the columns")
        # "label, sentence" is a common way to write a header by hand; the space is not part of the name.
        header = reader.fieldnames = [column.strip() for column in reader.fieldnames]
        repeated = sorted({c for c in header if header.count(c) > 1})
        if repeated:
            raise DataError(f"{name}: the header names {', '.join(map(repr, repeated))} more than once; "
                            "give every column its own name")
        rows = []
        for fields in reader:
            where = f"{name} line {reader.line_num}"
            if None in fields:  # DictReader's key for the values beyond the header's columns
                kind = "tab" if delimiter == "\t" else "comma (quote the field)"
                raise DataError(f"{where}: {len(header) + len(fields[None])} fields but the header names "
                                f"{len(header)}; a field holds a {kind}, or the line has a stray separator")
            rows.append(Row(where, fields))
    return Table(name, rows, header)
