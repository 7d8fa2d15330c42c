"""lite-sft's runtime against onnxruntime-genai's (and llama.cpp) decoding the same model, threads and prompts.

    python benchmarks/peers.py                                   # CPU, 1 thread: ~100M Llama, fp32/int8/int4, batch 1 and 8
    python benchmarks/peers.py --peers genai                     # the same without llama.cpp (no venv to build)
    python benchmarks/peers.py --peers none --quick              # lite-sft only, a tiny model (the test does this)
    python benchmarks/peers.py --precisions int8 --batches 1 --peers genai
    python benchmarks/peers.py --device cuda --peers genai       # GPU: fp16 and int4; no llama.cpp

What is compared. One random-weight Llama (seeded; hidden 640, 12 layers, 10 heads, 2 key-value heads
(`--kv-heads`), intermediate 1728, vocabulary 32,000: 93M parameters), tuned for one LoRA step so lite-sft's
own `lite-sft export` can take it (export starts from a tune run directory, not a plain Hugging Face folder),
and exported on the CPU with `--quantize int8` and `--quantize int4` (on CUDA once, `--dtype fp16 --quantize
int4`), parity gates and all. For a Llama `lite-sft export` runs onnxruntime-genai's model builder (parity.json's
"exporter" says which exporter wrote each folder): OUT/onnx is the builder's fp32 graph (fused
GroupQueryAttention) with its genai_config.json, OUT/onnx-int8 onnxruntime's quantize_dynamic over it,
OUT/onnx-int4 the builder's int4 (MatMulNBits, block 32, accuracy level 4). The engines:
  lite-sft            OUT/onnx (fp32; fp16 on CUDA), OUT/onnx-int8, OUT/onnx-int4 through lite_sft.serve
                      (load_backend + the generate loop, as `lite-sft bench` does: rows right-padded, the cache
                      written in place)
  onnxruntime-genai   its Generator on THE SAME folders (each carries the genai_config.json export wrote), so
                      the graph, the weights and onnxruntime are the same and the difference is the runtime
                      around them; "tokens" checks it: the share of its greedy tokens equal to lite-sft's
  llama.cpp           convert_hf_to_gguf.py from the llama-cpp-python sdist (--outtype f32) on the export's
                      merged/, then llama.cpp's quantiser (llama_model_quantize) to q8_0 and q4_0; run by
                      llama-cpp-python's C binding: other kernels and other quantisation, the same weights
The tokenizer is a SentencePiece model (a unigram vocabulary of ~300 pieces with byte fallback) written
here as the protobuf that transformers ships the schema of, because the sentencepiece package is not a
lite-sft dependency: convert_hf_to_gguf.py takes a `tokenizer.model` down Llama's SPM path with no
pre-tokenizer hash check (a BPE tokenizer.json it does not know is refused) and pads the vocabulary to the
config's 32,000 with [PAD] entries. Prompts are ids, so the tokenizer only has to load.

How. Every (engine, precision, batch) cell runs in a fresh process (benchmarks/peers_worker.py), cells of one
(precision, batch) back to back so the machine's drift hits the engines alike; `--rounds N` runs each cell N
times, the engines' order alternating (A B, B A, ...), and pools their timed runs: on a machine others share. `--threads` (default 1) is
every engine's thread count (onnxruntime intra-op threads, set in genai_config.json's session options for
onnxruntime-genai; llama.cpp n_threads and n_threads_batch; OMP_NUM_THREADS). A run: `--prompt-len` (128)
fixed random ids per row (seeded, the same for every engine), `--new-tokens` (64) greedy tokens, no stop token,
from an empty cache; `--warmup` (1) untimed runs, then `--repeats` (5) timed ones. Per run, as lite-sft bench
defines them (serve/bench.py summarize):
  TTFT ms        from the request to the first generated token: prefill of the whole batch and one sample
  decode tok/s   batch x (new tokens - 1) / the seconds from the first token to the last: every row's
                 tokens after the first, summed over the batch
and the table shows the medians. "vs best" is lite-sft's decode tok/s over the faster peer's at the same
precision and batch (the goal: at least 0.95x at batch 1, 1.2x at larger batches), and its TTFT over the
lower peer TTFT (the goal: at most 1.0x).

onnxruntime-genai is a lite-sft dependency (onnxruntime-genai-cuda, beside onnxruntime-gpu), so its cells run
in lite-sft's own interpreter. llama.cpp's environment is its own: a venv in --work-dir from
benchmarks/peers-requirements.txt (llama-cpp-python 0.3.36 built from its sdist with CMAKE_ARGS=-DGGML_NATIVE=ON,
i.e. for this CPU, and what its converter imports), remade when that file changes (a stamp holds its digest), or
--peer-python; llama.cpp processes get only that interpreter (and --peer-pythonpath). Time on 2 shared CPU
cores: the venv ~30 min the first time (llama-cpp-python's build), the model and its two exports ~5 min, the
GGUF conversions ~1 min, then the 18 cells ~6 min; all that is built is kept in --work-dir and reused (delete a
folder there to rebuild it). A cell that fails is recorded with its error and the run goes on.
Prints the table, then one JSON line, and saves it as benchmarks/results/peers-<date>.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from workload import WORDS, cpu_model, save_result, write_chat_data  # beside this script

HERE = Path(__file__).resolve().parent
WORKER = HERE / "peers_worker.py"
REQUIREMENTS = HERE / "peers-requirements.txt"
ENGINES = ("lite-sft", "genai", "llama.cpp")
PEER_NAMES = {"genai": "onnxruntime-genai", "llama.cpp": "llama.cpp"}
IN_PROCESS = ("lite-sft", "genai")  # engines that run in lite-sft's interpreter (the rest in the peers' venv)
# lite-sft's decode tok/s over the fastest peer's that the project asks for, by batch (larger batches: 1.2)
DECODE_GOAL = {1: 0.95}
PRECISIONS = {"cpu": ("fp32", "int8", "int4"), "cuda": ("fp16", "int4")}
GGUF_TYPES = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}
# hidden, layers, intermediate, heads, vocabulary (key-value heads: --kv-heads)
FULL, QUICK = (640, 12, 1728, 10, 32000), (64, 2, 176, 4, 512)
SPECIALS = ["<unk>", "<s>", "</s>"]
ADDED = ["<|im_start|>", "<|im_end|>", "<pad>"]  # ChatML (lite-sft's default template) and padding


def spm_tokenizer(folder: Path):
    """A SentencePiece unigram model with byte fallback over WORDS, as tokenizer.model, and the fast tokenizer
    transformers converts from it (LlamaConverter reads the protobuf itself; sentencepiece is not needed)."""
    from types import SimpleNamespace

    from transformers import LlamaTokenizerFast
    from transformers.convert_slow_tokenizer import LlamaConverter, import_protobuf

    pb = import_protobuf()
    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM  # BPE would need sentencepiece to extract merges
    proto.trainer_spec.byte_fallback = True
    proto.trainer_spec.unk_id, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id, proto.trainer_spec.pad_id = \
        0, 1, 2, -1
    proto.normalizer_spec.name, proto.normalizer_spec.add_dummy_prefix = "identity", True
    proto.normalizer_spec.remove_extra_whitespaces = False
    kind = pb.ModelProto.SentencePiece

    def add(piece: str, score: float, type_: int) -> None:
        entry = proto.pieces.add()
        entry.piece, entry.score, entry.type = piece, score, type_

    for name, type_ in zip(SPECIALS, (kind.UNKNOWN, kind.CONTROL, kind.CONTROL)):
        add(name, 0.0, type_)
    for name in ADDED:
        add(name, 0.0, kind.USER_DEFINED)
    for byte in range(256):
        add(f"<0x{byte:02X}>", 0.0, kind.BYTE)
    for i, word in enumerate(dict.fromkeys(WORDS)):
        add("\u2581" + word, -1.0 - i, kind.NORMAL)
    for i, char in enumerate(sorted(set("".join(WORDS))) + ["\u2581"]):
        add(char, -100.0 - i, kind.NORMAL)
    proto.trainer_spec.vocab_size = len(proto.pieces)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    owner = SimpleNamespace(vocab_file=str(folder / "tokenizer.model"), legacy=False, add_prefix_space=None,
                            convert_ids_to_tokens=lambda i: proto.pieces[i].piece)
    from lite_sft.tasks.causal_lm.masking import DEFAULT_CHAT_TEMPLATE

    tokenizer = LlamaTokenizerFast(tokenizer_object=LlamaConverter(owner).converted(), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", pad_token="<pad>", legacy=False)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def export_plan(precisions: list[str], device: str) -> dict[str, tuple[list[str], str]]:
    """{precision: (the `lite-sft export` options of the export that holds it, the variant to serve)}. On the CPU
    fp32 comes with whichever quantised export is made anyway, and int8 and int4 are one export each (--quantize
    takes one). On CUDA fp16 is `--dtype fp16` (the builder's CUDA graph), and int4 its own export from it
    (`--dtype fp16 --quantize int4`: the builder's int4 follows its source onto CUDA), so that an export refusing
    one costs only that precision's cells."""
    if device == "cuda":
        return {p: (["--dtype", "fp16"] + (["--quantize", "int4"] if p == "int4" else []), "fp" if p == "fp16" else p)
                for p in precisions}
    fp32 = "int8" if "int8" in precisions else "int4" if "int4" in precisions else "none"
    return {p: (["--quantize", fp32 if p == "fp32" else p], "fp" if p == "fp32" else p) for p in precisions}


def build_model(work: Path, dims: tuple[int, ...], kv: int, precisions: list[str], device: str, threads: int) -> dict:
    """Base -> one-step LoRA run -> `lite-sft export` per export_plan; returns {precision: (OUT, variant)}, or
    {precision: why} where its export failed (a parity gate, a refusal): the run goes on without those cells."""
    import torch

    from workload import one_step_run, random_llama

    hidden, layers, inter, heads, vocab = dims
    base = work / "base"
    if not (base / "config.json").is_file():
        torch.set_num_threads(threads)
        tokenizer = spm_tokenizer(work / "spm")
        random_llama((hidden, layers, inter, heads, kv, vocab), base, tokenizer, max_positions=1024)
        shutil.copy(work / "spm" / "tokenizer.model", base / "tokenizer.model")
    run = work / "run"
    if not (run / "adapter_config.json").is_file():
        print("== one LoRA step, so that lite-sft export has a run to take", flush=True)
        one_step_run(base, write_chat_data(work / "chats.jsonl"), run)
    exports, failed = {}, {}
    for precision, (args, variant) in export_plan(precisions, device).items():
        out = work / ("export" + "".join("-" + a for a in args[1::2]))  # export-int8, export-fp16-int4
        parity = out / "parity.json"
        # An export from before the exporter registry (optimum's graphs) has no "exporter": made again.
        if out not in failed and not (parity.is_file() and json.loads(parity.read_text()).get("exporter")):
            print(f"== lite-sft export {' '.join(args)}", flush=True)
            cmd = [sys.executable, "-m", "lite_sft", "export", str(run), "--out", str(out), "--overwrite", *args]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            if done.returncode:
                print(f"   failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}", flush=True)
                said = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
                # the CLI's last "error: ..." and the lines under it (an invalid option says why there)
                start = max((i for i, line in enumerate(said) if line.lower().startswith("error")),
                            default=max(len(said) - 1, 0))
                failed[out] = f"lite-sft export {' '.join(args)} failed: {' '.join(said[start:])[:300]}"
        exports[precision] = failed.get(out) or (out, variant)
    return exports


def exporter_of(out: Path, variant: str) -> str:
    """Which exporter wrote a variant's folder, as parity.json says: the builder for onnx/ and its int4; int8
    is onnxruntime's quantize_dynamic over onnx/ whichever exporter wrote that."""
    name = (json.loads((out / "parity.json").read_text()).get("exporter") or {}).get("name", "?")
    if variant == "int8":
        return f"quantize_dynamic over the {name} graph"
    return f"MatMulNBitsQuantizer over the {name} graph" if variant == "int4" and name != "builder" else name


def peer_source(work: Path, merged: Path) -> Path:
    """What llama.cpp converts: merged/ as lite-sft exported it, plus the SentencePiece file transformers could
    not save beside it (it saves tokenizer.model only through the sentencepiece package); links, so the weights
    are the same."""
    folder = work / "peer-source"
    if not (folder / "tokenizer.model").is_file():
        folder.mkdir(exist_ok=True)
        for item in merged.iterdir():
            if not (folder / item.name).exists():
                (folder / item.name).symlink_to(item.resolve())
        shutil.copy(work / "base" / "tokenizer.model", folder / "tokenizer.model")
    return folder


def peer_env(root: Path, args) -> dict:
    """{"python", "env"} for llama.cpp's processes: --peer-python, or the venv made from peers-requirements.txt."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PYTHONNOUSERSITE="1", OMP_NUM_THREADS=str(args.threads))
    if args.peer_pythonpath:
        env["PYTHONPATH"] = args.peer_pythonpath
    if args.peer_python:
        return {"python": args.peer_python, "env": env, "made": False}
    venv, digest = root / "peer-venv", hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    stamp = venv / "requirements.sha256"
    if not (stamp.is_file() and stamp.read_text().strip() == digest):
        shutil.rmtree(venv, ignore_errors=True)
        print(f"== making llama.cpp's venv {venv} from {REQUIREMENTS.name} (llama-cpp-python builds from source: "
              "~30 minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        build = {**env, "CMAKE_ARGS": "-DGGML_NATIVE=ON", "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count())}
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-r", str(REQUIREMENTS)],
                       env=build, check=True)
        stamp.write_text(digest + "\n")
    return {"python": str(venv / "bin" / "python"), "env": env, "made": True}


def llama_converter(root: Path, peer: dict) -> Path:
    """convert_hf_to_gguf.py (with its gguf-py and conversion/ package) from the llama-cpp-python sdist the
    requirements pin: the converter ships in the source tree, not in the installed wheel."""
    import tarfile

    pin = next(line.split("==")[1].split()[0] for line in REQUIREMENTS.read_text().splitlines()
               if line.startswith("llama-cpp-python=="))
    target = root / f"llama.cpp-{pin}"
    script = target / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    download = root / "sdist"
    subprocess.run([peer["python"], "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d",
                    str(download), f"llama-cpp-python=={pin}"], env=peer["env"], check=True)
    prefix = f"llama_cpp_python-{pin}/vendor/llama.cpp/"
    with tarfile.open(download / f"llama_cpp_python-{pin}.tar.gz") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.name[len(prefix):].split("/")[0]
                   in ("convert_hf_to_gguf.py", "conversion", "gguf-py")]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(target, members, filter="data")
    return script


def peer_run(peer: dict, cmd: list[str], what: str) -> None:
    print(f"   {' '.join(cmd)}", flush=True)
    done = subprocess.run([peer["python"], *cmd], env=peer["env"], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{what} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def build_gguf(work: Path, source: Path, precision: str, peer: dict, threads: int) -> Path:
    kind = GGUF_TYPES[precision]
    out = work / f"model-{kind}.gguf"
    if out.is_file():
        return out
    f32 = work / "model-f32.gguf"
    if not f32.is_file():
        print("== convert_hf_to_gguf.py --outtype f32", flush=True)
        script = llama_converter(work.parent, peer)
        peer_run(peer, [str(script), str(source), "--outtype", "f32", "--outfile", str(work / "tmp.gguf")],
                 "convert_hf_to_gguf.py")
        (work / "tmp.gguf").rename(f32)
    if kind != "f32":
        print(f"== llama_model_quantize {kind}", flush=True)
        peer_run(peer, [str(WORKER), "quantize-gguf", str(f32), str(work / "tmp.gguf"), kind, "--threads",
                        str(os.cpu_count())], "llama.cpp's quantiser")
        (work / "tmp.gguf").rename(out)
    return out


def measure(engine: str, model: Path, variant: str, prompts: Path, args, peer: dict | None) -> dict:
    """One process of one cell: the worker's report (per-run token times, the first run's greedy tokens,
    versions), or {"error"}."""
    python, env = ((sys.executable, {**os.environ, "OMP_NUM_THREADS": str(args.threads)}) if engine in IN_PROCESS
                   else (peer["python"], peer["env"]))
    cmd = [python, str(WORKER), "measure", engine, str(model), "--variant", variant, "--prompts", str(prompts),
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--device", args.device]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.cell_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.cell_timeout} s"}
    if done.returncode:
        return {"error": (done.stderr.strip() or done.stdout.strip())[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(reports: list[dict], batch: int) -> dict:
    """A cell from its rounds' reports: every timed run pooled and summarised as lite-sft bench does (medians in
    the table), the first round's tokens (compared across engines by agree()); a failed round fails the cell."""
    from lite_sft.serve.bench_measure import summarize

    failed = next((r for r in reports if "error" in r), None)
    if failed is not None:
        return {"error": failed["error"]}
    stats = summarize([run for r in reports for run in r["runs"]], batch)
    return {"decode_tok_s": stats["decode_tok_s"]["p50"], "ttft_ms": stats["ttft_ms"]["p50"],
            "tpot_ms": stats["tpot_ms"]["p50"], "stats": stats, "versions": reports[0]["versions"],
            "wall_s": round(sum(r["wall_s"] for r in reports), 3), "rounds": len(reports),
            "tokens": reports[0]["tokens"]}


