"""Load training data, recognise its format, and prepare packed rows: the data pipeline's entry point.

    from lite_sft.tasks.causal_lm.data import prepare_data
    data = prepare_data(cfg.data, tokenizer, seed=cfg.train.seed)
    data.train, data.validation              # lists of packing.Row, ready for packing.collate
    data.train_stats, data.format            # counts for the log; the format that was read
    data.added_tokens                        # True: resize the model's embedding to len(tokenizer)

prepare_data is the one place that gives the tokenizer a chat template, and only for conversational
data (alpaca, messages, sharegpt): prompt_completion and text are tokenised as written, so a tokenizer
without a template of its own gets no ChatML tokens added for them.

Sources: a .jsonl/.json/.csv/.parquet file, a folder written by `datasets` save_to_disk, a hub data
set id, or `builtin:skill` (the bundled offline set). Formats (named, or detected from every record's
keys): alpaca, messages, sharegpt, prompt_completion, text. Every problem raises DataError naming the
file, the record (JSONL line, CSV/Parquet row, JSON array index) and the field.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from lite_sft.artifacts import VALIDATION_SPLIT_FILE
from lite_sft.config import BUILTIN_DATA, DataConfig, setting
from lite_sft.errors import DataError
from lite_sft.tasks.causal_lm import cache
from lite_sft.tasks.causal_lm.masking import ROLES, DataStats, Example, Sample, build_examples, ensure_chat_template
from lite_sft.tasks.causal_lm.packing import Row, pack, unpacked_rows
from lite_sft.tasks.split import held_out
from lite_sft.tasks.table import open_text

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
CHAT_FORMATS = ("alpaca", "messages", "sharegpt")
# The keys that identify each format, tried in this order; other keys in a record are ignored.
FORMAT_KEYS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system"}
# Held-out examples copied as tokenised into validation_split.json: enough for any parity gate, small on disk.
SPLIT_EXAMPLES = 64


@dataclass
class Record:
    source: str
    """Where the record is, for messages: "train.jsonl line 3"."""
    fields: dict[str, Any]


@dataclass
class PreparedData:
    train: list[Row]
    validation: list[Row]
    train_stats: DataStats
    validation_stats: DataStats
    """All zero when there is no validation split."""
    format: str
    train_examples: list[Example] = field(repr=False, default_factory=list)
    """The unpacked training examples, for `lite-sft inspect-data`."""
    validation_examples: list[Example] = field(repr=False, default_factory=list)
    added_tokens: bool = False
    """This call added the default chat template's tokens to the tokenizer: resize the model's token embedding."""
    chat_template_used: bool = False
    """A split is conversational, so the tokenizer was given its chat template (see ensure_chat_template)."""


def prepare_data(cfg: DataConfig, tokenizer, seed: int) -> PreparedData:
    """Load, split, tokenise, mask and pack the training and validation data (cached when `cfg.cache`).

    Gives `tokenizer` its chat template when the data is conversational; `added_tokens` is True exactly
    when that added tokens to `tokenizer`, from the cache as well as freshly prepared.
    """
    key = cache.cache_key(cfg, tokenizer, seed) if cfg.cache else None
    cached = cache.load(key)
    if cached is not None:
        # The key covers the tokenizer as given, so it is as the entry's was before preparing: make the
        # change a fresh preparation made, and say what it did to this tokenizer.
        cached.added_tokens = cached.chat_template_used and ensure_chat_template(tokenizer, cfg.chat_template)
        return cached
    return cache.store(key, _prepare(cfg, tokenizer, seed))


def _prepare(cfg: DataConfig, tokenizer, seed: int) -> PreparedData:
    fmt, train = load_samples(cfg.path, cfg.format, cfg.split)
    validation_fmt = fmt
    rule = held_out(cfg, seed)
    if rule.kind == "file":
        validation_fmt, validation = load_samples(rule.path, cfg.format, cfg.split, role="validation")
    elif rule.kind == "builtin":  # the bundled set ships its own held-out file; any fraction > 0 asks for it
        validation_fmt, validation = load_samples(BUILTIN_DATA, cfg.format, cfg.split, role="validation")
    else:
        train, validation = rule.split(train)
    chat = bool({fmt, validation_fmt} & set(CHAT_FORMATS))
    added = chat and ensure_chat_template(tokenizer, cfg.chat_template)
    train_examples, train_stats = _examples(train, tokenizer, cfg, "training")
    validation_examples, validation_stats = (_examples(validation, tokenizer, cfg, "validation")
                                             if validation else ([], DataStats()))

    def rows(examples: list[Example]) -> list[Row]:
        return pack(examples, cfg.max_seq_len) if cfg.packing else unpacked_rows(examples)

    return PreparedData(rows(train_examples), rows(validation_examples), train_stats, validation_stats, fmt,
                        train_examples, validation_examples, added, chat)


def _examples(samples: list[Sample], tokenizer, cfg: DataConfig, split: str) -> tuple[list[Example], DataStats]:
    examples, stats = build_examples(samples, tokenizer, cfg)
    if not examples:
        raise DataError(
            f"the {split} set is empty after dropping: {stats.dropped} of {len(samples)} examples were longer than "
            f"data.max_seq_len={cfg.max_seq_len} (data.overlong=drop) and {stats.dropped_untrained} had no trained "
            f"token left after truncation; raise {setting('data.max_seq_len')} or use {setting('data.overlong', 'truncate')}")
    return examples, stats


def write_validation_split(run_dir: Path, cfg, data) -> Path:
    """Record the held-out records and the first SPLIT_EXAMPLES of them as tokenised for validation.

    Export checks its artefacts on examples training never saw. Re-deriving the split later from the
    data file and the seed silently goes wrong when the file moves or changes, so the split is written
    down now: which records (their sources), a digest of the file they came from, and the examples
    themselves (`labels[t] == input_ids[t]` where trained, -100 elsewhere).
    """
    d, rule = cfg.data, held_out(cfg.data, cfg.train.seed)
    source, origin = {
        "file": (f"validation file {d.validation_path}", d.validation_path),
        "builtin": ("the bundled validation set", None),
        "fraction": (f"held-out fraction {d.validation_fraction} of {d.path}, seed {cfg.train.seed}", d.path),
        "none": ("none", None),
    }[rule.kind]
    digest = None
    if origin is not None and Path(origin).expanduser().is_file():
        digest = hashlib.sha256(Path(origin).expanduser().read_bytes()).hexdigest()
    examples = data.validation_examples
    record = {"source": source, "data_sha256": digest, "count": len(examples),
              "sources": [ex.source for ex in examples],
              "examples": [{"source": ex.source, "input_ids": list(ex.input_ids), "labels": list(ex.labels)}
                           for ex in examples[:SPLIT_EXAMPLES]]}
    path = Path(run_dir) / VALIDATION_SPLIT_FILE
    path.write_text(json.dumps(record) + "\n")
    return path


def load_samples(path: str, fmt: str = "auto", split: str = "train", role: str = "train") -> tuple[str, list[Sample]]:
    """Read `path` and return (format, samples); `role` picks the builtin set's train or eval file."""
    records = load_records(path, split, role)
    if not records:
        raise DataError(f"{path}: no records; the data set is empty")
    if fmt == "auto":
        fmt = detect_format(records, path)
    elif fmt not in FORMAT_KEYS:
        raise DataError(f"unknown {setting('data.format')} {fmt!r}; use auto or one of {', '.join(FORMAT_KEYS)}")
    return fmt, [_CONVERTERS[fmt](r) for r in records]


