"""`lite-sft export`: a tuning run in; merged, converted and checked artefacts out.

    lite-sft export runs/qwen --out exports/qwen --quantize int4
    lite-sft export runs/sentiment --out exports/sentiment --quantize int8     # any task: config.yaml says which

OUT holds:
    merged/                 Hugging Face folder, the adapter merged in (the task's Auto class loads it)
    onnx/                   ONNX for the task, fp32 or fp16 (causal-lm), by the exporter onnx.py picks:
                            causal-lm through onnxruntime-genai's model builder where it takes the
                            architecture (onnxruntime-genai runs the folder as it is), else torch.onnx
    onnx-int8/, onnx-int4/  the quantised ONNX, beside the graph it was made from
    parity.json             the task and every gate's figures, written whether the gates passed or not
causal-lm: the generation_config.json of each folder lists the run's stop ids (lite_sft/stops.py), as
parity.json does. seq-cls and token-cls: config.json keeps the label names (id2label, label2id). seq2seq:
generation_config.json holds the run's own generation settings (RUN_DIR/generation_config.json).

Each stage is gated before the next one starts: merged vs the adapter model, ONNX vs the merged model,
quantised ONNX vs the merged model (checks.py: parity.py for causal-lm, parity_tasks.py for the others),
each ONNX one alone and in a padded batch. Everything is built in OUT.tmp-<pid> and renamed to OUT only
when every gate passed. A failed gate renames the folder to OUT.parity-failed instead (replacing an
earlier failed attempt) and raises ParityFailed; an error or an interruption removes the temporary
folder, so nothing half-written is left looking finished; what an export killed outright left there (no
cleanup runs on SIGKILL) the next export into OUT removes, and says so. An existing OUT is replaced only with
`overwrite`, only if it is an earlier export (it has a parity.json), and only after the new one passed.
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from lite_sft.artifacts import MERGED_DIR, PARITY_FILE, variant_folder
from lite_sft.options import ExportOptions
from lite_sft.report import peak_memory, versions
from lite_sft.taskspec import TASKS

from . import ExportError
from .checks import make_checks, run_stop_ids  # noqa: F401  (run_stop_ids: imported from here by callers)
from .leftovers import TMP_LOCK, hold_tmp, remove_leftovers
from .merge import base_path, load_reference, merge, merged_dtype, read_run, stored_dtype, unquantized_base
from .exporters import candidates
from .onnx import check_dtype, export_onnx, onnx_bytes, quantize_onnx
from .parity import Gate, format_report

PRECISION = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", "fp32": "float32",
             "fp16": "float16"}
BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, "fp32": 4, "fp16": 2, "int8": 1.1, "int4": 0.7}


class ParityFailed(RuntimeError):
    """A gate failed: the artefacts are kept in OUT.parity-failed, with parity.json saying why."""

    def __init__(self, report: dict, text: str, where: Path):
        super().__init__(f"parity gate failed; artefacts kept in {where} (see {where / PARITY_FILE})")
        self.report, self.text, self.where = report, text, where


def export_run(run_dir: str | Path, out: str | Path, opts: ExportOptions | None = None,
               say: Callable[[str], None] = print) -> dict:
    """Merge, convert and gate the run in `run_dir`; returns the parity report (also OUT/parity.json)."""
    opts = opts or ExportOptions()
    run_dir, out = Path(run_dir), Path(out)
    opts.validate()
    _check_out(run_dir, out, opts.overwrite)
    cfg = read_run(run_dir)
    task = cfg.task.name
    path = base_path(cfg, run_dir)
    base_dtype = stored_dtype(path, cfg.model.trust_remote_code)
    rows = []
    if opts.onnx:
        from transformers import AutoConfig

        check_dtype(opts.dtype, task)
        # Before any work: an architecture no exporter takes is one line, and nothing is written.
        rows = candidates(task, AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code),
                          opts.dtype, opts.exporter)
        check_fp16_int4(opts, rows[0].name)
    save_dtype = merged_dtype(opts.merged_dtype, cfg.model.quant, base_dtype)

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    merged_dir, onnx_dir = tmp / MERGED_DIR, tmp / variant_folder("fp")
    remove_leftovers(out, say)
    gates: list[Gate] = []
    exporter: dict = {}
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        timings[name] = round(time.perf_counter() - clock, 3)
        clock = time.perf_counter()

    with building(tmp):
        say(f"loading the {task} adapter model from {run_dir} (base {cfg.model.name_or_path}, "
            f"quant {cfg.model.quant})")
        reference, tokenizer = load_reference(run_dir, cfg)
        checks = make_checks(run_dir, cfg, reference, tokenizer, opts)
        say(f"parity {checks.noun}: {checks.source}")
        adapter_ref = checks.reference(reference)
        lap("load_reference_s")

        onto = ("" if cfg.model.quant == "none" else " onto the ORIGINAL weights" if opts.merge_onto == "original"
                else f" onto the dequantised {cfg.model.quant} weights")
        say(f"merging in fp32 on CPU{onto}")
        if cfg.model.quant != "none":
            base = unquantized_base(reference, tokenizer, cfg, run_dir, opts.merge_onto)
            del reference  # free the quantised model before the merge needs the memory
            gc.collect()
            merged = merge(base, cfg, run_dir)
            del base
        else:
            merged = merge(reference, cfg, run_dir)
            del reference
        _check_disk(tmp, merged.num_parameters(), save_dtype, opts, task)
        checks.save_merged(merged, tokenizer, merged_dir, save_dtype, opts.max_shard_size)
        del merged
        gc.collect()
        lap("merge_s")

        # The gate reads the folder back, so it judges the artefact on disk, not the object in memory.
        model = load_merged(merged_dir, task)
        quant = {"4bit": "4-bit NF4", "8bit": "8-bit"}.get(cfg.model.quant, "16/32-bit")
        # An 8-bit run's adapter model multiplies int8 activations too (LLM.int8), which no float model
        # reproduces, so its merge is held to the int8 tolerance; 4-bit layers dequantise and compute in fp32.
        gate = checks.torch_gate(model, adapter_ref, stage="merge", artefact=MERGED_DIR, precision=PRECISION[save_dtype],
                                 min_agreement=opts.min_agreement,
                                 tolerance="int8" if cfg.model.quant == "8bit" else None,
                                 reference=f"adapter model ({quant} base + adapter), fp32 on CPU")
        gate.extra["merge_onto"] = opts.merge_onto if cfg.model.quant != "none" else None
        gates.append(gate)
        lap("merge_gate_s")

        if gate.passed and opts.onnx:
            say(f"exporting ONNX ({opts.dtype}{', KV cache' if TASKS[task].generates else ''}) with the "
                f"{rows[0].name} exporter" + (f" ({rows[1].name} if it fails)" if len(rows) > 1 else ""))
            merged_ref = checks.reference(model, gate.extra.get("perplexity"))
            row, fallback = export_onnx(model, onnx_dir, opts.dtype, task, merged_dir, rows=rows, say=say)
            exporter = {"name": row.name, "module": f"lite_sft.export.exporters.{row.module}",
                        "chosen": "forced by --exporter" if opts.exporter != "auto" else "auto",
                        "fallback_from": fallback}
            checks.finish_onnx(onnx_dir)
            del model
            gc.collect()
            lap("onnx_export_s")
            gate = checks.ort_gate(onnx_dir, merged_ref, "onnx", PRECISION[opts.dtype])
            gates.append(gate)
            lap("onnx_gate_s")
            if gate.passed and opts.quantize != "none":
                check_fp16_int4(opts, row.name)  # the torch exporter may have stood in for the builder
                say(f"quantising ONNX to {opts.quantize}")
                name = variant_folder(opts.quantize)
                quantize_onnx(row, onnx_dir, tmp / name, opts.quantize, opts.block_size, merged_dir)
                checks.finish_onnx(tmp / name)
                lap("quantize_s")
                fp = gate
                gate = checks.ort_gate(tmp / name, merged_ref, opts.quantize, opts.quantize)
                gate.extra.update(size_bytes_before=onnx_bytes(onnx_dir), size_bytes_after=onnx_bytes(tmp / name),
                                  block_size=opts.block_size if opts.quantize == "int4" else None)
                if "perplexity" in gate.extra:  # causal-lm
                    gate.extra.update(perplexity_before=fp.extra["perplexity"],
                                      perplexity_after=gate.extra["perplexity"])
                gates.append(gate)
                lap("quantize_gate_s")

        passed = all(g.passed for g in gates)
        report = _report(run_dir, out, cfg, opts, save_dtype, checks, gates, timings, exporter)
        (tmp / PARITY_FILE).write_text(json.dumps(report, indent=2) + "\n")
        text = format_report(gates, checks.source, checks.agreement, checks.perplexity_on)
        return conclude(tmp, out, report, text, passed, say)


@contextmanager
def building(tmp: Path):
    """The export is built in `tmp`, beside OUT, under a lock (leftovers.hold_tmp) held until it is installed,
    kept as failed, or removed: any error removes it (a full disk says so), and nothing half-written stays."""
    lock = hold_tmp(tmp)
    try:
        yield
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno == errno.ENOSPC:
            raise ExportError(f"ran out of disk space writing {tmp}: {err}; nothing was kept") from err
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        lock.close()


def conclude(tmp: Path, out: Path, report: dict, text: str, passed: bool, say: Callable[[str], None]) -> dict:
    """A build whose every gate passed goes to OUT (an older export there only once the new one is in place); one
    that failed is kept as OUT.parity-failed, and ParityFailed says why."""
    if passed:
        _install(tmp, out)
        (out / TMP_LOCK).unlink(missing_ok=True)  # unlinked only now: no export saw tmp unlocked
        say(text)
        return report
    failed = out.with_name(f"{out.name}.parity-failed")
    if failed.exists():
        shutil.rmtree(failed)
    tmp.rename(failed)
    (failed / TMP_LOCK).unlink(missing_ok=True)
    raise ParityFailed(report, text, failed)


def check_fp16_int4(opts: ExportOptions, exporter: str) -> None:
    """int4 beside an fp16 graph is the builder's CUDA int4 (fp16 activations), built from merged/; onnxruntime's
    quantisers start from an fp32 graph, so the torch exporter's fp16 has none."""
    if opts.dtype == "fp16" and opts.quantize == "int4" and exporter != "builder":
        raise ExportError(f"--dtype fp16 --quantize int4 is built by the model builder, and this model exports through "
                          f"{exporter}: use --dtype fp32 --quantize int4")


