"""benchmarks/train_vs_trl.py: the verdict on made-up numbers, and a smoke run of its quickest mode."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
CPU = {"model": "llama35m", "quant": "none", "micro_batch": None}


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the script imports its helpers from beside itself
    import train_vs_trl

    return train_vs_trl


def fake(name: str, side: str, examples_per_s: float, val: float = 2.0, tail: float = 2.2, **extra) -> dict:
    """A finished run with every field the verdict and the table read."""
    return {"name": name, "side": side, "examples_per_s": examples_per_s, "trained_tokens_per_s": 100 * examples_per_s,
            "val_loss": val, "tail_train_loss": tail, "first_train_loss": 10.4, "final_train_loss": tail,
            "trained_tokens": 1000, "wall_s": 10 / examples_per_s, "setup_s": 1.0, "peak_rss_bytes": 2**30,
            "working_bytes": 2**29, **extra}


def test_targets_met_when_faster_at_equal_loss(bench):
    runs = [fake("TRL default", "trl", 1.0), fake("TRL packed", "trl", 2.0), fake("TRL packed-mb1", "trl", 2.5),
            fake("lite-sft", "lite-sft", 5.0, val=2.01, tail=2.19)]
    verdict = bench.judge(runs, "cpu", CPU)
    assert verdict["trl_default"] == "TRL default" and verdict["trl_best"] == "TRL packed-mb1"  # the fastest
    lite = runs[-1]
    assert lite["void"] is None and lite["speedup_vs_trl_default"] == pytest.approx(5.0)
    assert lite["speedup_vs_trl_best"] == pytest.approx(2.0)
    assert [t["met"] for t in verdict["targets"]] == [True, True]


def test_not_met_when_not_fast_enough(bench):
    runs = [fake("TRL default", "trl", 1.0), fake("TRL packed", "trl", 2.0), fake("lite-sft", "lite-sft", 2.5)]
    assert [t["met"] for t in bench.judge(runs, "cpu", CPU)["targets"]] == [True, False]  # 2.5x, but 1.25x best


def test_different_losses_void_the_comparison(bench):
    runs = [fake("TRL default", "trl", 1.0), fake("TRL packed", "trl", 2.0), fake("lite-sft", "lite-sft", 9.0, val=2.06)]
    verdict = bench.judge(runs, "cpu", CPU)
    assert runs[-1]["void"] == "VOID: losses differ by 3.0%"
    assert [t["met"] for t in verdict["targets"]] == [False, False]  # fast, but not at equal loss
    assert "VOID: losses differ by 3.0%" in bench.table(runs, "cpu", verdict)
    # The train loss counts as much as the validation loss, and 2% is allowed.
    runs = [fake("TRL default", "trl", 1.0), fake("lite-sft", "lite-sft", 9.0, tail=2.2 * 1.019)]
    bench.judge(runs, "cpu", CPU)
    assert runs[-1]["void"] is None
    runs = [fake("TRL default", "trl", 1.0), fake("lite-sft", "lite-sft", 9.0, tail=2.2 * 1.021)]
    bench.judge(runs, "cpu", CPU)
    assert runs[-1]["void"] == "VOID: losses differ by 2.1%"


def test_a_trl_variant_with_other_losses_is_not_best_and_errors_are_skipped(bench):
    runs = [fake("TRL default", "trl", 1.0), fake("TRL packed", "trl", 5.0, val=2.5), fake("TRL grouped", "trl", 1.5),
            {"name": "torch.compile", "side": "lite-sft", "error": "RuntimeError: no compiler"},
            fake("lite-sft", "lite-sft", 3.0)]
    verdict = bench.judge(runs, "cpu", CPU)
    assert verdict["trl_best"] == "TRL grouped" and runs[1]["void"] == "VOID: losses differ by 25.0%"
    assert runs[-1]["speedup_vs_trl_best"] == pytest.approx(2.0)
    text = bench.table(runs, "cpu", verdict)
    assert "ERROR: RuntimeError: no compiler" in text and "TRL grouped [best]" in text


def test_gpu_targets(bench):
    def runs(lite_reserved: float) -> list[dict]:
        return [fake("TRL default", "trl", 1.0, peak_allocated_bytes=8 * 2**30, peak_reserved_bytes=10 * 2**30),
                fake("lite-sft", "lite-sft", 2.5, peak_allocated_bytes=2**30, peak_reserved_bytes=lite_reserved * 2**30)]

    qwen = {"model": "qwen0.5b", "quant": "4bit", "micro_batch": None}
    measured = runs(4.0)
    verdict = bench.judge(measured, "cuda", qwen)
    assert [t["met"] for t in verdict["targets"]] == [True, None]
    assert "2.50x tokens/s, 0.40x peak reserved" in bench.table(measured, "cuda", verdict)
    assert [t["met"] for t in bench.judge(runs(6.0), "cuda", qwen)["targets"]] == [False, None]  # 0.6x memory
    llama = {"model": "llama8b", "quant": "4bit", "micro_batch": 1}
    assert [t["met"] for t in bench.judge(runs(6.5), "cuda", llama)["targets"]] == [None, True]
    assert [t["met"] for t in bench.judge(runs(7.5), "cuda", llama)["targets"]] == [None, False]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                    reason="trl is not installed; the benchmark compares against it (pip install -c constraints.txt '.[bench]')")
def test_quick_run_prints_the_table_and_json(tmp_path):
    cmd = [sys.executable, str(BENCH / "train_vs_trl.py"), "--quick", "--rows", "lite-sft", "--trl", "default,packed",
           "--examples", "16", "--val-examples", "8", "--threads", "1", "--work-dir", str(tmp_path), "--no-save"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.splitlines()
    result = json.loads(out[-1])
    runs = {r["name"]: r for r in result["runs"]}
    assert set(runs) == {"TRL default", "TRL packed", "lite-sft"}
    assert not [r["error"] for r in runs.values() if r.get("error")]
    for name, r in runs.items():
        assert any(line.startswith(name) for line in out), name
        assert r["trained_tokens"] > 0 and r["wall_s"] > 0 and r["val_loss"] > 0 and r["tail_train_loss"] > 0
    # One pass over the same 16 examples, masked the same way: TRL trains on exactly these tokens, and
    # lite-sft on these plus at most the rows its last step takes from the next epoch's order.
    assert runs["TRL default"]["trained_tokens"] == runs["TRL packed"]["trained_tokens"]
    assert runs["lite-sft"]["trained_tokens"] >= runs["TRL default"]["trained_tokens"]
    assert result["trl_best"] == "TRL packed" and len(result["targets"]) == 2
    assert all(t["met"] in (True, False) for t in result["targets"])
    assert {"torch", "transformers", "peft", "trl", "accelerate"} <= set(result["versions"])
    assert result["device"]["cpu"] and "train_vs_trl.py --quick" in result["command"]
    assert any(line.startswith("target ") for line in out)
