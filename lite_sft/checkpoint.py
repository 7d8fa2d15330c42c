"""Atomic training checkpoints: adapter weights, optimiser, scheduler, RNG and loop state.

A checkpoint is written to `checkpoints/.tmp-step-N`, then renamed to `checkpoints/step-N` in one
`os.replace`, so a folder named `step-N` is always complete: an interrupted write leaves only a
`.tmp-` folder, which the next save removes. Only the newest `keep_last` complete checkpoints are kept,
and an older one is deleted only after a newer one is complete.

With early stopping, the adapter with the lowest validation loss so far lives in `best/` (its weights
and `best.json`: step and loss), written the same way whenever validation improves, and every checkpoint
carries a copy of the best as of its step. It is on disk, not in memory, so a run that is interrupted,
resumed and then stops early still keeps the best adapter.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from .errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
_STEP_RE = re.compile(r"^step-(\d+)$")




def resume_hint(run_dir: Path) -> str:
    """Where a stopped run can continue from, as a sentence: its newest complete checkpoint and the command."""
    found = list_checkpoints(run_dir)
    if not found:
        return (f"no checkpoint of {run_dir} was saved yet (train.save_every, --save-every): start it again with "
                f"--overwrite")
    step, path = found[-1]
    return (f"the last good checkpoint is step {step} ({path}): continue with "
            f"`lite-sft tune --output-dir {run_dir} --resume`")


def write_failed(what: str, run_dir: Path, err: Exception) -> CheckpointError:
    first = (str(err).splitlines() or [type(err).__name__])[0]
    return CheckpointError(f"could not write {what} ({type(err).__name__}: {first}; is the disk full?); "
                           f"{resume_hint(run_dir)} once there is room")


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The parameters that train (LoRA and any trainable token rows), by their full names."""
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise RuntimeError(f"checkpoint lacks {len(missing)} trainable tensors (first: {missing[0]}): was it written by a different config?")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, loop_state: dict, keep_last: int) -> Path:
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    try:
        tmp.mkdir()
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
                    "loop": loop_state}, tmp / "state.pt")
        best = read_best(run_dir)
        if best is not None:  # the best as of this step, so that a resume from here knows it (restore_best)
            shutil.copytree(best[0], tmp / BEST_DIR)
        _fsync_dir(tmp)
    except BaseException as err:  # Ctrl-C too: no partial folder is left for anyone to mistake for a checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception):  # safetensors, torch.save and shutil each fail on a full disk differently
            raise write_failed(f"checkpoint step {step} in {root}", run_dir, err) from err
        raise
    if final.exists():  # a re-run of the same step after a resume: replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore everything a checkpoint holds; returns the loop state saved with it."""
    load_trainable_state(model, load_file(str(Path(path) / "trainable.safetensors")))
    # weights_only=False: the file holds Python RNG tuples and numpy state, written by this code.
    state = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state["loop"]


def save_best(run_dir: Path, model, step: int, val_loss: float) -> Path:
    """Write the trainable weights as RUN_DIR/best/, replacing the previous best only once complete."""
    def fill(tmp: Path) -> None:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        (tmp / "best.json").write_text(json.dumps({"step": step, "val_loss": val_loss}) + "\n")

    return _replace_best(Path(run_dir), fill)


def restore_best(checkpoint_dir: Path, run_dir: Path) -> None:
    """Make RUN_DIR/best/ the best as of `checkpoint_dir`: one saved after it belongs to the steps a resumed
    run replays (it re-earns it, or not, itself), and the best it replaced must come back."""
    saved = Path(checkpoint_dir) / BEST_DIR
    if (saved / "best.json").is_file():
        _replace_best(Path(run_dir), lambda tmp: [shutil.copy2(f, tmp / f.name) for f in saved.iterdir()])
    else:
        discard_best(run_dir)


def _replace_best(root: Path, fill) -> Path:
    final, tmp, old = root / BEST_DIR, root / f".tmp-{BEST_DIR}", root / f".old-{BEST_DIR}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        _fsync_dir(tmp)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, Exception):
            raise write_failed(f"the best adapter {final}", root, err) from err
        raise
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():  # a folder cannot be renamed over a non-empty one: move the old best aside first
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)
    return final


def read_best(run_dir: Path) -> tuple[Path, dict] | None:
    """(folder, {"step", "val_loss"}) of the saved best adapter, or None. A crash between the two renames
    of save_best leaves the previous best in .old-best, which is still a complete one."""
    for folder in (Path(run_dir) / BEST_DIR, Path(run_dir) / f".old-{BEST_DIR}"):
        try:
            meta = json.loads((folder / "best.json").read_text())
        except (OSError, ValueError):
            continue
        if (folder / "trainable.safetensors").is_file():
            return folder, meta
    return None


def discard_best(run_dir: Path) -> None:
    for name in (BEST_DIR, f".old-{BEST_DIR}", f".tmp-{BEST_DIR}"):
        shutil.rmtree(Path(run_dir) / name, ignore_errors=True)


def load_best(run_dir: Path, model) -> dict:
    """Put the saved best adapter into `model`; returns its {"step", "val_loss"}."""
    found = read_best(run_dir)
    if found is None:
        raise RuntimeError(f"{run_dir} has no saved best adapter ({BEST_DIR}/)")
    folder, meta = found
    load_trainable_state(model, load_file(str(folder / "trainable.safetensors")))
    return meta


def _fsync_dir(path: Path) -> None:
    """Flush file contents and the directory entry so a crash cannot leave a renamed-but-empty checkpoint."""
    for f in Path(path).iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
