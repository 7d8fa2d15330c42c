"""The training loop: setup, fit, save, top to bottom.

    lite-sft tune --model Qwen/Qwen2.5-0.5B --data chats.jsonl --quant 4bit --output-dir runs/qwen
    torchrun --nproc-per-node 2 -m lite_sft tune ...      # the same loop under DDP

One optimiser step consumes a fixed block of `micro_batch_size * grad_accum * world_size` rows from a
seeded stream of epoch permutations, so the data a step sees depends only on the step number: resume
and multi-process runs follow the same trajectory as a single uninterrupted run. The loss is summed over
trained tokens and divided by the trained-token count of the whole optimiser step (all micro-batches,
all processes), so accumulation and DDP give the same gradient as one big batch.
"""

from __future__ import annotations

import functools
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from . import checkpoint, report
from .config import BUILTIN_DATA, BUILTIN_MODEL, ConfigError, RunConfig, config_to_yaml, load_config, save_config
from .loss import check_loss_path, token_loss_sum
from .masking import DEFAULT_TEMPLATE_TOKENS, IGNORE_INDEX
from .model import ModelError, add_lora, cpu_has_fast_bf16, load_base_model, load_tokenizer, resolve_model_path
from .packing import collate
from .stops import save_stop_tokens


class RunDirError(RuntimeError):
    """The output directory cannot be used as asked (exists, or has nothing to resume)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# Fields that may change when resuming: they lengthen or shorten the run without changing its past.
RESUMABLE_CHANGES = {"train.max_steps", "train.epochs", "train.eval_every", "train.save_every",
                     "train.keep_last", "train.log_every", "train.early_stopping_patience"}


def tune(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False,
         on_step: Callable[[int, dict, torch.nn.Module], None] | None = None) -> dict:
    """Fine-tune `cfg.model` on `cfg.data` with LoRA and write the run directory; returns the summary."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import set_seed

    cfg.validate()
    run_dir = Path(cfg.output_dir)
    _check_run_dir(run_dir, cfg, resume, overwrite)

    # --- setup: everything that can fail on bad input happens before the run directory is touched
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    # accelerate keeps its precision in a process-wide state and refuses a second one; a notebook or a
    # test suite may tune several models in one process. The distributed state (PartialState) is kept.
    AcceleratorState._reset_state()
    # cpu=True without CUDA: that is what makes accelerate join a torchrun group over gloo on CPU.
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg, device_type), cpu=device_type == "cpu")
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
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    from .data import prepare_data

    # Conversational data gets a chat template here when the tokenizer has none (prompt_completion and
    # text need none, so their vocabulary is never touched).
    data = prepare_data(cfg.data, tokenizer, seed=cfg.train.seed)
    if cfg.data.format == "auto":
        cfg.data.format = data.format  # the saved config records what was detected
    if main and (warning := data.train_stats.straddling_warning()):
        print(f"warning: {warning}")
    model = load_base_model(cfg.model, model_path, accelerator.device)
    new_token_ids = None
    if data.added_tokens:
        new_token_ids = tokenizer.convert_tokens_to_ids(list(DEFAULT_TEMPLATE_TOKENS))
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        if main:
            print(f"the tokenizer has no chat template: using ChatML, with {', '.join(DEFAULT_TEMPLATE_TOKENS)} added "
                  "to the vocabulary; their embedding and output-layer rows train and are saved with the adapter")
    if cfg.data.packing:
        check_packing_isolation(model, accelerator.device)
    model = add_lora(model, cfg.lora, cfg.model, new_token_ids)
    loss_impl = check_loss_path(model, accelerator.device, cfg.train.loss)
    optimizer = _optimizer(cfg, model, accelerator.device)
    world = accelerator.num_processes
    rows_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * world
    total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * len(data.train) / rows_per_step)
    scheduler = _scheduler(cfg, optimizer, total_steps)

    if main:
        print(config_to_yaml(cfg), end="")
        print(f"data: {data.train_stats.examples} train / {data.validation_stats.examples} validation examples "
              f"({data.format}), {len(data.train)} rows, {total_steps} steps of {rows_per_step} rows")
        _init_run_dir(run_dir, resume, overwrite)
        save_config(cfg, run_dir / "config.yaml")
        tokenizer.save_pretrained(run_dir)
        save_stop_tokens(run_dir, tokenizer, model.generation_config)  # where generation stops, for every later step
        report.write_validation_split(run_dir, cfg, data)
    accelerator.wait_for_everyone()

    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.model.compile:
        model.compile(dynamic=True)  # in place: saving, unwrapping and the loss see the same module
    loop = {"step": 0, "tokens": 0, "trained_tokens": 0, "elapsed": 0.0, "best_val": math.inf, "best_step": None,
            "bad_evals": 0}
    if resume:
        step, ckpt = checkpoint.list_checkpoints(run_dir)[-1]
        loop = {**loop, **checkpoint.load_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, scheduler)}
        if main:
            checkpoint.restore_best(ckpt, run_dir)
            print(f"resuming from {ckpt} (step {step})")
    log = report.MetricsLog(run_dir, resume_step=loop["step"] if resume else None) if main else None
    skill_before = _skill_score(cfg, accelerator, model, tokenizer) if not resume else None

    # --- fit
    from tqdm.auto import tqdm

    # Packed rows are nearly all full already; grouping matters for padded ones.
    lengths = tuple(len(r) for r in data.train) if cfg.data.group_by_length and not cfg.data.packing else None
    bar = tqdm(total=total_steps, initial=loop["step"], disable=not main, dynamic_ncols=True, desc="tune", mininterval=0.5)
    started = time.perf_counter() - loop["elapsed"]
    stopped_early = False
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    try:
        while loop["step"] < total_steps:
            step = loop["step"] + 1
            rows = _rows_for_step(step - 1, len(data.train), rows_per_step, cfg.train.seed, lengths)
            per_rank = rows_per_step // world
            mine = [data.train[i] for i in rows[accelerator.process_index * per_rank:][:per_rank]]
            batches = [collate(mine[i:i + cfg.train.micro_batch_size], tokenizer.pad_token_id)
                       for i in range(0, per_rank, cfg.train.micro_batch_size)]
            trained = _all_sum(accelerator, sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches))
            tokens = _all_sum(accelerator, sum(len(r.input_ids) for r in mine))
            model.train()
            loss_sum = torch.zeros((), device=accelerator.device)
            for i, batch in enumerate(batches):
                last = i == len(batches) - 1
                with nullcontext() if last else accelerator.no_sync(model):
                    with accelerator.autocast(), _saved_tensors(cfg):  # autocast: the loss's own matmul too
                        ce = token_loss_sum(model, batch, accelerator.device, loss_impl, cfg.train.loss_chunk_tokens)
                    # DDP averages gradients over processes, hence the `* world`.
                    accelerator.backward(ce * world / max(trained, 1))
                loss_sum += ce.detach()
            loss = _all_sum(accelerator, loss_sum).item() / max(trained, 1)
            if not math.isfinite(loss):
                kept = checkpoint.list_checkpoints(run_dir)
                where = f"the last good checkpoint is {kept[-1][1]} (continue with --resume)" if kept else "no checkpoint was written yet"
                raise TrainingDiverged(f"loss became {loss} at step {step}; stopped before applying it, {where}. "
                                       "Lower --lr, check the data, or use a wider compute dtype.")
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm) \
                if cfg.train.max_grad_norm > 0 else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            loop.update(step=step, tokens=loop["tokens"] + tokens, trained_tokens=loop["trained_tokens"] + trained,
                        elapsed=time.perf_counter() - started)
            record = {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0],
                      "grad_norm": float(grad_norm) if grad_norm is not None else None,
                      "tokens_per_s": loop["tokens"] / max(loop["elapsed"], 1e-9), "trained_tokens": trained,
                      "epoch": step * rows_per_step / len(data.train)}
            if main and step % cfg.train.log_every == 0:
                log.log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")

            if data.validation and (step == total_steps or (cfg.train.eval_every and step % cfg.train.eval_every == 0)):
                val_loss = evaluate(model, data.validation, cfg.train.micro_batch_size, tokenizer.pad_token_id, accelerator,
                                    loss_impl, cfg.train.loss_chunk_tokens)
                if main:
                    log.log({"step": step, "val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50))})
                    bar.write(f"step {step}: validation loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 50)):.2f}")
                if val_loss < loop["best_val"]:
                    loop.update(best_val=val_loss, best_step=step, bad_evals=0)
                    if cfg.train.early_stopping_patience and main:
                        checkpoint.save_best(run_dir, accelerator.unwrap_model(model), step, val_loss)
                else:
                    loop["bad_evals"] += 1
                    if cfg.train.early_stopping_patience and loop["bad_evals"] >= cfg.train.early_stopping_patience:
                        stopped_early = True
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total_steps:
                _save(accelerator, run_dir, step, model, optimizer, scheduler, loop, cfg.train.keep_last)
            if on_step is not None:
                on_step(step, record, accelerator.unwrap_model(model))
            if stopped_early:
                if main:
                    bar.write(f"early stopping at step {step}: no better validation loss in "
                              f"{cfg.train.early_stopping_patience} evaluations; keeping the best adapter, "
                              f"from step {loop['best_step']} (validation loss {loop['best_val']:.4f})")
                break
    finally:
        bar.close()
        if log is not None:
            log.close()

    # --- save
    unwrapped = accelerator.unwrap_model(model)
    # The last checkpoint holds the weights the optimiser state belongs to; the adapter kept may be the best.
    _save(accelerator, run_dir, loop["step"], model, optimizer, scheduler, loop, cfg.train.keep_last)
    if stopped_early:
        checkpoint.load_best(run_dir, unwrapped)  # every process: the skill score below uses the weights too
    skill_after = _skill_score(cfg, accelerator, model, tokenizer)
    summary = None
    if main:
        # Rows of added tokens are saved as peft trainable tokens; without this peft would also save the whole
        # resized embedding and output layer (135 MB on a 30M model) because their size changed.
        unwrapped.save_pretrained(run_dir, save_embedding_layers=False)
        summary = _summary(cfg, data, loop, total_steps, world, accelerator.device, run_dir, stopped_early,
                           skill_before, skill_after)
        report.write_summary(run_dir, summary)
        report.plot_losses(run_dir)
    accelerator.wait_for_everyone()
    return summary


@torch.no_grad()
def evaluate(model, rows, micro_batch_size: int, pad_id: int, accelerator, loss: str = "full",
             loss_chunk: int = 0) -> float:
    """Validation loss per trained token over all rows (sharded across processes)."""
    model.eval()
    mine = rows[accelerator.process_index::accelerator.num_processes]
    total = torch.zeros((), device=accelerator.device)
    count = 0
    for i in range(0, len(mine), micro_batch_size):
        batch = collate(mine[i:i + micro_batch_size], pad_id)
        count += int((batch["labels"] != IGNORE_INDEX).sum())
        with accelerator.autocast():
            total += token_loss_sum(model, batch, accelerator.device, loss, loss_chunk)
    count = _all_sum(accelerator, count)
    return _all_sum(accelerator, total).item() / max(count, 1)


@torch.no_grad()
def check_packing_isolation(model, device: torch.device) -> None:
    """Packed examples must not see each other: compare a packed pair with the two run separately.

    transformers isolates packed examples only for architectures whose masks honour restarting
    position ids; this one forward pass proves it for the loaded model instead of assuming it.
    """
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, vocab, (1, 5), generator=gen), torch.randint(0, vocab, (1, 4), generator=gen)
    packed = torch.cat([a, b], dim=1).to(device)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]], device=device)
    was_training = model.training
    model.eval()
    together = model(input_ids=packed, position_ids=positions, use_cache=False).logits[0, 5:].float()
    alone = model(input_ids=b.to(device), use_cache=False).logits[0].float()
    model.train(was_training)
    if not torch.allclose(together, alone, atol=1e-2, rtol=1e-2):
        raise ModelError(f"{type(model).__name__} lets packed examples attend to each other in this transformers "
                         "version; turn packing off with --no-packing")


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