def load_merged(folder: Path, task: str):
    """merged/ read back in fp32 with the task's Auto class, as a user loads it."""
    import transformers

    return getattr(transformers, TASKS[task].auto_class).from_pretrained(folder, dtype=torch.float32)


def _check_out(run_dir: Path, out: Path, overwrite: bool) -> None:
    run, target = run_dir.resolve(), out.resolve()
    if target == run or target in run.parents:
        raise ExportError(f"--out {out} would hold the run directory {run_dir}; choose another folder")
    if out.exists():
        if not overwrite:
            raise ExportError(f"{out} already exists: pass --overwrite to replace it (it is replaced only once "
                              "the new export has passed its gates)")
        if not out.is_dir() or (any(out.iterdir()) and not (out / PARITY_FILE).is_file()):
            raise ExportError(f"{out} exists and is not an earlier export (no {PARITY_FILE}): refusing to replace it")


def _check_disk(tmp: Path, params: int, save_dtype, opts: ExportOptions, task: str = "causal-lm") -> None:
    """Refuse before writing when the artefacts cannot fit; ONNX export briefly holds its weights twice."""
    need = params * BYTES[save_dtype]
    if opts.onnx:
        onnx = params * BYTES[opts.dtype]
        need += onnx * (2 if onnx > 2 * 1024**3 else 1)
        if opts.quantize != "none":
            need += params * BYTES[opts.quantize]
    need = int(need * 1.05) + 50 * 1024**2
    free = shutil.disk_usage(tmp).free
    if free < need:
        raise ExportError(f"not enough disk space in {tmp.parent}: the export needs about {need / 1024**3:.2f} GiB "
                          f"and {free / 1024**3:.2f} GiB are free")


