"""Two CPU processes under torchrun (DDP over gloo) match one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def _tune_args(model_dir, data, out, micro, accum):
    return ["-m", "lite_sft", "tune", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out),
            "--max-steps", "3", "--micro-batch-size", str(micro), "--grad-accum", str(accum), "--lr", "5e-3",
            "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--max-seq-len", "64",
            "--warmup-ratio", "0", "--eval-every", "3", "--save-every", "0", "--seed", "3"]


def _losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


def _grad_norms(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["grad_norm"] for r in rows if "grad_norm" in r]


def test_two_process_ddp_matches_single_process(tiny_model_dir, chat_jsonl, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    subprocess.run([sys.executable, *_tune_args(tiny_model_dir, chat_jsonl, single, micro=2, accum=2)],
                   check=True, env=env, capture_output=True, timeout=600)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         *_tune_args(tiny_model_dir, chat_jsonl, ddp, micro=2, accum=1)],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["processes"] == 2

    (train_1, val_1), (train_2, val_2) = _losses(single), _losses(ddp)
    assert len(train_1) == len(train_2) == 3
    assert train_2 == pytest.approx(train_1, rel=1e-4)
    assert val_2 == pytest.approx(val_1, rel=1e-4)
    # DDP averages gradients over processes; the loop must undo that exactly, not by a factor of the world size.
    assert _grad_norms(ddp) == pytest.approx(_grad_norms(single), rel=1e-4)
    a = load_file(str(single / "adapter_model.safetensors"))
    b = load_file(str(ddp / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-5)
