"""Export cost and parity versus model size: wall time and peak memory of merging and of ONNX export,
and the parity gate's figures for every artefact precision.

    OMP_NUM_THREADS=1 python benchmarks/export.py                      # 10M, 50M and 150M parameters, CPU
    OMP_NUM_THREADS=1 python benchmarks/export.py --sizes 100M        # benchmarks/peers.py's 93M Llama
    OMP_NUM_THREADS=1 python benchmarks/export.py --sizes 700M        # over 2 GB: ONNX external data
    OMP_NUM_THREADS=1 python benchmarks/export.py --sizes 100M --exporter torch   # torch.onnx instead

For each size a random-weight Llama-architecture base is built and tuned for one step (LoRA, and 4-bit
QLoRA), so the run directories are real. Every measured step then runs in a fresh process, so its
peak resident memory is that step's own (Linux VmHWM, reset after the imports). `working` is the peak
minus the process's memory after its imports (torch, transformers, peft, onnxruntime, onnxruntime-genai's
model builder, onnxscript: several hundred MB that do not grow with the model); `x fp32` divides it by the
model's fp32 size (params x 4 B):

  merge         lite-sft export --no-onnx on the LoRA run: load the adapter model, merge, save, gate
  merge-qlora   the same on the 4-bit run (dequantise, merge, save 16-bit, gate)
  onnx-export   load merged/ in fp32 and export ONNX as `lite-sft export` does (export/onnx.py export_onnx,
                `--exporter`, default auto: for a Llama onnxruntime-genai's model builder, which reads the
                checkpoint again itself; torch.onnx where it refuses or fails), nothing else
  fp32+int8, int4, fp16   full exports (`lite-sft export ... --exporter`) whose parity.json give the figures
                per precision: the builder's int4 is built again from merged/, int8 is quantize_dynamic

Prints a table, then one JSON line, and saves that JSON under benchmarks/results/export-<date>.json.
Random weights give nearly flat logits, the hardest case for greedy agreement (see export/parity.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from workload import (bpe_tokenizer, one_step_run, peak_rss, random_llama, reset_peak, save_result,  # beside this script
                      write_chat_data)

ROOT = Path(__file__).resolve().parents[1]
# name -> Llama dimensions: hidden, layers, intermediate, heads, key-value heads, vocabulary
SIZES = {
    "10M": (256, 4, 688, 4, 4, 16000),
    "50M": (512, 10, 1376, 8, 4, 16000),
    "150M": (768, 12, 2304, 12, 4, 32000),
    "100M": (640, 12, 1728, 10, 2, 32000),  # benchmarks/peers.py's Llama (93M)
    "700M": (1536, 24, 4096, 12, 4, 32000),  # 2.8 GB in fp32: ONNX takes the external-data path
}
DEFAULT_SIZES = "10M,50M,150M"
FULL_EXPORTS = {"fp32+int8": ["--quantize", "int8"], "int4": ["--quantize", "int4"], "fp16": ["--dtype", "fp16"]}


def child(args) -> None:
    """One measured step in this fresh process; prints {"wall_s", "peak_rss_bytes", "baseline_rss_bytes"} (and
    for onnx-export the exporter that wrote the graph)."""
    import bitsandbytes  # noqa: F401  (imported before the baseline, like everything below)
    import onnxruntime  # noqa: F401
    import onnxscript  # noqa: F401  (torch.onnx's exporter)
    import peft  # noqa: F401
    import torch
    from onnxruntime_genai.models import builder  # noqa: F401  (the builder exporter imports it when it runs)
    from transformers import AutoModelForCausalLM

    from lite_sft.export.onnx import export_onnx
    from lite_sft.export.pipeline import export_run
    from lite_sft.options import ExportOptions

    torch.set_num_threads(args.threads)
    baseline = reset_peak()
    start = time.perf_counter()
    said = {}
    if args.child == "onnx-export":
        model = AutoModelForCausalLM.from_pretrained(args.merged, dtype=torch.float32)
        row, fallback = export_onnx(model, Path(args.out), "fp32", merged=Path(args.merged), exporter=args.exporter)
        said = {"exporter": row.name, "fallback_from": fallback}
    else:
        export_run(args.run, args.out, ExportOptions(onnx=False, overwrite=True), say=lambda _: None)
    print(json.dumps({"wall_s": time.perf_counter() - start, "peak_rss_bytes": peak_rss(),
                      "baseline_rss_bytes": baseline, **said}))


def run_child(step: str, threads: int, exporter: str = "auto", **paths) -> dict:
    cmd = [sys.executable, __file__, "--child", step, "--threads", str(threads), "--exporter", exporter]
    for key, value in paths.items():
        cmd += [f"--{key}", str(value)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode:
        raise RuntimeError(f"{step} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_runs(name: str, work: Path, threads: int) -> tuple[int, dict[str, Path]]:
    """A random-weight base of size `name` and two one-step runs on it: LoRA and 4-bit QLoRA."""
    import torch

    torch.set_num_threads(threads)
    data = write_chat_data(work / "chats.jsonl")
    base = work / f"base-{name}"
    params = random_llama(SIZES[name], base, bpe_tokenizer(), max_positions=512)
    runs = {quant: one_step_run(base, data, work / f"run-{name}-{quant}", quant) for quant in ("none", "4bit")}
    return params, runs


def measure(name: str, work: Path, threads: int, exporter: str) -> dict:
    import contextlib

    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        params, runs = make_runs(name, work, threads)
    fp32 = params * 4
    row: dict = {"size": name, "params": params, "fp32_bytes": fp32, "steps": {}, "parity": []}

    def record(step: str, result: dict) -> None:
        working = result["peak_rss_bytes"] - result["baseline_rss_bytes"]
        row["steps"][step] = {**result, "working_bytes": working, "working_x_fp32": working / fp32}

    record("merge", run_child("merge", threads, run=runs["none"], out=work / f"merge-{name}"))
    record("merge-qlora", run_child("merge", threads, run=runs["4bit"], out=work / f"merge-qlora-{name}"))
    shutil.rmtree(work / f"onnx-{name}", ignore_errors=True)  # the builder writes into an existing folder
    record("onnx-export", run_child("onnx-export", threads, exporter, merged=work / f"merge-{name}" / "merged",
                                    out=work / f"onnx-{name}"))
    for label, extra in FULL_EXPORTS.items():
        out = work / f"full-{name}-{label}"
        failed = out.with_name(out.name + ".parity-failed")
        for stale in (out, failed):  # so the report read below is this run's
            shutil.rmtree(stale, ignore_errors=True)
        cmd = [sys.executable, "-m", "lite_sft", "export", str(runs["none"]), "--out", str(out), "--overwrite",
               "--exporter", exporter, *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        report_file = (out if out.exists() else failed) / "parity.json"
        if not report_file.is_file():
            raise RuntimeError(f"export {label} failed:\n{done.stderr[-3000:]}")
        report = json.loads(report_file.read_text())
        gates = report["gates"] if label == "fp32+int8" else report["gates"][1:]  # the merge gate once
        row["parity"] += [{**g, "export": label, "exporter": (report.get("exporter") or {}).get("name"),
                           "timings_s": report["timings_s"]} for g in gates]
    qlora = json.loads((work / f"merge-qlora-{name}" / "parity.json").read_text())
    row["parity"].append({**qlora["gates"][0], "stage": "merge-qlora", "export": "merge-qlora"})
    return row


def table(rows: list[dict]) -> str:
    mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    lines = ["size   params    fp32 MiB | step          wall s  peak MiB  working MiB  x fp32"]
    for r in rows:
        for i, (step, s) in enumerate(r["steps"].items()):
            head = f"{r['size']:<6} {r['params'] / 1e6:6.1f}M {mib(r['fp32_bytes']):>10}" if i == 0 else " " * 25
            lines.append(f"{head} | {step:<12} {s['wall_s']:7.1f} {mib(s['peak_rss_bytes']):>9} "
                         f"{mib(s['working_bytes']):>12} {s['working_x_fp32']:7.2f}"
                         + (f"  ({s['exporter']})" if s.get("exporter") else ""))
    lines += ["", "size   export     stage        precision  max|dlogit|  mean      greedy  "
                  "perplexity            size MiB"]
    for r in rows:
        for g in r["parity"]:
            ppl = (f"{g['perplexity_before']:.2f} -> {g['perplexity_after']:.2f}" if "perplexity_before" in g
                   else f"{g.get('perplexity_reference') or 0:.2f} -> {g.get('perplexity') or 0:.2f}")
            size = (f"{mib(g['size_bytes_before'])} -> {mib(g['size_bytes_after'])}" if "size_bytes_before" in g
                    else "")
            lines.append(f"{r['size']:<6} {g['export']:<10} {g['stage']:<12} {g['precision']:<10} "
                         f"{g['max_abs_diff']:11.2e} "
                         f"{g['mean_abs_diff']:8.1e} {g['greedy_agreement']:7.1%}  {ppl:<21} {size}"
                         + ("" if g["passed"] else "  FAIL"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--threads", type=int, default=1, help="torch / onnxruntime threads")
    parser.add_argument("--exporter", default="auto", choices=["auto", "builder", "torch"],
                        help="lite-sft export's --exporter for the onnx-export step and the full exports")
    parser.add_argument("--work", default="/tmp/lite-sft-export-bench", help="scratch folder for models and exports")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    for hidden in ("run", "out", "merged"):
        parser.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    import torch

    from lite_sft.report import versions

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = [measure(name, work, args.threads, args.exporter) for name in args.sizes.split(",")]
    import importlib.metadata as meta

    import onnxruntime

    result = {
        "benchmark": "export",
        "command": " ".join([f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] * ("OMP_NUM_THREADS" in os.environ)
                            + ["python", "benchmarks/export.py", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": {"type": "cpu", "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                   "threads": args.threads, "cuda": torch.cuda.is_available()},
        "versions": {**versions(), "onnxruntime": onnxruntime.__version__,
                     **{name: meta.version(name) for name in ("onnxruntime-genai-cuda", "onnxscript", "onnx")}},
        "rows": rows,
    }
    print(table(rows))
    save_result("export", result)


if __name__ == "__main__":
    main()
