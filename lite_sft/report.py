"""What a run leaves behind to read: metrics.jsonl, TensorBoard events, loss_curve.png and summary.json.

    python -c "from lite_sft.report import plot_losses; plot_losses('runs/demo')"    # runs/demo/loss_curve.png

(validation_split.json, the held-out examples for the export's parity gate, is causal-lm's: its data.py writes it.)
"""

from __future__ import annotations

import json
import platform
import resource
import sys
from pathlib import Path
from typing import Any

import torch

from lite_sft.artifacts import METRICS_FILE, SUMMARY_FILE


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        if resume_step is not None and self.path.exists():
            # Lines past the checkpoint came from the interrupted run; the resumed run writes them again.
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None:
            self.path.write_text("")
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step)

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        self.tb.close()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def plot_losses(run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss (per trained token)")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(run_dir) / "loss_curve.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak allocated/reserved on CUDA; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return {
            "peak_memory_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "peak_memory_reserved_bytes": torch.cuda.max_memory_reserved(device),
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_bytes": rss if sys.platform == "darwin" else rss * 1024}


def versions() -> dict[str, str]:
    import accelerate
    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    out = Path(run_dir) / SUMMARY_FILE
    out.write_text(json.dumps(summary, indent=2) + "\n")
    return out
