"""`lite-sft bench`: every backend of one model side by side, through the same generation loop.

    lite-sft bench exports/demo --quick                  # a short table on the embedded default's export
    lite-sft bench exports/qwen --prompt-lens 128,1024 --output-lens 128 --runs 20
    python -m lite_sft.serve.bench exports/qwen --backends torch-merged,onnx-fp32

What it finds in MODEL_OR_RUN_DIR (bench_candidates.find_backends):
    an export OUT        torch-adapter  base + adapter unmerged, from the run directory parity.json names
                         torch-merged   OUT/merged
                         onnx-fp32 / onnx-fp16 (GPU only)   OUT/onnx;  onnx-int8, onnx-int4   OUT/onnx-int8|int4
    a tune run directory torch-adapter, and torch-merged (merged in memory with peft); no ONNX rows
    an ONNX folder       that one backend;   a Hugging Face folder   torch-merged
A backend that is not there gets a row saying why (re-export with --quantize int4 for an int4 row).

An encoder classifier (a seq-cls or token-cls export, or its folders) is measured as it is served: one forward
pass per batch of `batch` random sequences of each `prompt_lens` length (output lengths do not apply), giving
latency per batch (p50/p95/p99) and sequences/s, for torch-merged, onnx-fp32 (fp16) and onnx-int8 (int4).

For each backend and each (batch, prompt length, output length): `warmup` untimed runs, then `runs` timed
ones on seeded random prompt ids, greedy, no stop token (every run makes exactly the output length).
Per run: TTFT (start to first token: prefill and one sample), TPOT (mean time per later token), ITL (every
gap between tokens), end-to-end latency, decode tokens/s (batch x later tokens / their time) and overall
tokens/s; each reported as p50/p95/p99 over the runs. Peak memory is the process's peak resident set while
the backend was loaded and run (Linux resets the count per backend; imports and libraries, several hundred
MB, are in it: rss_before_load_bytes says how much), or CUDA's peak allocation.
The roofline: decoding one token at batch 1 reads every weight once (the input-embedding table aside: a
lookup reads one row), so tokens/s cannot pass bandwidth / those bytes ("roof %" is how close a backend
gets); the bandwidth is measured as a plain 256 MiB buffer copy on the same device (bytes read + written).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from lite_sft.errors import ServeError
from lite_sft.options import BenchOptions
from lite_sft.taskspec import TASKS

from .backends.devices import pick_device
from .bench_candidates import BACKENDS, bench_task, find_backends
from .bench_measure import (copy_bandwidth, device_info, peak_memory, percentiles, reset_peak, summarize, time_run,
                            versions)
from .bench_report import format_table, save, targets


def bench_backend(backend, opts: BenchOptions, vocab: int) -> list[dict]:
    rng = np.random.default_rng(opts.seed)
    rows = []
    for batch in opts.batch_sizes:
        for p_len in opts.prompt_lens:
            for o_len in opts.output_lens:
                if p_len + o_len > backend.max_context:
                    rows.append({"batch": batch, "prompt_len": p_len, "output_len": o_len,
                                 "skip": f"over the context ({backend.max_context})"})
                    continue
                # Ids from the upper part of the vocabulary: ordinary tokens, not the specials at its start.
                prompts = rng.integers(min(16, vocab // 2), vocab, size=(batch, p_len)).tolist()
                for _ in range(opts.warmup):
                    time_run(backend, prompts, o_len)
                runs = [time_run(backend, prompts, o_len) for _ in range(opts.runs)]
                rows.append({"batch": batch, "prompt_len": p_len, "output_len": o_len, **summarize(runs, batch)})
    return rows


def bench_encoder(backend, opts: BenchOptions) -> list[dict]:
    """Latency of one forward pass per (batch, sequence length), and sequences/s, for an encoder classifier."""
    rng = np.random.default_rng(opts.seed)
    vocab = backend.vocab_size or 1000
    rows = []
    for batch in opts.batch_sizes:
        for length in opts.prompt_lens:
            if length > backend.max_context:
                rows.append({"batch": batch, "seq_len": length, "skip": f"over the context ({backend.max_context})"})
                continue
            # Ids from the upper part of the vocabulary: ordinary tokens, not the specials at its start.
            inputs = [{"input_ids": r} for r in rng.integers(min(16, vocab // 2), vocab, size=(batch, length)).tolist()]
            for _ in range(opts.warmup):
                backend.logits(inputs)
            seconds = []
            for _ in range(opts.runs):
                start = time.perf_counter()
                backend.logits(inputs)
                seconds.append(time.perf_counter() - start)
            rows.append({"batch": batch, "seq_len": length, "latency_ms": percentiles([t * 1e3 for t in seconds]),
                         "seq_s": percentiles([batch / t for t in seconds])})
    return rows


def bench(path: str | Path, opts: BenchOptions | None = None, say: Callable[[str], None] = print) -> dict:
    """Measure every backend found in `path`; returns the report (see module docstring)."""
    import torch

    opts = opts or BenchOptions()
    opts.validate()
    threads = opts.threads or torch.get_num_threads()
    opts.threads = threads
    device = pick_device(opts.device)
    if not Path(path).is_dir():
        raise ServeError(f"{path} does not exist or is not a folder")
    task = bench_task(Path(path))
    encoder = not TASKS[task].generates
    if TASKS[task].encoder_decoder:
        raise ServeError(f"{path} is a seq2seq model: bench measures causal LMs and encoder classifiers; serve it "
                         "(`lite-sft serve`) and load-test the server with `lite-sft bench --url`")
    if encoder and (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file():
        raise ServeError(f"{path} is a {task} run directory: export it (`lite-sft export {path} --out OUT`) and "
                         "bench OUT, which measures the merged PyTorch model against its ONNX exports")
    candidates = [c for c in find_backends(Path(path), opts.device, threads, task)
                  if not opts.backends or c.name in opts.backends]
    bandwidth = None if encoder else copy_bandwidth(device)
    results = []
    for c in candidates:
        entry = {"backend": c.name, "source": c.source}
        if c.skip:
            results.append({**entry, "skip": c.skip})
            say(f"  {c.name:<14} skipped: {c.skip}")
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        before = reset_peak()
        say(f"  {c.name:<14} loading {c.source}")
        start = time.perf_counter()
        backend = c.load()
        load_s = time.perf_counter() - start
        if encoder:
            rows, roof = bench_encoder(backend, opts), {}
        else:
            rows, read = bench_backend(backend, opts, backend.vocab_size), backend.decode_bytes()
            roof = {"decode_bytes": read, "roofline_tok_s": bandwidth / read}
        entry.update(provider=backend.provider, precision=backend.precision, load_s=round(load_s, 3),
                     weight_bytes=backend.weight_bytes(), **roof, rows=rows, rss_before_load_bytes=before,
                     **peak_memory(device))
        results.append(entry)
        del backend
    report = {"benchmark": "serve", "task": task, "path": str(path), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": device_info(device, threads), "copy_bandwidth_bytes_s": bandwidth,
              "options": asdict(opts), "backends": results, "versions": versions()}
    report["targets"] = targets(report)
    return report


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lite_sft.serve.bench", description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--backends", help=f"comma-separated, from {', '.join(BACKENDS)}")
    parser.add_argument("--prompt-lens", default="32,128")
    parser.add_argument("--output-lens", default="32,128")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    opts = BenchOptions(ints(args.prompt_lens), ints(args.output_lens), runs=args.runs,
                        backends=args.backends.split(",") if args.backends else None)
    report = bench(args.path, opts)
    print(format_table(report))
    print(json.dumps(report))
    print("saved", *save(report, args.out))


if __name__ == "__main__":
    main()
