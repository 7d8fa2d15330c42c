"""What the export pipeline checks for each task: the reference, the gates, and what parity.json records.

    checks = make_checks(run_dir, cfg, adapter_model, tokenizer, opts)     # the task row's gate_on says which
    ref = checks.reference(model)                                          # what later gates compare with
    gate = checks.torch_gate(merged, ref, stage="merge", ...)              # a PyTorch candidate
    gate = checks.ort_gate(out / "onnx", ref, "onnx", "float32")           # an ONNX folder, alone and batched

pipeline.export_run drives every task through these same calls; causal-lm's figures come from parity.py,
seq-cls, token-cls and seq2seq's from parity_tasks.py.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch

from lite_sft.artifacts import GENAI_CONFIG, MERGED_DIR
from lite_sft.errors import ModelError
from lite_sft.stops import stop_ids_for, write_stop_tokens
from lite_sft.tasks.base import get_task
from lite_sft.tasks.seq2seq import generation_settings, load_generation_settings
from lite_sft.taskspec import TASKS

from . import ExportError, parity_tasks
from .merge import save_merged
from .onnx import load_ort, onnx_bytes
from .parity import Gate, batch_check, compare, make_reference, ort_batch_logits, ort_logits, torch_logits
from .perplexity import held_out_texts, perplexity
from .prompts import held_out_prompts

MERGED = f"merged PyTorch model ({MERGED_DIR}/), fp32"


def make_checks(run_dir: Path, cfg, model, tokenizer, opts):
    """The checks for the run's task, by what its row says the gate runs on (held-out prompts or the task's own
    examples); `model` is the adapter model, for what it says about the run."""
    checks = {"prompts": CausalChecks, "examples": TaskChecks}[TASKS[cfg.task.name].gate_on]
    return checks(run_dir, cfg, model, tokenizer, opts)


def run_stop_ids(run_dir: Path, tokenizer, generation_config) -> list[int]:
    """The stop ids the run saved when it started (lite_sft.stops), decided the same way for an older run."""
    try:
        return stop_ids_for(run_dir, tokenizer, generation_config)
    except ValueError as err:
        raise ExportError(str(err)) from err


class CausalChecks:
    """causal-lm: greedy continuations of held-out prompts (parity.py), perplexity on the held-out examples
    (perplexity.py), the run's stop ids."""

    noun = "prompts"
    agreement = "greedy"

    def __init__(self, run_dir: Path, cfg, model, tokenizer, opts):
        self.task, self.tokenizer, self.opts = cfg.task.name, tokenizer, opts
        self.prompts, self.source = held_out_prompts(run_dir, cfg, tokenizer, opts.parity_prompts)
        self.texts, self.perplexity_on = held_out_texts(run_dir, cfg, tokenizer)
        self.stops = run_stop_ids(run_dir, tokenizer, model.generation_config)

    def reference(self, model, perplexity_measured: float | None = None):
        """What later gates compare with; `perplexity_measured`: the model's perplexity when a gate already
        measured it (the merged model's, in the merge gate), so its held-out examples are not read twice."""
        ref = make_reference(model, self.prompts, self.opts.parity_tokens, self.stops, self.tokenizer.pad_token_id)
        ref.perplexity = (perplexity_measured if perplexity_measured is not None else
                          perplexity(lambda ids: model(input_ids=ids, use_cache=False).logits[0], self.texts))
        return ref

    def torch_gate(self, model, ref, **gate) -> Gate:
        result = compare(ref, torch_logits(model, ref), **gate)
        result.extra.update(perplexity_reference=ref.perplexity,
                            perplexity=perplexity(lambda ids: model(input_ids=ids).logits[0], self.texts))
        return result

    def ort_gate(self, folder: Path, ref, stage: str, precision: str) -> Gate:
        ort = load_ort(folder, self.task)
        gate = compare(ref, ort_logits(ort, ref), stage=stage, artefact=folder.name, precision=precision,
                       reference=MERGED, min_agreement=self.opts.min_agreement)
        # The server's shape too: two prompts of different lengths, padded into one batch.
        batch_check(gate, ref, ort_batch_logits(ort, ref.subset(ref.batch_rows())),
                    side="right" if ort.pad_right else "left")
        ppl = perplexity(lambda ids: ort(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0], self.texts)
        gate.extra.update(perplexity_reference=ref.perplexity, perplexity=ppl, size_bytes=onnx_bytes(folder))
        del ort
        gc.collect()
        return gate

    def save_merged(self, model, tokenizer, folder: Path, dtype, max_shard_size) -> None:
        save_merged(model, tokenizer, folder, dtype, max_shard_size, self.stops)

    def finish_onnx(self, folder: Path) -> None:
        write_stop_tokens(folder, self.stops)  # the exporter copies generation_config.json; make sure of the list
        genai = folder / GENAI_CONFIG  # the builder's: onnxruntime-genai stops at its model.eos_token_id
        if genai.is_file():
            config = json.loads(genai.read_text())
            config["model"]["eos_token_id"] = self.stops
            genai.write_text(json.dumps(config, indent=4) + "\n")

    def report(self) -> dict:
        return {"prompts": {"source": self.source, "count": len(self.prompts), "new_tokens": self.opts.parity_tokens},
                "perplexity_on": self.perplexity_on, "stop_ids": self.stops}


