"""Held-out perplexity of each export stage, defined as `lite-sft tune` defines its validation perplexity.

    texts, on = held_out_texts(run_dir, cfg, tokenizer)       # [(input_ids, labels)], what they are
    ppl = perplexity(lambda ids: model(input_ids=ids).logits[0], texts)

tune's figure (tasks/causal_lm/) is exp of the mean cross-entropy over the trained tokens (labels not
IGNORE_INDEX) of the validation split. Export measures the same thing on the same examples, as tune
tokenised them (RUN_DIR/validation_split.json), so the adapter model's figure here is tune's last one; an
earlier definition (every token, prompts included, of four examples) gave 118.9 where tune said 1.63.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from lite_sft.tasks.base import IGNORE_INDEX
from lite_sft.tasks.causal_lm.data import SPLIT_EXAMPLES, prepare_data

from .prompts import SPLIT_FILE, read_split


def held_out_texts(run_dir: Path, cfg, tokenizer) -> tuple[list[tuple[list[int], list[int]]], str]:
    """The held-out examples as (input_ids, labels), and a line saying which they are. A run without
    validation_split.json (an older lite-sft) has its split prepared again from the data files, as tune did."""
    path = Path(run_dir) / SPLIT_FILE
    if path.is_file():
        split = read_split(path)
        texts = [(ex["input_ids"], ex["labels"]) for ex in split["examples"]]
        count, where = split.get("count", len(texts)), f"in {SPLIT_FILE}"
    else:
        try:
            examples = prepare_data(cfg.data, tokenizer, seed=cfg.train.seed).validation_examples
        except Exception as err:  # a moved data file, a hub set offline: the gates still run, and say so
            return [], f"not measured: no {SPLIT_FILE} in the run and its validation data cannot be read ({err})"
        texts = [(ex.input_ids, ex.labels) for ex in examples[:SPLIT_EXAMPLES]]
        count, where = len(examples), f"re-derived from the data files (no {SPLIT_FILE} in the run)"
    texts = [(ids, labels) for ids, labels in texts if any(label != IGNORE_INDEX for label in labels[1:])]
    if not texts:
        return [], "not measured: the run held out no validation examples"
    which = f"the {len(texts)}" if len(texts) == count else f"the first {len(texts)} of {count}"
    return texts, f"{which} held-out examples {where}, trained tokens only, as tune's validation perplexity"


@torch.no_grad()
def perplexity(logits_of, texts: list[tuple[list[int], list[int]]]) -> float | None:
    """exp(mean next-token cross-entropy over trained tokens); logits_of(ids (1, seq)) -> (seq, vocab)."""
    total, count = 0.0, 0
    for ids, labels in texts:
        targets = torch.tensor(labels[1:])  # position t predicts token t + 1
        logits = logits_of(torch.tensor([ids])).float()
        total += F.cross_entropy(logits[:-1], targets, ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((targets != IGNORE_INDEX).sum())
    return math.exp(min(total / count, 50)) if count else None
