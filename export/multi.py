"""`lite-sft export RUN_A RUN_B [...]`: several adapters of one base, exported together to be served by one server.

    lite-sft export runs/sentiment runs/support --out exports/team --name runs/support=helpdesk

OUT holds:
    base/                       the shared base as a Hugging Face folder (a QLoRA run's: the dequantised weights it
                                was trained against), its tokenizer, config and generation config
    onnx/                       the model builder's graph of base/ (q, k, v as separate MatMuls), with a LoRA branch
                                beside every projection some run trains (export/lora_graph.py); its LoRA weights are
                                graph inputs, float whatever the base's precision
    onnx-int8/, onnx-int4/      --quantize: the quantised base graph with the same float branches
    adapters/NAME.onnx_adapter  each run's LoRA matrices, scaled (lite_sft/adapters.py)
    adapters.json               the manifest: the base (its folder and weights digest), the sites, every adapter
    parity.json                 the task, every gate, per adapter and stage, and the mixed checks

The runs are checked against each other before anything is built (multi_runs.py says what is refused and why).
Classifier runs (seq-cls, token-cls) share a trunk graph and keep a head graph each instead: multi_encoder.py.
Every adapter is gated: merge (its run's merged model on base/ against the run's adapter model, as the single-run
export's merge gate), then each graph fed with its bank alone against that merged model, alone and as a padded
batch (multi_gate.py), and a mixed batch whose rows use different adapters. As in the single-run export
(pipeline.py) everything is built in OUT.tmp-<pid>, installed only when every gate passed, kept as
OUT.parity-failed when one did not, and an existing OUT is replaced only with `overwrite`.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Callable

from lite_sft.adapters import AdapterEntry, write_adapter_file
from lite_sft.artifacts import ONNX_FILE, variant_folder
from lite_sft.options import ExportOptions
from lite_sft.stops import read_stop_tokens
from lite_sft.taskspec import TASKS

from . import ExportError
from .checks import CausalChecks
from .exporters import builder
from .leftovers import remove_leftovers
from .lora_graph import add_lora_branches
from .merge import load_reference, merge
from .multi_common import Laps, base_record, finish, merge_gate, mixed_lines, report, write_base
from .multi_encoder import export_classifiers
from .multi_gate import BASE_DIR, MERGED, adapter_file, adapter_gate, check_branches_float, mixed_check, summary
from .multi_runs import read_runs
from .ort_decoder import OnnxDecoder
from .parity import format_report
from .pipeline import PRECISION, _check_out, building, load_merged
from .quantize import quantize


def export_runs(run_dirs: list[Path], out: str | Path, opts: ExportOptions | None = None,
                say: Callable[[str], None] = print) -> dict:
    """Check, build and gate the multi-adapter export of `run_dirs` into `out`; returns parity.json's report."""
    opts = opts or ExportOptions()
    out = Path(out)
    opts.validate()
    for run_dir in run_dirs:
        _check_out(Path(run_dir), out, opts.overwrite)
    runs = read_runs(run_dirs, opts.names or [], opts.dtype)
    if runs[0].classifier:  # seq-cls and token-cls: one trunk graph and a head per run
        return export_classifiers(runs, out, opts, say)
    _check_options(opts)
    first = runs[0]
    base_info, save_dtype = base_record(first, opts)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    remove_leftovers(out, say)
    gates, mixed, refs, checks, lap = [], [], {}, {}, Laps()

    with building(tmp):
        say(f"writing the shared base of {len(runs)} runs ({first.cfg.model.name_or_path}, quant "
            f"{first.cfg.model.quant}) to {BASE_DIR}/")
        write_base(first, opts, tmp, save_dtype)
        base_info["stop_ids"] = read_stop_tokens(tmp / BASE_DIR)
        lap("base_s")

        for run in runs:
            say(f"{run.name}: merging {run.run_dir}'s adapter (r {run.rank}, {', '.join(run.targets)}) onto "
                f"{BASE_DIR}/")
            model, tok = load_reference(run.run_dir, run.cfg)
            checks[run.name] = check = CausalChecks(run.run_dir, run.cfg, model, tok, opts)
            adapter_ref = check.reference(model)
            del model
            merged = merge(load_merged(tmp / BASE_DIR, "causal-lm"), run.cfg, run.run_dir)
            gate = merge_gate(check, run, merged, adapter_ref, opts, save_dtype)
            gates.append(gate)
            refs[run.name] = check.reference(merged, gate.extra.get("perplexity"))
            del merged
            gc.collect()
        lap("merge_s")

        sites = []
        if all(g.passed for g in gates):
            for run in runs:
                write_adapter_file(tmp / adapter_file(run.name), run.sites)
            precision, provider = builder.PRECISIONS[opts.dtype]
            variants = [("onnx", variant_folder("fp"), PRECISION[opts.dtype])]
            if opts.quantize != "none":
                variants.append((opts.quantize, variant_folder(opts.quantize), opts.quantize))
            targets = set().union(*(run.targets for run in runs))
            for stage, folder, judged in variants:
                say(f"building {folder}/ ({judged}) with LoRA branches on {', '.join(sorted(targets))}")
                if stage == "int8":  # onnxruntime's quantize_dynamic over onnx/, the branches included
                    quantize(tmp / variant_folder("fp"), tmp / folder, "int8")
                    check_branches_float(tmp / folder / ONNX_FILE)
                else:
                    options = ({} if stage == "onnx" else dict(block_size=opts.block_size, is_symmetric="false",
                                                               accuracy_level=builder.INT4_ACCURACY_LEVEL))
                    builder._build(tmp / BASE_DIR, tmp / folder, precision if stage == "onnx" else "int4", provider,
                                   disable_qkv_fusion="true", **options)
                    sites = add_lora_branches(tmp / folder / ONNX_FILE, targets)
                lap(f"{stage}_build_s")
                stage_gates = _gate_graph(tmp / folder, sites, runs, refs, checks, stage, judged, mixed)
                gates.extend(stage_gates)
                lap(f"{stage}_gate_s")
                if not all(g.passed for g in stage_gates) or not mixed[-1]["passed"]:
                    break

        passed = all(g.passed for g in gates) and all(m["passed"] for m in mixed) and bool(sites)
        entries = [_entry(run, gates, checks[run.name].stops, base_info) for run in runs]
        head = {"task": "causal-lm", "optimum_task": TASKS["causal-lm"].hf_task,
                "exporter": {"name": builder.NAME, "module": "lite_sft.export.exporters.builder", "chosen": "auto",
                             "fallback_from": None}}
        adapters = {run.name: {"run_dir": str(run.run_dir), "r": run.rank, "alpha": run.alpha, "dora": False,
                               "rslora": run.rslora, "targets": run.targets, **checks[run.name].report()}
                    for run in runs}
        parity = report(runs, out, opts, base_info, gates, mixed, lap.timings, passed, head, adapters)
        return finish(tmp, out, base_info, sites, entries, parity, _text(runs, gates, mixed, checks), passed, say)


