"""Several adapters of one base exported together against one merged export each: time and bytes on disk.

    OMP_NUM_THREADS=1 python benchmarks/export_multi.py                    # 2 and 4 adapters, fp32 and fp32 + int8
    OMP_NUM_THREADS=1 python benchmarks/export_multi.py --adapters 4 --quantize none

A random-weight Llama (hidden 512, 8 layers, 8 query / 2 key-value heads, the built-in demo's tokenizer: about
23M parameters) is tuned for three steps once per adapter, with different ranks (8, 16) and targets (q and v; q, k,
v and o; the MLP; q, v and down), so every run directory is real. Then for each count: `lite-sft export RUN_1 ...
RUN_N` (export/multi.py) against N single-run exports (export/pipeline.py), each with every gate it runs. Prints
and saves one JSON object under benchmarks/results/export_multi-<date>.json: seconds, bytes per folder, and the
mixed batch's largest logit difference from each adapter alone per graph.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

TARGETS = (["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"],
           ["q_proj", "v_proj", "down_proj"])


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def build(root: Path, count: int) -> list[Path]:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lite_sft import tiny
    from lite_sft.config import load_config
    from lite_sft.train import tune

    tok = AutoTokenizer.from_pretrained(tiny.materialize_builtin_model())
    base = root / "base"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(base)
    tok.save_pretrained(base)
    rng = random.Random(0)
    words = "the quick brown fox jumps over the lazy dog hello there how are you a plan a canal panama".split()
    chats = [json.dumps({"messages": [{"role": "user", "content": " ".join(rng.choices(words, k=6))},
                                      {"role": "assistant", "content": " ".join(rng.choices(words, k=8))}]})
             for _ in range(48)]
    (root / "chats.jsonl").write_text("\n".join(chats) + "\n")
    runs = []
    for i in range(count):
        runs.append(root / f"run{i}")
        tune(load_config(None, {
            "model.name_or_path": str(base), "model.cpu_bf16": "off", "data.path": str(root / "chats.jsonl"),
            "data.max_seq_len": 64, "data.validation_fraction": 0.1, "lora.r": 8 * (1 + i % 2), "lora.alpha": 16,
            "lora.dropout": 0.0, "lora.target_modules": TARGETS[i % 4], "train.max_steps": 3,
            "train.micro_batch_size": 2, "train.lr": 5e-2, "train.warmup_ratio": 0.0, "train.eval_every": 0,
            "train.save_every": 0, "output_dir": str(runs[-1])}))
    return runs


def main() -> None:
    from lite_sft.export.multi import export_runs
    from lite_sft.export.pipeline import export_run
    from lite_sft.options import ExportOptions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--quantize", nargs="+", default=["none", "int8"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    quiet = lambda _: None  # noqa: E731
    results = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": platform.processor(),
               "model": "random Llama, hidden 512, 8 layers, 8/2 heads", "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        runs = build(root, max(args.adapters))
        from safetensors.torch import load_file

        results["params"] = sum(t.numel() for t in load_file(str(root / "base" / "model.safetensors")).values())
        for count in args.adapters:
            for quantize in args.quantize:
                opts = dict(quantize=quantize)
                start = time.perf_counter()
                out = root / f"multi-{count}-{quantize}"
                report = export_runs(runs[:count], out, ExportOptions(**opts), say=quiet)
                multi_s = time.perf_counter() - start
                start, singles = time.perf_counter(), 0
                for i, run in enumerate(runs[:count]):
                    export_run(run, root / f"single-{count}-{quantize}-{i}", ExportOptions(**opts), say=quiet)
                    singles += size(root / f"single-{count}-{quantize}-{i}")
                row = {"adapters": count, "quantize": quantize, "passed": report["passed"],
                       "multi_s": round(multi_s, 1), "singles_s": round(time.perf_counter() - start, 1),
                       "multi_bytes": size(out), "singles_bytes": singles,
                       "folders_bytes": {p.name: size(p) for p in out.iterdir() if p.is_dir()},
                       "timings_s": report["timings_s"],
                       "mixed_max_abs_diff_vs_alone": {m["stage"]: m["vs_alone"]["max_abs_diff"]
                                                       for m in report["mixed"]}}
                results["rows"].append(row)
                print(json.dumps(row))
    saved = Path(__file__).parent / "results" / f"export_multi-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.json"
    saved.write_text(json.dumps(results, indent=1) + "\n")
    print(f"saved {saved}")


if __name__ == "__main__":
    main()
