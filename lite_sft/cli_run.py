"""The commands about a tuning run: `tune`, `inspect-data`, `plan`, `generate` and `eval` (lite_sft.cli registers them).

    lite-sft tune --model Qwen/Qwen2.5-0.5B --data chats.jsonl --quant 4bit --output-dir runs/qwen
    lite-sft eval runs/sentiment --data dev.csv

Each builds its config from the flags (generated from the config's fields, see cli_options.py) and calls one
library function, imported inside the command so that `--help` answers without loading torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .artifacts import CONFIG_FILE
from .cli_options import Given, fail, options
from .errors import CheckpointError, ConfigError, DataError, ModelError, RunDirError
from .options import EvalOptions, GenerateOptions

# What a run command reports as `error: ...` (exit 2) rather than a traceback.
RUN_ERRORS = (CheckpointError, ConfigError, DataError, ModelError, RunDirError)

RunDir = Annotated[Path, typer.Argument(help="A `lite-sft tune` output directory.")]

TUNE = (
    "TuneOptions.config", "model.name_or_path", "data.path", "data.format", "output_dir", "model.quant",
    "model.dtype", "model.cpu_bf16", "model.gradient_checkpointing", "model.attn_implementation",
    "model.trust_remote_code", "model.compile", "model.offload_activations",
    "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules", "lora.use_dora", "lora.use_rslora",
    "data.max_seq_len", "data.overlong", "data.packing", "data.train_on_prompt", "data.chat_template",
    "data.system_prompt", "data.validation_path", "data.validation_fraction", "data.group_by_length", "data.cache",
    "train.epochs", "train.max_steps", "train.micro_batch_size", "train.grad_accum", "train.auto_batch",
    "train.memory_budget", "train.loss", "train.loss_chunk_tokens", "train.lr", "train.weight_decay",
    "train.schedule", "train.warmup_ratio", "train.max_grad_norm", "train.optimizer", "train.seed",
    "train.eval_every", "train.early_stopping_patience", "train.save_every", "train.keep_last", "train.log_every",
    "task.name", "task.text_column", "task.validation_text_column", "task.text_pair_column", "task.label_column",
    "task.class_weights", "task.tag_column", "task.tokens_key", "task.tags_key", "task.tag_scheme",
    "task.source_column", "task.target_column", "task.max_target_len", "task.max_new_tokens", "task.num_beams",
    "TuneOptions.resume", "TuneOptions.overwrite",
)
# A file's columns, as `eval` and `inspect-data` take them.
COLUMNS = ("task.text_column", "task.text_pair_column", "task.label_column", "task.tag_column", "task.tokens_key",
           "task.tags_key", "task.source_column", "task.target_column")
INSPECT = (
    "TuneOptions.config", "data.path", "InspectOptions.model", "task.name", "data.format", "data.max_seq_len",
    "data.overlong", "data.packing", "data.train_on_prompt", "data.chat_template", "data.system_prompt",
    "data.validation_path", "data.validation_fraction", "task.text_column", "task.validation_text_column",
    "task.text_pair_column", "task.label_column", "task.tag_column", "task.tokens_key", "task.tags_key",
    "task.tag_scheme", "task.source_column", "task.target_column", "task.max_target_len",
    "InspectOptions.examples", "InspectOptions.color",
)
PLAN = (
    "TuneOptions.config", "model.name_or_path", "model.quant", "model.dtype", "model.gradient_checkpointing",
    "model.trust_remote_code", "lora.r", "lora.dropout", "lora.target_modules", "lora.use_dora", "data.max_seq_len",
    "train.micro_batch_size", "train.grad_accum", "train.loss", "train.loss_chunk_tokens", "train.memory_budget",
    "PlanOptions.device", "PlanOptions.as_json",
)
GENERATE = tuple(f"GenerateOptions.{name}" for name in ("prompt", "system", "max_new_tokens", "temperature", "top_p",
                                                         "seed"))
EVAL = ("EvalOptions.data", "EvalOptions.out", "EvalOptions.batch_size", *COLUMNS)


def _load(config: Path | None, overrides: dict):
    """The run config: the YAML file (--config), then the flags; the demo's settings under both for the built-in
    model."""
    from .config import load_config

    return load_config(config, overrides)


def _size(text: str, flag: str) -> int:
    """Bytes in a size like 8GB; a ConfigError naming `flag` (the option or config field) if it is not one."""
    from .plan import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise ConfigError(f"{flag}: {err}") from None


def _budget_name(given: Given) -> str:
    return "--gpu-memory" if given["train.memory_budget"] is not None else "train.memory_budget"


@options(*TUNE)
def tune(given: Given):
    """Fine-tune a model with LoRA / QLoRA: a causal LM on chat or instruction data (the default task), or an
    encoder / encoder-decoder for --task seq-cls, token-cls or seq2seq. With no --model and --data: the
    embedded offline default."""
    config, resume, output_dir = given["TuneOptions.config"], given["TuneOptions.resume"], given["output_dir"]
    cfg = None
    try:
        if resume and config is None and output_dir and (Path(output_dir) / CONFIG_FILE).is_file():
            config = Path(output_dir) / CONFIG_FILE  # continue the run as it was configured
        cfg = _load(config, given.overrides())
        if cfg.train.memory_budget is not None:  # checked here so a typo fails before anything loads
            _size(cfg.train.memory_budget, _budget_name(given))
        from .train import TrainingDiverged, tune as run_tune

        summary = run_tune(cfg, resume=resume, overwrite=given["TuneOptions.overwrite"])
    except RUN_ERRORS as err:
        fail(err)
    except KeyboardInterrupt:
        _interrupted(Path(cfg.output_dir) if cfg is not None else None)
    except TrainingDiverged as err:
        fail(err, code=1)
    if summary is None:  # not the main process
        return
    _report(cfg, summary)


def _report(cfg, summary: dict) -> None:
    typer.echo(f"\nrun directory: {cfg.output_dir}")
    unit = next(k for k in ("trained_tokens", "labelled_tokens", "target_tokens", "examples") if k in summary)
    # A run shorter than --log-every logged no training loss.
    typer.echo(f"  steps {summary['steps']}, {unit.replace('_', ' ')} {summary[unit]:g}, "
               f"{summary['tokens_per_s']:.0f} tokens/s"
               + (f", final train loss {summary['final_train_loss']:.4f}" if summary["final_train_loss"] is not None else "")
               + (f", validation loss {summary['final_val_loss']:.4f}" if summary["final_val_loss"] is not None else ""))
    if summary.get("skill_exact_match_after") is not None:
        before = summary["skill_exact_match_before"]  # None after resuming a checkpoint that did not keep it
        typer.echo(f"  held-out exact match: {'?' if before is None else f'{before:.1%}'} before -> "
                   f"{summary['skill_exact_match_after']:.1%} after tuning")
    if summary.get("final_evaluation"):
        from .evaluate import format_report

        typer.echo(format_report({"task": cfg.task.name, "data": "the validation data",
                                  "examples": summary["validation_examples"], **summary["final_evaluation"]}))
    if cfg.task.name == "causal-lm":
        example = "Write 90210 backwards." if summary.get("skill_exact_match_after") is not None else "..."
        typer.echo(f"  try it: lite-sft generate {cfg.output_dir} --prompt \"{example}\"")
    else:
        typer.echo(f"  evaluate it on a file: lite-sft eval {cfg.output_dir} --data FILE")


def _interrupted(run_dir: Path | None):
    """Ctrl-C during tune: what was saved, and how to go on (exit 130, as a shell reports SIGINT)."""
    from .checkpoint import resume_hint

    if run_dir is None or not (run_dir / CONFIG_FILE).is_file():  # before the run directory was written
        typer.secho("interrupted before training started: nothing was written", fg=typer.colors.YELLOW, err=True)
    else:
        typer.secho(f"interrupted: {resume_hint(run_dir)}", fg=typer.colors.YELLOW, err=True)
    raise typer.Exit(130)


@options(*INSPECT)
def inspect_data(given: Given):
    """Show examples as they are trained (trained and ignored tokens, a text's label, each sub-token's tag,
    a target's tokens) and the data set's counts."""
    overrides = {**given.overrides(), "model.name_or_path": given["InspectOptions.model"]}
    try:
        cfg = _load(given["TuneOptions.config"], overrides)
        cfg.validate()
        from .inspect_data import render_report, render_task_report
        from .model import check_task_model, load_tokenizer, resolve_model_path
        from .tasks.base import get_task

        chosen = get_task(cfg.task.name)
        path = resolve_model_path(cfg.model.name_or_path)
        if chosen.name == "causal-lm":  # needs only the tokenizer: a folder may hold nothing else
            from .tasks.causal_lm.data import prepare_data

            tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
            prepared = prepare_data(cfg.data, tokenizer, seed=cfg.train.seed)  # templates the tokenizer if needed
        else:
            check_task_model(chosen, path, cfg.model)  # a base that cannot do the task is refused, as tune refuses it
            tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
            prepared = chosen.prepare(cfg, tokenizer)
    except RUN_ERRORS as err:
        fail(err)
    color, examples = given["InspectOptions.color"], given["InspectOptions.examples"]
    use_color = sys.stdout.isatty() if color is None else color
    if chosen.name == "causal-lm":
        typer.echo(render_report(prepared, tokenizer, n=examples, color=use_color))
    else:
        typer.echo(render_task_report(chosen, prepared, tokenizer, n=examples, color=use_color))


@options(*PLAN)
def plan(given: Given):
    """Estimate peak training memory from the config alone (no weights loaded); with --gpu-memory, pick a micro-batch."""
    import json

    device = given["PlanOptions.device"]
    try:
        if device not in ("cuda", "cpu"):
            raise ConfigError(f"--device {device!r}: choose cuda or cpu")
        cfg = _load(given["TuneOptions.config"], given.overrides())
        cfg.validate()
        from .plan import default_budget, report

        budget = None
        if cfg.train.memory_budget is not None:
            budget = _size(cfg.train.memory_budget, _budget_name(given))
        elif cfg.train.auto_batch:
            budget = default_budget(device)
        summary, text = report(cfg, device, budget)
    except RUN_ERRORS as err:
        fail(err)
    typer.echo(json.dumps(summary) if given["PlanOptions.as_json"] else text)


@options(*GENERATE)
def generate(run_dir: RunDir, given: Given):
    """Answer prompts with a tuned model (base + adapter from RUN_DIR)."""
    opts = GenerateOptions(**given.of(GenerateOptions))
    try:
        from .generate import answer

        for text in answer(run_dir, opts.prompt, system=opts.system, max_new_tokens=opts.max_new_tokens,
                           temperature=opts.temperature, top_p=opts.top_p, seed=opts.seed):
            typer.echo(text)
    except RUN_ERRORS as err:
        fail(err)


@options(*EVAL)
def eval_run(run_dir: RunDir, given: Given):
    """The run's task metrics on a data file (accuracy / F1 / BLEU / loss), printed and written as JSON.
    Columns default to the run's own (its config.yaml); name them when the file differs."""
    opts = EvalOptions(**given.of(EvalOptions))
    columns = {path.rpartition(".")[2]: value for path, value in given.overrides().items()}
    try:
        from .evaluate import evaluate_run, format_report

        report = evaluate_run(run_dir, opts.data, opts.out, opts.batch_size, **columns)
    except RUN_ERRORS as err:
        fail(err)
    typer.echo(format_report(report))
    typer.echo(f"written to {report['written_to']}")