def agree(cells: list[dict]) -> None:
    """Give every peer cell `same_tokens`: the share of its greedy tokens (row by row, step by step) equal to
    lite-sft's at the same precision and batch. onnxruntime-genai runs lite-sft's own graph, so anything below
    1.0 there means the two runtimes fed it differently; llama.cpp's kernels and quantisation are its own."""
    ours = {(c["precision"], c["batch"]): c["tokens"] for c in cells if c["engine"] == "lite-sft" and "tokens" in c}
    for c in cells:
        mine = ours.get((c["precision"], c["batch"]))
        if c["engine"] != "lite-sft" and "tokens" in c and mine is not None:
            pairs = [(a, b) for x, y in zip(c["tokens"], mine) for a, b in zip(x, y)]
            c["same_tokens"] = round(sum(a == b for a, b in pairs) / max(len(pairs), 1), 4)


def compare(cells: list[dict]) -> list[dict]:
    """Per (precision, batch): lite-sft's decode tok/s over the faster peer's, and its TTFT over the lower one,
    against DECODE_GOAL and a TTFT no higher than the peer's."""
    rows = []
    for precision, batch in dict.fromkeys((c["precision"], c["batch"]) for c in cells):
        here = [c for c in cells if (c["precision"], c["batch"]) == (precision, batch) and "decode_tok_s" in c]
        ours = next((c for c in here if c["engine"] == "lite-sft"), None)
        peers = [c for c in here if c["engine"] != "lite-sft"]
        if ours is None or not peers:
            continue
        fastest = max(peers, key=lambda c: c["decode_tok_s"])
        quickest = min(peers, key=lambda c: c["ttft_ms"])
        decode, ttft = ours["decode_tok_s"] / fastest["decode_tok_s"], ours["ttft_ms"] / quickest["ttft_ms"]
        goal = DECODE_GOAL.get(batch, 1.2)
        rows.append({"precision": precision, "batch": batch, "fastest_peer": PEER_NAMES[fastest["engine"]],
                     "decode_ratio": round(decode, 3), "decode_goal": goal,
                     "lowest_ttft_peer": PEER_NAMES[quickest["engine"]], "ttft_ratio": round(ttft, 3),
                     "meets_goal": decode >= goal and ttft <= 1.0})
    return rows


