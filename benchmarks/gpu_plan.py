"""`lite-sft plan` against the peaks train_vs_trl.py measured: for every lite-sft row of its results, the planner's
estimate for the same config beside the run's measured peak.

    python benchmarks/gpu_plan.py --from benchmarks/results/train_vs_trl-<time>.json WORK_DIR [--from ...]

WORK_DIR is the `--work-dir` the training benchmark ran with (its results name it $WORK; the planner reads the
model's config.json there, never its weights). Each row's config is written as YAML and planned by the CLI,
`python -m lite_sft plan --config ROW.yaml --device cuda|cpu --json`, in a fresh process.

What is compared: on CUDA the plan's total (which counts the CUDA context outside torch's allocator and the
allocator's fragmentation) against torch's peak reserved bytes, and its parts without that overhead against
the peak allocated; on a CPU the total against the run's peak resident set growth after its imports. Prints a
table, then one JSON line, and saves benchmarks/results/plan_vs_measured-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import yaml

from lite_sft.config import _nest as nest  # {"train.lr": 2e-4} -> {"train": {"lr": 2e-4}}, as tune reads it
from workload import save_result  # beside this script


def plan(overrides: dict, device: str, scratch: Path) -> dict:
    config = scratch / "row.yaml"
    config.write_text(yaml.safe_dump(nest(overrides)))
    done = subprocess.run([sys.executable, "-m", "lite_sft", "plan", "--config", str(config), "--device", device,
                           "--json"], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError((done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(result: dict, work: Path) -> list[dict]:
    device = result["device"]["type"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="plan-") as scratch:
        for run in result["runs"]:
            if run["side"] != "lite-sft" or run.get("error"):
                continue
            overrides = json.loads(json.dumps(run["overrides"]).replace("$WORK", str(work)))
            row = {"model": result["workload"]["model"], "row": run["name"], "device": device,
                   "quant": overrides.get("model.quant"), "micro_batch": overrides.get("train.micro_batch_size"),
                   "max_seq_len": overrides.get("data.max_seq_len")}
            try:
                estimate = plan(overrides, device, Path(scratch))
            except Exception as err:  # one row's failure must not end the table
                rows.append({**row, "error": f"{type(err).__name__}: {err}"[:300]})
                continue
            total, overhead = estimate["total_bytes"], estimate["overhead"]
            row.update(plan_total_bytes=total, plan_without_overhead_bytes=total - overhead,
                       plan={k: estimate[k] for k in ("weights", "adapter", "activations", "logits", "overhead")})
            if device == "cuda":
                alloc, reserved = run["peak_allocated_bytes"], run["peak_reserved_bytes"]
                row.update(peak_allocated_bytes=alloc, peak_reserved_bytes=reserved,
                           error_vs_reserved=(total - reserved) / reserved,
                           error_vs_allocated=(total - overhead - alloc) / alloc)
            else:
                row.update(working_bytes=run["working_bytes"],
                           error_vs_working=(total - run["working_bytes"]) / run["working_bytes"])
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    mib = lambda b: f"{b / 2**20:,.0f}" if b is not None else "-"  # noqa: E731
    lines = [f"{'model':<9} {'row':<26} {'plan MiB':>9} {'measured MiB':>13} {'error':>7}  against"]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['model']:<9} {r['row']:<26} ERROR: {r['error']}")
            continue
        pairs = ([("plan_total_bytes", "peak_reserved_bytes", "error_vs_reserved", "peak reserved"),
                  ("plan_without_overhead_bytes", "peak_allocated_bytes", "error_vs_allocated", "peak allocated")]
                 if r["device"] == "cuda" else [("plan_total_bytes", "working_bytes", "error_vs_working", "RSS growth")])
        for est, measured, err, label in pairs:
            lines.append(f"{r['model']:<9} {r['row']:<26} {mib(r[est]):>9} {mib(r[measured]):>13} {r[err]:+7.1%}  {label}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="sources", nargs=2, action="append", required=True, metavar=("RESULT", "WORK_DIR"),
                        help="a train_vs_trl result file and the --work-dir it ran with (repeatable)")
    parser.add_argument("--no-save", action="store_true", help="print the JSON line without saving it (tests)")
    args = parser.parse_args(argv)
    rows, sources = [], []
    for result_file, work in args.sources:
        result = json.loads(Path(result_file).read_text())
        sources.append({"result": Path(result_file).name, "command": result["command"], "date": result["date"]})
        rows += compare(result, Path(work).resolve())
        device, versions = result["device"], result["versions"]
    out = {"benchmark": "plan_vs_measured",
           "command": shlex.join(["python", "benchmarks/gpu_plan.py", *(sys.argv[1:] if argv is None else argv)]),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device, "versions": versions,
           "sources": sources, "rows": rows}
    for _, work in args.sources:  # a results file carries no machine's paths
        out = json.loads(json.dumps(out).replace(json.dumps(str(Path(work).resolve()))[1:-1], "$WORK")
                         .replace(json.dumps(str(work))[1:-1], "$WORK"))
    out = json.loads(json.dumps(out).replace(json.dumps(os.getcwd())[1:-1], "."))
    print(table(rows))
    if args.no_save:
        print(json.dumps(out))
    else:
        save_result("plan_vs_measured", out)
    return out


if __name__ == "__main__":
    main()
