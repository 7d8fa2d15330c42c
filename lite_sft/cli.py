"""The `lite-sft` command line: each command builds a config and calls one library function.

    lite-sft tune                                   # the embedded default: tiny model, bundled data
    lite-sft tune --model Qwen/Qwen2.5-0.5B --data chats.jsonl --quant 4bit --output-dir runs/qwen
    lite-sft inspect-data --data chats.jsonl --model Qwen/Qwen2.5-0.5B
    lite-sft plan --model Qwen/Qwen2.5-0.5B --quant 4bit --max-seq-len 2048 --gpu-memory 8GB
    lite-sft generate runs/qwen --prompt "Write a haiku about autumn"
    lite-sft tune --task seq-cls --model bert-base-uncased --data train.csv --output-dir runs/sentiment
    lite-sft eval runs/sentiment --data dev.csv
    lite-sft export runs/qwen --out exports/qwen --quantize int4
    lite-sft bench exports/qwen
    lite-sft serve exports/qwen

Heavy imports (torch, transformers, peft, bitsandbytes, onnxruntime) happen inside the
commands so that `lite-sft --help` answers at once.
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


def _size(text: str, flag: str) -> int:
    """Bytes in a size like 8GB; a ConfigError naming `flag` (the option or config field) if it is not one."""
    from .config import ConfigError
    from .plan import parse_size

    try:
        return parse_size(text)
    except ValueError as err:
        raise ConfigError(f"{flag}: {err}") from None


def _expected_errors():
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .errors import DataError
    from .model import ModelError
    from .train import RunDirError

    return CheckpointError, ConfigError, DataError, ModelError, RunDirError


# Command parameter -> the config field it overrides (a parameter left at None changes nothing).
FLAG_FIELDS = {
    "model": "model.name_or_path", "quant": "model.quant", "dtype": "model.dtype", "cpu_bf16": "model.cpu_bf16",
    "gradient_checkpointing": "model.gradient_checkpointing", "attn_implementation": "model.attn_implementation",
    "trust_remote_code": "model.trust_remote_code",
    "lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "target_modules": "lora.target_modules", "dora": "lora.use_dora", "rslora": "lora.use_rslora",
    "data": "data.path", "format": "data.format", "max_seq_len": "data.max_seq_len", "overlong": "data.overlong",
    "packing": "data.packing", "train_on_prompt": "data.train_on_prompt", "chat_template": "data.chat_template",
    "system_prompt": "data.system_prompt", "validation_data": "data.validation_path",
    "validation_fraction": "data.validation_fraction",
    "epochs": "train.epochs", "max_steps": "train.max_steps", "micro_batch_size": "train.micro_batch_size",
    "grad_accum": "train.grad_accum", "lr": "train.lr", "weight_decay": "train.weight_decay",
    "schedule": "train.schedule", "warmup_ratio": "train.warmup_ratio", "max_grad_norm": "train.max_grad_norm",
    "optimizer": "train.optimizer", "seed": "train.seed", "eval_every": "train.eval_every",
    "early_stopping_patience": "train.early_stopping_patience", "save_every": "train.save_every",
    "keep_last": "train.keep_last", "log_every": "train.log_every", "output_dir": "output_dir",
    "loss": "train.loss", "loss_chunk_tokens": "train.loss_chunk_tokens", "group_by_length": "data.group_by_length",
    "cache": "data.cache", "compile": "model.compile", "auto_batch": "train.auto_batch",
    "gpu_memory": "train.memory_budget", "offload_activations": "model.offload_activations",
    "task": "task.name", "text_column": "task.text_column", "validation_text_column": "task.validation_text_column",
    "text_pair_column": "task.text_pair_column", "label_column": "task.label_column",
    "class_weights": "task.class_weights", "tag_column": "task.tag_column", "tokens_key": "task.tokens_key",
    "tags_key": "task.tags_key", "tag_scheme": "task.tag_scheme", "source_column": "task.source_column",
    "target_column": "task.target_column", "max_target_len": "task.max_target_len",
    "max_new_tokens": "task.max_new_tokens", "num_beams": "task.num_beams",
}


def _overrides(params: dict) -> dict:
    return {field: params[name] for name, field in FLAG_FIELDS.items() if name in params}


# Options shared by several commands (`tune`, `inspect-data`, `plan`).
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
Quant = Annotated[Optional[str], _opt("model.quant", "--quant")]
Dtype = Annotated[Optional[str], _opt("model.dtype", "--dtype")]
CpuBf16 = Annotated[Optional[str], _opt("model.cpu_bf16", "--cpu-bf16")]
GradientCheckpointing = Annotated[Optional[bool], _opt("model.gradient_checkpointing", "--gradient-checkpointing/--no-gradient-checkpointing")]
TrustRemoteCode = Annotated[Optional[bool], _opt("model.trust_remote_code", "--trust-remote-code/--no-trust-remote-code")]
LoraR = Annotated[Optional[int], _opt("lora.r", "--lora-r")]
LoraDropout = Annotated[Optional[float], _opt("lora.dropout", "--lora-dropout")]
TargetModules = Annotated[Optional[str], typer.Option("--target-modules", help=DOCS["lora.target_modules"] + " Comma-separated.")]
Dora = Annotated[Optional[bool], _opt("lora.use_dora", "--dora/--no-dora")]
MicroBatchSize = Annotated[Optional[int], _opt("train.micro_batch_size", "--micro-batch-size")]
GradAccum = Annotated[Optional[int], _opt("train.grad_accum", "--grad-accum")]
Loss = Annotated[Optional[str], _opt("train.loss", "--loss")]
LossChunkTokens = Annotated[Optional[int], _opt("train.loss_chunk_tokens", "--loss-chunk-tokens")]
GpuMemory = Annotated[Optional[str], _opt("train.memory_budget", "--gpu-memory")]
Task = Annotated[Optional[str], _opt("task.name", "--task")]
TextColumn = Annotated[Optional[str], _opt("task.text_column", "--text-column")]
ValidationTextColumn = Annotated[Optional[str], _opt("task.validation_text_column", "--validation-text-column")]
TextPairColumn = Annotated[Optional[str], _opt("task.text_pair_column", "--text-pair-column")]
LabelColumn = Annotated[Optional[str], _opt("task.label_column", "--label-column")]
TagColumn = Annotated[Optional[int], _opt("task.tag_column", "--tag-column")]
TokensKey = Annotated[Optional[str], _opt("task.tokens_key", "--tokens-key")]
TagsKey = Annotated[Optional[str], _opt("task.tags_key", "--tags-key")]
TagScheme = Annotated[Optional[str], _opt("task.tag_scheme", "--tag-scheme")]
SourceColumn = Annotated[Optional[str], _opt("task.source_column", "--source-column")]
TargetColumn = Annotated[Optional[str], _opt("task.target_column", "--target-column")]
MaxTargetLen = Annotated[Optional[int], _opt("task.max_target_len", "--max-target-len")]


@app.command()
def tune(
    config: ConfigPath = None,
    model: Model = None,
    data: Data = None,
    format: Format = None,
    output_dir: Annotated[Optional[str], _opt("output_dir", "--output-dir", "-o")] = None,
    quant: Quant = None,
    dtype: Dtype = None,
    cpu_bf16: CpuBf16 = None,
    gradient_checkpointing: GradientCheckpointing = None,
    attn_implementation: Annotated[Optional[str], _opt("model.attn_implementation", "--attn-implementation")] = None,
    trust_remote_code: TrustRemoteCode = None,
    compile: Annotated[Optional[bool], _opt("model.compile", "--compile/--no-compile")] = None,
    offload_activations: Annotated[Optional[bool], _opt("model.offload_activations", "--offload-activations/--no-offload-activations")] = None,
    lora_r: LoraR = None,
    lora_alpha: Annotated[Optional[int], _opt("lora.alpha", "--lora-alpha")] = None,
    lora_dropout: LoraDropout = None,
    target_modules: TargetModules = None,
    dora: Dora = None,
    rslora: Annotated[Optional[bool], _opt("lora.use_rslora", "--rslora/--no-rslora")] = None,
    max_seq_len: MaxSeqLen = None,
    overlong: Overlong = None,
    packing: Packing = None,
    train_on_prompt: TrainOnPrompt = None,
    chat_template: ChatTemplate = None,
    system_prompt: SystemPrompt = None,
    validation_data: ValidationPath = None,
    validation_fraction: ValidationFraction = None,
    group_by_length: Annotated[Optional[bool], _opt("data.group_by_length", "--group-by-length/--no-group-by-length")] = None,
    cache: Annotated[Optional[bool], _opt("data.cache", "--cache/--no-cache")] = None,
    epochs: Annotated[Optional[float], _opt("train.epochs", "--epochs")] = None,
    max_steps: Annotated[Optional[int], _opt("train.max_steps", "--max-steps")] = None,
    micro_batch_size: MicroBatchSize = None,
    grad_accum: GradAccum = None,
    auto_batch: Annotated[Optional[bool], _opt("train.auto_batch", "--auto-batch/--no-auto-batch")] = None,
    gpu_memory: GpuMemory = None,
    loss: Loss = None,
    loss_chunk_tokens: LossChunkTokens = None,
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
    task: Task = None,
    text_column: TextColumn = None,
    validation_text_column: ValidationTextColumn = None,
    text_pair_column: TextPairColumn = None,
    label_column: LabelColumn = None,
    class_weights: Annotated[Optional[str], _opt("task.class_weights", "--class-weights")] = None,
    tag_column: TagColumn = None,
    tokens_key: TokensKey = None,
    tags_key: TagsKey = None,
    tag_scheme: TagScheme = None,
    source_column: SourceColumn = None,
    target_column: TargetColumn = None,
    max_target_len: MaxTargetLen = None,
    max_new_tokens: Annotated[Optional[int], _opt("task.max_new_tokens", "--max-new-tokens")] = None,
    num_beams: Annotated[Optional[int], _opt("task.num_beams", "--num-beams")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --output-dir from its newest checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --output-dir (only once setup has succeeded).")] = False,
):
    """Fine-tune a model with LoRA / QLoRA: a causal LM on chat or instruction data (the default task), or an
    encoder / encoder-decoder for --task seq-cls, token-cls or seq2seq. With no --model and --data: the
    embedded offline default."""
    from .config import load_config

    overrides = _overrides(locals())
    errors = _expected_errors()
    cfg = None
    try:
        if resume and config is None and output_dir and (Path(output_dir) / "config.yaml").is_file():
            config = Path(output_dir) / "config.yaml"  # continue the run as it was configured
        cfg = load_config(config, overrides)
        if cfg.train.memory_budget is not None:  # checked here so a typo fails before anything loads
            _size(cfg.train.memory_budget, "--gpu-memory" if gpu_memory is not None else "train.memory_budget")
        from .train import TrainingDiverged, tune as run_tune

        summary = run_tune(cfg, resume=resume, overwrite=overwrite)
    except errors as err:
        _fail(err)
    except KeyboardInterrupt:
        _interrupted(Path(cfg.output_dir) if cfg is not None else None)
    except TrainingDiverged as err:
        _fail(err, code=1)
    if summary is None:  # not the main process
        return
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

    if run_dir is None or not (run_dir / "config.yaml").is_file():  # before the run directory was written
        typer.secho("interrupted before training started: nothing was written", fg=typer.colors.YELLOW, err=True)
    else:
        typer.secho(f"interrupted: {resume_hint(run_dir)}", fg=typer.colors.YELLOW, err=True)
    raise typer.Exit(130)


@app.command("inspect-data")
def inspect_data(
    config: ConfigPath = None,
    data: Data = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model whose tokenizer and chat template to use.")] = None,
    task: Task = None,
    format: Format = None,
    max_seq_len: MaxSeqLen = None,
    overlong: Overlong = None,
    packing: Packing = None,
    train_on_prompt: TrainOnPrompt = None,
    chat_template: ChatTemplate = None,
    system_prompt: SystemPrompt = None,
    validation_data: ValidationPath = None,
    validation_fraction: ValidationFraction = None,
    text_column: TextColumn = None,
    validation_text_column: ValidationTextColumn = None,
    text_pair_column: TextPairColumn = None,
    label_column: LabelColumn = None,
    tag_column: TagColumn = None,
    tokens_key: TokensKey = None,
    tags_key: TagsKey = None,
    tag_scheme: TagScheme = None,
    source_column: SourceColumn = None,
    target_column: TargetColumn = None,
    max_target_len: MaxTargetLen = None,
    examples: Annotated[int, typer.Option("--examples", "-n", help="How many examples to show.")] = 3,
    color: Annotated[Optional[bool], typer.Option("--color/--no-color", help="Colour trained tokens (default: when printing to a terminal).")] = None,
):
    """Show examples as they are trained (trained and ignored tokens, a text's label, each sub-token's tag,
    a target's tokens) and the data set's counts."""
    from .config import load_config

    overrides = _overrides(locals())
    try:
        cfg = load_config(config, overrides)
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
    except _expected_errors() as err:
        _fail(err)
    use_color = sys.stdout.isatty() if color is None else color
    if chosen.name == "causal-lm":
        typer.echo(render_report(prepared, tokenizer, n=examples, color=use_color))
    else:
        typer.echo(render_task_report(chosen, prepared, tokenizer, n=examples, color=use_color))


@app.command()
def plan(
    config: ConfigPath = None,
    model: Model = None,
    quant: Quant = None,
    dtype: Dtype = None,
    gradient_checkpointing: GradientCheckpointing = None,
    trust_remote_code: TrustRemoteCode = None,
    lora_r: LoraR = None,
    lora_dropout: LoraDropout = None,
    target_modules: TargetModules = None,
    dora: Dora = None,
    max_seq_len: MaxSeqLen = None,
    micro_batch_size: MicroBatchSize = None,
    grad_accum: GradAccum = None,
    loss: Loss = None,
    loss_chunk_tokens: LossChunkTokens = None,
    gpu_memory: GpuMemory = None,
    device: Annotated[str, typer.Option("--device", help="Plan a GPU run (cuda) or a CPU one (cpu).")] = "cuda",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
):
    """Estimate peak training memory from the config alone (no weights loaded); with --gpu-memory, pick a micro-batch."""
    import json

    from .config import ConfigError, load_config

    overrides = _overrides(locals())
    try:
        if device not in ("cuda", "cpu"):
            raise ConfigError(f"--device {device!r}: choose cuda or cpu")
        cfg = load_config(config, overrides)
        cfg.validate()
        from .plan import default_budget, report

        budget = None
        if cfg.train.memory_budget is not None:
            budget = _size(cfg.train.memory_budget, "--gpu-memory" if gpu_memory is not None else "train.memory_budget")
        elif cfg.train.auto_batch:
            budget = default_budget(device)
        summary, text = report(cfg, device, budget)
    except _expected_errors() as err:
        _fail(err)
    typer.echo(json.dumps(summary) if as_json else text)


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(help="A `lite-sft tune` output directory.")],
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="A user message (repeat for several).")],
    system: Annotated[Optional[str], typer.Option("--system", help="A system message.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", min=1, help="Most tokens to generate (default 128; a seq2seq run: the setting it saved).")] = None,
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


@app.command("eval")
def eval_run(
    run_dir: Annotated[Path, typer.Argument(help="A `lite-sft tune` output directory.")],
    data: Annotated[str, typer.Option("--data", "-d", help="The file to evaluate on, in the run's format.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to write the metrics JSON (default RUN_DIR/eval-<file>.json).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Examples per forward pass (default: the run's micro-batch, as its own evaluation used, so the figures match training's).")] = None,
    text_column: TextColumn = None,
    text_pair_column: TextPairColumn = None,
    label_column: LabelColumn = None,
    tag_column: TagColumn = None,
    tokens_key: TokensKey = None,
    tags_key: TagsKey = None,
    source_column: SourceColumn = None,
    target_column: TargetColumn = None,
):
    """The run's task metrics on a data file (accuracy / F1 / BLEU / loss), printed and written as JSON.
    Columns default to the run's own (its config.yaml); name them when the file differs."""
    try:
        from .evaluate import evaluate_run, format_report

        report = evaluate_run(run_dir, data, out, batch_size, text_column=text_column, text_pair_column=text_pair_column,
                              label_column=label_column, tag_column=tag_column, tokens_key=tokens_key,
                              tags_key=tags_key, source_column=source_column, target_column=target_column)
    except _expected_errors() as err:
        _fail(err)
    typer.echo(format_report(report))
    typer.echo(f"written to {report['written_to']}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A `lite-sft tune` output directory.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: merged/, onnx/, onnx-int8|int4/, parity.json.")],
    dtype: Annotated[str, typer.Option("--dtype", help="ONNX precision: fp32 or fp16.")] = "fp32",
    merged_dtype: Annotated[str, typer.Option("--merged-dtype", help="Merged model precision: auto (the base's own; 16-bit for QLoRA), fp32, fp16, bf16.")] = "auto",
    quantize: Annotated[str, typer.Option("--quantize", help="Also write a quantised ONNX: none, int8 (dynamic), int4 (weight-only MatMulNBits).")] = "none",
    block_size: Annotated[int, typer.Option("--block-size", help="int4: input channels per scale (power of two, >= 16).")] = 32,
    merge_onto: Annotated[str, typer.Option("--merge-onto", help="QLoRA runs: `dequantized` (what the adapter was trained against) or `original` (changes the model; warns).")] = "dequantized",
    onnx: Annotated[bool, typer.Option("--onnx/--no-onnx", help="Convert the merged model to ONNX (causal-lm and seq2seq with a KV cache).")] = True,
    exporter: Annotated[str, typer.Option("--exporter", help="ONNX exporter: auto (causal-lm: onnxruntime-genai's model builder where it takes the architecture, else torch.onnx), builder or torch.")] = "auto",
    parity_prompts: Annotated[int, typer.Option("--parity-prompts", min=1, help="Held-out prompts the parity gate compares on.")] = 4,
    parity_tokens: Annotated[int, typer.Option("--parity-tokens", min=1, help="Greedy tokens generated and compared per prompt (seq2seq: per source).")] = 16,
    parity_examples: Annotated[Optional[int], typer.Option("--parity-examples", min=2, help="seq-cls, token-cls, seq2seq: held-out examples the gate compares on (default 32; seq2seq 8).")] = None,
    min_agreement: Annotated[Optional[float], typer.Option("--min-agreement", help="Override every gate's greedy-agreement threshold (0-1).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out (an earlier export), only once the new one has passed.")] = False,
):
    """Merge the adapter into its base, export ONNX (optionally int8/int4) and gate each step on parity."""
    try:
        from lite_sft.export import ExportError
        from lite_sft.export.pipeline import ExportOptions, ParityFailed, export_run

        opts = ExportOptions(dtype=dtype, merged_dtype=merged_dtype, quantize=quantize, block_size=block_size,
                             merge_onto=merge_onto, onnx=onnx, exporter=exporter, parity_prompts=parity_prompts,
                             parity_tokens=parity_tokens, parity_examples=parity_examples,
                             min_agreement=min_agreement, overwrite=overwrite)
        export_run(run_dir, out, opts, say=typer.echo)
    except _expected_errors() + (ExportError,) as err:
        _fail(err)
    except ParityFailed as err:
        typer.echo(err.text)
        _fail(err, code=1)
    typer.echo(f"\nexported to {out}: merged/" + (" onnx/" if onnx else "")
               + (f" onnx-{quantize}/" if quantize != "none" else "") + " parity.json")


