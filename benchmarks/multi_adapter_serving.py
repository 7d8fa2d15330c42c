"""Several LoRA adapters of one base in one server: batch invariance, throughput mixed against one adapter alone,
and memory by the number of adapters.

    OMP_NUM_THREADS=1 python benchmarks/multi_adapter_serving.py                # --size small, about 8 minutes
    OMP_NUM_THREADS=1 python benchmarks/multi_adapter_serving.py --size tiny
    OMP_NUM_THREADS=1 python benchmarks/multi_adapter_serving.py --quick        # a smoke run (tiny, one round)

The model (--size) is a random-weight Llama of 4 layers, hidden 512 (small), or the built-in tiny Llama of 2
layers, hidden 128 (tiny), as the builder exports it, with LoRA branches on q_proj, v_proj and down_proj
(export/lora_graph.py), and random adapters of rank 8 (random weights give honest timings: the arithmetic does
not depend on their values). Models this small are dominated by per-step overhead, and the banks' R columns
(32 for 4 adapters) are a larger share of hidden 128 or 512 than of a 1B model's 2048, so the ratios here
are a floor for what a real model would see.

The server's engine runs in this process (serve/engine.py, continuous batching, max batch 16), fed by N clients
that each send requests back to back (greedy, `--tokens` new tokens each, end-of-sequence ignored):
  * invariance: every (adapter, prompt)'s tokens alone, then with 4/8/16 clients mixing 4 adapters and the base
    in every batch: all must be identical;
  * throughput at 8 and 16 clients: 4 adapters mixed (clients round-robin over them), one adapter alone (the
    same graph, one adapter loaded, every client on it), four engines of one adapter each sharing the cores
    (as four single-adapter servers would; clients split over them), and the base graph without LoRA
    branches; the setups take turns `--rounds` times and each cell is the median (the cores are shared);
  * memory: a fresh process per count serves the graph with 0, 1, 4 and 16 adapters of rank 64, listed in its
    manifest at start ("start") or hot-loaded one by one ("hot"), and serves one request; RSS over the
    0-adapter process's, against the adapters' bytes.

Prints a table, then one JSON line, and saves benchmarks/results/multi_adapter_serving-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

TARGETS = ["q_proj", "v_proj", "down_proj"]
PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26], [30, 31], [40, 41, 42, 43]]


def random_adapter(merged: Path, seed: int, r: int, path: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import torch
    from lite_sft.adapters import peft_sites, write_adapter_file

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False))
    return write_adapter_file(path, peft_sites({k: v for k, v in peft.state_dict().items() if "lora_" in k}, 2.0))


SIZES = {"tiny": {}, "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4)}


def base_model(root: Path, size: str) -> Path:
    """The built-in tiny Llama, or (small) a random-weight Llama of the sizes above with its tokenizer."""
    import shutil

    from lite_sft import tiny

    merged = tiny.materialize_builtin_model()
    if not SIZES[size]:
        return merged
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = root / f"{size}-base"
    shutil.copytree(merged, folder)
    config = LlamaConfig.from_pretrained(merged)
    for key, value in SIZES[size].items():
        setattr(config, key, value)
    config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def make_export(root: Path, adapters: int, rank: int, size: str = "tiny") -> Path:
    """OUT with the LoRA graph and an empty manifest (adapters are loaded at run time), OUT/files/a{i}, and
    root/base: the same model's graph without branches."""
    import shutil

    from lite_sft.adapters import Manifest, write_manifest
    from lite_sft.export.exporters import builder
    from lite_sft.export.lora_graph import add_lora_branches

    merged = base_model(root, size)
    out = root / "team"
    builder._build(merged, out / "onnx", "fp32", "cpu", disable_qkv_fusion="true")
    shutil.copytree(out / "onnx", root / "base")
    sites = add_lora_branches(out / "onnx" / "model.onnx", set(TARGETS))
    write_manifest(out, Manifest({"name_or_path": str(merged)}, sites, []))
    (out / "parity.json").write_text(json.dumps({"task": "causal-lm", "gates": [{"stage": "onnx", "passed": True}]}))
    for i in range(adapters):
        random_adapter(merged, i, rank, out / "files" / f"a{i}.onnx_adapter")
    return out


