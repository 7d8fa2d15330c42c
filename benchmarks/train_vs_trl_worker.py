"""One measured run of benchmarks/train_vs_trl.py, inside its own fresh process: lite-sft's `tune()` or
TRL's SFTTrainer on the spec the parent wrote.

Every library either side uses is imported first, then the peak count is reset (CPU: VmHWM), so the
peak is the run's own and not the imports'. The pass is timed on its own: lite-sft's `wall_s` is its
loop's clock (the final validation starts when the loop's last step ends); TRL's is `trainer.train()`.
Prints `RESULT {json}` as its last line.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path

from workload import peak_rss, reset_peak  # beside this script

LORA = {"r": 16, "alpha": 32, "dropout": 0.0}


def run_worker(spec: dict, threads: int) -> None:
    # bitsandbytes (imported by peft) warns offline about a kernel it cannot fetch; its own one is used.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(threads)
    result = (_lite if spec["side"] == "lite-sft" else _trl)(spec)
    print("RESULT " + json.dumps(result), flush=True)


def _memory(baseline: int, cuda: bool) -> dict:
    import torch

    if cuda:
        return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                "peak_reserved_bytes": torch.cuda.max_memory_reserved()}
    peak = peak_rss()
    return {"peak_rss_bytes": peak, "baseline_rss_bytes": baseline, "working_bytes": peak - baseline}


def _figures(losses: list[float], examples: int, trained: int, tokens: int, wall: float) -> dict:
    """Train-loss summary (first step, last step, mean of the last 10% of steps) and throughput."""
    tail = losses[-max(1, round(0.1 * len(losses))):] if losses else []
    return {"first_train_loss": losses[0] if losses else None, "final_train_loss": losses[-1] if losses else None,
            "tail_train_loss": sum(tail) / len(tail) if tail else None, "examples": examples,
            "trained_tokens": trained, "tokens": tokens, "wall_s": wall, "examples_per_s": examples / wall,
            "trained_tokens_per_s": trained / wall, "tokens_per_s": tokens / wall}


def _lite(spec: dict) -> dict:
    import accelerate  # noqa: F401  (everything tune() imports, before the baseline)
    import matplotlib.pyplot  # noqa: F401
    import peft  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401
    import transformers  # noqa: F401

    import lite_sft.tasks.causal_lm.data  # noqa: F401
    import lite_sft.train as train
    from lite_sft import report
    from lite_sft.config import load_config

    baseline = reset_peak()
    cfg = load_config(None, spec["overrides"])
    # The loop's clock stops when its last step ends and the final validation begins; the time before
    # the loop started is setup (loading, tokenising or reading the cache, wrapping the model).
    pass_end: dict = {}
    evaluate = train.evaluate

    def timed_evaluate(*args, **kwargs):
        pass_end.setdefault("t", time.perf_counter())
        return evaluate(*args, **kwargs)

    train.evaluate = timed_evaluate
    started = time.perf_counter()
    summary = train.tune(cfg, overwrite=True)
    losses = [m["loss"] for m in report.read_metrics(Path(cfg.output_dir)) if "loss" in m]
    wall = summary["wall_s"]
    return {**_figures(losses, summary["train_examples"], summary["trained_tokens"], summary["tokens"], wall),
            "steps": summary["steps"], "setup_s": pass_end["t"] - started - wall, "val_loss": summary["final_val_loss"],
            "overrides": spec["overrides"], **_memory(baseline, spec["cuda"])}


def _trl(spec: dict) -> dict:
    import datasets
    import peft
    import torch
    import transformers
    import trl  # noqa: F401

    workload, cuda = spec["workload"], spec["cuda"]
    packed = spec["sft"].get("packing", False)
    micro, accum = spec["micro_accum"]
    baseline = reset_peak()
    started = time.perf_counter()
    paths = workload["paths"]
    data = datasets.load_dataset("json", data_files={"train": paths["train_prompt_completion"],
                                                      "validation": paths["validation_prompt_completion"]})
    tokenizer = transformers.AutoTokenizer.from_pretrained(workload["model_dir"])
    args = trl.SFTConfig(
        output_dir=spec["out"], num_train_epochs=1, per_device_train_batch_size=micro,
        per_device_eval_batch_size=micro, gradient_accumulation_steps=accum, learning_rate=spec["lr"],
        # transformers 5 folded warmup_ratio into warmup_steps: a value below 1 is the share of the steps.
        lr_scheduler_type="cosine", warmup_steps=spec["warmup"], weight_decay=0.0, max_grad_norm=1.0,
        seed=spec["seed"], max_length=workload["max_seq_len"], logging_steps=1, eval_strategy="no",
        save_strategy="no", report_to="none",
        # On a GPU, load the weights in bf16 as lite-sft does (TRL's own default loads fp32 and autocasts).
        model_init_kwargs={"dtype": "bfloat16"} if cuda else None, **spec["sft"])
    quant = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32) if spec["quant"] == "4bit" else None
    lora = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                           target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = trl.SFTTrainer(model=workload["model_dir"], args=args, train_dataset=data["train"],
                             eval_dataset=data["validation"], processing_class=tokenizer, peft_config=lora,
                             quantization_config=quant)
    setup = time.perf_counter() - started
    examples, trained, tokens = _counts(trainer.train_dataset, packed)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    output = trainer.train()
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - started
    eval_loss = trainer.evaluate()["eval_loss"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    resolved = {k: getattr(args, k) for k in ("bf16", "gradient_checkpointing", "packing", "packing_strategy",
                                              "padding_free", "train_sampling_strategy", "optim", "use_liger_kernel",
                                              "per_device_train_batch_size", "gradient_accumulation_steps")}
    return {**_figures(losses, examples, trained, tokens, wall), "steps": trainer.state.global_step,
            "setup_s": setup, "val_loss": _val_loss_per_token(trainer), "eval_loss_trainer": eval_loss,
            "trainer_train_runtime_s": output.metrics["train_runtime"], "trl_args": resolved,
            **_memory(baseline, cuda)}


def _counts(dataset, packed: bool) -> tuple[int, int, int]:
    """Examples, trained tokens and tokens in TRL's prepared training set (one pass sees each row once).

    A label at an example's first position is never scored (nothing in the example predicts it), and
    TRL's padding-free collator masks it too, so it is not counted.
    """
    examples = trained = tokens = 0
    lengths = dataset["seq_lengths"] if packed else None
    for i, (ids, labels) in enumerate(zip(dataset["input_ids"], dataset["labels"])):
        row = lengths[i] if packed else [len(ids)]
        starts = set(itertools.accumulate([0, *row[:-1]]))
        trained += sum(1 for j, label in enumerate(labels) if label != -100 and j not in starts)
        tokens += len(ids)
        examples += len(row)
    return examples, trained, tokens


def _val_loss_per_token(trainer) -> float:
    """Validation loss per trained token, as lite-sft computes it. `trainer.evaluate()` averages the
    per-batch means (weighted by rows), which drifts from this when batches hold different token counts."""
    import torch

    model = trainer.model
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs in trainer.get_eval_dataloader():
            inputs = trainer._prepare_inputs(inputs)
            n = int((inputs["labels"][:, 1:] != -100).sum())
            with trainer.compute_loss_context_manager():
                total += trainer.compute_loss(model, inputs).item() * n  # compute_loss: the mean over n tokens
            count += n
    return total / max(count, 1)