def _all_sum(accelerator, value):
    if accelerator.num_processes == 1:
        return value
    t = value.detach().clone().float() if torch.is_tensor(value) else torch.tensor(float(value), device=accelerator.device)
    t = accelerator.reduce(t.to(accelerator.device), reduction="sum")
    return t if torch.is_tensor(value) else int(round(t.item()))


def _saved_tensors(cfg: RunConfig):
    """Where autograd keeps what backward needs: on the GPU, or (offload_activations) in pinned host memory."""
    return torch.autograd.graph.save_on_cpu(pin_memory=True) if cfg.model.offload_activations else nullcontext()


def _auto_batch(cfg: RunConfig, device: torch.device, main: bool) -> None:
    """Set the largest micro-batch that `lite-sft plan` estimates to fit, keeping the rows per step."""
    from . import plan

    try:
        budget = plan.parse_size(cfg.train.memory_budget) if cfg.train.memory_budget else plan.default_budget(device.type)
    except ValueError as err:
        raise ConfigError(f"train.memory_budget (--gpu-memory): {err}") from err
    micro, accum = plan.pick_batch(cfg, budget, device.type)
    if main:
        print(f"auto batch: micro-batch {micro} x accumulation {accum} fits {budget / 2**30:.1f} GiB "
              f"(was {cfg.train.micro_batch_size} x {cfg.train.grad_accum})")
    cfg.train.micro_batch_size, cfg.train.grad_accum = micro, accum


