"""The training loop: setup, fit, evaluate, save, top to bottom, the same for every task.

    lite-sft tune --model Qwen/Qwen2.5-0.5B --data chats.jsonl --quant 4bit --output-dir runs/qwen
    lite-sft tune --task seq-cls --model bert-base-uncased --data train.csv --output-dir runs/sentiment
    torchrun --nproc-per-node 2 -m lite_sft tune ...      # the same loop under DDP

    run = setup(cfg); stopped_early = fit(run); summary = save(run, stopped_early)     # what tune() does

What differs per task (data, model class, collation, loss, metrics) sits behind lite_sft.tasks.base.Task.
The run directory (checked at the start, adapter and summary.json at the end) is rundir.py's; what an
evaluation leads to (logging, the best adapter, early stopping, the demo's skill score) is validation.py's.
One optimiser step consumes a fixed block of `micro_batch_size * grad_accum * world_size` rows from a
seeded stream of epoch permutations, so the data a step sees depends only on the step number: resume
and multi-process runs follow the same trajectory as a single uninterrupted run. The loss is summed over
the task's units (trained tokens, or examples) and divided by the units of the whole optimiser step (all
micro-batches, all processes), so accumulation and DDP give the same gradient as one big batch.
"""

from __future__ import annotations

import functools
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import checkpoint, plan, report
from .artifacts import CONFIG_FILE
from .config import BUILTIN_DATA, BUILTIN_MODEL, RunConfig, config_to_yaml, save_config
from .errors import ConfigError, RunDirError  # noqa: F401  (RunDirError: its old home, re-exported for now)
from .model import (add_lora, check_task_model, check_vocab, load_base_model, load_tokenizer, mixed_precision,
                    recorded_model_name, resolve_model_path)
from .rundir import check_run_dir, init_run_dir, save_adapter, summary as run_summary
from .tasks.base import Task, TaskData, all_sum, get_task
from .tasks.causal_lm.masking import DEFAULT_TEMPLATE_TOKENS
from .tasks.causal_lm.packing import check_packing_isolation
from .validation import record_evaluation, skill_score


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class Run:
    """Everything a run needs between setup, fit and save."""

    cfg: RunConfig
    task: Task
    accelerator: object
    tokenizer: object
    data: TaskData
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    loss_impl: str
    total_steps: int
    rows_per_step: int
    loop: dict
    log: report.MetricsLog | None
    skill_before: float | None = None
    last_eval: dict = field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.output_dir)


def tune(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False,
         on_step: Callable[[int, dict, torch.nn.Module], None] | None = None) -> dict:
    """Fine-tune `cfg.model` on `cfg.data` with LoRA and write the run directory; returns the summary."""
    run = setup(cfg, resume=resume, overwrite=overwrite)
    try:
        stopped_early = fit(run, on_step)
    finally:
        if run.log is not None:
            run.log.close()
    return save(run, stopped_early)


