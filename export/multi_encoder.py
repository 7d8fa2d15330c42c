"""`lite-sft export RUN_A RUN_B [...]` for classifiers: seq-cls and token-cls runs of one base share one trunk graph.

    lite-sft export runs/sentiment runs/ner --out exports/team --quantize int8

OUT holds:
    base/                       the shared trunk (BertModel, ...) as a Hugging Face folder, with the tokenizer (a
                                QLoRA run's: the dequantised weights it was trained against)
    onnx/                       the trunk graph of base/ with a LoRA branch at every module some run trains
                                (export/encoder_lora.py), its config and tokenizer; outputs last_hidden_state (and
                                pooler_output)
    onnx-int8/, onnx-int4/      --quantize: the trunk's weights quantised, the LoRA branches still float
    heads/NAME.onnx             each run's head (its merged classifier with the trunk cut off), fp32, read by every
                                variant: trunk outputs in, the run's logits out
    adapters/NAME.onnx_adapter  each run's LoRA matrices on the trunk, scaled (lite_sft/adapters.py)
    adapters.json               the manifest: the base (kind "encoder", the graph's token inputs and outputs), the
                                sites, every adapter with its task, labels and head
    parity.json                 the first run's task, every run's, every gate per adapter and stage, the mixed checks

base/ is saved from a seq-cls run's model where there is one: a token classifier's trunk has no pooler, a sequence
classifier's does. Every adapter is gated: merge (base/ read back with the run's task head, its adapter merged,
against the run's adapter model, as the single-run export's merge gate, checks.TaskChecks), then per graph the
trunk with its bank alone and its head against that merged model, alone and as a padded batch, then a mixed batch
per graph (encoder_gate.py). As multi.py: built in OUT.tmp-<pid>, installed only when every gate passed.
"""

from __future__ import annotations

import dataclasses
import gc
import os
from pathlib import Path
from typing import Callable

from lite_sft.adapters import HEADS_DIR, AdapterEntry, write_adapter_file
from lite_sft.artifacts import ONNX_FILE, copy_model_files, variant_folder
from lite_sft.options import ExportOptions
from lite_sft.taskspec import TASKS

from . import ExportError
from .checks import TaskChecks
from .encoder_gate import Graphs, adapter_gate, mixed_check
from .encoder_lora import TRUNK_OUTPUTS, export_head, export_trunk, trunk_of, trunk_sites
from .exporters.torch_encoder import input_names
from .leftovers import remove_leftovers
from .merge import load_reference, merge, plain_base
from .multi_common import Laps, base_record, finish, merge_gate, mixed_lines, report, write_base
from .multi_gate import BASE_DIR, adapter_file, check_branches_float, summary
from .parity import format_report
from .pipeline import building
from .quantize import quantize


def head_file(name: str) -> str:
    """An adapter's head graph, relative to OUT."""
    return f"{HEADS_DIR}/{name}.onnx"


def export_classifiers(runs: list, out: Path, opts: ExportOptions, say: Callable[[str], None] = print) -> dict:
    """Build and gate the multi-adapter export of classifier `runs` (read_runs checked them) into `out`."""
    _check_options(opts)
    first = runs[0]
    source = next((run for run in runs if run.task == "seq-cls"), first)  # its trunk keeps the pooler
    base_info, save_dtype = base_record(first, opts, kind="encoder")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    remove_leftovers(out, say)
    gates, mixed, refs, checks, lap = [], [], {}, {}, Laps()

    with building(tmp):
        say(f"writing the shared trunk of {len(runs)} classifiers ({first.cfg.model.name_or_path}, quant "
            f"{first.cfg.model.quant}) to {BASE_DIR}/")
        tokenizer = write_base(source, opts, tmp, save_dtype, part=trunk_of, task=source.task)
        lap("base_s")

        heads = {}
        for run in runs:
            say(f"{run.name}: merging {run.run_dir}'s {run.task} adapter (r {run.rank}) and head onto {BASE_DIR}/")
            model, tok = load_reference(run.run_dir, run.cfg)
            checks[run.name] = check = TaskChecks(run.run_dir, run.cfg, model, tok, opts)
            adapter_ref = check.reference(model)
            del model
            merged = merge(_on_base(tmp / BASE_DIR, run, tok), run.cfg, run.run_dir)
            gate = merge_gate(check, run, merged, adapter_ref, opts, save_dtype)
            gate.extra["task"] = run.task
            gates.append(gate)
            refs[run.name] = check.reference(merged)
            if gate.passed:  # the head graph is the merged model with its trunk stubbed out (in place: last use)
                heads[run.name] = export_head(merged, list(TRUNK_OUTPUTS), tmp / head_file(run.name))
            del merged
            gc.collect()
        lap("merge_s")

        sites = []
        if all(g.passed for g in gates):
            say(f"exporting the trunk graph with LoRA branches on {', '.join(_targets(runs))}")
            trunk = trunk_of(_on_base(tmp / BASE_DIR, source, tokenizer))
            names = input_names(trunk, tmp / BASE_DIR)
            sites = trunk_sites(trunk, _site_order(trunk, runs))
            outputs = export_trunk(trunk, sites, names, tmp / variant_folder("fp") / ONNX_FILE)
            copy_model_files(tmp / BASE_DIR, tmp / variant_folder("fp"))
            del trunk
            _check_heads(heads, outputs)
            base_info.update(inputs=names, outputs=outputs)
            for run in runs:
                write_adapter_file(tmp / adapter_file(run.name), run.sites)
            lap("onnx_export_s")
            variants = [("onnx", variant_folder("fp"), "float32")]
            if opts.quantize != "none":
                variants.append((opts.quantize, variant_folder(opts.quantize), opts.quantize))
            for stage, folder, precision in variants:
                if stage != "onnx":  # onnxruntime's quantisers over onnx/: constant weights only, not the banks
                    say(f"quantising the trunk graph to {stage}")
                    quantize(tmp / variant_folder("fp"), tmp / folder, stage, opts.block_size)
                    check_branches_float(tmp / folder / ONNX_FILE)
                    lap(f"{stage}_build_s")
                stage_gates = _gate_graph(tmp, folder, sites, runs, refs, checks, tokenizer.pad_token_id, stage,
                                          precision, mixed)
                gates.extend(stage_gates)
                lap(f"{stage}_gate_s")
                if not all(g.passed for g in stage_gates) or not mixed[-1]["passed"]:
                    break

        passed = all(g.passed for g in gates) and all(m["passed"] for m in mixed) and bool(sites)
        entries = [_entry(run, gates, checks[run.name]) for run in runs]
        task = first.task
        head = {"task": task,  # lite_sft.artifacts.model_task reads it; "tasks" has every adapter's
                "tasks": {run.name: run.task for run in runs}, "optimum_task": TASKS[task].hf_task,
                "exporter": {"name": "torch", "module": "lite_sft.export.encoder_lora", "chosen": "auto",
                             "fallback_from": None}}
        adapters = {run.name: {"run_dir": str(run.run_dir), "task": run.task, "r": run.rank, "alpha": run.alpha,
                               "dora": False, "rslora": run.rslora, "targets": run.targets,
                               "head": head_file(run.name), **checks[run.name].report()}
                    for run in runs}
        parity = report(runs, out, opts, base_info, gates, mixed, lap.timings, passed, head, adapters)
        return finish(tmp, out, base_info, sites, entries, parity, _text(runs, gates, mixed, checks), passed, say)


