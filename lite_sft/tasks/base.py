"""What differs between the tasks the training loop runs: data, model class, collation, loss, metrics.

    task = get_task("seq-cls")                               # the `TASK` of the module taskspec.TASKS names
    data = task.prepare(cfg, tokenizer)                      # TaskData: rows and counts
    model = load_base_model(cfg.model, path, device, task, data.labels)
    batch = task.collate(rows, tokenizer)                    # tensors for one micro-batch
    loss_sum, units = task.loss_sum(model, batch, device), task.units(batch)
    task.predict(model, batch, device) / task.metrics(...)   # what evaluation reports

The loop (train.py) sums `loss_sum` over a whole optimiser step and divides by the step's `units`
(trained tokens for causal-lm and seq2seq, labelled sub-words for token-cls, examples, or their class
weights, for seq-cls), so every task gets the gradient of its mean loss whatever the micro-batch split.
Everything else, from optimiser to checkpoints, is the same loop for every task.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from lite_sft.config import setting
from lite_sft.errors import ConfigError, DataError  # noqa: F401  (DataError: its old home, re-exported for now)
from lite_sft.taskspec import TASK_NAMES, TASKS, TaskSpec

# The label value the loss ignores (torch.nn.CrossEntropyLoss and transformers' default ignore_index).
IGNORE_INDEX = -100


@dataclass
class TaskData:
    """A task's prepared data: rows its collate takes (each `len(row)` = its tokens) and what to report."""

    train: list
    validation: list
    format: str
    """The data format read (causal-lm: alpaca, messages, ...; the other tasks: their file kind)."""
    summary: str
    """One line about the data for the log: examples, labels, what was dropped."""
    examples: tuple[int, int] = (0, 0)
    """Training and validation examples (causal-lm packs several into a row)."""
    labels: Any = None
    """The LabelMap of seq-cls and token-cls (saved with the run, and into the model's config)."""
    added_tokens: bool = False
    """causal-lm: the default chat template's tokens were added to the tokenizer."""
    validation_examples: list = field(default_factory=list)
    """causal-lm: the unpacked held-out examples, recorded in validation_split.json for export."""
    train_stats: Any = None
    validation_stats: Any = None