def setup(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> Run:
    """Load, prepare and check everything; only then create (or continue) the run directory."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import set_seed

    cfg.validate()
    if cfg.data.path != BUILTIN_DATA and cfg.model.name_or_path == BUILTIN_MODEL:
        # The demo's random tiny model would train on the user's data for the demo's 800 steps and look like a run.
        raise ConfigError(f"--data {cfg.data.path} needs --model too (model.name_or_path): a hub id such as "
                          "Qwen/Qwen2.5-0.5B-Instruct or a local model folder; the built-in tiny model only runs the "
                          "demo on its bundled data")
    cfg.model.name_or_path = recorded_model_name(cfg.model.name_or_path)  # config.yaml and peft record it absolute
    task = get_task(cfg.task.name)
    run_dir = Path(cfg.output_dir)
    check_run_dir(run_dir, cfg, resume, overwrite)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    # accelerate keeps its precision in a process-wide state and refuses a second one; a notebook or a
    # test suite may tune several models in one process. The distributed state (PartialState) is kept.
    AcceleratorState._reset_state()
    # cpu=True without CUDA: that is what makes accelerate join a torchrun group over gloo on CPU.
    precision = mixed_precision(cfg.model, device_type)
    if device_type == "cpu" and cfg.model.cpu_bf16 == "auto":
        # Record what auto chose: eval and --resume then compute as training did, on whatever CPU they run.
        cfg.model.cpu_bf16 = "on" if precision == "bf16" else "off"
    accelerator = Accelerator(mixed_precision=precision, cpu=device_type == "cpu")
    main = accelerator.is_main_process
    if cfg.model.offload_activations and accelerator.device.type != "cuda":
        raise ConfigError("model.offload_activations moves activations from GPU to CPU memory; on "
                          f"{accelerator.device.type} they are in CPU memory already: turn it off")
    if cfg.train.auto_batch and not resume:  # a resumed run keeps the batch its config.yaml recorded
        _auto_batch(cfg, accelerator.device, main)
    if cfg.model.name_or_path == BUILTIN_MODEL and accelerator.device.type == "cpu":
        # The built-in model's matmuls are too small to split: a second OpenMP thread mostly
        # spin-waits, and makes the demo several times slower whenever anything shares the cores.
        torch.set_num_threads(1)
    set_seed(cfg.train.seed)
    model_path = resolve_model_path(cfg.model.name_or_path)
    check_task_model(task, model_path, cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    # causal-lm: conversational data gets a chat template here when the tokenizer has none (prompt_completion
    # and text need none, so their vocabulary is never touched).
    data = task.prepare(cfg, tokenizer)
    task.record_detected(cfg, data)  # the saved config records what was detected (causal-lm: the format)
    if main and data.train_stats is not None and (warning := data.train_stats.straddling_warning()):
        print(f"warning: {warning}")
    model = load_base_model(cfg.model, model_path, accelerator.device, task, **task.model_kwargs(data))
    if model.config.pad_token_id is None:  # a classifier finds each row's last real token by it
        model.config.pad_token_id = tokenizer.pad_token_id
    check_vocab(model, tokenizer, model_path, DEFAULT_TEMPLATE_TOKENS if data.added_tokens else ())
    new_token_ids = None
    if data.added_tokens:
        new_token_ids = tokenizer.convert_tokens_to_ids(list(DEFAULT_TEMPLATE_TOKENS))
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        if main:
            print(f"the tokenizer has no chat template: using ChatML, with {', '.join(DEFAULT_TEMPLATE_TOKENS)} added "
                  "to the vocabulary; their embedding and output-layer rows train and are saved with the adapter")
    if cfg.data.packing and task.packs:
        check_packing_isolation(model, accelerator.device)
    model = add_lora(model, cfg.lora, cfg.model, new_token_ids, task)
    loss_impl = task.loss_path(model, accelerator.device, cfg.train.loss)
    optimizer = _optimizer(cfg, model, accelerator.device)
    rows_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * accelerator.num_processes
    total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * len(data.train) / rows_per_step)
    scheduler = _scheduler(cfg, optimizer, total_steps)

    if main:
        print(config_to_yaml(cfg), end="")
        print(f"data: {data.summary}; {total_steps} steps of {rows_per_step} rows")
        print(f"precision: {_precision_line(precision, cfg.model.cpu_bf16, accelerator.device.type, model)}")
        init_run_dir(run_dir, resume, overwrite)
        save_config(cfg, run_dir / CONFIG_FILE)
        tokenizer.save_pretrained(run_dir)
        task.write_run_files(run_dir, cfg, tokenizer, model, data)
    accelerator.wait_for_everyone()

    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.model.compile:
        model.compile(dynamic=True)  # in place: saving, unwrapping and the loss see the same module
    loop = {"step": 0, "tokens": 0, "units": 0, "elapsed": 0.0, "best_val": math.inf, "best_step": None,
            "bad_evals": 0}
    if resume:
        step, ckpt = checkpoint.list_checkpoints(run_dir)[-1]
        loop = {**loop, **checkpoint.load_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, scheduler)}
        if "trained_tokens" in loop:  # written before the loop counted any task's units
            loop["units"] = loop.pop("trained_tokens")
        if main:
            checkpoint.restore_best(ckpt, run_dir)
            print(f"resuming from {ckpt} (step {step})")
    log = report.MetricsLog(run_dir, resume_step=loop["step"] if resume else None) if main else None
    run = Run(cfg, task, accelerator, tokenizer, data, model, optimizer, scheduler, loss_impl, total_steps,
              rows_per_step, loop, log)
    if not resume:
        run.skill_before = loop["skill_before"] = skill_score(run)  # checkpoints carry it for a resumed run
    else:
        run.skill_before = loop.get("skill_before")  # None from a checkpoint written before it was kept
    return run


def fit(run: Run, on_step: Callable[[int, dict, torch.nn.Module], None] | None = None) -> bool:
    """Train until the last step or early stopping (returned True); evaluates and checkpoints on the way."""
    from tqdm.auto import tqdm

    cfg, task, accelerator, model, loop = run.cfg, run.task, run.accelerator, run.model, run.loop
    world, micro = accelerator.num_processes, cfg.train.micro_batch_size
    packed = cfg.data.packing and task.packs
    # Packed rows are nearly all full already; grouping matters for padded ones.
    lengths = tuple(len(r) for r in run.data.train) if cfg.data.group_by_length and not packed else None
    bar = tqdm(total=run.total_steps, initial=loop["step"], disable=not run.main, dynamic_ncols=True, desc="tune",
               mininterval=0.5)
    started = time.perf_counter() - loop["elapsed"]
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    try:
        while loop["step"] < run.total_steps:
            step = loop["step"] + 1
            rows = _rows_for_step(step - 1, len(run.data.train), run.rows_per_step, cfg.train.seed, lengths)
            per_rank = run.rows_per_step // world
            mine = [run.data.train[i] for i in rows[accelerator.process_index * per_rank:][:per_rank]]
            batches = [task.collate(mine[i:i + micro], run.tokenizer) for i in range(0, per_rank, micro)]
            # The step's loss is the mean over its units (trained tokens, or examples), all micro-batches and
            # processes together: accumulation and DDP give the gradient of one big batch.
            units = all_sum(accelerator, sum(task.units(b) for b in batches))
            tokens = all_sum(accelerator, sum(len(r) for r in mine))
            model.train()
            loss_sum = torch.zeros((), device=accelerator.device)
            for i, batch in enumerate(batches):
                with nullcontext() if i == len(batches) - 1 else accelerator.no_sync(model):
                    with accelerator.autocast(), _saved_tensors(cfg):  # autocast: the loss's own matmul too
                        part = task.loss_sum(model, batch, accelerator.device, run.loss_impl, cfg.train.loss_chunk_tokens)
                    # DDP averages gradients over processes, hence the `* world`.
                    accelerator.backward(part * world / max(units, 1e-9))
                loss_sum += part.detach()
            loss = all_sum(accelerator, loss_sum).item() / max(units, 1e-9)
            if not math.isfinite(loss):
                kept = checkpoint.list_checkpoints(run.run_dir)
                where = f"the last good checkpoint is {kept[-1][1]} (continue with --resume)" if kept else "no checkpoint was written yet"
                raise TrainingDiverged(f"loss became {loss} at step {step}; stopped before applying it, {where}. "
                                       "Lower --lr, check the data, or use a wider compute dtype.")
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm) \
                if cfg.train.max_grad_norm > 0 else None
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)

            loop.update(step=step, tokens=loop["tokens"] + tokens, units=loop["units"] + units,
                        elapsed=time.perf_counter() - started)
            record = {"step": step, "loss": loss, "lr": run.scheduler.get_last_lr()[0],
                      "grad_norm": float(grad_norm) if grad_norm is not None else None,
                      "tokens_per_s": loop["tokens"] / max(loop["elapsed"], 1e-9), task.unit_name: units,
                      "epoch": step * run.rows_per_step / len(run.data.train)}
            if run.main and step % cfg.train.log_every == 0:
                run.log.log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")

            stop = False
            if run.data.validation and (step == run.total_steps or (cfg.train.eval_every and step % cfg.train.eval_every == 0)):
                stop = record_evaluation(run, step, evaluate(run), bar.write)
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < run.total_steps:
                _save(run, step)
            if on_step is not None:
                on_step(step, record, accelerator.unwrap_model(model))
            if stop:
                if run.main:
                    bar.write(f"early stopping at step {step}: no better validation loss in "
                              f"{cfg.train.early_stopping_patience} evaluations; keeping the best adapter, "
                              f"from step {loop['best_step']} (validation loss {loop['best_val']:.4f})")
                return True
    finally:
        bar.close()
    return False


def evaluate(run: Run) -> dict:
    """The task's validation figures: {"val_loss", and its metrics (perplexity, accuracy, F1, BLEU, ...)}."""
    return run.task.evaluate(run.model, run.data.validation, run.tokenizer, run.accelerator,
                             run.cfg.train.micro_batch_size, run.loss_impl, run.cfg.train.loss_chunk_tokens)


def save(run: Run, stopped_early: bool) -> dict | None:
    """Write the adapter (the best one after early stopping), the summary and the loss plot."""
    accelerator = run.accelerator
    unwrapped = accelerator.unwrap_model(run.model)
    # The last checkpoint holds the weights the optimiser state belongs to; the adapter kept may be the best.
    _save(run, run.loop["step"])
    if stopped_early:
        checkpoint.load_best(run.run_dir, unwrapped)  # every process: the skill score below uses the weights too
    skill_after = skill_score(run)
    summary = None
    if run.main:
        save_adapter(unwrapped, run.run_dir)
        summary = run_summary(run, stopped_early, skill_after)
        report.write_summary(run.run_dir, summary)
        report.plot_losses(run.run_dir)
    accelerator.wait_for_everyone()
    return summary


def _rows_for_step(step: int, n_rows: int, rows_per_step: int, seed: int,
                   lengths: tuple[int, ...] | None = None) -> list[int]:
    """Row indices for optimiser step `step` (0-based): a block of a stream of seeded epoch permutations.

    With `lengths` (length-grouped batching) each epoch's permutation is arranged so that every step's
    block holds rows of similar length; see `_epoch_order`.
    """
    positions = [divmod(p, n_rows) for p in range(step * rows_per_step, (step + 1) * rows_per_step)]
    orders = {epoch: _epoch_order(seed, epoch, n_rows, rows_per_step if lengths else 0, lengths)
              for epoch in {epoch for epoch, _ in positions}}
    return [orders[epoch][index] for epoch, index in positions]


# Rows per "megabatch" = this many optimiser steps' worth, as in transformers' LengthGroupedSampler.
GROUP_STEPS = 50


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n_rows: int, rows_per_step: int = 0,
                 lengths: tuple[int, ...] | None = None) -> list[int]:
    """A seeded permutation of the rows. Length-grouped: cut it into megabatches of GROUP_STEPS steps,
    sort each by length (longest first), cut that into steps and shuffle the steps within it; the data
    stays random at the scale of a megabatch while a micro-batch pads its rows to a similar length."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_rows, generator=gen).tolist()
    if not rows_per_step:
        return order
    grouped = []
    mega = rows_per_step * GROUP_STEPS
    for start in range(0, n_rows, mega):
        block = sorted(order[start:start + mega], key=lambda i: -lengths[i])
        steps = [block[i:i + rows_per_step] for i in range(0, len(block), rows_per_step)]
        for k in torch.randperm(len(steps), generator=gen).tolist():
            grouped += steps[k]
    return grouped


def _saved_tensors(cfg: RunConfig):
    """Where autograd keeps what backward needs: on the GPU, or (offload_activations) in pinned host memory."""
    return torch.autograd.graph.save_on_cpu(pin_memory=True) if cfg.model.offload_activations else nullcontext()


def _auto_batch(cfg: RunConfig, device: torch.device, main: bool) -> None:
    """Set the largest micro-batch that `lite-sft plan` estimates to fit, keeping the rows per step."""
    try:
        budget = plan.parse_size(cfg.train.memory_budget) if cfg.train.memory_budget else plan.default_budget(device.type)
    except ValueError as err:
        raise ConfigError(f"train.memory_budget (--gpu-memory): {err}") from err
    micro, accum = plan.pick_batch(cfg, budget, device.type)
    if main:
        print(f"auto batch: micro-batch {micro} x accumulation {accum} fits {budget / 2**30:.1f} GiB "
              f"(was {cfg.train.micro_batch_size} x {cfg.train.grad_accum})")
    cfg.train.micro_batch_size, cfg.train.grad_accum = micro, accum


def _precision_line(precision: str, cpu_bf16: str, device_type: str, model) -> str:
    weights = str(next(model.parameters()).dtype).removeprefix("torch.")
    if precision == "no" and device_type == "cpu" and weights == "float32":
        return "fp32 (--cpu-bf16 on computes in bf16 under autocast)"
    if precision == "bf16" and weights == "float32":
        return f"bf16 autocast over fp32 weights (--cpu-bf16 {cpu_bf16}; --cpu-bf16 off for fp32)"
    return f"{weights} weights" + (f", {precision} autocast" if precision != "no" else "")


def _optimizer(cfg: RunConfig, model, device: torch.device):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.train.optimizer == "paged_adamw_8bit":
        if device.type != "cuda":
            raise ConfigError("train.optimizer: paged_adamw_8bit needs a CUDA GPU; use adamw on this device")
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def _scheduler(cfg: RunConfig, optimizer, total_steps: int):
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(cfg.train.schedule, cfg.train.schedule)
    warmup = round(cfg.train.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _save(run: Run, step: int) -> None:
    if run.main:
        checkpoint.save_checkpoint(run.run_dir, step, run.accelerator.unwrap_model(run.model), run.optimizer,
                                   run.scheduler, run.loop, run.cfg.train.keep_last)
    run.accelerator.wait_for_everyone()
