"""lite-sft's ONNX decode against onnxruntime-genai and llama.cpp on the same model, threads and prompts.

    python benchmarks/peers.py                                   # CPU, 1 thread: ~100M Llama, fp32/int8/int4, batch 1 and 8
    python benchmarks/peers.py --peers none --quick              # lite-sft only, a tiny model (the test does this)
    python benchmarks/peers.py --precisions int8 --batches 1 --peers genai
    python benchmarks/peers.py --device cuda --peer-python /opt/peers/bin/python     # GPU: fp16 and int4; no llama.cpp

What is compared. One random-weight Llama (seeded; hidden 640, 12 layers, 10 heads, 2 key-value heads
(`--kv-heads`), intermediate 1728, vocabulary 32,000: 93M parameters), tuned for one LoRA step so lite-sft's
own `lite-sft export` can take it (export starts from a tune run directory, not a plain Hugging Face folder),
and exported with `--quantize int8` and `--quantize int4` (parity gates and all). Both peers convert the
export's merged/ folder, so all three run the same weights:
  lite-sft            OUT/onnx (fp32), OUT/onnx-int8 (dynamic int8), OUT/onnx-int4 (MatMulNBits, block 32),
                      through lite_sft.serve (load_backend + the generate loop, as `lite-sft bench` does)
  onnxruntime-genai   `python -m onnxruntime_genai.models.builder -i merged -o DIR -p fp32|int8|int4 -e cpu
                      -c CACHE` with `--extra_options accuracy_level=4` for int8/int4 (its CPU default, said
                      explicitly: MatMulNBits, block 32, int8 activations); its fused GroupQueryAttention graph
  llama.cpp           convert_hf_to_gguf.py from the llama-cpp-python sdist (--outtype f32), then llama.cpp's
                      quantiser (llama_model_quantize) to q8_0 and q4_0; run by llama-cpp-python's C binding
  lite-sft-gqa        (with genai) the builder's graph served by lite-sft's runtime: its fused
                      GroupQueryAttention, rows right-padded, the cache written in place (serve/runtime.py), from
                      a folder linking its model.onnx beside lite-sft's config and tokenizer. Measured only when
                      its gate passes (gqa_gate: fp32 greedy tokens equal lite-sft's own fp32 export's, and a
                      padded batch's logits equal each row's alone); the comparison takes lite-sft's faster graph.
The tokenizer is a SentencePiece model (a unigram vocabulary of ~300 pieces with byte fallback) written
here as the protobuf that transformers ships the schema of, because the sentencepiece package is not a
lite-sft dependency: convert_hf_to_gguf.py takes a `tokenizer.model` down Llama's SPM path with no
pre-tokenizer hash check (a BPE tokenizer.json it does not know is refused) and pads the vocabulary to the
config's 32,000 with [PAD] entries; ORT-GenAI's builder reads the tokenizer.json beside it. Prompts are ids,
so the tokenizer only has to load.

How. Every (engine, precision, batch) cell runs in a fresh process (benchmarks/peers_worker.py), cells of one
(precision, batch) back to back so the machine's drift hits the engines alike. `--threads` (default 1) is
every engine's thread count (onnxruntime intra-op threads; llama.cpp n_threads and n_threads_batch;
OMP_NUM_THREADS). A run: `--prompt-len` (128) fixed random ids per row (seeded, the same for every engine),
`--new-tokens` (64) greedy tokens, no stop token, from an empty cache; `--warmup` (1) untimed runs, then
`--repeats` (5) timed ones. Per run, as lite-sft bench defines them (serve/bench.py summarize):
  TTFT ms        from the request to the first generated token: prefill of the whole batch and one sample
  decode tok/s   batch x (new tokens - 1) / the seconds from the first token to the last: every row's
                 tokens after the first, summed over the batch
and the table shows the medians. "vs best" is lite-sft's decode tok/s over the faster peer's at the same
precision and batch (the goal is 1.2x), and its TTFT over the lower peer TTFT (the goal is at most 1.0x).

The peers' environment is their own: a venv in --work-dir from benchmarks/peers-requirements.txt
(onnxruntime-genai 0.18.0, transformers 5, torch 2.13 CPU, llama-cpp-python 0.3.36 built from its sdist with
CMAKE_ARGS=-DGGML_NATIVE=ON, i.e. for this CPU), remade when that file changes (a stamp holds its digest);
peer processes get only that venv (and --peer-pythonpath), lite-sft processes only lite-sft's interpreter.
Time on 2 shared CPU cores: the venv ~30 min the first time (llama-cpp-python's build), the model and its two
exports ~5 min, the peers' conversions ~1 min, then the 18 cells ~6 min; all that is built is kept in
--work-dir and reused (delete a folder there to rebuild it). A cell that fails is recorded with its error
and the run goes on.
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
ENGINES = ("lite-sft", "lite-sft-gqa", "genai", "llama.cpp")
PEER_NAMES = {"genai": "onnxruntime-genai", "llama.cpp": "llama.cpp"}
OURS = ("lite-sft", "lite-sft-gqa")
GATE_TOKENS = 16
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
    from lite_sft.masking import DEFAULT_CHAT_TEMPLATE

    tokenizer = LlamaTokenizerFast(tokenizer_object=LlamaConverter(owner).converted(), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", pad_token="<pad>", legacy=False)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def build_model(work: Path, dims: tuple[int, ...], kv: int, precisions: list[str], device: str, threads: int) -> dict:
    """Base -> one-step LoRA run -> `lite-sft export` per quantisation; returns {precision: (OUT, variant)}."""
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
    plan = {"fp32": ("int8" if "int8" in precisions else "int4" if "int4" in precisions else "none", "fp"),
            "int8": ("int8", "int8"), "int4": ("int4", "int4"), "fp16": ("fp16", "fp")}
    exports = {}
    for precision in precisions:
        quant, variant = plan[precision]
        out = work / f"export-{quant}"
        if not (out / "parity.json").is_file():
            print(f"== lite-sft export --quantize {quant}", flush=True)
            args = ["--dtype", "fp16"] if quant == "fp16" else ["--quantize", quant]
            cmd = [sys.executable, "-m", "lite_sft", "export", str(run), "--out", str(out), "--overwrite", *args]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            if done.returncode:
                raise RuntimeError(f"lite-sft export failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        exports[precision] = (out, variant)
    return exports


def peer_source(work: Path, merged: Path) -> Path:
    """merged/ as lite-sft exported it, plus the SentencePiece file transformers could not save beside it
    (it saves tokenizer.model only through the sentencepiece package); links, so the weights are the same."""
    folder = work / "peer-source"
    if not (folder / "tokenizer.model").is_file():
        folder.mkdir(exist_ok=True)
        for item in merged.iterdir():
            if not (folder / item.name).exists():
                (folder / item.name).symlink_to(item.resolve())
        shutil.copy(work / "base" / "tokenizer.model", folder / "tokenizer.model")
    return folder


def peer_env(root: Path, args) -> dict:
    """{"python", "env"} for the peer processes: --peer-python, or the venv made from peers-requirements.txt."""
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
        print(f"== making the peers' venv {venv} from {REQUIREMENTS.name} (llama-cpp-python builds from source: "
              "minutes)", flush=True)
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


def build_genai(work: Path, source: Path, precision: str, device: str, peer: dict) -> tuple[Path, list[str]]:
    out = work / f"genai-{precision}-{device}"
    opts = ["-p", precision, "-e", device]
    if precision in ("int8", "int4") and device == "cpu":
        opts += ["--extra_options", "accuracy_level=4"]
    if not (out / "genai_config.json").is_file():
        print(f"== onnxruntime-genai builder {precision}", flush=True)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        peer_run(peer, ["-m", "onnxruntime_genai.models.builder", "-i", str(source), "-o", str(tmp), *opts,
                        "-c", str(work / "genai-cache")], "onnxruntime-genai's builder")
        tmp.rename(out)
    return out, opts


def served_gqa(work: Path, genai: Path, onnx: Path, precision: str) -> Path:
    """The builder's graph as a folder lite-sft serves: its model.onnx (and weights) linked, and the config,
    generation config and tokenizer of lite-sft's own export beside it."""
    out = work / f"lite-sft-gqa-{precision}"
    out.mkdir(exist_ok=True)
    for f in genai.iterdir():
        if f.name.startswith("model.onnx") and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    for f in onnx.iterdir():
        if f.suffix in (".json", ".model", ".jinja", ".txt") and f.name != "genai_config.json":
            shutil.copy(f, out / f.name)
    return out