class Task:
    """The interface; each task module implements it (causal_lm/, classification.py, token_cls.py, seq2seq.py)."""

    name: str
    """Its row's name in taskspec.TASKS, where everything outside the task's module reads about it."""
    head_names: tuple[str, ...] = ()
    """Modules that are the task head: new, so trained whole and saved with the adapter (peft modules_to_save)."""
    unit_name: str = "trained_tokens"
    """What the loss is averaged over, as metrics.jsonl and summary.json name it."""
    packs: bool = False
    """Its rows may hold several examples (data.packing): the model must keep them apart, and the rows are
    nearly all full, so grouping them by length gains nothing."""
    lora_all_linear: bool = False
    """peft's own "all-linear" keeps this task's head out of LoRA (it knows a causal LM's output layer); for
    the other heads the layers are named by lite_sft.model.linear_layer_names."""

    @property
    def spec(self) -> TaskSpec:
        return TASKS[self.name]

    @property
    def peft_task_type(self) -> str:
        """peft's TaskType name: CAUSAL_LM, SEQ_CLS, TOKEN_CLS or SEQ_2_SEQ_LM."""
        return self.spec.peft_task_type

    @property
    def auto_class(self) -> str:
        """The transformers Auto class that loads the base with this task's head."""
        return self.spec.auto_class

    def check_model(self, config, name: str) -> None:
        """Raise ModelError when the architecture cannot do this task (the base's config.json is given)."""

    def model_kwargs(self, data: TaskData) -> dict:
        """Extra from_pretrained arguments (num_labels, id2label, ...)."""
        return {}

    def saved_model_kwargs(self, run_dir) -> dict:
        """model_kwargs as a finished run saved them (write_run_files), to load its base again."""
        return {}

    def prepare(self, cfg, tokenizer) -> TaskData:
        raise NotImplementedError

    def record_detected(self, cfg, data: TaskData) -> None:
        """Put into `cfg` what prepare detected, so the saved config.yaml records it (causal-lm: the format)."""

    def loss_path(self, model, device, requested: str) -> str:
        """The loss implementation train.loss asks for, checked against the model ("full" where only one)."""
        return "full"

    def write_run_files(self, run_dir, cfg, tokenizer, model, data: TaskData) -> None:
        """What later steps (eval, export, serve) need besides config.yaml, the tokenizer and the adapter."""

    def eval_rows(self, cfg, tokenizer, path: str, run_dir) -> list:
        """Rows of an evaluation file (`lite-sft eval RUN_DIR --data FILE`), read as the run read its data."""
        raise NotImplementedError

    def collate(self, rows: list, tokenizer) -> dict:
        raise NotImplementedError

    def units(self, batch: dict) -> float:
        """What the loss of `batch` is averaged over (its share of the step's denominator)."""
        raise NotImplementedError

    def loss_sum(self, model, batch: dict, device, loss_impl: str = "full", chunk: int = 0):
        """The loss summed over `batch`'s units, a 0-d tensor with a gradient."""
        raise NotImplementedError

    def shard_batches(self, rows: list, tokenizer, accelerator, micro_batch_size: int):
        """(rows, collated batch) for this process's share of `rows`, micro-batch by micro-batch: evaluation
        is sharded across processes, and each task gathers or sums what its shard produced."""
        mine = rows[accelerator.process_index::accelerator.num_processes]
        for i in range(0, len(mine), micro_batch_size):
            part = mine[i:i + micro_batch_size]
            yield part, self.collate(part, tokenizer)

    def evaluate(self, model, rows: list, tokenizer, accelerator, micro_batch_size: int,
                 loss_impl: str = "full", chunk: int = 0) -> dict:
        """{"val_loss": mean loss over the validation units, and the task's metrics}, on every process."""
        raise NotImplementedError


def get_task(name: str) -> Task:
    """A fresh Task for `name`: the `TASK` class of the module its row in taskspec.TASKS names (a registry
    dispatch, so this interface never imports the tasks that implement it)."""
    spec = TASKS.get(name)
    if spec is None:
        raise ConfigError(f"{setting('task.name')} {name!r}: choose one of {', '.join(TASK_NAMES)}")
    return importlib.import_module(f"lite_sft.tasks.{spec.module}").TASK()


def max_tokens(cfg, tokenizer) -> int:
    """data.max_seq_len, or the tokenizer's model_max_length when smaller: an encoder has no position beyond
    it (BERT's 512), and a longer row would fail inside the model."""
    return min(cfg.data.max_seq_len, tokenizer.model_max_length)


def is_decoder_only(config) -> bool:
    """A causal language model (GPT-2, Llama, ...): it reads left to right and has no encoder. Known by its saved
    architectures, or, for a folder saved from the bare model (["LlamaModel"]), by its type: one transformers
    has a causal-LM head for but no masked-LM head (BERT has both, and is an encoder)."""
    if getattr(config, "is_encoder_decoder", False):
        return False
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return True
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    kind = getattr(config, "model_type", None)
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def all_sum(accelerator, value):
    """`value` (a number or a tensor) summed over every process; returned as it came (int, float, tensor)."""
    if accelerator.num_processes == 1:
        return value
    import torch

    t = value.detach().clone().float() if torch.is_tensor(value) else torch.tensor(float(value), device=accelerator.device)
    t = accelerator.reduce(t.to(accelerator.device), reduction="sum")
    if torch.is_tensor(value):
        return t
    return int(round(t.item())) if isinstance(value, int) else t.item()


def gather(accelerator, values: list) -> list:
    """Every process's list, concatenated in process order (evaluation shards rows across processes)."""
    if accelerator.num_processes == 1:
        return values
    from accelerate.utils import gather_object

    return gather_object(values)
