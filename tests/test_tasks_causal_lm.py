"""causal-lm's data line, as `lite-sft tune` prints it."""

from __future__ import annotations

import json

import pytest

from lite_sft.config import RunConfig
from lite_sft.tasks.causal_lm import CausalLMTask

SHORT = {"prompt": "what is two plus four", "completion": " the answer is four"}
LONG = {"prompt": "hello there", "completion": " fine thanks" * 20}


@pytest.mark.parametrize("overlong, expected", [("truncate", "1 truncated to 16 tokens"),
                                                ("drop", "1 dropped as longer than 16 tokens")])
def test_the_data_line_counts_overlong_examples(tmp_path, tokenizer, overlong, expected):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (SHORT, SHORT, LONG)))
    cfg = RunConfig()
    cfg.data.path, cfg.data.max_seq_len, cfg.data.overlong = str(path), 16, overlong
    cfg.data.validation_fraction, cfg.data.cache = 0, False
    summary = CausalLMTask().prepare(cfg, tokenizer).summary
    assert expected in summary, summary
