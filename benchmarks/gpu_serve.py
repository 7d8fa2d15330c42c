"""Serving speed on a GPU for the three kinds of model lite-sft serves: a decoder (ONNX fp16 and int4 on the CUDA
provider against PyTorch bf16), an encoder classifier and an encoder-decoder, each through the serving code.

    python benchmarks/gpu_serve.py --kind decoder --device cuda                # Qwen2.5-0.5B's dimensions
    python benchmarks/gpu_serve.py --kind encoder --device cuda                # all-MiniLM-L6-v2's dimensions
    python benchmarks/gpu_serve.py --kind seq2seq --device cuda                # seq2seq.py's 128-wide T5
    OMP_NUM_THREADS=1 python benchmarks/gpu_serve.py --kind decoder --device cpu --quick   # a CPU dry run

Every model is built from a config with seeded random weights (the arithmetic, so the speed, does not depend on
the weights' values), tuned for one LoRA step so the adapter is real, and exported as `lite-sft export` does,
parity gates included. The decoder goes through onnxruntime-genai's model builder (`lite-sft export` picks it
for a Llama): on a GPU `--dtype fp16 --quantize int4`, the builder's CUDA graphs (fp16, and int4 MatMulNBits
built for CUDA from it); on a CPU `--quantize int4` (fp32 and the CPU int4). Where export refuses int4 or its
gate fails, the decoder is exported without it and the int4 row says why. The others export in fp32 through
torch.onnx. The decoder is a Llama with Qwen2.5-0.5B's dimensions (hidden 896, 24 layers, 14 heads, 2 key-value
heads, MLP 4864, vocabulary 151,936; Llama has no q/k/v bias, Qwen2 has: a rounding error in time); the encoder
a BERT with all-MiniLM-L6-v2's (384 wide, 6 layers, vocabulary 30,522), as a 2-label classifier.

  decoder   lite_sft.serve.bench.bench on the export: torch-merged (bf16 on CUDA), onnx-fp16 (fp32 on CPU) and
            onnx-int4
  encoder   the same on the classifier's export: torch-merged and onnx-fp32, latency per batch and sequences/s
  seq2seq   `lite-sft bench` refuses seq2seq, so its generation loop is timed here with bench's own per-run
            measure (bench_backend: TTFT, TPOT, decode tokens/s) on merged/ (torch) and onnx/ (the export's
            encoder and decoder graphs under serve/backends/seq2seq.py, cache bound on the device under CUDA)

`--work` keeps the models and exports, so a second run only measures. Prints a table, then one JSON line, and
saves benchmarks/results/serve_<kind>_<device>-<time>.json with the device, driver, versions and command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from workload import bpe_tokenizer, one_step_run, random_llama, save_result, write_chat_data  # beside this script

# hidden, layers, intermediate, heads, key-value heads, vocabulary (workload.random_llama's order)
DECODERS = {"0.5B": (896, 24, 4864, 14, 2, 151936), "10M": (256, 4, 688, 4, 4, 16000)}
ENCODERS = {"minilm": (384, 6, 1536, 12, 30522), "tiny": (32, 2, 64, 2, 2000)}  # hidden, layers, MLP, heads, vocab
SHAPES = {  # prompt (encoder: sequence) lengths, output lengths, batch sizes, runs, warm-ups
    "full": {"decoder": ([128, 1024], [64], [1, 8], 5, 1), "encoder": ([64, 256], [2], [1, 32], 20, 3),
             "seq2seq": ([16], [32], [1, 16], 10, 2)},
    "quick": {"decoder": ([16], [8], [1], 2, 1), "encoder": ([16], [2], [1, 4], 3, 1),
              "seq2seq": ([8], [8], [1], 2, 1)},
}


def decoder_export(work: Path, size: str, cuda: bool) -> tuple[Path, str | None]:
    """(OUT with onnx/ and, where export made and gated it, onnx-int4/; why there is no onnx-int4/, or None)."""
    from lite_sft.export import ExportError
    from lite_sft.export.pipeline import ParityFailed, export_run
    from lite_sft.options import ExportOptions

    out, missing = work / f"decoder-{size}-export", work / f"decoder-{size}-no-int4.txt"
    if (out / "onnx" / "model.onnx").is_file():
        return out, missing.read_text() if missing.is_file() else None
    base = work / f"decoder-{size}-base"
    params = random_llama(DECODERS[size], base, bpe_tokenizer(), max_positions=2048)
    print(f"decoder: {params / 1e6:.0f}M parameters", file=sys.stderr)
    run = one_step_run(base, write_chat_data(work / "chats.jsonl"), work / f"decoder-{size}-run")
    dtype = "fp16" if cuda else "fp32"
    try:
        export_run(run, out, ExportOptions(dtype=dtype, quantize="int4", overwrite=True), say=print)
        return out, None
    except (ExportError, ParityFailed) as err:
        why = " ".join(str(err).split())
        print(f"decoder: no int4 ({why}); exporting {dtype} alone", file=sys.stderr)
    export_run(run, out, ExportOptions(dtype=dtype, overwrite=True), say=print)
    missing.write_text(why)
    return out, why


def word_tokenizer(vocab_size: int):
    """A BERT-style word-level tokenizer ([CLS] text [SEP]) over vocab_size synthetic words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from train_vs_trl_workload import word_types
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate(specials + word_types(vocab_size - len(specials)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)


def encoder_export(work: Path, size: str) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    from lite_sft.config import load_config
    from lite_sft.export.pipeline import export_run
    from lite_sft.options import ExportOptions
    from lite_sft.train import tune

    out = work / f"encoder-{size}-export"
    if (out / "onnx" / "model.onnx").is_file():
        return out
    hidden, layers, mlp, heads, vocab = ENCODERS[size]
    tokenizer, base = word_tokenizer(vocab), work / f"encoder-{size}-base"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=mlp,
                         num_attention_heads=heads, max_position_embeddings=512)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    rng, words = random.Random(0), [w for w in tokenizer.get_vocab() if w.isalpha()]
    data = work / "sentences.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=rng.randint(4, 30))),
                                        "label": i % 2}) + "\n" for i in range(64)))
    run = work / f"encoder-{size}-run"
    tune(load_config(None, {
        "task.name": "seq-cls", "model.name_or_path": str(base), "model.dtype": "float32", "data.path": str(data),
        "data.validation_fraction": 0.25, "data.max_seq_len": 64, "lora.r": 8, "lora.alpha": 16, "lora.dropout": 0.0,
        "train.max_steps": 1, "train.micro_batch_size": 8, "train.eval_every": 0, "train.save_every": 0,
        "output_dir": str(run)}), overwrite=True)
    export_run(run, out, ExportOptions(overwrite=True), say=print)
    return out


