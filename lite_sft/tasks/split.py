"""Which examples a run holds out for validation: one rule every task, the report and the export gate share.

    from lite_sft.tasks.split import held_out
    rule = held_out(cfg.data, cfg.train.seed)
    rule.kind                       # "file", "builtin", "fraction" or "none"
    train, validation = rule.split(records)    # the seeded fraction ("fraction"; nothing held out for "none")

data.validation_path, when given, is the held-out set; else the bundled data ships its own held-out file, which
any validation_fraction > 0 asks for; else a seeded random validation_fraction of the training records; a
fraction of 0 holds out nothing. Export re-derives the split by the same rule for runs that did not write it
down, so it must stay the one written here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lite_sft.config import BUILTIN_DATA, DataConfig, setting
from lite_sft.errors import DataError


@dataclass(frozen=True)
class HeldOut:
    """Where a run's validation examples come from."""

    kind: str
    """"file" (data.validation_path), "builtin" (the bundled held-out file), "fraction" (a seeded share of the
    training records) or "none"."""
    path: str | None
    """The file read for validation ("file"), or the one the fraction is split off ("fraction")."""
    fraction: float
    seed: int

    def split(self, records: list) -> tuple[list, list]:
        """(train, validation) of the training records: the seeded fraction, or all of them and none held out."""
        return split_validation(records, self.fraction, self.seed)


def held_out(d: DataConfig, seed: int) -> HeldOut:
    """The rule above, read from a run's data settings and seed."""
    if d.validation_path:
        return HeldOut("file", d.validation_path, d.validation_fraction, seed)
    if d.validation_fraction > 0 and d.path == BUILTIN_DATA:
        return HeldOut("builtin", None, d.validation_fraction, seed)
    if d.validation_fraction > 0:
        return HeldOut("fraction", d.path, d.validation_fraction, seed)
    return HeldOut("none", None, d.validation_fraction, seed)


def split_validation(samples: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a seeded random `fraction` (at least one sample) for validation; 0 holds out none."""
    if fraction <= 0:
        return samples, []
    if len(samples) < 2:
        raise DataError(f"data.validation_fraction={fraction} needs at least 2 examples to split, got "
                        f"{len(samples)}; add data, give {setting('data.validation_path')}, or set {setting('data.validation_fraction', 0)}")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    n_val = min(len(samples) - 1, max(1, round(len(samples) * fraction)))
    held = set(order[:n_val])
    return ([s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held])