class TaskChecks:
    """seq-cls, token-cls and seq2seq: the run's held-out rows through each model (parity_tasks.py)."""

    noun = "examples"
    agreement = "agree"
    perplexity_on = None  # their figures are the task's metrics, which `lite-sft eval` measures

    def __init__(self, run_dir: Path, cfg, model, tokenizer, opts):
        self.task, self.spec = get_task(cfg.task.name), TASKS[cfg.task.name]
        self.tokenizer, self.opts = tokenizer, opts
        # A generating task (seq2seq) gates on the run's generation settings; a classifier reports its labels.
        self.generation = run_generation(run_dir, cfg, model) if self.spec.generates else None
        id2label = getattr(model.config, "id2label", None) if not self.spec.generates else None
        self.labels = [id2label[i] for i in sorted(id2label)] if id2label else None
        count = opts.parity_examples or self.spec.gate_examples
        self.rows, self.source = parity_tasks.held_out_rows(self.task, run_dir, cfg, tokenizer, count)

    def reference(self, model, perplexity_measured: float | None = None):  # the classic tasks measure none
        return parity_tasks.make_reference(model, self.task, self.rows, self.tokenizer, self.opts.parity_tokens,
                                           self.generation)

    def torch_gate(self, model, ref, tolerance: str | None = None, **gate) -> Gate:
        return compare(ref.as_reference(), parity_tasks.torch_logits(model, ref),
                       thresholds=self.thresholds(tolerance or gate["precision"]), **gate)

    def thresholds(self, precision: str) -> dict:
        return self.spec.thresholds[precision]

    def ort_gate(self, folder: Path, ref, stage: str, precision: str) -> Gate:
        judge = dict(stage=stage, artefact=folder.name, precision=precision, reference=MERGED,
                     min_agreement=self.opts.min_agreement, thresholds=self.thresholds(precision))
        ort = load_ort(folder, self.task.name)
        gate = compare(ref.as_reference(), parity_tasks.ort_logits(ort, ref), **judge)
        # As a server runs them: several examples of different lengths, padded into one batch.
        batch_check(gate, ref.as_reference(), parity_tasks.ort_batch_logits(ort, ref), rows=ref.batch_rows,
                    input_lengths=ref.lengths(ref.batch_rows))
        del ort
        gate.extra["size_bytes"] = onnx_bytes(folder)
        gc.collect()
        return gate

    def save_merged(self, model, tokenizer, folder: Path, dtype, max_shard_size) -> None:
        save_merged(model, tokenizer, folder, dtype, max_shard_size, generation=self.generation)

    def finish_onnx(self, folder: Path) -> None:
        pass  # the exporter copies the merged model's config (labels) and generation config (seq2seq) as they are

    def report(self) -> dict:
        examples = {"source": self.source, "count": len(self.rows), "agreement_of": self.spec.agreement}
        extra = {"labels": self.labels} if self.labels else {}
        if self.generation is not None:
            examples["new_tokens"] = self.opts.parity_tokens
            extra["generation"] = self.generation.to_diff_dict()
        return {"examples": examples, **extra}


def run_generation(run_dir: Path, cfg, model):
    """A seq2seq run's generation settings: RUN_DIR/generation_config.json, or, for a run without it, the
    base's own with the run's task.max_new_tokens and task.num_beams (as its evaluation generated)."""
    try:
        saved = load_generation_settings(run_dir)
    except ModelError as err:
        raise ExportError(str(err)) from err
    return saved if saved is not None else generation_settings(model, cfg.task.max_new_tokens, cfg.task.num_beams)