def seq2seq_export(work: Path, size: str) -> Path:
    from seq2seq import build_model, split_pairs, write_jsonl  # beside this script

    from lite_sft.config import load_config
    from lite_sft.export.pipeline import export_run
    from lite_sft.options import ExportOptions
    from lite_sft.train import tune

    out = work / f"t5-{size}-export"
    if (out / "onnx" / "encoder_model.onnx").is_file():
        return out
    base = work / f"t5-{size}-base"
    build_model("t5", size, base)
    train, held_out = split_pairs(0.2)
    run = work / f"t5-{size}-run"
    tune(load_config(None, {
        "task.name": "seq2seq", "model.name_or_path": str(base), "data.path": str(write_jsonl(work / "pairs.jsonl", train)),
        "data.validation_path": str(write_jsonl(work / "held_out.jsonl", held_out)), "data.max_seq_len": 16,
        "task.max_target_len": 12, "task.max_new_tokens": 12, "lora.r": 8, "lora.alpha": 16, "lora.dropout": 0.0,
        "train.max_steps": 2, "train.micro_batch_size": 16, "train.eval_every": 0, "train.save_every": 0,
        "output_dir": str(run)}), overwrite=True)
    export_run(run, out, ExportOptions(overwrite=True), say=print)
    return out


def seq2seq_report(export: Path, opts, device: str) -> dict:
    """bench()'s report shape for an encoder-decoder: its generation loop timed on merged/ and onnx/."""
    import time

    import torch

    from lite_sft.serve.bench import bench_backend
    from lite_sft.serve.backends.factory import load_backend

    backends = []
    for name, folder in (("torch-merged", export / "merged"), ("onnx-fp32", export / "onnx")):
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        backend, tokenizer = load_backend(folder, device, opts.threads)
        load_s = time.perf_counter() - start
        rows = bench_backend(backend, opts, len(tokenizer))
        peak = {"peak_gpu_allocated_bytes": torch.cuda.max_memory_allocated()} if device == "cuda" else {}
        backends.append({"backend": name, "source": str(folder), "provider": backend.provider,
                         "precision": backend.precision, "load_s": round(load_s, 3), "rows": rows, **peak})
        del backend
    return {"task": "seq2seq", "path": str(export), "backends": backends}


