"""One config type for a tuning run: nested dataclasses, loadable from YAML.

    cfg = load_config("run.yaml", overrides={"train.lr": 1e-4})
    cfg.validate()            # raises ConfigError listing every problem at once
    save_config(cfg, run_dir / "config.yaml")

Every field carries a docstring; `lite-sft tune --help` and the README are built from the same words. A field's
flag is `--field-name` unless its `flag(...)` metadata names another (`lora.r`: `--lora-r`); lite_sft/cli_options.py
builds the options from the fields, and `setting()` names them in error hints.
The resolved config is saved in the run directory so export and serve find the base model
without being told.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config_io import build as _build, field_docs as _docs_of, flag, flag_name, merge as _merge, nest as _nest
from .errors import ConfigError
from .taskspec import TASK_NAMES

# The embedded default: a tiny Llama built from a config and a bundled skill data set.
# Both need no network; they exist to prove the pipeline offline.
BUILTIN_MODEL = "builtin:tiny-llama"
BUILTIN_DATA = "builtin:skill"

QUANT_CHOICES = ("4bit", "8bit", "none")
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
CPU_BF16_CHOICES = ("auto", "on", "off")
FORMAT_CHOICES = ("auto", "alpaca", "messages", "sharegpt", "prompt_completion", "text")
OVERLONG_CHOICES = ("truncate", "drop")
SCHEDULE_CHOICES = ("linear", "cosine", "constant")
OPTIMIZER_CHOICES = ("adamw", "paged_adamw_8bit")
LOSS_CHOICES = ("fused", "trained", "full")
TASK_CHOICES = TASK_NAMES
CLASS_WEIGHT_CHOICES = ("none", "balanced")
TAG_SCHEMES = ("iob2", "iob1")


def lite_sft_home() -> Path:
    """Where lite-sft keeps what it builds and caches: $LITE_SFT_HOME, by default ~/.cache/lite-sft."""
    return Path(os.environ.get("LITE_SFT_HOME", "~/.cache/lite-sft")).expanduser()


# Settings load_config puts under the user's own when the model is the built-in one (lite_sft.tiny builds it). LoRA is the
# only trainable part and the base is random, so it wants a far higher learning rate than a
# pretrained model. Measured with `lite-sft tune` on 2 CPU cores: 800 steps of 32 examples (about 13
# passes) gave 100% held-out exact match for seeds 0, 1, 2, 3 and 42; 500 steps gave 86.5-100%, and
# lr 3e-3 for 500 steps 89.5-100%. Rows hold one example each (no packing) so a step is always
# 32 examples, as measured; max_seq_len is far above the skill's ~30 tokens so that the built-in
# model with the user's own data is not cut short.
BUILTIN_DEFAULTS: dict[str, Any] = {
    "model": {"dtype": "float32"},  # its matmuls are too small for bf16 autocast to pay for its casts
    "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
    "data": {"max_seq_len": 256, "packing": False},
    "train": {"max_steps": 800, "micro_batch_size": 32, "lr": 2e-3, "schedule": "cosine", "warmup_ratio": 0.03,
              "eval_every": 100, "save_every": 400, "log_every": 10},
}


@dataclass
class ModelConfig:
    name_or_path: str = field(default=BUILTIN_MODEL, metadata=flag("--model", "-m"))
    """Base model: a hub id, a local folder, or `builtin:tiny-llama` (the offline default)."""
    quant: str = "none"
    """Backbone quantisation: `4bit` (NF4 + double quantisation, QLoRA), `8bit`, or `none`."""
    dtype: str = "auto"
    """Compute dtype: `auto` picks bfloat16 where the device supports it, float32 otherwise."""
    cpu_bf16: str = "auto"
    """On a CPU, run the matmuls in bf16 under autocast over fp32 weights: `auto` where the CPU multiplies bf16
    natively (AVX512-BF16 or AMX) and --dtype is auto, `on` always (emulated, slower, on other CPUs), `off` never
    (fp32). The run records the choice, so eval and --resume compute as training did."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% slower."""
    offload_activations: bool = False
    """Keep the activations saved for backward in pinned CPU memory instead of GPU memory (CUDA only;
    with gradient checkpointing only the per-layer checkpoints are saved, so little moves)."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to transformers (`sdpa`, `eager`, `flash_attention_2`)."""
    trust_remote_code: bool = False
    """Allow model code from the hub; off by default because it runs foreign code."""
    compile: bool = False
    """torch.compile the model (dynamic shapes). Pays a compile at start; measure before keeping it on."""


