"""Several adapters on one base, the whole path: `lite-sft export A B C D`, `lite-sft serve`, HTTP clients; against
four separate single-adapter server processes sharing the same cores.

    OMP_NUM_THREADS=2 python benchmarks/multi_adapter_e2e.py                 # 10M base, about 10 minutes
    OMP_NUM_THREADS=2 python benchmarks/multi_adapter_e2e.py --size 100M --seconds 20
    python benchmarks/multi_adapter_e2e.py --quick                            # a smoke run, a few minutes

benchmarks/multi_adapter_serving.py measures the engine in one process (invariance, throughput, memory by adapter
count); this script measures what a user runs. The base is bench_serve.py's random-weight Llama; one run is tuned
on it for one LoRA step (rank 16 on every projection) and copied once per adapter with seeded random LoRA weights
that move greedy answers apart (a one-step adapter is almost the base, so mixing two would hide a row reading
another's columns). Then:

  lite-sft export a0 a1 a2 a3 --out multi-4       # one graph, four adapter files, a gate per adapter
  lite-sft export a0 --out single-0 ... a3        # today's merged exports, one server each

Answers: every adapter's (and the base's) greedy answers to 8 prompts, asked one at a time over HTTP; then at 1,
4, 8 and 16 concurrent clients, each client going through the prompts on the adapters in turn: every answer must
be the one asked alone. Throughput at 8 and 16 clients for --seconds each: the 4-adapter server with every client
on one adapter; the same server with the clients spread over the four (mixed batches); and the four
single-adapter servers running at once on the same cores, the clients split between them, once with --threads
each and once with one thread each. The issue's targets: mixed >= 0.8x one adapter alone, >= 2x the four servers.

Prints the tables, then one JSON line, and saves benchmarks/results/multi_adapter_e2e-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path

from bench_serve import SIZES, serving  # beside this script
from workload import bpe_tokenizer, cpu_model, random_llama, save_result, write_chat_data

PROMPTS = ["Write 40817 backwards.", "hello there", "the quick brown fox", "a plan, a canal", "how are you?",
           "Write 123 backwards.", "one two three", "numbers: 9 8 7"]
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
RANK = 16


def tuned_run(base: Path, data: Path, out: Path) -> Path:
    """A real run directory: one LoRA step on `base`, rank 16 on every projection."""
    from lite_sft.config import load_config
    from lite_sft.train import tune

    tune(load_config(None, {
        "model.name_or_path": str(base), "data.path": str(data), "data.max_seq_len": 64,
        "data.validation_fraction": 0.1, "lora.r": RANK, "lora.alpha": 2 * RANK, "lora.dropout": 0.0,
        "lora.target_modules": TARGETS, "train.max_steps": 1, "train.micro_batch_size": 2, "train.lr": 1e-2,
        "train.warmup_ratio": 0.0, "train.eval_every": 0, "train.save_every": 0, "output_dir": str(out)}),
        overwrite=True)
    return out


def randomized(run: Path, out: Path, seed: int) -> Path:
    """A copy of `run` whose adapter has seeded random LoRA weights (B no longer zero)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(run, out, dirs_exist_ok=True)
    path = out / "adapter_model.safetensors"
    weights = load_file(path)
    gen = torch.Generator().manual_seed(seed)
    for key, value in weights.items():
        if "lora_" in key:  # A (r, in), B (out, r): delta = B A x * 2, near the base projections in size, so
            fan = value.shape[1]  # that adapters answer differently from each other and from the base
            weights[key] = torch.randn(value.shape, generator=gen) * (1.2 / fan ** 0.5)
    save_file(weights, path, metadata={"format": "pt"})
    return out