def environment(device: str) -> dict:
    """The device (GPU name and driver from nvidia-smi) and the versions every figure depends on."""
    import importlib.metadata as meta

    import torch

    info = {"type": device, "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads()}
    if device == "cuda":
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True)
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda, nvidia_smi=smi.stdout.strip() or None)
    names = ("torch", "transformers", "peft", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "onnxruntime-gpu",
             "onnxruntime-genai-cuda", "numpy")
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = meta.version(name)
        except meta.PackageNotFoundError:
            pass
    return {"device": info, "versions": versions}


def table(report: dict) -> str:
    lines = [f"{'backend':<14} {'provider':<24} {'prec':<5} {'batch':>5} {'len':>5} {'out':>4}  "
             f"{'ttft/lat ms p50':>15} {'tpot ms p50':>11} {'tok/s or seq/s p50':>18}"]
    for b in report["backends"]:
        if b.get("skip"):
            lines.append(f"{b['backend']:<14} skipped: {b['skip']}")
            continue
        for r in b["rows"]:
            if r.get("skip"):
                continue
            if "latency_ms" in r:  # an encoder classifier
                cells = (r["seq_len"], "", r["latency_ms"]["p50"], None, r["seq_s"]["p50"])
            else:
                cells = (r["prompt_len"], r["output_len"], r["ttft_ms"]["p50"], r["tpot_ms"]["p50"],
                         r["decode_tok_s"]["p50"])
            length, out, first, tpot, rate = cells
            lines.append(f"{b['backend']:<14} {b['provider']:<24} {b['precision']:<5} {r['batch']:>5} {length:>5} "
                         f"{out:>4}  {first:15.2f} {'' if tpot is None else f'{tpot:.2f}':>11} {rate:18.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=["decoder", "encoder", "seq2seq"], required=True)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny models and one short shape: a dry run")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 1),
                        help="CPU threads for torch and onnxruntime")
    parser.add_argument("--work", type=Path, help="folder for the models, runs and exports (default: a temporary one)")
    args = parser.parse_args(argv)
    import torch

    from lite_sft.serve.bench import bench
    from lite_sft.options import BenchOptions

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU")
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    prompt_lens, output_lens, batches, runs, warmup = SHAPES["quick" if args.quick else "full"][args.kind]
    opts = BenchOptions(prompt_lens, output_lens, batches, runs, warmup, args.device, args.threads)
    with tempfile.TemporaryDirectory(prefix="gpu-serve-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        if args.kind == "decoder":
            export, no_int4 = decoder_export(work, "10M" if args.quick else "0.5B", cuda)
            opts.backends = ["torch-merged", "onnx-fp16" if cuda else "onnx-fp32", "onnx-int4"]
            report = bench(export, opts, say=lambda line: print(line, file=sys.stderr))
            for b in report["backends"]:
                if b["backend"] == "onnx-int4" and b.get("skip") and no_int4:
                    b["skip"] = f"not exported: {no_int4}"
        elif args.kind == "encoder":
            opts.backends = ["torch-merged", "onnx-fp32"]
            report = bench(encoder_export(work, "tiny" if args.quick else "minilm"), opts,
                           say=lambda line: print(line, file=sys.stderr))
        else:
            report = seq2seq_report(seq2seq_export(work, "quick" if args.quick else "full"), opts, args.device)
    result = {"benchmark": f"serve_{args.kind}_{args.device}",
              "command": shlex.join([f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] * ("OMP_NUM_THREADS" in os.environ)
                                    + ["python", "benchmarks/gpu_serve.py", *(sys.argv[1:] if argv is None else argv)]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **environment(args.device),
              "weights": "random (seeded), built from a config: honest time, no quality",
              "options": {"prompt_lens": prompt_lens, "output_lens": output_lens, "batch_sizes": batches,
                          "runs": runs, "warmup": warmup},
              "bench": {k: v for k, v in report.items() if k not in ("device", "versions", "command", "date")}}
    result = json.loads(json.dumps(result).replace(json.dumps(str(work))[1:-1], "$WORK"))  # no machine paths
    print(table(report))
    save_result(result["benchmark"], result)
    return result


if __name__ == "__main__":
    main()