def format_table(cells: list[dict], comparison: list[dict]) -> str:
    ratios = {(r["precision"], r["batch"]): r for r in comparison}
    lines = [f"{'precision':<9} {'batch':>5}  {'engine':<18} {'artefact':<10} {'decode tok/s':>12} {'TTFT ms':>9} "
             f"{'tokens':>7}  vs best (goal)", "-" * 100]
    for c in cells:
        name = PEER_NAMES.get(c["engine"], c["engine"])
        if "decode_tok_s" not in c:
            why = c.get("skip") or "error: " + c.get("error", "").strip().splitlines()[-1][:60]
            lines.append(f"{c['precision']:<9} {c['batch']:>5}  {name:<18} {c['artefact']:<10} {why}")
            continue
        r = ratios.get((c["precision"], c["batch"])) if c["engine"] == "lite-sft" else None
        vs = (f"  decode {r['decode_ratio']:.2f}x ({r['decode_goal']}x), TTFT {r['ttft_ratio']:.2f}x (1.0x)"
              if r else "")
        same = f"{c['same_tokens']:.0%}" if "same_tokens" in c else ""
        lines.append(f"{c['precision']:<9} {c['batch']:>5}  {name:<18} {c['artefact']:<10} "
                     f"{c['decode_tok_s']:>12.1f} {c['ttft_ms']:>9.1f} {same:>7}{vs}")
    lines.append("tokens: the share of a peer's greedy tokens equal to lite-sft's (the same graph for onnxruntime-genai)")
    return "\n".join(lines)


