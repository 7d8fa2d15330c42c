"""seq2seq with LoRA on tiny random T5 and BART: held-out BLEU before and after tuning, training time and tokens/s.

    python benchmarks/seq2seq.py                  # T5 and BART, d_model 128, 2+2 layers
    python benchmarks/seq2seq.py --quick          # a smoke run in seconds (tests/test_bench_seq2seq.py)

Each model is built from its config with seeded random weights and a word-level tokenizer made here with
its family's conventions (T5: <pad> 0 starts decoding, </s> 1 ends every text; BART: texts as <s> ... </s>,
decoding starts at </s>). Two choices make a random base one that LoRA alone can steer, and say nothing
about lite-sft: no dropout (with T5's default 0.1 a random T5 stalled near 30-50 held-out BLEU where it
reaches 80 without), and
BART's weights drawn with std 1/sqrt(d_model), as T5 draws them, not BART's 0.02 (chosen for 1024-wide
layers: at 128 wide it leaves every attention output far below the residual stream, and the decoder
never hears the encoder).

The task is generated: count from a number word up or down to a digit, in English or in French:

    count : three 7               -> three four five six seven
    translate : eight 5           -> huit sept six cinq

Every (language, start, end) with at least four words is a source; a seeded fifth of them is held out
and never trained on, so the held-out score measures putting known parts together, not recall.

Training is `lite-sft tune --task seq2seq` in this process (the library's setup / fit / save); the held-out
pairs, never trained on, are its validation data, scored with greedy generation before the first step (LoRA
starts as the identity, so that is the random base) and after the last. tokens/s counts source and target
tokens and excludes the evaluations. Each run is then exported as `lite-sft export RUN --quantize int8` does
(merge, ONNX encoder and decoder, int8), with its parity gates' figures, and the ONNX models generate from
the held-out sources through lite-sft's own server backend (serve/backends/seq2seq.py, greedy, the export's
max_new_tokens and stop ids), scored the same way (--no-export skips it).
Prints a table, then one JSON line, and saves benchmarks/results/seq2seq-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workload import save_result  # noqa: E402  (beside this script)

DIGITS = "zero one two three four five six seven eight nine".split()
FRENCH = "zéro un deux trois quatre cinq six sept huit neuf".split()
INSTRUCTIONS = ("count", "translate")  # count in English, count in French
ARTEFACTS = ("onnx", "onnx-int8")  # what `lite-sft export --quantize int8` writes besides merged/
# name -> (d_model, layers in encoder and in decoder, heads, feed-forward width)
SIZES = {"full": (128, 2, 4, 512), "quick": (32, 1, 2, 64)}


def all_pairs() -> list[dict]:
    """Every source of the task and its target: count (in English) or translate (count in French) from one
    number word to another, up or down, at least four words."""
    pairs = []
    for instruction in INSTRUCTIONS:
        words = DIGITS if instruction == "count" else FRENCH
        for first in range(10):
            for last in range(10):
                if abs(last - first) >= 3:
                    step = 1 if last > first else -1
                    pairs.append({"source": f"{instruction} : {DIGITS[first]} {last}",
                                  "target": " ".join(words[i] for i in range(first, last + step, step))})
    return pairs


def split_pairs(held_out: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """A seeded split of the sources: the held-out ones never appear in training."""
    pairs = all_pairs()
    random.Random(seed).shuffle(pairs)
    n = max(1, round(held_out * len(pairs)))
    return pairs[n:], pairs[:n]


def write_jsonl(path: Path, pairs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    return path


def word_tokenizer(family: str):
    """One token a word; the special tokens, their ids and the texts' framing of `family` (t5 or bart)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"] if family == "t5" else ["<s>", "<pad>", "</s>", "<unk>"]
    words = sorted(set(DIGITS + FRENCH + list(INSTRUCTIONS) + [":"] + [str(i) for i in range(10)]))
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
    eos = ("</s>", vocab["</s>"])
    if family == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[eos])
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), eos])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def build_model(family: str, size: str, path: Path) -> int:
    """Save a seeded random `family` model of `size` and its tokenizer into `path`; returns its parameter count."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    d_model, layers, heads, ffn = SIZES[size]
    tokenizer = word_tokenizer(family)
    torch.manual_seed(0)
    if family == "t5":
        model = T5ForConditionalGeneration(T5Config(
            vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // heads, d_ff=ffn, num_layers=layers,
            num_heads=heads, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.0))
    else:
        model = BartForConditionalGeneration(BartConfig(
            vocab_size=len(tokenizer), d_model=d_model, encoder_layers=layers, decoder_layers=layers,
            encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
            max_position_embeddings=64, dropout=0.0, init_std=d_model ** -0.5, bos_token_id=0, pad_token_id=1,
            eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model.num_parameters()


def tune_and_score(family: str, args, work: Path, held_out: list[dict]) -> dict:
    """Build, tune and score one model; the row of the table."""
    from lite_sft.config import load_config
    from lite_sft.train import evaluate, fit, save, setup

    base = work / f"{family}-base"
    params = build_model(family, args.size, base)
    cfg = load_config(None, {
        "task.name": "seq2seq", "model.name_or_path": str(base), "data.path": str(work / "train.jsonl"),
        "data.validation_path": str(work / "held_out.jsonl"), "data.max_seq_len": 16, "task.max_target_len": 12,
        "task.max_new_tokens": 12, "lora.r": args.lora_r, "lora.alpha": 2 * args.lora_r, "lora.dropout": 0.0,
        "train.max_steps": args.steps, "train.micro_batch_size": args.batch, "train.lr": args.lr,
        "train.warmup_ratio": 0.05, "train.eval_every": 0, "train.save_every": 0, "train.log_every": 10,
        "train.seed": 0, "output_dir": str(work / f"{family}-run")})
    started = time.perf_counter()
    run = setup(cfg, overwrite=True)
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    before = evaluate(run)
    try:
        stopped = fit(run)
    finally:
        run.log.close()
    summary = save(run, stopped)
    after = summary["final_evaluation"]
    exported = None
    if args.export:
        exported = export_and_score(work / f"{family}-run", work / f"{family}-export", held_out, args.threads)
    return {"model": family, "params": params, "trainable_params": trainable, "steps": summary["steps"],
            "train_pairs": summary["train_examples"], "held_out_pairs": summary["validation_examples"],
            "train_s": summary["wall_s"], "total_s": time.perf_counter() - started,
            "tokens_per_s": summary["tokens_per_s"], "target_tokens_per_s": summary["target_tokens_per_s"],
            "before": scores(before), "after": scores(after), "samples": after["samples"][:3], "export": exported}


def export_and_score(run_dir: Path, out: Path, held_out: list[dict], threads: int) -> dict:
    """`lite-sft export --quantize int8` of the run (its parity gates' figures), then each ONNX model's greedy
    output on the held-out sources, scored as the run's evaluation scores PyTorch's."""
    from lite_sft.export.pipeline import export_run
    from lite_sft.options import ExportOptions

    started = time.perf_counter()
    report = export_run(run_dir, out, ExportOptions(quantize="int8", overwrite=True), say=lambda _: None)
    export_s = time.perf_counter() - started
    gates = [{"stage": g["stage"], "precision": g["precision"], "max_abs_diff": g["max_abs_diff"],
              "greedy_agreement": g["greedy_agreement"], "passed": g["passed"],
              "size_bytes": g.get("size_bytes_after")} for g in report["gates"]]
    return {"export_s": export_s, "parity_examples": report["examples"]["count"], "gates": gates,
            **{folder: onnx_scores(out / folder, held_out, threads) for folder in ARTEFACTS}}


def onnx_scores(folder: Path, held_out: list[dict], threads: int) -> dict:
    from transformers import GenerationConfig

    from lite_sft.serve.generate import SamplingParams, generate_ids
    from lite_sft.serve.backends.factory import load_backend
    from lite_sft.serve.backends.folder import stop_ids
    from lite_sft.tasks.metrics import bleu

    backend, tokenizer = load_backend(folder, "cpu", threads=threads)
    gen = GenerationConfig.from_pretrained(folder)
    params = SamplingParams(gen.max_new_tokens or gen.max_length,
                            stop_ids=stop_ids(folder, tokenizer))
    sources = [tokenizer(p["source"])["input_ids"] for p in held_out]
    started = time.perf_counter()
    predictions = [p.strip() for p in tokenizer.batch_decode(generate_ids(backend, sources, params),
                                                             skip_special_tokens=True)]
    seconds = time.perf_counter() - started
    references = [p["target"] for p in held_out]
    return {"bleu": bleu(predictions, references)["bleu"],
            "exact_match": sum(p.split() == r.split() for p, r in zip(predictions, references)) / len(references),
            "generate_s": seconds}


def export_versions(exported: bool) -> dict:
    if not exported:
        return {}
    import onnxruntime
    import onnxscript

    # torch.onnx (dynamo) writes the graphs through onnxscript; onnxruntime runs and quantises them.
    return {"onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__}


def scores(figures: dict) -> dict:
    return {k: figures[k] for k in ("val_loss", "bleu", "rouge1", "rouge2", "rougeL", "exact_match")}


def table(rows: list[dict]) -> str:
    lines = ["model  params  trainable  steps  train s  tokens/s  target tok/s | held-out  before -> after",
             "-" * 100]
    for r in rows:
        b, a = r["before"], r["after"]
        head = (f"{r['model']:<5} {r['params'] / 1e6:6.2f}M {r['trainable_params'] / 1e6:9.3f}M {r['steps']:6d} "
                f"{r['train_s']:8.1f} {r['tokens_per_s']:9.0f} {r['target_tokens_per_s']:13.0f} |")
        for i, (name, key, fmt) in enumerate((("BLEU", "bleu", ".1f"), ("ROUGE-L", "rougeL", ".3f"),
                                              ("exact match", "exact_match", ".1%"), ("loss", "val_loss", ".3f"))):
            lines.append(f"{head if i == 0 else ' ' * len(head)} {name:<11} {b[key]:{fmt}} -> {a[key]:{fmt}}")
    exported = [r for r in rows if r["export"]]
    if exported:
        lines += ["", "model  export s | gate    precision  max|dlogit|  greedy agreement  MiB  "
                      "| held-out BLEU, exact match", "-" * 96]
        # The merge line scores the tuned PyTorch model (the training run's last evaluation); the others their ONNX.
        for r in exported:
            e = r["export"]
            scored = {"merge": (r["after"]["bleu"], r["after"]["exact_match"]),
                      **{g["stage"]: (e[f]["bleu"], e[f]["exact_match"]) for g, f in zip(e["gates"][1:], ARTEFACTS)}}
            for i, g in enumerate(e["gates"]):
                head = f"{r['model']:<6} {e['export_s']:8.1f} |" if i == 0 else " " * 16 + "|"
                size = f"{g['size_bytes'] / 2**20:.1f}" if g["size_bytes"] else ""
                bleu_, exact = scored[g["stage"]]
                lines.append(f"{head} {g['stage']:<7} {g['precision']:<10} {g['max_abs_diff']:11.2e} "
                             f"{g['greedy_agreement']:17.1%} {size:>4} | {bleu_:.1f}, {exact:.1%}"
                             + ("" if g["passed"] else "  FAIL"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1+1-layer 32-wide models, 40 steps: a smoke run")
    parser.add_argument("--models", default="t5,bart", help="comma-separated: t5, bart")
    parser.add_argument("--steps", type=int, help="optimiser steps (default 1000; --quick 40)")
    parser.add_argument("--batch", type=int, default=16, help="pairs a step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--held-out", type=float, default=0.2, help="fraction of the sources held out")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the models are too small to split)")
    parser.add_argument("--work", type=Path, help="folder for models and runs (default: a temporary one)")
    parser.add_argument("--export", action=argparse.BooleanOptionalAction, default=True,
                        help="export each run (merge, ONNX, int8) and score the ONNX models too")
    parser.add_argument("--no-save", action="store_true", help="print, but write nothing under benchmarks/results")
    args = parser.parse_args(argv)
    args.size = "quick" if args.quick else "full"
    args.steps = args.steps or (40 if args.quick else 1000)

    import torch

    from lite_sft.report import versions

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        train, held_out = split_pairs(args.held_out)
        write_jsonl(work / "train.jsonl", train)
        write_jsonl(work / "held_out.jsonl", held_out)
        rows = [tune_and_score(family, args, work, held_out) for family in args.models.split(",")]
    result = {
        "benchmark": "seq2seq",
        "command": " ".join([f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] * ("OMP_NUM_THREADS" in os.environ)
                            + ["python", "benchmarks/seq2seq.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": {"type": "cpu", "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                   "threads": args.threads, "cuda": torch.cuda.is_available()},
        "versions": {**versions(), **export_versions(args.export)},
        "settings": {k: getattr(args, k) for k in ("size", "steps", "batch", "lr", "lora_r", "held_out")},
        "task": "count (English) or translate (count in French) from a number word to a digit, up or down; "
                "held-out sources never trained on; greedy, 12 new tokens at most",
        "rows": rows,
    }
    print(table(rows))
    if args.no_save:
        print(json.dumps(result))
    else:
        save_result("seq2seq", result)
    return result


if __name__ == "__main__":
    main()