def _install(tmp: Path, out: Path) -> None:
    """Put the finished export at `out`; an older export there is removed only after the new one is in place."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old)


def _report(run_dir, out, cfg, opts, save_dtype, checks, gates, timings, exporter) -> dict:
    import onnxruntime

    settings = {k: v for k, v in dataclasses.asdict(opts).items() if k not in ("overwrite", "names")}
    planned = ["merge"] + (["onnx"] if opts.onnx else []) + ([opts.quantize] if opts.quantize != "none" else [])
    return {
        "task": cfg.task.name,  # what the server and the benchmarks read to know what the model does
        "optimum_task": TASKS[cfg.task.name].hf_task,  # the same task in Hugging Face's exporter vocabulary
        "exporter": exporter or None,  # which exporter wrote onnx/, and whether it stood in for a failed one
        "passed": all(g.passed for g in gates),
        "not_run": planned[len(gates):],  # stages after a failed gate
        "run_dir": str(run_dir),
        "out": str(out),
        "base_model": cfg.model.name_or_path,
        "run_quant": cfg.model.quant,
        "adapter": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dora": cfg.lora.use_dora, "rslora": cfg.lora.use_rslora},
        "merged_dtype": PRECISION[save_dtype],
        "settings": settings,
        **checks.report(),  # causal-lm: prompts, stop_ids; the classic tasks: examples, labels or generation
        "gates": [g.to_dict() for g in gates],
        "timings_s": timings,
        **peak_memory(torch.device("cpu")),
        "versions": {**versions(), "onnxruntime": onnxruntime.__version__,
                     **{name: _version(name) for name in ONNX_PACKAGES}},
    }


ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime-genai-cuda")  # recorded in parity.json beside onnxruntime


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None