@dataclass
class LoraConfig:
    r: int = field(default=16, metadata=flag("--lora-r"))
    """LoRA rank: the inner dimension of each adapter pair."""
    alpha: int = field(default=32, metadata=flag("--lora-alpha"))
    """LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rsLoRA)."""
    dropout: float = field(default=0.05, metadata=flag("--lora-dropout"))
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules to adapt: `all-linear` (every linear layer but the output head) or explicit names. Comma-separated."""
    use_dora: bool = field(default=False, metadata=flag("--dora"))
    """Weight-decomposed LoRA (DoRA)."""
    use_rslora: bool = field(default=False, metadata=flag("--rslora"))
    """Rank-stabilised LoRA scaling (alpha / sqrt(r))."""


@dataclass
class DataConfig:
    path: str = field(default=BUILTIN_DATA, metadata=flag("--data", "-d"))
    """Training data: a JSONL/JSON/CSV/Parquet file, a saved `datasets` folder, a hub data set id,
    or `builtin:skill` (the bundled offline data set)."""
    format: str = "auto"
    """Record format: auto, alpaca, messages, sharegpt, prompt_completion, text."""
    split: str = "train"
    """Split to read from a hub data set or a saved DatasetDict."""
    validation_path: str | None = field(default=None, metadata=flag("--validation-data"))
    """A separate validation file (same formats); overrides `validation_fraction`."""
    validation_fraction: float = 0.05
    """Fraction of the training examples held out for validation when no file is given (0 for none)."""
    max_seq_len: int = 1024
    """Longest example in tokens (seq2seq: longest source); also the packed row length."""
    overlong: str = "truncate"
    """What to do with longer examples: `truncate` them or `drop` them (both are counted)."""
    packing: bool = True
    """Pack several examples into one row; packed examples never attend to each other (causal-lm; the other
    tasks pad each example)."""
    group_by_length: bool = True
    """Without packing: put rows of similar length in the same micro-batch, so little is padding."""
    cache: bool = True
    """Keep tokenised data on disk (keyed by the data files, tokenizer and data settings) and reuse it."""
    train_on_prompt: bool = False
    """Train on every token, not only the assistant's (completion's) tokens."""
    chat_template: str | None = None
    """A Jinja chat template to use instead of the tokenizer's own (or the built-in default)."""
    system_prompt: str | None = None
    """A system message added to conversations that have none."""


@dataclass
class TrainConfig:
    epochs: float = 1.0
    """Passes over the training data (ignored when `max_steps` is set)."""
    max_steps: int | None = None
    """Stop after this many optimiser steps."""
    micro_batch_size: int = 4
    """Rows per forward pass (per process)."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""
    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay (LoRA weights only)."""
    schedule: str = "cosine"
    """Learning-rate schedule after warm-up: linear, cosine or constant."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming up linearly from zero."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 turns clipping off)."""
    optimizer: str = "adamw"
    """`adamw`, or `paged_adamw_8bit` (bitsandbytes, CUDA only)."""
    seed: int = 42
    """Seed for data order, LoRA initialisation and dropout."""
    eval_every: int = 50
    """Evaluate on the validation split every N steps (0 for only at the end)."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations without a lower validation loss (0 turns it off)."""
    save_every: int = 100
    """Write a checkpoint every N steps (0 for only at the end)."""
    keep_last: int = 2
    """Checkpoints to keep; older ones are deleted once a newer one is complete."""
    log_every: int = 1
    """Log training metrics every N steps."""
    loss: str = "fused"
    """Cross-entropy: `fused` (output layer and loss on trained positions only, chunk by chunk, never all
    logits at once), `trained` (logits on trained positions only) or `full` (logits everywhere)."""
    loss_chunk_tokens: int = 0
    """Positions per chunk of the `fused` loss (the logits held at once are this times the vocabulary);
    0 sizes it to the vocabulary: 2^25 logits (128 MiB in fp32), between 128 and 4096 positions."""
    auto_batch: bool = False
    """Pick the largest micro-batch that fits `memory_budget` (see `lite-sft plan`), with gradient
    accumulation raised to keep rows per optimiser step."""
    memory_budget: str | None = field(default=None, metadata=flag("--gpu-memory"))
    """Memory for `auto_batch`, e.g. `8GB`; default: the GPU's total memory (the machine's RAM on CPU)."""


