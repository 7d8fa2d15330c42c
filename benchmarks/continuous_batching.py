"""Continuous against static batching under load; same-seed answers alone and batched; memory over 1,000 requests.

    OMP_NUM_THREADS=1 python benchmarks/continuous_batching.py                    # 10M model, about 8 minutes
    OMP_NUM_THREADS=1 python benchmarks/continuous_batching.py --size 100M --variant int8
    OMP_NUM_THREADS=1 python benchmarks/continuous_batching.py --quick            # a smoke run, about 2 minutes

The model is bench_serve.py's export of a random-weight Llama (one LoRA step, `lite-sft export --quantize int8`
with its parity gates; random weights give honest timings, the arithmetic does not depend on their values).
Two `lite-sft serve` processes of it run side by side, `--batching static` and `--batching continuous`, both
with --max-batch 16, --max-queue 64 and the same threads. At each concurrency (1, 4, 8, 16 streaming clients)
the static server is loaded for `--seconds`, then the continuous one, each request asking a length drawn
uniformly from 8..64 tokens (seeded per client, ignore_eos: `lite-sft bench --url --min-tokens`), as real
traffic mixes short and long answers. Per cell: requests/s, generated tokens/s, time to first token and
end-to-end p50/p95/p99, and errors (there must be none: the queue limit is above the clients).

Same seeds: 8 requests, half greedy and half sampled with a seed, are sent to each server one at a time, then
all together 30 ms apart, so they join a running batch at different steps; every text must be the same.

Memory: the continuous server then answers `--requests` more (1,000 by default; 8 clients, 1..16 tokens each,
non-streaming) while its resident set size is read from /proc every 100 answers. Reported: RSS after the
first 100 and at the end, and the growth between (allocator noise is a few MB; a leak of a request's cache
or its events would grow with the count).

Prints the tables, then one JSON line, and saves benchmarks/results/continuous_batching-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench_serve import SIZES, last_json, lite_sft, make_export, serving  # beside this script
from workload import cpu_model, save_result

PROMPTS = ["Write 40817 backwards.", "hello there", "the quick brown fox", "a plan, a canal", "how are you?",
           "Write 123 backwards.", "one two three", "numbers: 9 8 7"]
MODES = ("static", "continuous")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def same_seed(url: str, max_tokens: int) -> dict:
    """Each request's text alone, then all sent together (30 ms apart): whether every text is the same."""
    import httpx

    bodies = [{"prompt": p, "max_tokens": max_tokens, "ignore_eos": True,
               **({"temperature": 0.8, "top_p": 0.95, "seed": 100 + i} if i % 2 else {"temperature": 0})}
              for i, p in enumerate(PROMPTS)]
    alone = [httpx.post(url + "/v1/completions", json=b, timeout=120).json()["choices"][0]["text"] for b in bodies]

    async def together():
        async with httpx.AsyncClient(timeout=120) as http:
            async def one(i, body):
                await asyncio.sleep(0.03 * i)
                return (await http.post(url + "/v1/completions", json=body)).json()["choices"][0]["text"]
            return await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies)))

    batched = asyncio.run(together())
    return {"requests": len(bodies), "identical": alone == batched,
            "differing": [i for i, (a, b) in enumerate(zip(alone, batched)) if a != b]}