def _check_options(opts: ExportOptions) -> None:
    if not opts.onnx:
        raise ExportError("--no-onnx: several classifiers export one trunk graph with their adapters and heads; "
                          "export a run alone for its merged model only")
    if opts.exporter == "builder":
        raise ExportError("--exporter builder: onnxruntime-genai's model builder takes decoders; classifiers export "
                          "their trunk through torch.onnx: drop --exporter")


def _on_base(folder: Path, run, tokenizer):
    """base/ read back as the run's classifier (its task head, sized and labelled as the run saved them), fp32:
    plain_base with the run's base swapped for base/."""
    model = dataclasses.replace(run.cfg.model, name_or_path=str(folder.resolve()))
    return plain_base(dataclasses.replace(run.cfg, model=model), run.run_dir, tokenizer)


def _targets(runs) -> list[str]:
    return sorted(set().union(*(run.targets for run in runs)))


def _site_order(trunk, runs) -> list[str]:
    """Every module some run trains, in the trunk's own order (embeddings to pooler)."""
    trained = set().union(*(run.sites for run in runs))
    order = [name for name, _ in trunk.named_modules() if name in trained]
    missing = sorted(trained - set(order))
    if missing:
        raise ExportError(f"the trunk of {BASE_DIR}/ has no module {missing[0]} that "
                          f"{next(r.run_dir for r in runs if missing[0] in r.sites)} trains LoRA on; export it alone")
    return order


def _check_heads(heads: dict[str, list[str]], outputs: list[str]) -> None:
    """Every head reads only what the trunk graph gives (and the token ids and mask)."""
    for name, inputs in heads.items():
        lacking = [i for i in inputs if i not in (*outputs, "input_ids", "attention_mask")]
        if lacking:
            raise ExportError(f"the head of {name} reads {', '.join(lacking)}, which the shared trunk graph does not "
                              f"give ({', '.join(outputs)}); export it alone")


def _gate_graph(tmp: Path, folder: str, sites, runs, refs, checks, pad_id, stage: str, precision: str,
                mixed: list) -> list:
    graphs = Graphs(tmp / folder / ONNX_FILE, {run.name: tmp / head_file(run.name) for run in runs})
    gates, alones = [], {}
    for run in runs:
        gate, alones[run.name] = adapter_gate(graphs, sites, run, refs[run.name], checks[run.name], stage=stage,
                                              artefact=f"{folder} + {adapter_file(run.name)}", precision=precision)
        gates.append(gate)
    mixed.append(mixed_check(graphs, sites, runs, refs, alones, checks, pad_id if pad_id is not None else 0,
                             stage=stage, artefact=folder, precision=precision))
    del graphs
    gc.collect()
    return gates


def _entry(run, gates, check) -> AdapterEntry:
    return AdapterEntry(name=run.name, file=adapter_file(run.name), rank=run.rank, alpha=run.alpha, scale=run.scale,
                        targets=run.targets, run_dir=str(run.run_dir), task=run.task,
                        gate={g.stage: summary(g) for g in gates if g.extra.get("adapter") == run.name},
                        rslora=run.rslora, labels=check.labels, head=head_file(run.name))


def _text(runs, gates, mixed, checks) -> str:
    """Each adapter's parity table (parity.py's), then a line per mixed batch."""
    tables = [f"{run.name} ({run.task}): " + format_report([g for g in gates if g.extra["adapter"] == run.name],
                                                           checks[run.name].source, checks[run.name].agreement)
              for run in runs]
    return "\n".join(tables + mixed_lines(mixed, "labels"))