def load_records(path: str, split: str = "train", role: str = "train") -> list[Record]:
    """Read raw records from a file, a saved `datasets` folder, a hub id or the builtin set."""
    if path == BUILTIN_DATA:
        name = "skill_train.jsonl" if role == "train" else "skill_eval.jsonl"
        try:
            packaged = resources.files("lite_sft.assets") / name
        except ModuleNotFoundError as err:
            raise DataError(f"{path}: the bundled data (lite_sft/assets/{name}) is missing; reinstall lite-sft") from err
        with resources.as_file(packaged) as local:
            if not local.is_file():
                raise DataError(f"{path}: the bundled data (lite_sft/assets/{name}) is missing; reinstall lite-sft")
            return _read_file(local, str(local))
    p = Path(path).expanduser()
    if p.is_dir():
        return _read_saved_dataset(p, path, split)
    if p.is_file():
        return _read_file(p, path)
    # Anything that looks like a path is a missing file; the rest ("org/name") may be a hub id.
    if p.suffix.lower() in SUFFIXES or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise DataError(f"{path}: file not found")
    return _read_hub(path, split)


def _read_file(p: Path, name: str) -> list[Record]:
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        records = []
        # Iterating the file, not str.splitlines(), which also splits at U+2028 inside JSON strings.
        with open_text(p, name) as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(Record(f"{name} line {n}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise DataError(f"{name} line {n}: not valid JSON ({err}); fix or remove the line") from err
    elif suffix == ".json":
        try:
            with open_text(p, name) as f:
                loaded = json.load(f)
        except json.JSONDecodeError as err:
            hint = "; it looks like JSON Lines, rename it to .jsonl" if err.msg == "Extra data" else ""
            raise DataError(f"{name}: not valid JSON ({err}){hint}") from err
        if not isinstance(loaded, list):
            raise DataError(f"{name}: expected a JSON array of records, got a {type(loaded).__name__}")
        records = [Record(f"{name} index {i}", r) for i, r in enumerate(loaded)]
    elif suffix == ".csv":
        with open_text(p, name, newline="") as f:
            records = [Record(f"{name} row {n}", dict(r)) for n, r in enumerate(csv.DictReader(f), start=1)]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq  # installed with datasets

        rows = pq.read_table(p).to_pylist()
        records = [Record(f"{name} row {n}", r) for n, r in enumerate(rows, start=1)]
    else:
        raise DataError(f"{name}: unsupported file type {p.suffix or '(none)'!r}; use one of {', '.join(SUFFIXES)}, "
                        "or a folder saved with datasets' save_to_disk")
    for r in records:
        if not isinstance(r.fields, dict):
            raise DataError(f"{r.source}: expected an object with named fields, got {type(r.fields).__name__}")
    return records


def _read_saved_dataset(p: Path, name: str, split: str) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError as err:
        raise DataError(f"{name}: a folder, but not one written by datasets' save_to_disk ({err})") from err
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{name}: no split {split!r}; it has {', '.join(ds)}; set data.split")
        ds, name = ds[split], f"{name} split {split}"
    return [Record(f"{name} row {n}", r) for n, r in enumerate(ds, start=1)]


def _read_hub(name: str, split: str) -> list[Record]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # offline, unknown id, private, no such split: all worded differently upstream
        raise DataError(f"{name}: not a local file or folder, and loading it as a hub data set (split {split!r}) "
                        f"failed: {type(err).__name__}: {err}. Check the path or id, the network, and data.split") from err
    return [Record(f"{name} split {split} row {n}", r) for n, r in enumerate(ds, start=1)]


def detect_format(records: list[Record], name: str) -> str:
    """The one format all records share, else DataError naming the first record that differs."""
    first: dict[str, Record] = {}
    counts: dict[str, int] = {}
    for r in records:
        fmt = next((f for f, keys in FORMAT_KEYS.items() if all(k in r.fields for k in keys)), None)
        if fmt is None:
            expected = "; ".join(f"{f}: {', '.join(keys)}" for f, keys in FORMAT_KEYS.items())
            raise DataError(f"{r.source}: cannot tell the format from the fields {sorted(r.fields)}; expected the "
                            f"fields of one format ({expected}). Rename the fields or set {setting('data.format')}")
        first.setdefault(fmt, r)
        counts[fmt] = counts.get(fmt, 0) + 1
    if len(counts) > 1:
        fmt0, other = list(first)[:2]
        seen = ", ".join(f"{f} ({c} record{'s' * (c != 1)})" for f, c in counts.items())
        raise DataError(f"{first[other].source}: this record is {other} but {first[fmt0].source} is {fmt0}; "
                        f"{name} mixes formats: {seen}. Use one format per file")
    return next(iter(counts))


def _field(r: Record, key: str, fmt: str, optional: bool = False) -> str | None:
    value = r.fields.get(key)
    if value is None:
        if optional:
            return None
        raise DataError(f"{r.source}: missing field {key!r} (format {fmt} needs {', '.join(FORMAT_KEYS[fmt])})")
    if not isinstance(value, str):
        raise DataError(f"{r.source}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _turns(r: Record, key: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict[str, str]]:
    turns = r.fields.get(key)
    if turns is None:
        raise DataError(f"{r.source}: missing field {key!r}")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{r.source}: field {key!r} must be a non-empty list of turns, got {turns!r:.60}")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{r.source}: field '{key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where}' must be an object with {role_key!r} and {content_key!r}, got {turn!r:.60}")
        role, content = turn.get(role_key), turn.get(content_key)
        if role not in roles:
            raise DataError(f"{where}.{role_key}': unknown role {role!r}; use one of {', '.join(roles)}")
        if not isinstance(content, str):
            raise DataError(f"{where}.{content_key}' must be a string, got {type(content).__name__}")
        messages.append({"role": roles[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{r.source}: field {key!r} has no assistant turn, so nothing would be trained; "
                        "add the reply or remove the record")
    return messages


def _alpaca(r: Record) -> Sample:
    instruction, output = _field(r, "instruction", "alpaca"), _field(r, "output", "alpaca")
    extra, system = _field(r, "input", "alpaca", optional=True), _field(r, "system", "alpaca", optional=True)
    if not output.strip():
        raise DataError(f"{r.source}: field 'output' is empty, so nothing would be trained")
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction})
    messages.append({"role": "assistant", "content": output})
    return Sample(r.source, messages=messages)


def _messages(r: Record) -> Sample:
    return Sample(r.source, messages=_turns(r, "messages", "role", "content", {role: role for role in ROLES}))


def _sharegpt(r: Record) -> Sample:
    return Sample(r.source, messages=_turns(r, "conversations", "from", "value", SHAREGPT_ROLES))


def _prompt_completion(r: Record) -> Sample:
    prompt, completion = _field(r, "prompt", "prompt_completion"), _field(r, "completion", "prompt_completion")
    if not completion.strip():
        raise DataError(f"{r.source}: field 'completion' is empty, so nothing would be trained")
    return Sample(r.source, prompt=prompt, completion=completion)


def _text(r: Record) -> Sample:
    text = _field(r, "text", "text")
    if not text.strip():
        raise DataError(f"{r.source}: field 'text' is empty")
    return Sample(r.source, text=text)


_CONVERTERS = {"alpaca": _alpaca, "messages": _messages, "sharegpt": _sharegpt,
               "prompt_completion": _prompt_completion, "text": _text}