def mixed_precision(cfg: RunConfig, device_type: str) -> str:
    """Autocast for accelerate. `auto` on a GPU loads 16-bit weights and needs none; on a CPU with
    native bf16 (AVX512-BF16 or AMX) it keeps fp32 weights and runs matmuls in bf16 under autocast, 1.5x
    faster than fp32 for a 35M Llama (benchmarks/train_vs_trl.py)."""
    if cfg.model.dtype == "auto":
        return "bf16" if device_type == "cpu" and cpu_has_fast_bf16() else "no"
    return {"bfloat16": "bf16", "float16": "fp16"}.get(cfg.model.dtype, "no")


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


def _check_run_dir(run_dir: Path, cfg: RunConfig, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: pick one")
    if resume:
        if not checkpoint.list_checkpoints(run_dir):
            raise RunDirError(f"{run_dir} has no checkpoint to resume from; start afresh with --overwrite")
        saved = load_config(run_dir / "config.yaml")
        _adopt_resolved(cfg, saved)
        changed = sorted(set(_flat(saved.to_dict()).items()) ^ set(_flat(cfg.to_dict()).items()))
        changed = sorted({k for k, _ in changed} - RESUMABLE_CHANGES)
        if changed:
            raise ConfigError(f"--resume continues {run_dir} as configured in {run_dir / 'config.yaml'}; "
                              f"these fields differ from it: {', '.join(changed)}")
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise RunDirError(f"{run_dir} already exists: pass --overwrite to replace it or --resume to continue it")


def _adopt_resolved(cfg: RunConfig, saved: RunConfig) -> None:
    """Take what the run resolved at its start for what it was asked, so that resuming with the command
    that started it is accepted: `format: auto` was saved as the format detected, `auto_batch` as the
    micro-batch and accumulation it chose."""
    if cfg.data.format == "auto":
        cfg.data.format = saved.data.format
    if cfg.train.auto_batch and saved.train.auto_batch:
        cfg.train.micro_batch_size, cfg.train.grad_accum = saved.train.micro_batch_size, saved.train.grad_accum


def _init_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
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


def _save(accelerator, run_dir, step, model, optimizer, scheduler, loop, keep_last) -> None:
    if accelerator.is_main_process:
        checkpoint.save_checkpoint(run_dir, step, accelerator.unwrap_model(model), optimizer, scheduler, loop, keep_last)
    accelerator.wait_for_everyone()


def _skill_score(cfg: RunConfig, accelerator, model, tokenizer) -> float | None:
    """Held-out exact match on the bundled skill data (the embedded default only)."""
    if cfg.data.path != BUILTIN_DATA:
        return None
    score = None
    if accelerator.is_main_process:
        from .tiny import exact_match, load_skill_eval

        score = exact_match(accelerator.unwrap_model(model), tokenizer, load_skill_eval())
        print(f"held-out exact match: {score:.1%}")
    accelerator.wait_for_everyone()
    return score


def _summary(cfg, data, loop, total_steps, world, device, run_dir, stopped_early, skill_before, skill_after) -> dict:
    metrics = report.read_metrics(run_dir)
    train_losses = [m["loss"] for m in metrics if "loss" in m]
    val_losses = [m["val_loss"] for m in metrics if "val_loss" in m]
    elapsed = max(loop["elapsed"], 1e-9)
    return {
        "steps": loop["step"],
        "planned_steps": total_steps,
        "stopped_early": stopped_early,
        "processes": world,
        "device": str(device),
        "train_examples": data.train_stats.examples,
        "validation_examples": data.validation_stats.examples,
        "tokens": loop["tokens"],
        "trained_tokens": loop["trained_tokens"],
        "tokens_per_s": loop["tokens"] / elapsed,
        "trained_tokens_per_s": loop["trained_tokens"] / elapsed,
        "wall_s": loop["elapsed"],
        "final_train_loss": train_losses[-1] if train_losses else None,
        "final_val_loss": val_losses[-1] if val_losses else None,
        "best_val_loss": loop["best_val"] if math.isfinite(loop["best_val"]) else None,
        "best_step": loop["best_step"],
        "adapter_step": loop["best_step"] if stopped_early else loop["step"],
        "skill_exact_match_before": skill_before,
        "skill_exact_match_after": skill_after,
        **report.peak_memory(device),
        "versions": report.versions(),
    }