def _text(runs, gates, mixed, checks) -> str:
    """Each adapter's parity table (parity.py's), then a line per mixed batch."""
    tables = [f"{run.name}: " + format_report([g for g in gates if g.extra["adapter"] == run.name],
                                              checks[run.name].source, perplexity_on=checks[run.name].perplexity_on)
              for run in runs]
    return "\n".join(tables + mixed_lines(mixed, "greedy"))


def _check_options(opts: ExportOptions) -> None:
    if not opts.onnx:
        raise ExportError("--no-onnx: several runs export one base graph with their adapters; export a run alone "
                          "for its merged model only")
    if opts.exporter == "torch":
        raise ExportError("--exporter torch: several runs export through onnxruntime-genai's model builder, whose "
                          "projections the LoRA branches sit beside; drop --exporter")


def _gate_graph(folder: Path, sites, runs, refs, checks, stage: str, precision: str, mixed: list) -> list:
    decoder = OnnxDecoder(folder)
    gates, alones = [], []
    for run in runs:
        gate, alone = adapter_gate(decoder, sites, run, refs[run.name], checks[run.name], stage=stage,
                                   artefact=f"{folder.name} + {adapter_file(run.name)}", precision=precision,
                                   reference=MERGED)
        gates.append(gate)
        alones.append(alone)
    mixed.append(mixed_check(decoder, sites, runs, [refs[run.name] for run in runs], alones, stage=stage,
                             artefact=folder.name, precision=precision))
    del decoder
    gc.collect()
    return gates


def _entry(run, gates, stops: list[int], base: dict) -> AdapterEntry:
    return AdapterEntry(name=run.name, file=adapter_file(run.name), rank=run.rank, alpha=run.alpha, scale=run.scale,
                        targets=run.targets, run_dir=str(run.run_dir), task=run.cfg.task.name,
                        gate={g.stage: summary(g) for g in gates if g.extra.get("adapter") == run.name},
                        stop_ids=list(stops) if list(stops) != list(base.get("stop_ids") or []) else None,
                        rslora=run.rslora)
