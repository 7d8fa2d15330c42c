"""`lite-sft eval`: a finished run's task metrics on a data file, written as JSON.

    lite-sft eval runs/sentiment --data dev.tsv --text-column content     # accuracy, macro-F1, per class, confusion
    lite-sft eval runs/qwen --data held_out.jsonl                         # loss and perplexity

The file is read the way the run read its validation data (the run's config.yaml: columns, label mapping,
max_seq_len, chat template); flags override the columns. The model is base + adapter, unmerged, as
`lite-sft tune` left it: the figures are the tuned model's, before any export.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .errors import ConfigError
from .model import load_tuned, mixed_precision
from .report import versions
from .tasks.base import get_task

# Flag -> the task field it overrides for the evaluation file.
COLUMN_FIELDS = ("text_column", "text_pair_column", "label_column", "tag_column", "tokens_key", "tags_key",
                 "source_column", "target_column")


def evaluate_run(run_dir: str | Path, data: str, out: str | Path | None = None, batch_size: int | None = None,
                 **columns) -> dict:
    """Evaluate RUN_DIR on `data`; writes `out` (default RUN_DIR/eval-<file name>.json) and returns the report.
    `batch_size` defaults to the run's micro-batch: training evaluated in batches of that size, and other
    batches pad differently, which moves the last digits of the figures."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    run_dir = Path(run_dir)
    unknown = set(columns) - set(COLUMN_FIELDS)
    if unknown:
        raise ConfigError(f"unknown column settings {sorted(unknown)}; known: {', '.join(COLUMN_FIELDS)}")
    model, tokenizer, cfg = load_tuned(run_dir, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    for name, value in columns.items():
        if value is not None:
            setattr(cfg.task, name, value)
            if name == "text_column":  # the file given is read with this column, whatever the run's validation file used
                cfg.task.validation_text_column = None
    task = get_task(cfg.task.name)
    rows = task.eval_rows(cfg, tokenizer, data, run_dir)
    if not rows:
        raise ConfigError(f"{data}: no examples to evaluate")
    started = time.perf_counter()
    AcceleratorState._reset_state()  # as tune does: this process may have tuned with another precision
    # The precision the run trained and evaluated in (config.yaml records what cpu_bf16 auto chose), so the
    # figures equal the final evaluation of training on the same data.
    precision = mixed_precision(cfg.model, model.device.type)
    accelerator = Accelerator(mixed_precision=precision, cpu=model.device.type == "cpu")
    figures = task.evaluate(model, rows, tokenizer, accelerator, batch_size or cfg.train.micro_batch_size)
    report = {"run_dir": str(run_dir), "data": str(data), "task": task.name, "examples": len(rows),
              "precision": "bf16 autocast" if precision == "bf16" else str(model.dtype).removeprefix("torch."),
              "seconds": round(time.perf_counter() - started, 3), **figures, "versions": versions()}
    path = Path(out) if out is not None else run_dir / f"eval-{Path(data).name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    report["written_to"] = str(path)
    return report


def format_report(report: dict) -> str:
    """The headline figures, one per line (the JSON file has everything)."""
    lines = [f"{report['task']} on {report['data']}: {report['examples']} examples"]
    for key, value in report.items():
        if isinstance(value, float) and key != "seconds":
            lines.append(f"  {key.replace('_', ' ')}: {value:.4f}")
    for sample in report.get("samples") or []:  # seq2seq: a few predictions beside their references
        lines.append(f"  {sample['source']!r} -> {sample['prediction']!r} (reference {sample['reference']!r})")
    if report.get("unread_words"):
        lines.append(f"  {report['unread_words']} words cut off by truncation, counted as predicted O")
    for name, scores in (report.get("per_class") or report.get("per_type") or {}).items():
        lines.append(f"  {name}: precision {scores['precision']:.4f}, recall {scores['recall']:.4f}, "
                     f"f1 {scores['f1']:.4f}, support {scores['support']}")
    return "\n".join(lines)