def gqa_gate(reference: Path, served: Path, precision: str, device: str, threads: int) -> dict:
    """Whether lite-sft's runtime runs the builder's graph right, on 4 prompts of different lengths:
    - fp32: its greedy tokens alone are lite-sft's own fp32 export's, token for token, and the same batched;
    - every precision: a left-padded batch's logits (prefill, then one decode step on the same tokens) are each
      row's logits alone, within 1e-4 in fp32 and 0.05 quantised (the int8 activations of MatMulNBits are
      rounded per row, but its kernels take other paths for one row and for several). A padding or cache
      placement error gives other logits altogether.
    Agreement of the greedy tokens with lite-sft's fp32 export is told for every precision."""
    from lite_sft.serve.generate import SamplingParams, generate_ids, pad_left
    from lite_sft.serve.runtime import OrtBackend

    ref, gqa = OrtBackend(reference, device, threads), OrtBackend(served, device, threads)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(16, ref.vocab_size, n).tolist() for n in (40, 7, 23, 2)]
    params = SamplingParams(max_new_tokens=GATE_TOKENS)
    expected = [generate_ids(ref, [p], params)[0] for p in prompts]
    alone = [generate_ids(gqa, [p], params)[0] for p in prompts]

    def two_steps(rows: list[list[int]]) -> np.ndarray:  # (2, rows, vocab): prefill's logits, then a decode's
        ids, mask = pad_left(rows)
        first, state = gqa.prefill(ids, mask, ids.shape[1] + 2)
        second = gqa.decode(state, np.array([e[0] for e in expected[:len(rows)]] if len(rows) > 1
                                            else [expected[prompts.index(rows[0])][0]]))
        gqa.release(state)
        return np.stack([first, second])

    batched = two_steps(prompts)
    each = np.concatenate([two_steps([p]) for p in prompts], axis=1)
    drift = float(np.abs(batched - each).max())
    fp = precision in ("fp32", "fp16")
    agree = float(np.mean([a == b for x, y in zip(alone, expected) for a, b in zip(x, y)]))
    passed = drift <= (1e-4 if fp else 5e-2) and (not fp or (alone == expected
                                                              and generate_ids(gqa, prompts, params) == alone))
    return {"passed": passed, "batch_logits_max_abs_diff": drift, "agreement_with_fp32": round(agree, 3),
            "prompts": [len(p) for p in prompts], "tokens": GATE_TOKENS, "right_padded": gqa.pad_right}


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


