"""causal-lm, the default task: instruction and chat tuning of a decoder on its trained tokens.

    lite-sft tune --model Qwen/Qwen2.5-0.5B --data chats.jsonl

Its code lives in this package: data.py (sources, formats, the pipeline's entry point), masking.py (which
tokens are trained), packing.py (rows and collation), cache.py (prepared data on disk) and loss.py (the fused
output layer); this module only puts them behind the Task interface.
"""

from __future__ import annotations

import math

import torch

from lite_sft.errors import ModelError
from lite_sft.stops import save_stop_tokens
from lite_sft.tasks.base import IGNORE_INDEX, Task, TaskData, all_sum
from lite_sft.tasks.causal_lm import data as pipeline  # called through the module, which tests patch
from lite_sft.tasks.causal_lm.data import load_samples, write_validation_split
from lite_sft.tasks.causal_lm.loss import check_loss_path, token_loss_sum
from lite_sft.tasks.causal_lm.masking import build_examples
from lite_sft.tasks.causal_lm.packing import collate as collate_rows, unpacked_rows


class CausalLMTask(Task):
    name = "causal-lm"
    packs = True
    lora_all_linear = True

    def check_model(self, config, name: str) -> None:
        if getattr(config, "is_encoder_decoder", False):
            raise ModelError(f"{name} is an encoder-decoder ({config.model_type}): tune it with --task seq2seq")

    def prepare(self, cfg, tokenizer) -> TaskData:
        data = pipeline.prepare_data(cfg.data, tokenizer, seed=cfg.train.seed)
        s, v = data.train_stats, data.validation_stats
        limit = cfg.data.max_seq_len
        overlong = (f"{s.truncated + v.truncated} truncated to {limit} tokens" if cfg.data.overlong == "truncate" else
                    f"{s.dropped + v.dropped} dropped as longer than {limit} tokens")
        if untrained := s.dropped_untrained + v.dropped_untrained:
            overlong += f", {untrained} dropped with no trained token left after truncation"
        summary = (f"{s.examples} train / {v.examples} validation examples ({data.format}), {len(data.train)} rows, "
                   f"{s.trained_tokens} trained tokens; {overlong}")
        return TaskData(data.train, data.validation, data.format, summary, (s.examples, v.examples),
                        added_tokens=data.added_tokens, validation_examples=data.validation_examples,
                        train_stats=s, validation_stats=v)

    def record_detected(self, cfg, data: TaskData) -> None:
        if cfg.data.format == "auto":
            cfg.data.format = data.format

    def loss_path(self, model, device, requested: str) -> str:
        return check_loss_path(model, device, requested)

    def write_run_files(self, run_dir, cfg, tokenizer, model, data: TaskData) -> None:
        save_stop_tokens(run_dir, tokenizer, model.generation_config)  # where generation stops, for every later step
        write_validation_split(run_dir, cfg, data)

    def eval_rows(self, cfg, tokenizer, path: str, run_dir) -> list:
        _, samples = load_samples(path, cfg.data.format, cfg.data.split, role="validation")
        return unpacked_rows(build_examples(samples, tokenizer, cfg.data)[0])

    def collate(self, rows: list, tokenizer) -> dict:
        return collate_rows(rows, tokenizer.pad_token_id)

    def units(self, batch: dict) -> float:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss_sum(self, model, batch: dict, device, loss_impl: str = "full", chunk: int = 0):
        return token_loss_sum(model, batch, device, loss_impl, chunk)

    @torch.no_grad()
    def evaluate(self, model, rows: list, tokenizer, accelerator, micro_batch_size: int,
                 loss_impl: str = "full", chunk: int = 0) -> dict:
        model.eval()
        total = torch.zeros((), device=accelerator.device)
        count = 0
        for _, batch in self.shard_batches(rows, tokenizer, accelerator, micro_batch_size):
            count += self.units(batch)
            with accelerator.autocast():
                total += self.loss_sum(model, batch, accelerator.device, loss_impl, chunk)
        loss = all_sum(accelerator, total).item() / max(all_sum(accelerator, count), 1)
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50))}


TASK = CausalLMTask  # what lite_sft.tasks.base.get_task builds for the row of taskspec.TASKS naming this module