def command(argv: list[str]) -> str:
    """The command line as run, the work folder (a path of this machine) written as WORK."""
    words = [w if prev != "--work-dir" else "WORK" for prev, w in zip(["", *argv], argv)]
    words = [w.split("=")[0] + "=WORK" if w.startswith("--work-dir=") else w for w in words]
    return " ".join(["python", "benchmarks/peers.py", *words])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", default="genai,llama.cpp", help="comma-separated: genai, llama.cpp; or none")
    parser.add_argument("--precisions", help="comma-separated; default fp32,int8,int4 (cpu), fp16,int4 (cuda)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", type=int, default=1, help="every engine's threads")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs a cell (at least 1: it gives the tokens)")
    parser.add_argument("--rounds", type=int, default=1, help="processes a cell, the engines' order alternating "
                        "round by round; their timed runs are pooled")
    parser.add_argument("--kv-heads", type=int, default=2, help="key-value heads (grouped-query attention)")
    parser.add_argument("--quick", action="store_true", help="a tiny model (hidden 64, 2 layers), prompt 16, "
                        "8 new tokens, 1 repeat: checks the plumbing, not the speed")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--peer-python", help="llama.cpp's interpreter, instead of making a venv")
    parser.add_argument("--peer-pythonpath", help="PYTHONPATH for llama.cpp's processes only")
    parser.add_argument("--cell-timeout", type=int, default=1800, help="seconds one cell may take")
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "lite-sft-peers"),
                        help="models, exports, GGUF conversions and llama.cpp's venv (kept and reused)")
    args = parser.parse_args(argv)
    if args.quick:
        args.prompt_len, args.new_tokens, args.repeats = 16, 8, 1
    dims = QUICK if args.quick else FULL
    peers = [] if args.peers == "none" else args.peers.split(",")
    precisions = args.precisions.split(",") if args.precisions else list(PRECISIONS[args.device])
    batches = [int(b) for b in args.batches.split(",")]
    problems = [f"--peers {p}: choose genai, llama.cpp or none" for p in peers if p not in PEER_NAMES]
    problems += [f"--precisions {p}: on {args.device} choose from {', '.join(PRECISIONS[args.device])}"
                 for p in precisions if p not in PRECISIONS[args.device]]
    if args.new_tokens < 2 or min(args.repeats, args.warmup, args.rounds, *batches) < 1 or dims[3] % args.kv_heads:
        problems.append("new tokens at least 2; repeats, warmup, rounds and batches at least 1; heads a multiple of "
                        "--kv-heads")
    if problems:
        parser.error("; ".join(problems))

    hidden, layers, inter, heads, vocab = dims
    work = Path(args.work_dir) / f"llama-h{hidden}-l{layers}-i{inter}-a{heads}-kv{args.kv_heads}-v{vocab}"
    work.mkdir(parents=True, exist_ok=True)
    exports = build_model(work, dims, args.kv_heads, precisions, args.device, args.threads)
    llama = "llama.cpp" in peers and args.device == "cpu"
    peer = peer_env(Path(args.work_dir), args) if llama else None
    made = [e[0] for e in exports.values() if not isinstance(e, str)]
    source = peer_source(work, made[0] / "merged") if llama and made else None

    artefacts: dict[tuple[str, str], tuple[Path, str, str] | str] = {}  # (engine, precision) -> (model, variant, name)
    exporters = {}
    for precision in precisions:
        if isinstance(exports[precision], str):
            for engine in ENGINES:
                artefacts[engine, precision] = exports[precision]
            continue
        out, variant = exports[precision]
        name = "onnx" if variant == "fp" else f"onnx-{variant}"
        exporters[precision] = exporter_of(out, variant)
        artefacts["lite-sft", precision] = (out, variant, name)
        if "genai" in peers:
            artefacts["genai", precision] = (
                (out / name, "fp", name) if (out / name / "genai_config.json").is_file() else
                f"{name}/ has no genai_config.json: written by {exporters[precision]}, not the builder")
    for precision in precisions:
        if "llama.cpp" in peers:
            artefacts["llama.cpp", precision] = (
                "needs a CUDA build of llama-cpp-python, out of scope here" if not llama else
                "no export made a merged/ to convert" if source is None else
                (build_gguf(work, source, precision, peer, args.threads), "fp", GGUF_TYPES[precision]))

    rng = np.random.default_rng(0)
    cells = []
    for batch in batches:
        # Ids from the upper part of the vocabulary, as lite-sft bench draws them: ordinary tokens, not specials.
        prompts = work / f"prompts-{batch}x{args.prompt_len}.json"
        prompts.write_text(json.dumps(rng.integers(16, vocab, size=(batch, args.prompt_len)).tolist()))
        for precision in precisions:
            engines = [(e, artefacts[e, precision]) for e in ENGINES if e == "lite-sft" or e in peers]
            measured = [(e, found) for e, found in engines if not isinstance(found, str)]
            reports: dict[str, list[dict]] = {e: [] for e, _ in measured}
            for round_ in range(args.rounds):
                # Each round in the other order (A B, B A, ...): drift on a shared machine hits the engines alike.
                for engine, (model, variant, _) in measured if round_ % 2 == 0 else measured[::-1]:
                    print(f"-- {engine} {precision} batch {batch}"
                          + (f" (round {round_ + 1} of {args.rounds})" if args.rounds > 1 else ""), flush=True)
                    reports[engine].append(measure(engine, model, variant, prompts, args, peer))
                    if "error" in reports[engine][-1]:
                        print(f"   failed: {reports[engine][-1]['error'][-500:]}", flush=True)
            for engine, found in engines:
                cell = {"engine": engine, "precision": precision, "batch": batch}
                cells.append({**cell, "artefact": "-", "skip": found} if isinstance(found, str) else
                             {**cell, "artefact": found[2], **summarise(reports[engine], batch)})

    agree(cells)
    comparison = compare(cells)
    print(format_table(cells, comparison))
    versions = {}
    for c in cells:
        if c.get("versions"):
            versions.setdefault(c["engine"], {k: v for k, v in c["versions"].items()
                                              if k not in ("provider", "precision")})  # those are per cell
    result = {
        "benchmark": "peers",
        "command": command(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": {"type": args.device, "cpu": cpu_model(), "cpus": os.cpu_count(), "threads": args.threads},
        "model": {"architecture": "LlamaForCausalLM", "hidden": hidden, "layers": layers, "intermediate": inter,
                  "heads": heads, "kv_heads": args.kv_heads, "vocab": vocab, "weights": "random (seed 0), one LoRA "
                  "step merged", "tokenizer": "SentencePiece unigram, byte fallback"},
        "workload": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batches": batches,
                     "repeats": args.repeats, "warmup": args.warmup, "rounds": args.rounds,
                     "order": "per (batch, precision) the engines' cells back to back, alternating order each round",
                     "greedy": True, "stop": None,
                     "decode_tok_s": "batch x (new tokens - 1) / seconds from the first token to the last; median",
                     "ttft_ms": "request to first token (prefill + one sample); median"},
        "engines": {
            "lite-sft": {"versions": versions.get("lite-sft"), "export": "lite-sft export RUN "
                         + ("--dtype fp16 --quantize int4" if args.device == "cuda" else "--quantize int8 | int4")
                         + " (block 32)", "exporter": exporters,
                         "runtime": "lite_sft.serve load_backend + generate (as lite-sft bench times it)"},
            **({"onnxruntime-genai": {"versions": versions.get("genai"), "model": "the same folders as lite-sft "
                "(OUT/onnx, OUT/onnx-int8, OUT/onnx-int4), through the genai_config.json lite-sft export wrote, "
                "threads overlaid", "api": "og.Generator per request: append_tokens, then generate_next_token"}}
               if "genai" in peers else {}),
            **({"llama.cpp": {"versions": versions.get("llama.cpp"), "build": "pip install llama-cpp-python from "
                "its sdist, CMAKE_ARGS=-DGGML_NATIVE=ON", "convert": "convert_hf_to_gguf.py MERGED --outtype f32, "
                "then llama_model_quantize to q8_0 / q4_0", "api": "llama_batch, one sequence id per row"}}
               if "llama.cpp" in peers else {}),
        },
        "peer_python": None if peer is None else ("venv from benchmarks/peers-requirements.txt" if peer["made"]
                                                  else "given (--peer-python)"),
        "cells": [{k: v for k, v in c.items() if k != "tokens" and (k != "versions" or c["engine"] == "lite-sft")}
                  for c in cells],
        "comparison": comparison,
    }
    save_result("peers", result)
    return result


if __name__ == "__main__":
    main()
