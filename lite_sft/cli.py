"""The `lite-sft` command line: each command builds a config and calls one library function.

    lite-sft tune                                   # the embedded default: tiny model, bundled data
    lite-sft tune --model Qwen/Qwen2.5-0.5B --data chats.jsonl --quant 4bit --output-dir runs/qwen
    lite-sft inspect-data --data chats.jsonl --model Qwen/Qwen2.5-0.5B
    lite-sft generate runs/qwen --prompt "Write a haiku about autumn"

Heavy imports (torch, transformers, peft, bitsandbytes) happen inside the commands so that
`lite-sft --help` answers at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .config import field_docs

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune a language model with LoRA/QLoRA, export it, serve it.")
DOCS = field_docs()


def _opt(field: str, *names: str):
    return typer.Option(*names, help=DOCS[field], show_default=False)


def _fail(err: Exception, code: int = 2):
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _expected_errors():
    from .config import ConfigError
    from .data import DataError
    from .model import ModelError
    from .train import RunDirError

    return ConfigError, DataError, ModelError, RunDirError


# Options shared by `tune` and `inspect-data`: they decide how data is read and masked.
ConfigPath = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config; flags override it.")]
Model = Annotated[Optional[str], _opt("model.name_or_path", "--model", "-m")]
Data = Annotated[Optional[str], _opt("data.path", "--data", "-d")]
Format = Annotated[Optional[str], _opt("data.format", "--format")]
MaxSeqLen = Annotated[Optional[int], _opt("data.max_seq_len", "--max-seq-len")]
Overlong = Annotated[Optional[str], _opt("data.overlong", "--overlong")]
Packing = Annotated[Optional[bool], _opt("data.packing", "--packing/--no-packing")]
TrainOnPrompt = Annotated[Optional[bool], _opt("data.train_on_prompt", "--train-on-prompt/--no-train-on-prompt")]
ChatTemplate = Annotated[Optional[str], _opt("data.chat_template", "--chat-template")]
SystemPrompt = Annotated[Optional[str], _opt("data.system_prompt", "--system-prompt")]
ValidationPath = Annotated[Optional[str], _opt("data.validation_path", "--validation-data")]
ValidationFraction = Annotated[Optional[float], _opt("data.validation_fraction", "--validation-fraction")]


@app.command()
def tune(
    config: ConfigPath = None,
    model: Model = None,
    data: Data = None,
    format: Format = None,
    output_dir: Annotated[Optional[str], _opt("output_dir", "--output-dir", "-o")] = None,
    quant: Annotated[Optional[str], _opt("model.quant", "--quant")] = None,
    dtype: Annotated[Optional[str], _opt("model.dtype", "--dtype")] = None,
    gradient_checkpointing: Annotated[Optional[bool], _opt("model.gradient_checkpointing", "--gradient-checkpointing/--no-gradient-checkpointing")] = None,
    attn_implementation: Annotated[Optional[str], _opt("model.attn_implementation", "--attn-implementation")] = None,
    trust_remote_code: Annotated[Optional[bool], _opt("model.trust_remote_code", "--trust-remote-code/--no-trust-remote-code")] = None,
    lora_r: Annotated[Optional[int], _opt("lora.r", "--lora-r")] = None,
    lora_alpha: Annotated[Optional[int], _opt("lora.alpha", "--lora-alpha")] = None,
    lora_dropout: Annotated[Optional[float], _opt("lora.dropout", "--lora-dropout")] = None,
    target_modules: Annotated[Optional[str], typer.Option("--target-modules", help=DOCS["lora.target_modules"] + " Comma-separated.")] = None,
    dora: Annotated[Optional[bool], _opt("lora.use_dora", "--dora/--no-dora")] = None,
    rslora: Annotated[Optional[bool], _opt("lora.use_rslora", "--rslora/--no-rslora")] = None,
    max_seq_len: MaxSeqLen = None,
    overlong: Overlong = None,
    packing: Packing = None,
    train_on_prompt: TrainOnPrompt = None,
    chat_template: ChatTemplate = None,
    system_prompt: SystemPrompt = None,
    validation_data: ValidationPath = None,
    validation_fraction: ValidationFraction = None,
    epochs: Annotated[Optional[float], _opt("train.epochs", "--epochs")] = None,
    max_steps: Annotated[Optional[int], _opt("train.max_steps", "--max-steps")] = None,
    micro_batch_size: Annotated[Optional[int], _opt("train.micro_batch_size", "--micro-batch-size")] = None,
    grad_accum: Annotated[Optional[int], _opt("train.grad_accum", "--grad-accum")] = None,
    lr: Annotated[Optional[float], _opt("train.lr", "--lr")] = None,
    weight_decay: Annotated[Optional[float], _opt("train.weight_decay", "--weight-decay")] = None,
    schedule: Annotated[Optional[str], _opt("train.schedule", "--schedule")] = None,
    warmup_ratio: Annotated[Optional[float], _opt("train.warmup_ratio", "--warmup-ratio")] = None,
    max_grad_norm: Annotated[Optional[float], _opt("train.max_grad_norm", "--max-grad-norm")] = None,
    optimizer: Annotated[Optional[str], _opt("train.optimizer", "--optimizer")] = None,
    seed: Annotated[Optional[int], _opt("train.seed", "--seed")] = None,
    eval_every: Annotated[Optional[int], _opt("train.eval_every", "--eval-every")] = None,
    early_stopping_patience: Annotated[Optional[int], _opt("train.early_stopping_patience", "--early-stopping-patience")] = None,
    save_every: Annotated[Optional[int], _opt("train.save_every", "--save-every")] = None,
    keep_last: Annotated[Optional[int], _opt("train.keep_last", "--keep-last")] = None,
    log_every: Annotated[Optional[int], _opt("train.log_every", "--log-every")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output-dir from its newest checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --output-dir (only once setup has succeeded).")] = False,
):
    """Fine-tune a model with LoRA / QLoRA. With no --model and --data: the embedded offline default."""
    from .config import load_config

    overrides = {
        "model.name_or_path": model, "model.quant": quant, "model.dtype": dtype,
        "model.gradient_checkpointing": gradient_checkpointing, "model.attn_implementation": attn_implementation,
        "model.trust_remote_code": trust_remote_code,
        "lora.r": lora_r, "lora.alpha": lora_alpha, "lora.dropout": lora_dropout, "lora.target_modules": target_modules,
        "lora.use_dora": dora, "lora.use_rslora": rslora,
        "data.path": data, "data.format": format, "data.max_seq_len": max_seq_len, "data.overlong": overlong,
        "data.packing": packing, "data.train_on_prompt": train_on_prompt, "data.chat_template": chat_template,
        "data.system_prompt": system_prompt, "data.validation_path": validation_data,
        "data.validation_fraction": validation_fraction,
        "train.epochs": epochs, "train.max_steps": max_steps, "train.micro_batch_size": micro_batch_size,
        "train.grad_accum": grad_accum, "train.lr": lr, "train.weight_decay": weight_decay, "train.schedule": schedule,
        "train.warmup_ratio": warmup_ratio, "train.max_grad_norm": max_grad_norm, "train.optimizer": optimizer,
        "train.seed": seed, "train.eval_every": eval_every, "train.early_stopping_patience": early_stopping_patience,
        "train.save_every": save_every, "train.keep_last": keep_last, "train.log_every": log_every,
        "output_dir": output_dir,
    }
    errors = _expected_errors()
    try:
        if resume and config is None and output_dir and (Path(output_dir) / "config.yaml").is_file():
            config = Path(output_dir) / "config.yaml"  # continue the run as it was configured
        cfg = load_config(config, overrides)
        from .train import TrainingDiverged, tune as run_tune

        summary = run_tune(cfg, resume=resume, overwrite=overwrite)
    except errors as err:
        _fail(err)
    except TrainingDiverged as err:
        _fail(err, code=1)
    if summary is None:  # not the main process
        return
    typer.echo(f"\nrun directory: {cfg.output_dir}")
    typer.echo(f"  steps {summary['steps']}, trained tokens {summary['trained_tokens']}, "
               f"{summary['tokens_per_s']:.0f} tokens/s, final train loss {summary['final_train_loss']:.4f}"
               + (f", validation loss {summary['final_val_loss']:.4f}" if summary["final_val_loss"] is not None else ""))
    if summary.get("skill_exact_match_after") is not None:
        typer.echo(f"  held-out exact match: {summary['skill_exact_match_before']:.1%} before -> "
                   f"{summary['skill_exact_match_after']:.1%} after tuning")
    typer.echo(f"  try it: lite-sft generate {cfg.output_dir} --prompt \"...\"")


@app.command("inspect-data")
def inspect_data(
    config: ConfigPath = None,
    data: Data = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model whose tokenizer and chat template to use.")] = None,
    format: Format = None,
    max_seq_len: MaxSeqLen = None,
    overlong: Overlong = None,
    packing: Packing = None,
    train_on_prompt: TrainOnPrompt = None,
    chat_template: ChatTemplate = None,
    system_prompt: SystemPrompt = None,
    validation_data: ValidationPath = None,
    validation_fraction: ValidationFraction = None,
    examples: Annotated[int, typer.Option("--examples", "-n", help="How many examples to show.")] = 3,
    color: Annotated[Optional[bool], typer.Option("--color/--no-color", help="Colour trained tokens (default: when printing to a terminal).")] = None,
):
    """Show rendered examples with trained and ignored tokens told apart, and data set counts."""
    from .config import load_config

    overrides = {
        "model.name_or_path": model, "data.path": data, "data.format": format, "data.max_seq_len": max_seq_len,
        "data.overlong": overlong, "data.packing": packing, "data.train_on_prompt": train_on_prompt,
        "data.chat_template": chat_template, "data.system_prompt": system_prompt,
        "data.validation_path": validation_data, "data.validation_fraction": validation_fraction,
    }
    try:
        cfg = load_config(config, overrides)
        cfg.validate()
        from .data import prepare_data
        from .inspect_data import render_report
        from .masking import ensure_chat_template
        from .model import load_tokenizer, resolve_model_path

        tokenizer = load_tokenizer(resolve_model_path(cfg.model.name_or_path), cfg.model.trust_remote_code)
        ensure_chat_template(tokenizer, cfg.data.chat_template)
        prepared = prepare_data(cfg.data, tokenizer, seed=cfg.train.seed)
    except _expected_errors() as err:
        _fail(err)
    use_color = sys.stdout.isatty() if color is None else color
    typer.echo(render_report(prepared, tokenizer, n=examples, color=use_color))


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(help="A `lite-sft tune` output directory.")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="A user message (repeat for several).")],
    system: Annotated[Optional[str], typer.Option("--system", help="A system message.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Most tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", min=0.0, help="0 for greedy decoding.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed for sampling.")] = 0,
):
    """Answer prompts with a tuned model (base + adapter from RUN_DIR)."""
    try:
        from .generate import answer

        for text in answer(run_dir, prompt, system=system, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, seed=seed):
            typer.echo(text)
    except _expected_errors() as err:
        _fail(err)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