async def run_clients(engine, clients: int, per_client: int, pick, tokens: int) -> tuple[dict, float, int]:
    """({(client, k): token ids}, seconds, tokens) for `clients` sending `per_client` requests each; `engine` is
    one engine, or a list of them that client c uses the (c mod len)-th of."""
    from lite_sft.serve.sampling import SamplingParams

    answers, generated = {}, 0

    async def client(c: int) -> None:
        nonlocal generated
        for k in range(per_client):
            adapter, prompt = pick(c, k)
            serving = engine[c % len(engine)] if isinstance(engine, list) else engine
            job = serving.submit([PROMPTS[prompt]], [SamplingParams(tokens, 0.0, stop_ids=[])], adapter=adapter)
            ids = []
            async for _, event in job:
                if event.token_id is not None:
                    ids.append(event.token_id)
            answers[(c, k)] = (adapter, prompt, ids)
            generated += len(ids)

    start = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return answers, time.perf_counter() - start, generated


def engine_over(backend, tokenizer):
    from lite_sft.serve.engine import Engine

    return Engine(backend, tokenizer, max_batch=16, max_queue=64)


def measure(args) -> dict:
    from lite_sft.serve.backends.factory import load_backend
    from lite_sft.serve.backends.folder import load_tokenizer
    from lite_sft.serve.backends.ort import OrtBackend

    root = Path(tempfile.mkdtemp(prefix="multi-adapter-"))
    out = make_export(root, 4, 8, args.size)
    names = [f"a{i}" for i in range(4)]
    tokenizer = load_tokenizer(out / "onnx")
    model = ("builtin tiny Llama (2 layers, hidden 128)" if args.size == "tiny" else
             "random Llama " + ", ".join(f"{k} {v}" for k, v in SIZES[args.size].items()))
    result = {"model": f"{model}, fp32, CPU", "tokens": args.tokens, "rounds": args.rounds,
              "threads": args.threads, "rank": 8, "targets": TARGETS}

    def lora_backend(loaded: list[str]):
        backend, _ = load_backend(out, "cpu", threads=args.threads)
        for name in loaded:
            backend.load_adapter(name, out / "files" / f"{name}.onnx_adapter")
        return backend

    # Invariance: alone (one client), then mixed at 4, 8, 16 clients
    engine = engine_over(lora_backend(names), tokenizer)
    choices = [None, *names]
    alone = {}
    for adapter in choices:
        for p in range(len(PROMPTS)):
            got, _, _ = asyncio.run(run_clients(engine, 1, 1, lambda c, k: (adapter, p), args.tokens))
            alone[(adapter, p)] = got[(0, 0)][2]
    invariance = {}
    for clients in (4, 8, 16):
        got, _, _ = asyncio.run(run_clients(engine, clients, 2,
                                            lambda c, k: (choices[(c + k) % 5], (c * 2 + k) % len(PROMPTS)),
                                            args.tokens))
        invariance[clients] = all(ids == alone[(a, p)] for a, p, ids in got.values())
    engine.close()
    result["identical_alone_and_mixed"] = invariance

    # Throughput: the setups take turns, `rounds` times, and each cell is the median (the cores are shared)
    import statistics

    setups = {"4 adapters mixed": (lambda: engine_over(lora_backend(names), tokenizer),
                                   lambda c, k: (names[(c + k) % 4], (c + k) % 5)),
              "1 adapter alone": (lambda: engine_over(lora_backend(names[:1]), tokenizer),
                                  lambda c, k: ("a0", (c + k) % 5)),
              # four servers of one adapter each, on the same cores: four engines, client c on the (c mod 4)-th
              "4 single-adapter engines": (lambda: [engine_over(lora_backend([n]), tokenizer) for n in names],
                                           lambda c, k: (names[c % 4], (c + k) % 5)),
              "base graph, no LoRA": (lambda: engine_over(OrtBackend(root / "base", "cpu", args.threads), tokenizer),
                                      lambda c, k: (None, (c + k) % 5))}
    engines = {label: make() for label, (make, _) in setups.items()}
    samples: dict = {}
    for clients in (8, 16):
        for _ in range(args.rounds):
            for label, (_, pick) in setups.items():
                asyncio.run(run_clients(engines[label], clients, 1, pick, args.tokens))  # warm up
                _, seconds, generated = asyncio.run(run_clients(engines[label], clients, args.requests, pick,
                                                                args.tokens))
                samples.setdefault((label, clients), []).append(generated / seconds)
    for engine in engines.values():
        for one in engine if isinstance(engine, list) else [engine]:
            one.close()
    rows = [{"setup": label, "clients": clients, "tokens_per_s": round(statistics.median(values), 1),
             "samples": [round(v, 1) for v in values]} for (label, clients), values in samples.items()]
    result["throughput"] = rows
    for clients in (8, 16):
        by = {r["setup"]: r["tokens_per_s"] for r in rows if r["clients"] == clients}
        result[f"mixed_over_alone_{clients}"] = round(by["4 adapters mixed"] / by["1 adapter alone"], 3)
        result[f"mixed_over_4_engines_{clients}"] = round(by["4 adapters mixed"] / by["4 single-adapter engines"], 3)

    # Memory, a fresh process per count
    mem_root = Path(tempfile.mkdtemp(prefix="multi-adapter-mem-"))
    mem_out = make_export(mem_root, 16, 64)
    memory = []
    for how in ("start", "hot"):
        for count in (0, 1, 4, 16):
            line = subprocess.run([sys.executable, __file__, "--memory-child", str(mem_out), str(count), how],
                                  capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            memory.append(json.loads(line))
    base_rss = {row["how"]: row["rss"] for row in memory if row["adapters"] == 0}
    for row in memory:
        row["rss_over_base_mb"] = round((row["rss"] - base_rss[row["how"]]) / 2**20, 2)
        row["adapter_file_mb"] = round(row["adapter_file_bytes"] / 2**20, 2)
        row["bank_mb"] = round(row["bank_bytes"] / 2**20, 2)
    result["memory"] = memory
    return result


def memory_child(out: str, count: int, how: str) -> None:
    """One server process with `count` adapters: in its manifest at start ("start") or loaded one by one ("hot")."""
    import asyncio as aio

    from lite_sft.adapters import AdapterEntry, read_manifest, write_manifest
    from lite_sft.serve.backends.factory import load_backend

    files = sorted((Path(out) / "files").glob("*.onnx_adapter"))[:count]
    if how == "start":  # a copy of OUT whose manifest lists them
        folder = Path(tempfile.mkdtemp(prefix="multi-adapter-start-"))
        (folder / "onnx").symlink_to(Path(out) / "onnx")
        (folder / "parity.json").write_text((Path(out) / "parity.json").read_text())
        manifest = read_manifest(Path(out))
        manifest.adapters = [AdapterEntry(p.stem, str(p), 64, 128.0, 2.0, sorted(TARGETS)) for p in files]
        write_manifest(folder, manifest)
        backend, tokenizer = load_backend(folder, "cpu", threads=1)
    else:
        backend, tokenizer = load_backend(out, "cpu", threads=1)
        for path in files:
            backend.load_adapter(path.stem, path)
    engine = engine_over(backend, tokenizer)
    pick = (lambda c, k: (files[0].stem if files else None, 0))
    aio.run(run_clients(engine, 1, 1, pick, 8))
    engine.close()
    rss = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    print(json.dumps({"adapters": count, "how": how, "rss": rss,
                      "adapter_file_bytes": sum(p.stat().st_size for p in files),
                      "bank_bytes": backend.adapter_bytes() if files else 0}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=6, help="requests per client per throughput cell")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]), args.memory_child[2])
        return
    if args.quick:
        args.tokens, args.requests, args.rounds, args.size = 8, 2, 1, "tiny"
    result = measure(args)
    print(f"{'setup':<26}{'clients':>8}{'tokens/s':>10}")
    for row in result["throughput"]:
        print(f"{row['setup']:<26}{row['clients']:>8}{row['tokens_per_s']:>10}")
    print("identical alone and mixed:", result["identical_alone_and_mixed"])
    for row in result["memory"]:
        print(f"{row['adapters']:>3} adapters ({row['how']}): RSS +{row['rss_over_base_mb']} MB over none; files "
              f"{row['adapter_file_mb']} MB, banks {row['bank_mb']} MB")
    result["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    print(json.dumps(result))
    if not args.quick:
        results = Path(__file__).parent / "results"
        results.mkdir(exist_ok=True)
        name = f"multi_adapter_serving-{args.size}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.json"
        (results / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
