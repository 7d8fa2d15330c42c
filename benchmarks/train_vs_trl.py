"""lite-sft against TRL's SFTTrainer + PEFT on the same model, data, hyperparameters and seed.

    OMP_NUM_THREADS=2 python benchmarks/train_vs_trl.py                       # CPU: ~35M Llama, 32k vocab
    OMP_NUM_THREADS=1 python benchmarks/train_vs_trl.py --quick               # tiny model and data, ~2 minutes
                                                                              # (no torch.compile row unless asked)
    python benchmarks/train_vs_trl.py --model qwen0.5b --quant 4bit           # GPU: Qwen2.5-0.5B config, QLoRA
    python benchmarks/train_vs_trl.py --model llama8b --quant 4bit --micro-batch 1    # GPU: Llama-3.1-8B config
    ... --rows lite-sft,loss-full,no-packing-random-order --trl default,packed    # a subset of the runs

Needs trl (`pip install -c constraints.txt -e '.[bench]'`). Everything is offline: the model is an
architecture's config with random weights (built on the GPU in bf16 when there is one), the tokenizer
a word-level one with one synthetic word type per vocabulary entry (32k on CPU), drawn with Zipfian
frequencies so the whole vocabulary is in use, and the data one-turn
instructions whose lengths are lognormal (median ~200 tokens, a tail past 1,000) capped at the
sequence limit (1024 on CPU, 2048 for the GPU presets). Random weights give honest time and memory
figures (the arithmetic does not depend on the weights' values). lite-sft reads the data as
`{"messages": [...]}`; TRL reads the same content as a conversational prompt-completion data set, so
both train on the assistant reply and its `<|im_end|>` only (the trained-token counts are reported;
a gap of more than 3% is called out; lite-sft fills a pass's last step from the next epoch's order,
so it can see up to one step's rows more than TRL).

Same on both sides: LoRA r=16, alpha=32, dropout 0, all linear layers; AdamW, lr 2e-4, cosine with
3% warm-up, clipping 1.0, no weight decay, seed 42; one pass over the same examples; no evaluation
during the pass, validation loss on the same held-out examples at the end. Unpacked runs take B=8
examples per optimiser step; packed runs take rows of max_seq_len, round(B x mean length / max_seq_len)
of them per step (about the same tokens per step; lite-sft and TRL packed use the same count). Both
sides use the same micro-batch (`--micro-batch`, default a whole step) and accumulate to the step.
On a GPU both load the weights in bf16 (TRL's own default would load fp32 and autocast); `--quant
4bit` is NF4 with double quantisation and bf16 compute on both sides. Every run is a fresh process,
so its peak memory is its own. The CPU default (512 examples, all rows) takes an hour or more on
two cores; `--examples`, `--rows` and `--trl` scale it, `--work-dir` keeps (and reuses) the model,
data and each run's folder and log.

TRL runs (`--trl`, default `default,packed,packed-mb1`): `default` is SFTConfig's defaults as a user
gets them (gradient checkpointing on, bf16 autocast, no packing) with only the shared settings above;
on a CPU TRL refuses its own bf16 default ("Your setup doesn't support bf16/gpu") unless told
`use_cpu=True`, so it then runs in fp32 and the row says so. `packed` is TRL's bfd packing
(padding-free: a micro-batch of packed rows is flattened into one sequence with position_ids),
gradient checkpointing off, bf16 only on a GPU (plus Liger kernels on CUDA when installed);
`packed-mb1` is `packed` one row per forward pass (accumulating to the same rows per step), which on
a CPU is faster than attending across a flattened micro-batch; `grouped` pads but groups by length,
checkpointing off; `packed-gc` is `packed` with TRL's default checkpointing and bf16. "TRL best" is
the fastest TRL run whose losses agree with TRL default. Not a variant: `padding_free` without packing
(TRL then refuses max_length, so it would not train the same truncated examples). Note that off
CUDA/XPU TRL's fused LM head scores every position (its trained-positions-only path is Triton's).

lite-sft rows (`--rows`), an ablation from its defaults (packing, fused loss):
  lite-sft                     the defaults
  loss=trained, loss=full      logits on trained positions only / everywhere, instead of the fused loss
  no packing, length-grouped   padded rows of B examples, grouped by length
  no packing, random order     padded rows of B examples in random order
  gradient checkpointing       recompute activations in the backward pass
  torch.compile                compile the model (the compile happens inside the timed pass)
  attention eager              eager attention instead of SDPA
  fp32 compute                 no bf16 autocast (on a CPU with native bf16, lite-sft's auto uses it)
  no tokenisation cache        the data prepared afresh (the other rows load it warm from the cache)

Figures: examples/s and trained tokens/s over the pass wall time; setup time (loading, tokenising,
wrapping) separately; peak memory (CPU: the process's peak resident set, VmHWM, and its growth over
the process after its imports; GPU: torch.cuda max allocated / reserved from the start of the pass
through the final validation); the first and last step's train loss, the mean over the last 10% of
steps, and the validation loss per trained token (TRL's own `evaluate()` averages per batch, so it is
recomputed per token; both are saved). A comparison is VOID when a run's validation or last-10% train
loss differs by more than 2% from TRL default's or TRL best's (TRL variants: from TRL default's).
The first step's loss shows how far one pass moved a random-weight model. Targets: on CPU the lite-sft row at >= 2x TRL default's and
>= 1.3x TRL best's examples/s; on CUDA >= 2x TRL default's trained tokens/s at <= 0.5x its peak reserved
memory (qwen0.5b, 4-bit), and llama8b 4-bit at micro-batch 1 under 7 GiB peak reserved. When
`lite_sft.plan.estimate` exists, its estimate is compared with each lite-sft row's measured peak (CPU:
the peak RSS growth after imports; GPU: max allocated).

Prints a table, then one JSON line, and saves it under benchmarks/results/train_vs_trl-<date>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from train_vs_trl_worker import LORA, run_worker  # beside this script
from train_vs_trl_workload import PRESETS, prepare_workload
from workload import save_result

LITE_ROWS = {
    "lite-sft": {},
    "loss=trained": {"train.loss": "trained"},
    "loss=full": {"train.loss": "full"},
    "no packing, length-grouped": {"data.packing": False},
    "no packing, random order": {"data.packing": False, "data.group_by_length": False},
    "gradient checkpointing": {"model.gradient_checkpointing": True},
    "torch.compile": {"model.compile": True},
    "attention eager": {"model.attn_implementation": "eager"},
    "fp32 compute": {"model.dtype": "float32"},
    "no tokenisation cache": {"data.cache": False},
}
TRL_RUNS = ("default", "packed", "packed-mb1", "grouped", "packed-gc")
BATCH_EXAMPLES = 8  # B: examples per optimiser step, unpacked
LR, WARMUP, SEED = 2e-4, 0.03, 42
LOSS_TOLERANCE = 0.02
TOKEN_GAP = 0.03  # trained-token counts further apart than this are called out


def slug(name: str) -> str:
    """'no packing, length-grouped' -> 'no-packing-length-grouped': how --rows and the folders name a row."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def trl_settings(variant: str, cuda: bool, liger: bool, cpu_bf16: bool = False) -> dict:
    """SFTConfig fields a variant sets on top of the shared ones. On a CPU with native bf16 (as lite-sft
    uses it there) TRL's fast runs get bf16 autocast too, which transformers allows with use_cpu=True."""
    bf16 = {"bf16": True} if cuda else {"bf16": True, "use_cpu": True} if cpu_bf16 else {"bf16": False}
    fast = {"gradient_checkpointing": False, **bf16, **({"use_liger_kernel": True} if cuda and liger else {})}
    return {"default": {}, "packed": {"packing": True, **fast}, "packed-mb1": {"packing": True, **fast},
            # transformers 5 replaced group_by_length with train_sampling_strategy.
            "grouped": {"train_sampling_strategy": "group_by_length", **fast}, "packed-gc": {"packing": True}}[variant]