def memory_run(url: str, pid: int, requests: int, clients: int = 8, every: int = 100) -> dict:
    """`requests` non-streaming requests from `clients` clients; the server's RSS every `every` answers."""
    import httpx

    samples, started, done, errors = [], 0, 0, 0

    async def run():
        async with httpx.AsyncClient(timeout=120) as http:
            async def client(c):
                nonlocal started, done, errors
                draw = random.Random(c)
                while started < requests:
                    started += 1
                    body = {"prompt": draw.choice(PROMPTS), "max_tokens": draw.randint(1, 16), "ignore_eos": True}
                    r = await http.post(url + "/v1/completions", json=body)
                    if r.status_code == 200:
                        done += 1
                    else:
                        errors += 1
                    if done and done % every == 0 and len(samples) < done // every:
                        samples.append({"requests": done, "rss_mb": rss_bytes(pid) / 2**20})
            await asyncio.gather(*(client(c) for c in range(clients)))

    start = time.perf_counter()
    asyncio.run(run())
    samples.append({"requests": done, "rss_mb": rss_bytes(pid) / 2**20})
    first, last = samples[0]["rss_mb"], samples[-1]["rss_mb"]
    return {"requests": done, "errors": errors, "seconds": round(time.perf_counter() - start, 1),
            "rss_mb": samples, "rss_first_mb": round(first, 1), "rss_last_mb": round(last, 1),
            "growth_mb": round(last - first, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="10M", choices=list(SIZES))
    parser.add_argument("--variant", default="fp", choices=("fp", "int8", "int4"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--seconds", type=float, default=20.0, help="load per cell")
    parser.add_argument("--min-tokens", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=1000, help="the memory run's request count")
    parser.add_argument("--quick", action="store_true", help="5 s cells at 1 and 8 clients, 200 requests")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "lite-sft-serve-bench"),
                        help="scratch folder for the model and its export (shared with bench_serve.py)")
    args = parser.parse_args()
    if args.quick:
        args.concurrency, args.seconds, args.requests = "1,8", 5.0, 200
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"== {args.size}: building and exporting (reused when {work} has it)", flush=True)
    export = make_export(args.size, work, args.threads)
    options = ("--variant", args.variant, "--max-batch", "16", "--max-queue", "64")
    result = {"benchmark": "continuous_batching", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "benchmarks/continuous_batching.py", *sys.argv[1:]]),
              "model": {"size": args.size, "variant": args.variant, "random_weights": True},
              "threads": args.threads, "cpu": cpu_model(), "tokens": [args.min_tokens, args.max_tokens], "load": []}
    with serving(export, args.threads, "--batching", "static", *options) as (static_url, _), \
            serving(export, args.threads, "--batching", "continuous", *options) as (cont_url, cont):
        urls = dict(zip(MODES, (static_url, cont_url)))
        for clients in [int(c) for c in args.concurrency.split(",")]:
            for mode in MODES:
                out = lite_sft("bench", "--url", urls[mode], "--concurrency", str(clients), "--duration",
                               str(args.seconds), "--max-tokens", str(args.max_tokens), "--min-tokens",
                               str(args.min_tokens), threads=args.threads)
                row = {"batching": mode, **last_json(out)}
                result["load"].append(row)
                print(f"{mode:>10}  {clients:>2} clients  {row['tokens_per_s']:7.1f} tok/s  "
                      f"TTFT p50 {row['ttft_ms'].get('p50', 0):6.0f} ms  p95 {row['ttft_ms'].get('p95', 0):6.0f} ms  "
                      f"errors {row['errors'] or 'none'}", flush=True)
        result["same_seed"] = {mode: same_seed(urls[mode], 24) for mode in MODES}
        print(f"same seeds alone and batched: {result['same_seed']}", flush=True)
        result["memory"] = memory_run(cont_url, cont.pid, args.requests)
        memory = result["memory"]
        print(f"memory over {memory['requests']} requests: RSS {memory['rss_first_mb']} MB after the first 100, "
              f"{memory['rss_last_mb']} MB at the end ({memory['growth_mb']:+} MB), errors {memory['errors']}")
    print(format_table(result["load"]))
    save_result("continuous_batching", result)


def format_table(rows: list[dict]) -> str:
    lines = ["clients | static tok/s | continuous tok/s | ratio | static TTFT p50/p95 ms | continuous TTFT p50/p95 ms",
             "---|---|---|---|---|---"]
    by = {(r["batching"], r["concurrency"]): r for r in rows}
    for clients in sorted({r["concurrency"] for r in rows}):
        s, c = by[("static", clients)], by[("continuous", clients)]
        lines.append(f"{clients} | {s['tokens_per_s']:.1f} | {c['tokens_per_s']:.1f} | "
                     f"{c['tokens_per_s'] / s['tokens_per_s']:.2f}x | {s['ttft_ms']['p50']:.0f} / "
                     f"{s['ttft_ms']['p95']:.0f} | {c['ttft_ms']['p50']:.0f} / {c['ttft_ms']['p95']:.0f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