def export(runs: list[Path], out: Path, threads: int) -> Path:
    """`lite-sft export RUNS --out OUT`; an OUT a previous run of this script exported under --work is reused
    (delete it to export again)."""
    if (out / "parity.json").is_file():
        return out
    cmd = [sys.executable, "-m", "lite_sft", "export", *map(str, runs), "--out", str(out), "--overwrite"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode:
        raise RuntimeError(f"export failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return out


def ask(http, url: str, model: str | None, prompt: str, max_tokens: int):
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return http.post(url + "/v1/completions", json=body if model is None else {**body, "model": model})


def alone(url: str, models: list[str], max_tokens: int) -> dict:
    """Each (model, prompt)'s greedy text, one request at a time."""
    import httpx

    async def run():
        texts = {}
        async with httpx.AsyncClient(timeout=300) as http:
            for model in models:
                for prompt in PROMPTS:
                    r = await ask(http, url, model, prompt, max_tokens)
                    r.raise_for_status()
                    texts[(model, prompt)] = r.json()["choices"][0]["text"]
        return texts
    return asyncio.run(run())


def mixed(url: str, models: list[str], clients: int, want: dict, max_tokens: int) -> dict:
    """`clients` concurrent clients, each going through the prompts on its own adapter (rotating), every answer
    compared with its adapter's alone."""
    import httpx

    async def run():
        wrong, total = [], 0
        async with httpx.AsyncClient(timeout=300) as http:
            async def client(c):
                nonlocal total
                for i, prompt in enumerate(PROMPTS):
                    model = models[(c + i) % len(models)]
                    r = await ask(http, url, model, prompt, max_tokens)
                    r.raise_for_status()
                    total += 1
                    if r.json()["choices"][0]["text"] != want[(model, prompt)]:
                        wrong.append({"client": c, "model": model, "prompt": prompt})
            await asyncio.gather(*(client(c) for c in range(clients)))
        return {"clients": clients, "answers": total, "different": len(wrong), "examples": wrong[:3]}
    return asyncio.run(run())


def throughput(targets: list[tuple[str, str]], clients: int, seconds: float, max_tokens: int) -> dict:
    """`clients` clients for `seconds`, client c sending to targets[c % len(targets)] (url, model): generated
    tokens per second over all of them."""
    import httpx

    async def run():
        tokens, requests, errors = 0, 0, 0
        deadline = time.perf_counter() + seconds
        async with httpx.AsyncClient(timeout=300) as http:
            async def client(c):
                nonlocal tokens, requests, errors
                url, model = targets[c % len(targets)]
                draw = random.Random(c)
                while time.perf_counter() < deadline:
                    r = await ask(http, url, model, draw.choice(PROMPTS), max_tokens)
                    if r.status_code == 200:
                        tokens += r.json()["usage"]["completion_tokens"]
                        requests += 1
                    else:
                        errors += 1
            start = time.perf_counter()
            await asyncio.gather(*(client(c) for c in range(clients)))
            return tokens / (time.perf_counter() - start), requests, errors
    tok_s, requests, errors = asyncio.run(run())
    return {"clients": clients, "tok_s": round(tok_s, 1), "requests": requests, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="10M", choices=list(SIZES))
    parser.add_argument("--seconds", type=float, default=15.0, help="per throughput cell")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the base, the runs and the exports here (reused by the next run)")
    parser.add_argument("--rounds", type=int, default=3, help="turns of every setup; each cell is the median")
    parser.add_argument("--quick", action="store_true", help="3 s cells, 16 tokens, one round")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.max_tokens, args.rounds = 3.0, 16, 1
    work = args.work or Path(tempfile.mkdtemp(prefix="lite-sft-multi-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    import torch

    torch.set_num_threads(args.threads)
    base = work / f"base-{args.size}"
    if not (base / "config.json").is_file():
        random_llama(SIZES[args.size], base, bpe_tokenizer(), max_positions=1024)
    seed_run = work / "seed-run"
    if not (seed_run / "adapter_model.safetensors").is_file():
        tuned_run(base, write_chat_data(work / "chats.jsonl"), seed_run)
    runs = [randomized(seed_run, work / "runs" / f"a{i}", seed=i) for i in range(4)]
    names = [run.name for run in runs[:4]]
    multi4 = export(runs[:4], work / "multi-4", args.threads)
    singles = [export([run], work / f"single-{i}", args.threads) for i, run in enumerate(runs)]  # merged exports
    result = {"benchmark": "multi_adapter_e2e", "size": args.size, "threads": args.threads, "cpu": cpu_model(),
              "max_tokens": args.max_tokens, "seconds_per_cell": args.seconds, "rounds": args.rounds,
              "adapters": names, "rank": RANK, "targets": TARGETS,
              "command": "python benchmarks/multi_adapter_e2e.py " + " ".join(sys.argv[1:]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    options = ("--max-batch", "16", "--max-queue", "64")
    with ExitStack() as stack:
        url = stack.enter_context(serving(multi4, args.threads, *options))[0]
        models = names + ["base"]
        want = alone(url, models, args.max_tokens)
        # How many of an adapter's answers differ from the base's: the invariance check means something only if
        # adapters answer differently.
        result["answers"] = {"differ_from_base": {m: sum(want[(m, p)] != want[("base", p)] for p in PROMPTS)
                                                  for m in names},
                             "mixed": [mixed(url, models, c, want, args.max_tokens) for c in (1, 4, 8, 16)]}
        # Every setup's servers run at once (idle ones cost nothing); the cells take turns, median of rounds.
        setups = {"one_adapter": [(url, names[0])], "mixed": [(url, m) for m in names]}
        for threads in sorted({args.threads, 1}, reverse=True):
            setups[f"four_servers_{threads}t"] = [(stack.enter_context(serving(s, threads, *options))[0], None)
                                                  for s in singles]
        rows = []
        for clients in (8, 16):
            cells = {name: [] for name in setups}
            for _ in range(args.rounds):
                for name, targets in setups.items():
                    cells[name].append(throughput(targets, clients, args.seconds, args.max_tokens))
            row = {"clients": clients, "errors": sum(c["errors"] for runs_ in cells.values() for c in runs_)}
            row.update({f"{name}_tok_s": statistics.median(c["tok_s"] for c in runs_) for name, runs_ in cells.items()})
            row["mixed_vs_one"] = round(row["mixed_tok_s"] / row["one_adapter_tok_s"], 2)
            row["mixed_vs_four_servers"] = round(row["mixed_tok_s"] / max(
                v for k, v in row.items() if k.startswith("four_servers_")), 2)
            rows.append(row)
    result["throughput"] = rows
    result["targets"] = {
        "identical_answers": all(m["different"] == 0 for m in result["answers"]["mixed"]),
        "mixed_vs_one_at_least_0.8": all(r["mixed_vs_one"] >= 0.8 for r in rows),
        "mixed_vs_four_servers_at_least_2": all(r["mixed_vs_four_servers"] >= 2 for r in rows)}
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(format_tables(result))
    print(json.dumps(result))
    if not args.quick:
        print(f"saved {save_result('multi_adapter_e2e', result)}")


def format_tables(result: dict) -> str:
    differ = result["answers"]["differ_from_base"]
    lines = [f"answers that differ from the base's, of {len(PROMPTS)}: "
             + ", ".join(f"{name} {n}" for name, n in differ.items())]
    lines += [f"  {m['clients']:>2} clients: {m['answers']} answers, {m['different']} different from alone"
              for m in result["answers"]["mixed"]]
    four = sorted(k for k in result["throughput"][0] if k.startswith("four_servers_"))
    lines.append("clients  one_adapter_tok_s  mixed_tok_s  " + "  ".join(four) + "  mixed/one  mixed/best 4 servers")
    lines += [f"{r['clients']:>7}  {r['one_adapter_tok_s']:>17}  {r['mixed_tok_s']:>11}  "
              + "  ".join(f"{r[k]:>{len(k)}}" for k in four)
              + f"  {r['mixed_vs_one']:>9}  {r['mixed_vs_four_servers']:>20}" for r in result["throughput"]]
    lines.append("targets: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in result["targets"].items()))
    return "\n".join(lines)

if __name__ == "__main__":
    main()