@dataclass
class TaskConfig:
    name: str = field(default="causal-lm", metadata=flag("--task"))
    """What to fine-tune for: `causal-lm` (instruction or chat tuning of a decoder), `seq-cls` (a text or a
    text pair to a label), `token-cls` (a tag per word: named entities) or `seq2seq` (a source text to a target
    text with an encoder-decoder such as T5 or BART)."""
    text_column: str = "text"
    """seq-cls: the column (CSV/TSV header, JSONL key) holding the text."""
    validation_text_column: str | None = None
    """seq-cls: the validation file's text column, when it differs from text_column."""
    text_pair_column: str | None = None
    """seq-cls: the column holding a second text, for pair tasks (entailment, paraphrase)."""
    label_column: str = "label"
    """seq-cls: the column holding the label, as a name or an integer id."""
    class_weights: str = "none"
    """seq-cls: `none`, `balanced` (each class weighted by examples / (classes x its examples) in the training
    data), or one weight per label id, comma-separated; the loss is the weighted mean."""
    tag_column: int = -1
    """token-cls, CoNLL files: the whitespace-separated column holding the tag (-1: the last one)."""
    tokens_key: str = "tokens"
    """token-cls, JSONL files: the key holding the list of words."""
    tags_key: str = "tags"
    """token-cls, JSONL files: the key holding the list of tags."""
    tag_scheme: str = "iob2"
    """token-cls: the tags' scheme: `iob2` (every entity starts with B-), or `iob1` (converted to IOB2 on reading)."""
    source_column: str = "source"
    """seq2seq: the column holding the input text."""
    target_column: str = "target"
    """seq2seq: the column holding the text to generate."""
    max_target_len: int = 128
    """seq2seq: longest target in tokens; longer targets are truncated (and counted)."""
    max_new_tokens: int = 128
    """seq2seq: most tokens generated when evaluating; saved as the model's generation setting."""
    num_beams: int = 1
    """seq2seq: beams when generating (1: greedy); saved as the model's generation setting."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    output_dir: str = field(default="runs/latest", metadata=flag(short="-o"))
    """Run directory: adapter, tokenizer, config, checkpoints, metrics."""

    def validate(self) -> None:
        """Raise ConfigError naming every invalid field, not just the first."""
        problems = []

        def check(ok: bool, name: str, message: str) -> None:
            if not ok:
                problems.append(f"{name}: {message}")

        m, lo, d, t, k = self.model, self.lora, self.data, self.train, self.task
        check(m.quant in QUANT_CHOICES, "model.quant", f"{m.quant!r} is not one of {QUANT_CHOICES}")
        check(m.dtype in DTYPE_CHOICES, "model.dtype", f"{m.dtype!r} is not one of {DTYPE_CHOICES}")
        check(m.cpu_bf16 in CPU_BF16_CHOICES, "model.cpu_bf16", f"{m.cpu_bf16!r} is not one of {CPU_BF16_CHOICES}")
        check(lo.r > 0, "lora.r", f"must be positive, got {lo.r}")
        check(lo.alpha > 0, "lora.alpha", f"must be positive, got {lo.alpha}")
        check(0 <= lo.dropout < 1, "lora.dropout", f"must be in [0, 1), got {lo.dropout}")
        check(bool(lo.target_modules), "lora.target_modules", "name at least one module or 'all-linear'")
        check(d.format in FORMAT_CHOICES, "data.format", f"{d.format!r} is not one of {FORMAT_CHOICES}")
        check(d.overlong in OVERLONG_CHOICES, "data.overlong", f"{d.overlong!r} is not one of {OVERLONG_CHOICES}")
        check(d.max_seq_len >= 8, "data.max_seq_len", f"must be at least 8, got {d.max_seq_len}")
        check(0 <= d.validation_fraction < 1, "data.validation_fraction",
              f"must be in [0, 1), got {d.validation_fraction}")
        check(t.epochs > 0, "train.epochs", f"must be positive, got {t.epochs}")
        check(t.max_steps is None or t.max_steps > 0, "train.max_steps", f"must be positive, got {t.max_steps}")
        check(t.micro_batch_size > 0, "train.micro_batch_size", f"must be positive, got {t.micro_batch_size}")
        check(t.grad_accum > 0, "train.grad_accum", f"must be positive, got {t.grad_accum}")
        check(t.lr > 0, "train.lr", f"must be positive, got {t.lr}")
        check(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
        check(t.schedule in SCHEDULE_CHOICES, "train.schedule", f"{t.schedule!r} is not one of {SCHEDULE_CHOICES}")
        check(0 <= t.warmup_ratio < 1, "train.warmup_ratio", f"must be in [0, 1), got {t.warmup_ratio}")
        check(t.max_grad_norm >= 0, "train.max_grad_norm", f"must be >= 0, got {t.max_grad_norm}")
        check(t.optimizer in OPTIMIZER_CHOICES, "train.optimizer",
              f"{t.optimizer!r} is not one of {OPTIMIZER_CHOICES}")
        for name in ("eval_every", "early_stopping_patience", "save_every", "log_every"):
            check(getattr(t, name) >= 0, f"train.{name}", f"must be >= 0, got {getattr(t, name)}")
        check(t.loss in LOSS_CHOICES, "train.loss", f"{t.loss!r} is not one of {LOSS_CHOICES}")
        check(t.loss_chunk_tokens >= 0, "train.loss_chunk_tokens", f"must be >= 0 (0 for auto), got {t.loss_chunk_tokens}")
        check(t.keep_last >= 1, "train.keep_last", f"must be at least 1, got {t.keep_last}")
        check(t.log_every >= 1, "train.log_every", f"must be at least 1, got {t.log_every}")
        check(bool(self.output_dir), "output_dir", "must not be empty")
        check(k.name in TASK_CHOICES, "task.name", f"{k.name!r} is not one of {TASK_CHOICES}")
        if k.name != "causal-lm":
            check(m.name_or_path != BUILTIN_MODEL, "model.name_or_path",
                  f"the built-in model is a tiny causal LM for the demo; task {k.name} needs --model (an encoder "
                  "such as BERT for seq-cls and token-cls, T5 or BART for seq2seq)")
            check(d.path != BUILTIN_DATA, "data.path", f"the bundled data is chat data; task {k.name} needs --data")
            check(not t.auto_batch, "train.auto_batch", "lite-sft plan sizes causal-LM training only; set the "
                  "micro-batch yourself")
        check(k.class_weights in CLASS_WEIGHT_CHOICES or _weights(k.class_weights) is not None, "task.class_weights",
              f"{k.class_weights!r}: none, balanced, or numbers separated by commas (one per label id)")
        check(k.tag_scheme in TAG_SCHEMES, "task.tag_scheme", f"{k.tag_scheme!r} is not one of {TAG_SCHEMES}")
        for name in ("max_target_len", "max_new_tokens", "num_beams"):
            check(getattr(k, name) >= 1, f"task.{name}", f"must be at least 1, got {getattr(k, name)}")
        if problems:
            raise ConfigError("invalid config:\n  " + "\n  ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _weights(text: str) -> list[float] | None:
    """Class weights given as numbers separated by commas, or None when `text` is not that."""
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        return None
    return weights if weights and all(w >= 0 for w in weights) and any(weights) else None


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML config (optional) and apply dotted overrides (CLI flags win over the file)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model, lora, data, train), got {type(loaded).__name__}")
        values = loaded
    if overrides:
        values = _merge(values, _nest({k: v for k, v in overrides.items() if v is not None}))
    if values.get("model", {}).get("name_or_path", BUILTIN_MODEL) == BUILTIN_MODEL:
        # The tiny random-weight model learns with other settings than a pretrained one (see
        # BUILTIN_DEFAULTS for the measurements); the user's own values still win.
        values = _merge(BUILTIN_DEFAULTS, values)
    problems: list[str] = []
    cfg = _build(RunConfig, values, "", problems)
    if problems:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}invalid config:\n  " + "\n  ".join(problems))
    return cfg


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def field_docs() -> dict[str, str]:
    """{"train.lr": "Peak learning rate.", ...} read from the docstrings under each field.

    The CLI's --help text comes from here, so a field is documented in exactly one place.
    """
    docs = {}
    for section, cls in _sections().items():
        docs.update({section + name: text for name, text in _docs_of(cls).items()})
    return docs


def _sections() -> dict[str, type]:
    """{"model.": ModelConfig, ..., "": RunConfig}: the prefix of each section's fields."""
    sections = {f"{f.name}.": f.default_factory for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(
        f.default_factory)}
    return {**sections, "": RunConfig}


def config_field(path: str) -> dataclasses.Field:
    """The dataclass field a dotted name such as `train.lr` stands for."""
    section, _, name = path.rpartition(".")
    cls = _sections()[section + "." if section else ""]
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def setting(field: str, value: Any = None) -> str:
    """A setting as error hints name it, for the command line and a config file alike: `--text-column
    (task.text_column)`, or with a value `--validation-fraction 0 (data.validation_fraction=0)`. Only for
    fields that have a flag (the field's own `flag(...)` or `--name`)."""
    name = flag_name(config_field(field))
    return f"{name} ({field})" if value is None else f"{name} {value} ({field}={value})"
