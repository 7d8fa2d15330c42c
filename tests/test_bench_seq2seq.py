"""benchmarks/seq2seq.py: its task holds out whole sources, and its quickest mode tunes, exports and reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the script imports its helpers from beside itself
    import importlib

    return importlib.import_module("seq2seq")


def test_held_out_sources_are_never_trained_on(bench):
    train, held_out = bench.split_pairs(0.2)
    assert len(held_out) == round(0.2 * (len(train) + len(held_out)))
    assert not {p["source"] for p in train} & {p["source"] for p in held_out}
    pairs = {p["source"]: p["target"] for p in bench.all_pairs()}
    assert pairs["count : three 7"] == "three four five six seven"
    assert pairs["translate : eight 5"] == "huit sept six cinq"
    assert min(len(t.split()) for t in pairs.values()) == 4  # every target has BLEU's 4-grams


def test_word_tokenizers_follow_each_family(bench):
    t5, bart = bench.word_tokenizer("t5"), bench.word_tokenizer("bart")
    assert t5("count : three 7")["input_ids"][-1] == t5.eos_token_id == 1 and t5.pad_token_id == 0
    ids = bart("huit sept")["input_ids"]
    assert ids[0] == bart.bos_token_id == 0 and ids[-1] == bart.eos_token_id == 2 and bart.pad_token_id == 1
    assert bart.decode(ids, skip_special_tokens=True) == "huit sept"


@pytest.mark.slow
def test_quick_run_prints_the_table_and_json(tmp_path):
    cmd = [sys.executable, str(BENCH / "seq2seq.py"), "--quick", "--steps", "5", "--work", str(tmp_path), "--no-save"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.splitlines()
    result = json.loads(out[-1])
    assert result["benchmark"] == "seq2seq" and "seq2seq.py --quick" in result["command"] and result["date"]
    assert result["device"]["type"] == "cpu"
    assert {"torch", "transformers", "peft", "onnxscript", "onnxruntime"} <= set(result["versions"])
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"t5", "bart"}
    for name, r in rows.items():
        assert sum(line.startswith(name) for line in out) == 2, name  # a training line and an export line
        assert r["steps"] == 5 and r["train_s"] > 0 and r["tokens_per_s"] > 0 and r["target_tokens_per_s"] > 0
        assert r["held_out_pairs"] > 0 and 0 < r["trainable_params"] < r["params"]
        assert set(r["before"]) == set(r["after"]) == {"val_loss", "bleu", "rouge1", "rouge2", "rougeL", "exact_match"}
        exported = r["export"]
        assert [g["stage"] for g in exported["gates"]] == ["merge", "onnx", "int8"]
        assert all(g["passed"] for g in exported["gates"]) and exported["gates"][2]["size_bytes"] > 0
        assert {"bleu", "exact_match", "generate_s"} <= set(exported["onnx"]) == set(exported["onnx-int8"])
    assert (tmp_path / "t5-run" / "generation_config.json").is_file()