def batching(workload: dict, micro: int | None) -> dict:
    """[micro-batch, accumulation] for unpacked and packed runs. A packed step takes as many full rows as
    B examples of the data's mean length fill, so both kinds of step see about the same tokens."""
    rows = max(1, round(BATCH_EXAMPLES * workload["length"]["mean"] / workload["max_seq_len"]))

    def split(per_step: int, m: int | None) -> list[int]:
        m = min(m or per_step, per_step)
        return [m, math.ceil(per_step / m)]

    # packed-mb1: TRL flattens a micro-batch of packed rows into one sequence (padding-free), so its
    # attention spans micro x max_seq_len positions; one row per forward pass avoids that.
    return {"unpacked": split(BATCH_EXAMPLES, micro), "packed": split(rows, micro), "packed_mb1": split(rows, 1),
            "packed_rows_per_step": rows}


# --- the runs ---------------------------------------------------------------------------------------

def lite_overrides(row: dict, workload: dict, batch: dict, quant: str, out: Path) -> dict:
    micro, accum = batch["packed" if row.get("data.packing", True) else "unpacked"]  # the same as TRL's
    paths = workload["paths"]
    return {"model.name_or_path": workload["model_dir"], "model.quant": quant,
            "lora.r": LORA["r"], "lora.alpha": LORA["alpha"], "lora.dropout": LORA["dropout"],
            "lora.target_modules": ["all-linear"],
            "data.path": paths["train_messages"], "data.validation_path": paths["validation_messages"],
            "data.max_seq_len": workload["max_seq_len"],
            "train.epochs": 1, "train.micro_batch_size": micro, "train.grad_accum": accum, "train.lr": LR,
            "train.schedule": "cosine", "train.warmup_ratio": WARMUP, "train.max_grad_norm": 1.0,
            "train.weight_decay": 0.0, "train.seed": SEED, "train.eval_every": 0, "train.save_every": 0,
            "train.log_every": 1, "output_dir": str(out), **row}