def measure(engine: str, model: Path, variant: str, prompts: Path, batch: int, args, peer: dict | None) -> dict:
    """One cell in a fresh process: the worker's per-run token times, summarised as lite-sft bench does."""
    from lite_sft.serve.bench import summarize

    python, env = ((sys.executable, {**os.environ, "OMP_NUM_THREADS": str(args.threads)}) if engine in OURS
                   else (peer["python"], peer["env"]))
    worker = "lite-sft" if engine in OURS else engine  # lite-sft-gqa: the same loop on another graph
    cmd = [python, str(WORKER), "measure", worker, str(model), "--variant", variant, "--prompts", str(prompts),
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--device", args.device]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.cell_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.cell_timeout} s"}
    if done.returncode:
        return {"error": (done.stderr.strip() or done.stdout.strip())[-2000:]}
    report = json.loads(done.stdout.strip().splitlines()[-1])
    stats = summarize(report["runs"], batch)
    return {"decode_tok_s": stats["decode_tok_s"]["p50"], "ttft_ms": stats["ttft_ms"]["p50"],
            "tpot_ms": stats["tpot_ms"]["p50"], "stats": stats, "versions": report["versions"],
            "wall_s": report["wall_s"]}


def compare(cells: list[dict]) -> list[dict]:
    """Per (precision, batch): lite-sft's decode tok/s over the faster peer's, and its TTFT over the lower; for
    lite-sft, the faster of its graphs (optimum's export, or the builder's through lite-sft's runtime)."""
    rows = []
    for precision, batch in dict.fromkeys((c["precision"], c["batch"]) for c in cells):
        here = [c for c in cells if (c["precision"], c["batch"]) == (precision, batch) and "decode_tok_s" in c]
        ours = max((c for c in here if c["engine"] in OURS), key=lambda c: c["decode_tok_s"], default=None)
        peers = [c for c in here if c["engine"] not in OURS]
        if ours is None or not peers:
            continue
        fastest = max(peers, key=lambda c: c["decode_tok_s"])
        quickest = min(peers, key=lambda c: c["ttft_ms"])
        decode, ttft = ours["decode_tok_s"] / fastest["decode_tok_s"], ours["ttft_ms"] / quickest["ttft_ms"]
        rows.append({"precision": precision, "batch": batch, "lite_sft_graph": ours["engine"],
                     "fastest_peer": PEER_NAMES[fastest["engine"]],
                     "decode_ratio": round(decode, 3), "lowest_ttft_peer": PEER_NAMES[quickest["engine"]],
                     "ttft_ratio": round(ttft, 3), "meets_goal": decode >= 1.2 and ttft <= 1.0})
    return rows


