"""Serving speed versus model size on CPU: every backend through `lite-sft bench`, then a load test of
`lite-sft serve`, for random-weight Llama-architecture models of about 10M and 100M parameters.

    OMP_NUM_THREADS=1 python benchmarks/bench_serve.py                     # 10M and 100M, 1 thread
    OMP_NUM_THREADS=1 python benchmarks/bench_serve.py --sizes 10M --runs 3 --load-seconds 5

For each size: a base is built from a config (seeded random weights), tuned for one LoRA step so the
adapter is real, and exported with `lite-sft export --quantize int8` (merged/, onnx/, onnx-int8/, parity
gates); onnx-int4/ is then made from onnx/ with the exporter's own quantiser (lite_sft.export.quantize,
block size 32) so one export folder holds every CPU backend. Then, each in a fresh process:

  lite-sft bench OUT     torch-adapter, torch-merged, onnx-fp32, onnx-int8, onnx-int4 (fp16 is GPU only)
  lite-sft serve OUT     loaded with `lite-sft bench --url` at 1, 4 and 8 concurrent clients

Prints the tables, then one JSON line, and saves the JSON under benchmarks/results/serve-<date>.json.
The issue's CPU targets (ONNX fp32 >= 2x and int8 >= 3x PyTorch eager decode tokens/s at batch 1) are
judged against torch-merged, the same model in eager PyTorch, and reported whether met or not.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from workload import bpe_tokenizer, one_step_run, random_llama, save_result, write_chat_data  # beside this script

ROOT = Path(__file__).resolve().parents[1]
# name -> Llama dimensions: hidden, layers, intermediate, heads, key-value heads, vocabulary
SIZES = {
    "10M": (256, 4, 688, 4, 4, 16000),
    "100M": (640, 12, 1728, 10, 5, 32000),
}


def make_export(name: str, work: Path, threads: int) -> Path:
    """Base, one-step LoRA run, `lite-sft export --quantize int8`, plus onnx-int4/: returns the export folder."""
    out = work / f"export-{name}"
    if (out / "onnx-int4" / "model.onnx").is_file():
        return out  # made by an earlier run of this script
    import torch

    from lite_sft.export.quantize import quantize

    torch.set_num_threads(threads)
    base = work / f"base-{name}"
    random_llama(SIZES[name], base, bpe_tokenizer(), max_positions=1024)
    run = one_step_run(base, write_chat_data(work / "chats.jsonl"), work / f"run-{name}")
    cmd = [sys.executable, "-m", "lite_sft", "export", str(run), "--out", str(out), "--overwrite", "--quantize", "int8"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode:
        raise RuntimeError(f"export failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    quantize(out / "onnx", out / "onnx-int4", "int4", 32)
    return out


def lite_sft(*args: str, threads: int) -> str:
    done = subprocess.run([sys.executable, "-m", "lite_sft", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode:
        raise RuntimeError(f"lite-sft {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def last_json(stdout: str) -> dict:
    return json.loads(next(line for line in reversed(stdout.splitlines()) if line.startswith("{")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(export: Path, threads: int, *options: str):
    """`lite-sft serve export` on 127.0.0.1 and a free port, with `options`: yields (its URL, its process);
    stopped at the end."""
    import httpx

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "lite_sft", "serve", str(export), "--port", str(port),
                               "--threads", str(threads), "--device", "cpu", "--log-level", "warning", *options],
                              env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"lite-sft serve did not start:\n{server.stderr.read()[-3000:]}")
            time.sleep(0.5)
        yield url, server
    finally:
        server.terminate()
        server.wait(30)


def load(export: Path, threads: int, seconds: float, concurrency: list[int], max_tokens: int) -> list[dict]:
    """Start `lite-sft serve` on 127.0.0.1, load it at each concurrency, stop it."""
    with serving(export, threads, "--max-batch", "8", "--max-queue", "32") as (url, _):
        rows = []
        for c in concurrency:
            out = lite_sft("bench", "--url", url, "--concurrency", str(c), "--duration", str(seconds),
                           "--max-tokens", str(max_tokens), threads=threads)
            rows.append(last_json(out))
            print("\n".join(line for line in out.splitlines() if not line.startswith("{")))
        return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10M,100M", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--threads", type=int, default=1, help="torch / onnxruntime threads, for every backend")
    parser.add_argument("--prompt-lens", default="32,128")
    parser.add_argument("--output-lens", default="64")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--load-seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--work", default="/tmp/lite-sft-serve-bench", help="scratch folder for models and exports")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    result = {"benchmark": "serve", "command": " ".join(
        [f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] * ("OMP_NUM_THREADS" in os.environ)
        + ["python", "benchmarks/bench_serve.py", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "sizes": []}
    for name in args.sizes.split(","):
        print(f"== {name}: building and exporting", flush=True)
        export = make_export(name, work, args.threads)
        out = lite_sft("bench", str(export), "--prompt-lens", args.prompt_lens, "--output-lens", args.output_lens,
                       "--runs", str(args.runs), "--device", "cpu", "--threads", str(args.threads),
                       "--out", str(work / "bench"), threads=args.threads)
        print("\n".join(line for line in out.splitlines() if not line.startswith("{")), flush=True)
        report = last_json(out)
        load_rows = load(export, args.threads, args.load_seconds, [int(c) for c in args.concurrency.split(",")], 32)
        merged = next(b for b in report["backends"] if b["backend"] == "torch-merged")
        params = merged["weight_bytes"] // 4  # fp32
        result["sizes"].append({"size": name, "params": params, "bench": report, "load": load_rows})
        result.setdefault("device", report["device"])
        result.setdefault("versions", report["versions"])
    save_result("serve", result)


if __name__ == "__main__":
    main()