def warm_cache(specs: list[dict]) -> None:
    """Prepare each cached row's data once before timing, so the rows run warm (as a second run would)."""
    from lite_sft.config import load_config
    from lite_sft.tasks.causal_lm.data import prepare_data
    from lite_sft.model import load_tokenizer

    for spec in specs:
        cfg = load_config(None, spec["overrides"])
        if cfg.data.cache:
            tokenizer = load_tokenizer(cfg.model.name_or_path)
            prepare_data(cfg.data, tokenizer, seed=cfg.train.seed)  # as tune prepares it, template and all


def run(spec: dict, work: Path, threads: int) -> dict:
    """One run in a fresh process; its log goes to work/logs/. Errors come back as the row's `error`."""
    name = slug(spec["name"])
    (work / "logs").mkdir(exist_ok=True)
    spec_file = work / "logs" / f"{name}.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--worker", str(spec_file), "--threads", str(threads)],
                          capture_output=True, text=True, env=env)
    (work / "logs" / f"{name}.log").write_text(done.stdout + done.stderr)
    result = next((json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
    base = {"name": spec["name"], "side": spec["side"], "settings": spec.get("row", spec.get("sft", {})),
            "process_s": time.perf_counter() - started}
    if result is None:
        lines = [x for x in done.stderr.splitlines() if x.strip()]
        error = next((x for x in reversed(lines) if re.match(r"^[\w.]*(Error|Exception|Failed)\b", x)),
                     lines[-1] if lines else f"exit status {done.returncode}")
        return {**base, "error": error.strip()[:300]}
    return {**base, **result}


# --- judging ----------------------------------------------------------------------------------------

def loss_gap(run: dict, ref: dict) -> float | None:
    """Largest relative difference of validation and last-10% train loss, as a fraction of ref's."""
    gaps = [abs(run[k] - ref[k]) / abs(ref[k]) for k in ("val_loss", "tail_train_loss")
            if run.get(k) is not None and ref.get(k)]
    return max(gaps) if gaps else None


def judge(runs: list[dict], device: str, context: dict) -> dict:
    """Pick TRL best, mark VOID rows, add speed-ups, and check the targets. `context` holds the preset
    name, quant and micro-batch (the GPU targets are defined for particular setups)."""
    ok = [r for r in runs if not r.get("error")]
    default = next((r for r in ok if r["name"] == "TRL default"), None)
    agree = lambda r, ref: (g := loss_gap(r, ref)) is None or g <= LOSS_TOLERANCE  # noqa: E731
    trl = [r for r in ok if r["side"] == "trl" and r is not default and (default is None or agree(r, default))]
    best = max(trl, key=lambda r: r["examples_per_s"], default=None)
    for r in ok:
        refs = [default] if r["side"] == "trl" else [default, best]
        gaps = [g for ref in refs if ref is not None and ref is not r and (g := loss_gap(r, ref)) is not None]
        r["loss_gap"] = max(gaps) if gaps else None
        r["void"] = f"VOID: losses differ by {r['loss_gap']:.1%}" if gaps and max(gaps) > LOSS_TOLERANCE else None
        for label, ref in (("trl_default", default), ("trl_best", best)):
            r[f"speedup_vs_{label}"] = r["examples_per_s"] / ref["examples_per_s"] if ref else None
            r[f"token_speedup_vs_{label}"] = r["trained_tokens_per_s"] / ref["trained_tokens_per_s"] if ref else None
    lite = next((r for r in ok if r["name"] == "lite-sft"), None)
    return {"trl_default": default and default["name"], "trl_best": best and best["name"],
            "targets": targets(lite, default, best, device, context)}


def targets(lite: dict | None, default: dict | None, best: dict | None, device: str, context: dict) -> list[dict]:
    def check(name: str, ready: bool, met: bool | None, detail: str) -> dict:
        if not ready:
            return {"target": name, "met": None, "detail": detail}
        return {"target": name, "met": bool(met), "detail": detail}

    void = lambda: f"; {lite['void']}" if lite["void"] else ""  # noqa: E731
    missing = "needs the lite-sft row and TRL default"
    if device != "cuda":
        out = [check(">= 2x TRL default examples/s at equal loss", bool(lite and default),
                     lite and default and lite["speedup_vs_trl_default"] >= 2 and not lite["void"],
                     f"{lite['speedup_vs_trl_default']:.2f}x{void()}" if lite and default else missing)]
        out.append(check(">= 1.3x TRL best examples/s at equal loss", bool(lite and best),
                         lite and best and lite["speedup_vs_trl_best"] >= 1.3 and not lite["void"],
                         f"{lite['speedup_vs_trl_best']:.2f}x vs {best['name']}{void()}" if lite and best
                         else "needs the lite-sft row and a TRL variant"))
        return out
    qlora = context["quant"] == "4bit"
    here = context["model"] == "qwen0.5b" and qlora
    ready = bool(here and lite and default)
    out = [check(">= 2x TRL default trained tokens/s at <= 0.5x its peak memory (qwen0.5b QLoRA, seq 2048)", ready,
                 ready and lite["token_speedup_vs_trl_default"] >= 2 and not lite["void"]
                 and lite["peak_reserved_bytes"] <= 0.5 * default["peak_reserved_bytes"],
                 f"{lite['token_speedup_vs_trl_default']:.2f}x tokens/s, "
                 f"{lite['peak_reserved_bytes'] / default['peak_reserved_bytes']:.2f}x peak reserved{void()}" if ready
                 else "run with --model qwen0.5b --quant 4bit")]
    here = context["model"] == "llama8b" and qlora and context["micro_batch"] == 1
    ready = bool(here and lite)
    out.append(check("llama8b QLoRA, seq 2048, micro-batch 1 under 7 GiB peak", ready,
                     ready and lite["peak_reserved_bytes"] < 7 * 2**30,
                     f"{lite['peak_reserved_bytes'] / 2**30:.2f} GiB reserved" if ready
                     else "run with --model llama8b --quant 4bit --micro-batch 1"))
    return out


def plan_errors(runs: list[dict], device: str) -> str:
    """Compare lite_sft.plan.estimate (when it exists) with each lite-sft row's measured peak."""
    try:
        from lite_sft import plan

        estimate = plan.estimate
    except (ImportError, AttributeError):
        return "lite_sft.plan.estimate not available: skipped"
    from lite_sft.config import load_config

    measured_key = "peak_allocated_bytes" if device == "cuda" else "working_bytes"
    for r in runs:
        if r["side"] != "lite-sft" or r.get("error"):
            continue
        try:
            est = estimate(load_config(None, r["overrides"]), micro_batch_size=None, device=device).total_bytes
        except Exception as err:  # the planner is being written alongside; one failure must not end the table
            r["plan_error"] = f"{type(err).__name__}: {err}"
            continue
        r["plan_estimate_bytes"] = est
        r["plan_relative_error"] = (est - r[measured_key]) / r[measured_key]
    return f"estimate vs {measured_key}"


# --- report -----------------------------------------------------------------------------------------

def table(runs: list[dict], device: str, verdict: dict) -> str:
    mib = lambda b: f"{b / 2**20:,.0f}" if b is not None else "-"  # noqa: E731
    num = lambda v, f, unit="": format(v, f) + unit if v is not None else "-"  # noqa: E731
    peak = ("peak MiB  +MiB" if device != "cuda" else "alloc MiB  rsv MiB")
    lines = [f"{'run':<28} {'ex/s':>7} {'tok/s':>8} {'trained':>8} {'pass s':>7} {'setup s':>7} {peak:>17} "
             f"{'loss 1st':>8} {'last':>7} {'last10%':>7} {'val':>7} {'vs def':>6} {'vs best':>7}  note"]
    for r in runs:
        label = r["name"] + (" [best]" if r["name"] == verdict["trl_best"] else "")
        if r.get("error"):
            lines.append(f"{label:<28} ERROR: {r['error']}")
            continue
        mem = (f"{mib(r['peak_rss_bytes']):>9} {mib(r['working_bytes']):>7}" if device != "cuda"
               else f"{mib(r['peak_allocated_bytes']):>9} {mib(r['peak_reserved_bytes']):>7}")
        notes = [n for n in [r.get("void"), *r.get("notes", [])] if n]
        if r.get("plan_relative_error") is not None:
            notes.append(f"plan {r['plan_relative_error']:+.0%}")
        elif r.get("plan_error"):
            notes.append(f"plan failed: {r['plan_error'][:80]}")
        lines.append(f"{label:<28} {r['examples_per_s']:7.2f} {r['trained_tokens_per_s']:8.0f} {r['trained_tokens']:8d} "
                     f"{r['wall_s']:7.1f} {r['setup_s']:7.1f} {mem:>17} {num(r['first_train_loss'], '8.4f')} "
                     f"{num(r['final_train_loss'], '7.4f')} {num(r['tail_train_loss'], '7.4f')} "
                     f"{num(r['val_loss'], '7.4f')} {num(r['speedup_vs_trl_default'], '.2f', 'x'):>6} "
                     f"{num(r['speedup_vs_trl_best'], '.2f', 'x'):>7}  {'; '.join(notes)}")
    lines.append("")
    for t in verdict["targets"]:
        state = {True: "met", False: "NOT MET", None: "not checked"}[t["met"]]
        lines.append(f"target {t['target']}: {state} ({t['detail']})")
    return "\n".join(lines)


def token_notes(runs: list[dict], default_name: str | None) -> list[str]:
    ref = next((r for r in runs if r["name"] == default_name), None)
    notes = []
    for r in runs:
        if ref and not r.get("error") and r is not ref and abs(r["trained_tokens"] - ref["trained_tokens"]) > TOKEN_GAP * ref["trained_tokens"]:
            notes.append(f"{r['name']} trained on {r['trained_tokens']} tokens, TRL default on {ref['trained_tokens']}")
            r.setdefault("notes", []).append("trained tokens differ")
    return notes


def device_info(cuda: bool, threads: int) -> dict:
    import platform

    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), None) if Path("/proc/cpuinfo").exists() else None
    info = {"type": "cuda" if cuda else "cpu", "cpu": cpu or platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "threads": threads}
    if cuda:
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    gpu_memory_bytes=torch.cuda.get_device_properties(0).total_memory)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[p for p in PRESETS if p != "quick"], help="default: llama35m on CPU, qwen0.5b on CUDA")
    parser.add_argument("--quick", action="store_true", help="a tiny model and data set (about 2 minutes)")
    parser.add_argument("--quant", choices=["none", "4bit"], help="backbone quantisation, both sides (default: none on CPU, 4bit on CUDA)")
    parser.add_argument("--rows", default="all", help="lite-sft rows by slug, comma-separated: all, none, or from "
                        + ", ".join(map(slug, LITE_ROWS)))
    parser.add_argument("--trl", default="default,packed,packed-mb1", help=f"TRL runs, from {', '.join(TRL_RUNS)}")
    parser.add_argument("--micro-batch", type=int, help="rows per forward pass on both sides (default: a whole step)")
    parser.add_argument("--examples", type=int, help="training examples (default: the preset's)")
    parser.add_argument("--val-examples", type=int, help="validation examples (default: the preset's)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count()))
    parser.add_argument("--work-dir", help="model, data and run folders (default: a temporary folder)")
    parser.add_argument("--no-save", action="store_true", help="print the JSON line without saving it (tests)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(json.loads(Path(args.worker).read_text()), args.threads)

    import torch

    cuda = torch.cuda.is_available()
    args.model = "quick" if args.quick else args.model or ("qwen0.5b" if cuda else "llama35m")
    args.quant = args.quant or ("4bit" if cuda else "none")
    by_slug = {slug(name): name for name in LITE_ROWS}
    asked = {"all": list(by_slug), "none": []}.get(args.rows, [r.strip() for r in args.rows.split(",") if r.strip()])
    variants = [v.strip() for v in args.trl.split(",") if v.strip() and v.strip() != "none"]
    unknown = [r for r in asked if slug(r) not in by_slug] + [v for v in variants if v not in TRL_RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; lite-sft rows: {', '.join(by_slug)}; TRL runs: {', '.join(TRL_RUNS)}")
    rows = [by_slug[slug(r)] for r in asked]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lite-sft-vs-trl-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    # Everything either side caches goes into the work folder, so a run never reads another's cache.
    os.environ.update(LITE_SFT_HOME=str(work / "home"), HF_DATASETS_CACHE=str(work / "hf-datasets"),
                      HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(args.threads)
    workload = prepare_workload(args.model, args.examples, args.val_examples, work, cuda)
    batch = batching(workload, args.micro_batch)
    liger = importlib.util.find_spec("liger_kernel") is not None
    from lite_sft.model import cpu_has_fast_bf16

    cpu_bf16 = not cuda and cpu_has_fast_bf16()
    if args.quick and args.rows == "all":
        rows.remove("torch.compile")  # its compile alone takes a minute on a CPU
        print("--quick: leaving out the torch.compile row (ask for it with --rows)", file=sys.stderr)
    common = {"workload": workload, "batch": batch, "quant": args.quant, "cuda": cuda, "lr": LR, "warmup": WARMUP,
              "seed": SEED}
    specs = [{**common, "side": "trl", "name": f"TRL {v}", "sft": trl_settings(v, cuda, liger, cpu_bf16), "variant": v,
              "micro_accum": batch["packed_mb1" if v == "packed-mb1" else "packed" if "packed" in v else "unpacked"],
              "out": str(work / "runs" / f"trl-{v}")} for v in variants]
    lite = [{**common, "side": "lite-sft", "name": name, "row": LITE_ROWS[name],
             "overrides": lite_overrides(LITE_ROWS[name], workload, batch, args.quant,
                                         work / "runs" / slug(name))} for name in rows]
    length = workload["length"]
    header = (f"{args.model}: {workload['params'] / 1e6:.1f}M parameters, vocab {workload['vocab']}, quant {args.quant}; "
              f"{workload['train_examples']} train / {workload['validation_examples']} validation examples, lengths "
              f"p50 {length['p50']} p90 {length['p90']} p99 {length['p99']} max {length['max']} mean {length['mean']:.0f} "
              f"(limit {workload['max_seq_len']}); a step = {BATCH_EXAMPLES} examples or "
              f"{batch['packed_rows_per_step']} packed rows; {'CUDA' if cuda else f'CPU, {args.threads} threads'}")
    print(f"{header}; work folder {work}", file=sys.stderr)
    warm_cache(lite)
    runs = []
    for spec in specs + lite:
        print(f"running {spec['name']} ...", file=sys.stderr)
        result = run(spec, work, args.threads)
        if result.get("error") and spec["side"] == "trl" and not cuda and "bf16" not in spec["sft"]:
            # TRL turns bf16 on by default; where that fails on a CPU, run it as a user then would.
            failed = result["error"]
            result = run({**spec, "sft": {**spec["sft"], "bf16": False}}, work, args.threads)
            result.setdefault("notes", []).append(f"TRL's default bf16 failed on CPU ({failed}); ran in fp32")
        runs.append(result)
    device = "cuda" if cuda else "cpu"
    context = {"model": args.model, "quant": args.quant, "micro_batch": args.micro_batch}
    verdict = judge(runs, device, context)
    notes = token_notes(runs, verdict["trl_default"])
    plan_note = plan_errors(runs, device)
    import datasets
    import trl

    from lite_sft import __version__
    from lite_sft.report import versions

    result = {
        "benchmark": "train_vs_trl",
        "command": shlex.join([f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] * ("OMP_NUM_THREADS" in os.environ)
                              + ["python", "benchmarks/train_vs_trl.py", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(cuda, args.threads),
        "versions": {**versions(), "trl": trl.__version__, "datasets": datasets.__version__, "lite_sft": __version__},
        "workload": {k: v for k, v in workload.items() if k not in ("paths", "model_dir")},
        "settings": {"lora": LORA, "lr": LR, "schedule": "cosine", "warmup_ratio": WARMUP, "max_grad_norm": 1.0,
                     "weight_decay": 0.0, "seed": SEED, "epochs": 1, "quant": args.quant,
                     "examples_per_step": BATCH_EXAMPLES, **batch, "loss_tolerance": LOSS_TOLERANCE},
        "runs": runs,
        **verdict,
        "notes": notes + [f"plan: {plan_note}"],
    }
    # The saved result names the work folder $WORK: a results file carries no machine's paths.
    result = json.loads(json.dumps(result).replace(json.dumps(str(work))[1:-1], "$WORK"))
    print(header)
    print(table(runs, device, verdict))
    for note in result["notes"]:
        print(f"note: {note}")
    if args.no_save:
        print(json.dumps(result))
    else:
        save_result("train_vs_trl", result)


if __name__ == "__main__":
    main()
