"""What a run leaves behind to read: metrics.jsonl, TensorBoard events, loss_curve.png, summary.json,
and validation_split.json (which records were held out, for the export's parity gate)."""

from __future__ import annotations

import hashlib
import json
import platform
import resource
import sys
from pathlib import Path
from typing import Any

import torch

METRICS_FILE = "metrics.jsonl"
VALIDATION_SPLIT_FILE = "validation_split.json"
# Held-out examples copied as tokenised: enough for any parity gate, small on disk.
SPLIT_EXAMPLES = 64


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


def write_validation_split(run_dir: Path, cfg, data) -> Path:
    """Record the held-out records and the first SPLIT_EXAMPLES of them as tokenised for validation.

    Export checks its artefacts on examples training never saw. Re-deriving the split later from the
    data file and the seed silently goes wrong when the file moves or changes, so the split is written
    down now: which records (their sources), a digest of the file they came from, and the examples
    themselves (`labels[t] == input_ids[t]` where trained, -100 elsewhere).
    """
    from .config import BUILTIN_DATA

    d = cfg.data
    if d.validation_path:
        source, origin = f"validation file {d.validation_path}", d.validation_path
    elif d.path == BUILTIN_DATA and d.validation_fraction > 0:
        source, origin = "the bundled validation set", None
    elif d.validation_fraction > 0:
        source, origin = f"held-out fraction {d.validation_fraction} of {d.path}, seed {cfg.train.seed}", d.path
    else:
        source, origin = "none", None
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
    out = Path(run_dir) / "summary.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    return out
