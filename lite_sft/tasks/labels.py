"""Label names and ids: built from the training data, applied unchanged to every other file.

    labels = build_label_map([("train.tsv line 2", "pos"), ("train.tsv line 3", "neg")], "train.tsv", "label")
    labels.names                                # ('neg', 'pos'): sorted, so two runs agree on the ids
    labels.encode("pos", "dev.tsv line 9", "label")   # 1; an unknown label is a DataError naming the known ones

Data whose labels are integers (SST-2's 0/1, or "0"/"1" in a CSV) keeps them as ids: names[i] is str(i)
unless a LabelMap with display names is given (LabelMap(("negative", "positive"), ids=True)).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lite_sft.artifacts import LABELS_FILE
from lite_sft.config import setting
from lite_sft.errors import DataError

_INTEGER = re.compile(r"-?\d+")


def parse_label(value: object, where: str, column: str) -> int | str:
    """An int (a JSON integer, or a CSV field of digits) or a non-empty stripped name."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        shown = "nothing" if value is None else f"{type(value).__name__} {value!r:.40}"
        raise DataError(f"{where}: column {column!r} must be a label name or an integer id, got {shown}; "
                        "fill it in or remove the line")
    if isinstance(value, str):
        value = value.strip()
        if not value:
            raise DataError(f"{where}: column {column!r} (the label) is empty; fill it in or remove the line")
        if _INTEGER.fullmatch(value):
            value = int(value)
    if isinstance(value, int) and value < 0:
        raise DataError(f"{where}: label id {value} in column {column!r} is negative; ids count from 0 "
                        "(GLUE's unlabelled test files use -1: such a file cannot be used for training or evaluation)")
    return value


@dataclass(frozen=True)
class LabelMap:
    names: tuple[str, ...]
    """names[i] is the label with id i: what the model config's id2label holds."""
    ids: bool = False
    """The data gives labels as integer ids (names are only for display); else it gives names."""
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"label names must be unique, got {list(self.names)}")
        object.__setattr__(self, "_index", {n: i for i, n in enumerate(self.names)})

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return dict(self._index)

    def encode(self, value: int | str, where: str, column: str) -> int:
        """The id of a parsed label (parse_label), else DataError naming it and the known labels."""
        if isinstance(value, int) and self.ids:
            if 0 <= value < len(self.names):
                return value
        elif str(value) in self._index:  # str(): a name may be digits ("1" of a star rating named by hand)
            return self._index[str(value)]
        known = (f"ids 0..{len(self.names) - 1}" if self.ids else "names") + f" ({', '.join(self.names)})"
        kind = "an id" if isinstance(value, int) else "a name"
        raise DataError(f"{where}: unknown label {value!r} in column {column!r}; the training data's labels are "
                        f"{known} and this is {kind}. Fix the label, or train with data that has it")


def build_label_map(labels: Sequence[tuple[str, object]], name: str, column: str) -> LabelMap:
    """The mapping for training data: (where, raw label) pairs in, ids kept or names sorted."""
    parsed = [(where, parse_label(value, where, column)) for where, value in labels]
    first_id = next(((w, v) for w, v in parsed if isinstance(v, int)), None)
    first_name = next(((w, v) for w, v in parsed if isinstance(v, str)), None)
    if first_id and first_name:
        raise DataError(f"{name}: column {column!r} mixes integer ids ({first_id[1]} at {first_id[0]}) and names "
                        f"({first_name[1]!r} at {first_name[0]}); use one kind for every label")
    distinct = {v for _, v in parsed}
    if len(distinct) < 2:
        only = f"only the label {next(iter(distinct))!r}" if distinct else "no labels"
        raise DataError(f"{name}: column {column!r} has {only}, so there is nothing to tell apart; a classifier "
                        f"needs training examples of at least two classes (is {setting('task.label_column')} the right column?)")
    if first_id:
        return LabelMap(tuple(str(i) for i in range(max(distinct) + 1)), ids=True)
    # Plain code-point order: the same on every machine and locale, so the ids never depend on row order.
    return LabelMap(tuple(sorted(distinct)))


def label_kwargs(labels: LabelMap) -> dict:
    """from_pretrained arguments that size the head and name its outputs (saved in the model's config)."""
    return {"num_labels": len(labels.names), "id2label": labels.id2label, "label2id": labels.label2id}


def save_labels(folder, labels: LabelMap) -> None:
    """The run's label mapping, for eval and export to rebuild the same head (the model's id2label)."""
    (Path(folder) / LABELS_FILE).write_text(json.dumps({"names": list(labels.names), "ids": labels.ids}) + "\n")


def load_labels(folder) -> LabelMap | None:
    """The mapping save_labels wrote, or None when the folder has none (a causal-lm or seq2seq run)."""
    path = Path(folder) / LABELS_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return LabelMap(tuple(saved["names"]), ids=bool(saved["ids"]))
