"""The run directory `lite-sft tune` writes: checked before a run starts, and its adapter and summary at the end.

    lite-sft tune --output-dir runs/demo              # a new run: refused if runs/demo holds anything
    lite-sft tune --output-dir runs/demo --overwrite  # replaced
    lite-sft tune --output-dir runs/demo --resume     # continued from its last checkpoint, as configured then

The file names are lite_sft.artifacts'; what a step of the loop writes (checkpoints, metrics) is checkpoint.py's
and report.py's. A resumed run must be the run that was started: only RESUMABLE_CHANGES may differ.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from . import checkpoint, report
from .artifacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CONFIG_FILE
from .config import ConfigError, RunConfig, load_config
from .errors import RunDirError

# Fields that may change when resuming: they lengthen or shorten the run without changing its past.
RESUMABLE_CHANGES = {"train.max_steps", "train.epochs", "train.eval_every", "train.save_every",
                     "train.keep_last", "train.log_every", "train.early_stopping_patience"}


def check_run_dir(run_dir: Path, cfg: RunConfig, resume: bool, overwrite: bool) -> None:
    """Refuse a run that would overwrite another unasked, or resume one configured otherwise."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: pick one")
    if resume:
        if not checkpoint.list_checkpoints(run_dir):
            raise RunDirError(f"{run_dir} has no checkpoint to resume from; start afresh with --overwrite")
        saved = load_config(run_dir / CONFIG_FILE)
        _adopt_resolved(cfg, saved)
        changed = sorted(set(_flat(saved.to_dict()).items()) ^ set(_flat(cfg.to_dict()).items()))
        changed = sorted({k for k, _ in changed} - RESUMABLE_CHANGES)
        if changed:
            raise ConfigError(f"--resume continues {run_dir} as configured in {run_dir / CONFIG_FILE}; "
                              f"these fields differ from it: {', '.join(changed)}")
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise RunDirError(f"{run_dir} already exists: pass --overwrite to replace it or --resume to continue it")


def _adopt_resolved(cfg: RunConfig, saved: RunConfig) -> None:
    """Take what the run resolved at its start for what it was asked, so that resuming with the command
    that started it is accepted: `format: auto` was saved as the format detected, `auto_batch` as the
    micro-batch and accumulation it chose, `cpu_bf16: auto` as on or off."""
    if cfg.data.format == "auto":
        cfg.data.format = saved.data.format
    if cfg.model.cpu_bf16 == "auto":
        cfg.model.cpu_bf16 = saved.model.cpu_bf16
    if cfg.train.auto_batch and saved.train.auto_batch:
        cfg.train.micro_batch_size, cfg.train.grad_accum = saved.train.micro_batch_size, saved.train.grad_accum


def init_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    if overwrite and run_dir.exists() and not resume:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def save_adapter(model, run_dir: Path) -> None:
    """The adapter (and any task head) into the run directory, or nothing: no half-written adapter may pass for a
    finished run."""
    # Rows of added tokens are saved as peft trainable tokens; without this peft would also save the whole
    # resized embedding and output layer (135 MB on a 30M model) because their size changed.
    try:
        model.save_pretrained(run_dir, save_embedding_layers=False)
    except Exception as err:  # a full disk
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            (run_dir / name).unlink(missing_ok=True)
        raise checkpoint.write_failed(f"the adapter in {run_dir}", run_dir, err) from err


def summary(run, stopped_early: bool, skill_after: float | None) -> dict:
    """summary.json: what the run did and measured (`run` is train.Run)."""
    loop, unit = run.loop, run.task.unit_name
    metrics = report.read_metrics(run.run_dir)
    train_losses = [m["loss"] for m in metrics if "loss" in m]
    val_losses = [m["val_loss"] for m in metrics if "val_loss" in m]
    elapsed = max(loop["elapsed"], 1e-9)
    return {
        "task": run.task.name,
        "steps": loop["step"],
        "planned_steps": run.total_steps,
        "stopped_early": stopped_early,
        "processes": run.accelerator.num_processes,
        "device": str(run.accelerator.device),
        "train_examples": run.data.examples[0],
        "validation_examples": run.data.examples[1],
        "tokens": loop["tokens"],
        unit: loop["units"],
        "tokens_per_s": loop["tokens"] / elapsed,
        f"{unit}_per_s": loop["units"] / elapsed,
        "wall_s": loop["elapsed"],
        "final_train_loss": train_losses[-1] if train_losses else None,
        "final_val_loss": val_losses[-1] if val_losses else None,
        "best_val_loss": loop["best_val"] if math.isfinite(loop["best_val"]) else None,
        "best_step": loop["best_step"],
        "adapter_step": loop["best_step"] if stopped_early else loop["step"],
        "final_evaluation": run.last_eval or None,
        "skill_exact_match_before": run.skill_before,
        "skill_exact_match_after": skill_after,
        **report.peak_memory(run.accelerator.device),
        "versions": report.versions(),
    }