def format_table(cells: list[dict], comparison: list[dict]) -> str:
    ratios = {(r["precision"], r["batch"]): r for r in comparison}
    lines = [f"{'precision':<9} {'batch':>5}  {'engine':<18} {'artefact':<10} {'decode tok/s':>12} {'TTFT ms':>9}  vs best",
             "-" * 84]
    for c in cells:
        name = c["engine"] if c["engine"] in OURS else PEER_NAMES[c["engine"]]
        if "decode_tok_s" not in c:
            why = c.get("skip") or "error: " + c.get("error", "").strip().splitlines()[-1][:60]
            lines.append(f"{c['precision']:<9} {c['batch']:>5}  {name:<18} {c['artefact']:<10} {why}")
            continue
        r = ratios.get((c["precision"], c["batch"]))
        r = r if r and r["lite_sft_graph"] == c["engine"] else None
        vs = f"  decode {r['decode_ratio']:.2f}x, TTFT {r['ttft_ratio']:.2f}x" if r else ""
        lines.append(f"{c['precision']:<9} {c['batch']:>5}  {name:<18} {c['artefact']:<10} "
                     f"{c['decode_tok_s']:>12.1f} {c['ttft_ms']:>9.1f}{vs}")
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
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--kv-heads", type=int, default=2, help="key-value heads (grouped-query attention)")
    parser.add_argument("--quick", action="store_true", help="a tiny model (hidden 64, 2 layers), prompt 16, "
                        "8 new tokens, 1 repeat: checks the plumbing, not the speed")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--peer-python", help="the peers' interpreter, instead of making a venv")
    parser.add_argument("--peer-pythonpath", help="PYTHONPATH for the peer processes only")
    parser.add_argument("--cell-timeout", type=int, default=1800, help="seconds one cell may take")
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "lite-sft-peers"),
                        help="models, exports, peer conversions and the peers' venv (kept and reused)")
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
    if args.new_tokens < 2 or args.repeats < 1 or min(batches) < 1 or dims[3] % args.kv_heads:
        problems.append("new tokens at least 2, repeats and batches at least 1, heads a multiple of --kv-heads")
    if problems:
        parser.error("; ".join(problems))

    hidden, layers, inter, heads, vocab = dims
    work = Path(args.work_dir) / f"llama-h{hidden}-l{layers}-i{inter}-a{heads}-kv{args.kv_heads}-v{vocab}"
    work.mkdir(parents=True, exist_ok=True)
    exports = build_model(work, dims, args.kv_heads, precisions, args.device, args.threads)
    source = peer_source(work, next(iter(exports.values()))[0] / "merged")
    peer = peer_env(Path(args.work_dir), args) if peers else None

    artefacts: dict[tuple[str, str], tuple[Path, str, str] | str] = {}  # (engine, precision) -> (model, variant, name)
    builder_options, gates = {}, {}
    for precision in precisions:
        out, variant = exports[precision]
        artefacts["lite-sft", precision] = (out, variant, f"onnx-{variant}" if variant != "fp" else "onnx")
        if "genai" in peers:
            folder, opts = build_genai(work, source, precision, args.device, peer)
            artefacts["genai", precision] = (folder, "fp", precision)
            builder_options[precision] = opts
            served = served_gqa(work, folder, out / "onnx", precision)
            gates[precision] = gate = gqa_gate(out / "onnx", served, precision, args.device, args.threads)
            print(f"== lite-sft on the builder's {precision} graph: gate {'passed' if gate['passed'] else 'FAILED'} "
                  f"({gate})", flush=True)
            artefacts["lite-sft-gqa", precision] = ((served, "fp", f"gqa-{precision}") if gate["passed"] else
                                                    "the gate failed: see gates in the JSON")
        if "llama.cpp" in peers:
            artefacts["llama.cpp", precision] = ("needs a CUDA build of llama-cpp-python, out of scope here"
                                                  if args.device == "cuda" else
                                                  (build_gguf(work, source, precision, peer, args.threads), "fp",
                                                   GGUF_TYPES[precision]))

    rng = np.random.default_rng(0)
    cells = []
    for batch in batches:
        # Ids from the upper part of the vocabulary, as lite-sft bench draws them: ordinary tokens, not specials.
        prompts = work / f"prompts-{batch}x{args.prompt_len}.json"
        prompts.write_text(json.dumps(rng.integers(16, vocab, size=(batch, args.prompt_len)).tolist()))
        for precision in precisions:
            for engine in [e for e in ENGINES if e == "lite-sft" or e in peers or (e == "lite-sft-gqa" and "genai" in peers)]:
                found = artefacts[engine, precision]
                cell = {"engine": engine, "precision": precision, "batch": batch}
                if isinstance(found, str):
                    cells.append({**cell, "artefact": "-", "skip": found})
                    continue
                model, variant, cell["artefact"] = found
                print(f"-- {engine} {precision} batch {batch}", flush=True)
                cells.append({**cell, **measure(engine, model, variant, prompts, batch, args, peer)})
                if "error" in cells[-1]:
                    print(f"   failed: {cells[-1]['error'][-500:]}", flush=True)

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
                     "repeats": args.repeats, "warmup": args.warmup, "greedy": True, "stop": None,
                     "decode_tok_s": "batch x (new tokens - 1) / seconds from the first token to the last; median",
                     "ttft_ms": "request to first token (prefill + one sample); median"},
        "engines": {
            "lite-sft": {"versions": versions.get("lite-sft"), "export": "lite-sft export RUN --quantize int8 | "
                         "int4 (block 32); served by lite_sft.serve load_backend + generate"},
            **({"lite-sft-gqa": {"graph": "onnxruntime-genai's builder output (the genai cells' folder) with "
                "lite-sft's config and tokenizer beside it; served by lite_sft.serve load_backend + generate "
                "(rows right-padded, cache written in place)", "gates": gates}} if "genai" in peers else {}),
            **({"onnxruntime-genai": {"versions": versions.get("genai"), "builder": "python -m "
                "onnxruntime_genai.models.builder -i MERGED -o DIR -c CACHE", "options": builder_options}}
               if "genai" in peers else {}),
            **({"llama.cpp": {"versions": versions.get("llama.cpp"), "build": "pip install llama-cpp-python from "
                "its sdist, CMAKE_ARGS=-DGGML_NATIVE=ON", "convert": "convert_hf_to_gguf.py MERGED --outtype f32, "
                "then llama_model_quantize to q8_0 / q4_0", "api": "llama_batch, one sequence id per row"}}
               if "llama.cpp" in peers else {}),
        },
        "peer_python": None if peer is None else ("venv from benchmarks/peers-requirements.txt" if peer["made"]
                                                  else "given (--peer-python)"),
        "cells": [{k: v for k, v in c.items() if k != "versions" or c["engine"] in OURS} for c in cells],
        "comparison": comparison,
    }
    save_result("peers", result)
    return result


if __name__ == "__main__":
    main()
