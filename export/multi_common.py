"""What the two multi-adapter exports do alike: multi.py (decoders: the model builder's graph with LoRA branches)
and multi_encoder.py (classifiers: a trunk graph with LoRA branches and a head per run).

    base, save_dtype = base_record(runs[0], opts)                  # adapters.json's "base"
    tokenizer = write_base(runs[0], opts, tmp, save_dtype)         # OUT/base/, plain or dequantised
    gate = merge_gate(check, run, merged, adapter_ref, opts, save_dtype)
    return finish(tmp, out, base, sites, entries, report(...), text, passed, say)

Both build in OUT.tmp-<pid> under pipeline.building() and end through pipeline.conclude(), as the single-run
export does; what differs between them (the graph, the gates per graph, the manifest entries) stays in each.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from pathlib import Path
from typing import Callable

import torch

from lite_sft.adapters import Manifest, write_manifest
from lite_sft.artifacts import PARITY_FILE
from lite_sft.options import ExportOptions
from lite_sft.report import peak_memory, versions

from .merge import load_reference, merged_dtype, plain_base, save_merged, stored_dtype, unquantized_base
from .multi_gate import BASE_DIR, adapter_file
from .pipeline import ONNX_PACKAGES, PRECISION, _check_disk, _version, conclude


class Laps:
    """Seconds per stage, for parity.json's timings_s: laps("merge_s") ends the stage running since the last call."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self._since = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._since, 3)
        self._since = now


def base_record(first, opts: ExportOptions, **extra) -> tuple[dict, torch.dtype]:
    """adapters.json's "base" (what every adapter was trained on) and the dtype base/ is saved in."""
    quant = first.cfg.model.quant
    save_dtype = merged_dtype(opts.merged_dtype, quant, stored_dtype(first.base, first.cfg.model.trust_remote_code))
    return ({"name_or_path": first.cfg.model.name_or_path, "folder": BASE_DIR, "source": first.base,
             "digest": first.digest, "quant": quant, "merge_onto": opts.merge_onto if quant != "none" else None,
             "dtype": PRECISION[save_dtype], **extra}, save_dtype)


def write_base(run, opts: ExportOptions, tmp: Path, save_dtype: torch.dtype,
               part: Callable = lambda model: model, task: str = "causal-lm"):
    """OUT/base/ from `run`'s base (a QLoRA run's: the dequantised weights it was trained against), `part` of it
    (a classifier's trunk); returns the run's tokenizer, saved beside it."""
    reference, tokenizer = load_reference(run.run_dir, run.cfg)
    base = (unquantized_base(reference, tokenizer, run.cfg, run.run_dir, opts.merge_onto)
            if run.cfg.model.quant != "none" else plain_base(run.cfg, run.run_dir, tokenizer))
    del reference
    _check_disk(tmp, base.num_parameters(), save_dtype, opts, task)  # the adapter files are a few MB
    save_merged(part(base), tokenizer, tmp / BASE_DIR, save_dtype, opts.max_shard_size)
    del base
    gc.collect()
    return tokenizer


def merge_gate(check, run, merged, adapter_ref, opts: ExportOptions, save_dtype: torch.dtype):
    """The run's adapter merged onto base/ against its adapter model: the single-run export's merge gate."""
    gate = check.torch_gate(merged, adapter_ref, stage="merge", artefact=adapter_file(run.name),
                            precision=PRECISION[save_dtype], min_agreement=opts.min_agreement,
                            tolerance="int8" if run.cfg.model.quant == "8bit" else None,
                            reference=f"adapter model of {run.run_dir}, fp32 on CPU")
    gate.extra["adapter"] = run.name
    return gate


def report(runs, out: Path, opts: ExportOptions, base: dict, gates: list, mixed: list, timings: dict, passed: bool,
           head: dict, adapters: dict) -> dict:
    """parity.json: `head` (task, exporter) first, then what every export records, `adapters` per run."""
    import onnxruntime

    planned = ["merge", "onnx"] + ([opts.quantize] if opts.quantize != "none" else [])
    done = {g.stage for g in gates}
    return {
        **head,
        "passed": passed,
        "not_run": [stage for stage in planned if stage not in done],
        "run_dirs": [str(run.run_dir) for run in runs],
        "out": str(out),
        "base_model": base["name_or_path"],
        "base": base,
        "run_quant": base["quant"],
        "adapters": adapters,
        "settings": {k: v for k, v in dataclasses.asdict(opts).items() if k != "overwrite"},
        "gates": [g.to_dict() for g in gates],
        "mixed": mixed,
        "timings_s": timings,
        **peak_memory(torch.device("cpu")),
        "versions": {**versions(), "onnxruntime": onnxruntime.__version__,
                     **{name: _version(name) for name in ONNX_PACKAGES}},
    }


def mixed_lines(mixed: list, agreement: str) -> list[str]:
    """A line per mixed batch for the export's text: how far each row stayed from its adapter alone."""
    return [f"  mixed batch ({m['artefact']}): {', '.join(m['adapters'])}: {agreement} as alone "
            f"{m['vs_alone']['greedy_agreement']:.1%}, max |dlogit| vs alone {m['vs_alone']['max_abs_diff']:.2e}  "
            + ("pass" if m["passed"] else "FAIL") for m in mixed]


def finish(tmp: Path, out: Path, base: dict, sites: list, entries: list, parity: dict, text: str, passed: bool,
           say: Callable[[str], None]) -> dict:
    """adapters.json and parity.json into the build, then installed as OUT (every gate passed) or kept aside."""
    write_manifest(tmp, Manifest(base, sites, entries))
    (tmp / PARITY_FILE).write_text(json.dumps(parity, indent=2) + "\n")
    return conclude(tmp, out, parity, text, passed, say)