@app.command()
def serve(
    model_dir: Annotated[Path, typer.Argument(help="An export OUT, its onnx/ folder, or a Hugging Face folder (merged/).")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on; 0.0.0.0 opens it to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="Port to listen on (0: any free one).")] = 8000,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when onnxruntime and torch see a GPU), cpu or cuda.")] = "auto",
    variant: Annotated[Optional[str], typer.Option("--variant", help="In an export OUT: fp (onnx/), int8 (onnx-int8/) or int4 (onnx-int4/); default: the quantised variant the export made and gated, else fp.")] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="LITE_SFT_API_KEY", help="Require `Authorization: Bearer KEY` on /v1/*. Prefer setting LITE_SFT_API_KEY: a flag's value shows in `ps` to every local user.")] = None,
    model_name: Annotated[Optional[str], typer.Option("--model-name", help="Name in /v1/models (default: the folder's name).")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Most rows (requests x n) run together in one batch.")] = 8,
    max_queue: Annotated[int, typer.Option("--max-queue", min=1, help="Requests waiting beyond this are answered 429.")] = 32,
    batching: Annotated[str, typer.Option("--batching", help="continuous: a request joins the running batch at the next step; static: each batch runs to its end (seq2seq always).")] = "continuous",
    timeout: Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds a request may take, queueing included (then 504).")] = 60.0,
    max_context: Annotated[Optional[int], typer.Option("--max-context", min=2, help="Cap prompt + output tokens below the model's context.")] = None,
    default_max_tokens: Annotated[int, typer.Option("--default-max-tokens", min=1, help="Chat requests without max_tokens stop here.")] = 256,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for the model (default: onnxruntime's, one per core).")] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="uvicorn's log level.")] = "info",
):
    """Serve an exported model over an OpenAI-compatible HTTP API: /v1/completions and /v1/chat/completions for a
    causal LM, /v1/completions for seq2seq, /v1/classify for seq-cls, /v1/ner for token-cls."""
    try:
        from lite_sft.serve import ServeError
        from lite_sft.serve.server import serve as run_server

        run_server(model_dir, say=typer.echo, host=host, port=port, device=device, variant=variant, threads=threads,
                   model_name=model_name, log_level=log_level, api_key=api_key, timeout_s=timeout,
                   default_max_tokens=default_max_tokens, max_context=max_context, max_batch=max_batch,
                   max_queue=max_queue, batching=batching)
    except ServeError as err:
        _fail(err)


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(ValueError(f"{flag} {text!r}: comma-separated whole numbers, e.g. 32,128"))


@app.command()
def bench(
    model_dir: Annotated[Optional[Path], typer.Argument(help="An export OUT, a tune run directory, an ONNX or a Hugging Face folder.")] = None,
    url: Annotated[Optional[str], typer.Option("--url", help="Load-test the server running here instead (e.g. http://127.0.0.1:8000).")] = None,
    backends: Annotated[Optional[str], typer.Option("--backends", help="Comma-separated: torch-adapter, torch-merged, onnx-fp32, onnx-fp16, onnx-int8, onnx-int4 (default: all found).")] = None,
    prompt_lens: Annotated[str, typer.Option("--prompt-lens", help="Prompt lengths in tokens (an encoder classifier's sequence lengths), comma-separated.")] = "32,128",
    output_lens: Annotated[str, typer.Option("--output-lens", help="Generated tokens per run, comma-separated.")] = "32,128",
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Prompts per batch, comma-separated.")] = "1",
    runs: Annotated[int, typer.Option("--runs", min=1, help="Timed runs per shape (percentiles over these).")] = 10,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed runs first.")] = 2,
    quick: Annotated[bool, typer.Option("--quick", help="A short table: prompt 16, output 32, 5 runs, 1 warm-up.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for every backend (default: OMP_NUM_THREADS / torch's).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for serve-<time>.json and .png.")] = Path("bench-results"),
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="--url: concurrent clients.")] = 4,
    duration: Annotated[float, typer.Option("--duration", min=0.1, help="--url: seconds to keep sending requests.")] = 20.0,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="--url: tokens per request.")] = 32,
    min_tokens: Annotated[Optional[int], typer.Option("--min-tokens", min=1, help="--url: each request asks a length drawn from min..max tokens.")] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="LITE_SFT_API_KEY", help="--url: the server's API key.")] = None,
):
    """Latency of every backend side by side (TTFT, TPOT, ITL, tokens/s, memory; an encoder classifier's latency
    per batch and sequences/s), or a load test with --url."""
    import json

    try:
        from lite_sft.serve import ServeError

        if url:
            from lite_sft.serve.loadtest import format_load, load_test

            report = load_test(url, concurrency, duration, max_tokens, api_key=api_key, min_tokens=min_tokens)
            typer.echo(format_load(report))
            typer.echo(json.dumps(report))
            return
        if model_dir is None:
            _fail(ValueError("give MODEL_DIR to benchmark backends, or --url to load-test a running server"))
        from lite_sft.serve.bench import BenchOptions, bench as run_bench
        from lite_sft.serve.bench_report import format_table, save

        opts = BenchOptions(_ints(prompt_lens, "--prompt-lens"), _ints(output_lens, "--output-lens"),
                            _ints(batch_sizes, "--batch-sizes"), runs, warmup, device, threads,
                            backends.split(",") if backends else None)
        if quick:
            opts.prompt_lens, opts.output_lens, opts.runs, opts.warmup = [16], [32], 5, 1
        report = run_bench(model_dir, opts, say=typer.echo)
    except ServeError as err:
        _fail(err)
    typer.echo(format_table(report))
    typer.echo(json.dumps(report))
    saved = save(report, out)
    typer.echo(f"saved {saved[0]} and {saved[1]}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
