"""What tune does with an evaluation: log and print it, keep the best adapter, stop early; and the demo's score.

    lite-sft tune --eval-every 50 --early-stopping-patience 3 ...   # stop after 3 evaluations with no better loss

The figures themselves are the task's (Task.evaluate); `run` is train.Run throughout.
"""

from __future__ import annotations

from typing import Callable

from . import checkpoint
from .config import BUILTIN_DATA
from .stops import read_stop_tokens
from .tiny import exact_match, load_skill_eval


def record_evaluation(run, step: int, figures: dict, say: Callable[[str], None]) -> bool:
    """Log and print an evaluation, keep the best adapter; True when early stopping's patience ran out."""
    loop, val_loss = run.loop, figures["val_loss"]
    run.last_eval = {"step": step, **figures}
    scalars = {k: v for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if run.main:
        run.log.log({"step": step, **{k if k.startswith("val_") else f"val_{k}": v for k, v in scalars.items()}})
        say(f"step {step}: validation " + ", ".join(
            f"{k.removeprefix('val_').replace('_', ' ')} " + (f"{v:.4f}" if isinstance(v, float) else f"{v}")
            for k, v in scalars.items()))
    if val_loss < loop["best_val"]:
        loop.update(best_val=val_loss, best_step=step, bad_evals=0)
        if run.cfg.train.early_stopping_patience and run.main:
            checkpoint.save_best(run.run_dir, run.accelerator.unwrap_model(run.model), step, val_loss)
        return False
    loop["bad_evals"] += 1
    patience = run.cfg.train.early_stopping_patience
    return bool(patience) and loop["bad_evals"] >= patience


def skill_score(run) -> float | None:
    """Held-out exact match on the bundled skill data (the embedded default only)."""
    if run.cfg.data.path != BUILTIN_DATA:
        return None
    score = None
    if run.main:
        # Stopped where generation stops after export and in the server: the list the run directory records.
        score = exact_match(run.accelerator.unwrap_model(run.model), run.tokenizer, load_skill_eval(),
                            stop_ids=read_stop_tokens(run.run_dir))
        print(f"held-out exact match: {score:.1%}")
    run.accelerator.wait_for_everyone()
    return score
