"""What runs inside each measured process of benchmarks/peers.py: one engine, one model, one batch size.

    python benchmarks/peers_worker.py measure lite-sft EXPORT_OUT --variant int8 --prompts P.json --new-tokens 64
    python benchmarks/peers_worker.py measure genai EXPORT_OUT/onnx-int8 --prompts P.json --new-tokens 64
    PEER_PY benchmarks/peers_worker.py measure llama.cpp MODEL.gguf --prompts P.json --new-tokens 64
    PEER_PY benchmarks/peers_worker.py quantize-gguf F32.gguf OUT.gguf q8_0

lite-sft and onnxruntime-genai run under lite-sft's interpreter (onnxruntime-genai is its dependency);
llama.cpp under its own venv, which has no lite-sft in it, so this file imports only the standard library and
numpy at the top and each engine inside its own function. It prints one JSON line: the engine's versions, per
timed run the seconds from the start of the request to each generated token (all rows step together, so row
0's times are the batch's), and the greedy tokens (batch, new tokens) of the first run. peers.py turns the
times into TTFT and decode tokens/s with lite-sft's own summarize, so every engine is judged by the same
arithmetic, and compares the tokens with lite-sft's.

Every run is greedy with no stop token, exactly --new-tokens tokens per row, and starts from an empty cache:
  lite-sft   load_backend + time_run (serve/bench.py): the serving loop, the cache written in place and all;
             the first warm-up is generate_ids (the same loop) for the tokens
  genai      og.Model on the export's folder (its genai_config.json, threads overlaid), a new Generator per
             request (its KV buffers are allocated there: part of TTFT), append_tokens with the (batch,
             prompt) ids, then generate_next_token + get_next_tokens per token; min_length = max_length keeps
             EOS from ending a row early
  llama.cpp  the C API through llama-cpp-python's ctypes binding: one llama_batch with every row's prompt
             (row r is sequence id r, logits for its last token only), then one llama_batch per step with
             one token per sequence; greedy argmax on the logits in numpy; the KV memory is cleared first
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def lite_sft(args, prompts: list[list[int]]) -> tuple[list[list[float]], list[list[int]], dict]:
    import onnxruntime

    import lite_sft as pkg
    from lite_sft.serve.bench_measure import time_run
    from lite_sft.serve.generate import SamplingParams, generate_ids
    from lite_sft.serve.backends.factory import load_backend

    backend, _ = load_backend(args.model, args.device, args.threads, args.variant)
    tokens = generate_ids(backend, prompts, SamplingParams(max_new_tokens=args.new_tokens))  # greedy, no stop
    for _ in range(args.warmup - 1):
        time_run(backend, prompts, args.new_tokens)
    runs = [time_run(backend, prompts, args.new_tokens) for _ in range(args.repeats)]
    return runs, tokens, {"lite_sft": pkg.__version__, "onnxruntime": onnxruntime.__version__,
                          "provider": backend.provider, "precision": backend.precision}


def genai(args, prompts: list[list[int]]) -> tuple[list[list[float]], list[list[int]], dict]:
    import onnxruntime
    import onnxruntime_genai as og

    config = og.Config(args.model)
    config.clear_providers()
    if args.device == "cuda":
        config.append_provider("cuda")
    # Threads as the other engines get them; the builder's genai_config.json leaves them to onnxruntime.
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": args.threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    ids = np.asarray(prompts, dtype=np.int32)  # (batch, prompt)
    length = ids.shape[1] + args.new_tokens

    def one(tokens: list | None = None) -> list[float]:
        start = time.perf_counter()
        params = og.GeneratorParams(model)
        params.set_search_options(batch_size=ids.shape[0], max_length=length, min_length=length, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        times = []
        for _ in range(args.new_tokens):
            generator.generate_next_token()
            step = generator.get_next_tokens()
            times.append(time.perf_counter() - start)
            if tokens is not None:
                tokens.append(step.tolist())
        return times

    tokens: list[list[int]] = []  # (new tokens, batch) as generated
    one(tokens)
    for _ in range(args.warmup - 1):
        one()
    runs = [one() for _ in range(args.repeats)]
    return runs, [list(row) for row in zip(*tokens)], {"onnxruntime_genai": og.__version__,
                                                        "onnxruntime": onnxruntime.__version__}


def llama_cpp(args, prompts: list[list[int]]) -> tuple[list[list[float]], list[list[int]], dict]:
    import llama_cpp as L

    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    mparams.n_gpu_layers = 0
    model = L.llama_model_load_from_file(args.model.encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {args.model}")
    rows, prompt = len(prompts), len(prompts[0])
    per_seq = -(-(prompt + args.new_tokens) // 256) * 256
    cparams = L.llama_context_default_params()
    cparams.n_ctx = rows * per_seq  # each sequence gets n_ctx / n_seq_max cells
    cparams.n_batch = max(rows * prompt, 512)  # the whole prefill in one llama_decode call
    cparams.n_seq_max = rows
    cparams.n_threads = cparams.n_threads_batch = args.threads
    ctx = L.llama_init_from_model(model, cparams)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context")
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(rows * prompt, 0, rows)

    def fill(entries) -> None:
        batch.n_tokens = len(entries)
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq

    def decode(logit_rows: list[int]) -> list[int]:
        if L.llama_decode(ctx, batch):
            raise RuntimeError("llama_decode failed")
        return [int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())
                for i in logit_rows]

    def one(made: list | None = None) -> list[float]:
        start = time.perf_counter()
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        fill([(t, p, r, p == prompt - 1) for r, row in enumerate(prompts) for p, t in enumerate(row)])
        tokens = decode([r * prompt + prompt - 1 for r in range(rows)])
        times = [time.perf_counter() - start]
        steps = [tokens]
        for step in range(1, args.new_tokens):
            fill([(t, prompt + step - 1, r, True) for r, t in enumerate(tokens)])
            tokens = decode(list(range(rows)))
            times.append(time.perf_counter() - start)
            steps.append(tokens)
        if made is not None:
            made += [list(row) for row in zip(*steps)]
        return times

    made: list[list[int]] = []  # (batch, new tokens)
    one(made)
    for _ in range(args.warmup - 1):
        one()
    runs = [one() for _ in range(args.repeats)]
    info = {"llama_cpp_python": L.__version__, "n_ctx": cparams.n_ctx, "n_batch": cparams.n_batch,
            "n_ubatch": cparams.n_ubatch, "n_seq_max": cparams.n_seq_max, "kv_unified": bool(cparams.kv_unified),
            "flash_attn": {-1: "auto", 0: "off", 1: "on"}.get(cparams.flash_attn_type, cparams.flash_attn_type),
            "system_info": L.llama_print_system_info().decode(errors="replace").strip()}
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return runs, made, info


def quantize_gguf(src: str, dst: str, kind: str, threads: int) -> None:
    """llama.cpp's own quantiser (llama_model_quantize), through the binding: no CLI tool needs building."""
    import ctypes

    import llama_cpp as L

    params = L.llama_model_quantize_default_params()
    params.ftype = {"q8_0": L.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": L.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
    params.nthread = threads
    if L.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)):
        raise RuntimeError(f"llama_model_quantize {src} -> {kind} failed")


ENGINES = {"lite-sft": lite_sft, "genai": genai, "llama.cpp": llama_cpp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure")
    m.add_argument("engine", choices=ENGINES)
    m.add_argument("model", help="lite-sft: an export OUT; genai: a folder with genai_config.json; llama.cpp: a .gguf")
    m.add_argument("--variant", default="fp", help="lite-sft: fp, int8 or int4 (the folder inside OUT)")
    m.add_argument("--prompts", required=True, help="a JSON file: the (batch, prompt) token ids")
    m.add_argument("--new-tokens", type=int, default=64)
    m.add_argument("--repeats", type=int, default=5)
    m.add_argument("--warmup", type=int, default=1, help="untimed runs (at least one: it gives the tokens)")
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--device", default="cpu")
    q = sub.add_parser("quantize-gguf")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("kind", choices=["q8_0", "q4_0"])
    q.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    if args.command == "quantize-gguf":
        quantize_gguf(args.src, args.dst, args.kind, args.threads)
        return
    prompts = json.loads(Path(args.prompts).read_text())
    start = time.perf_counter()
    runs, tokens, info = ENGINES[args.engine](args, prompts)
    print(json.dumps({"engine": args.engine, "runs": runs, "tokens": tokens, "versions": info,
                      "python": sys.version.split()[0], "wall_s": round(time.perf_counter() - start, 3)}))


if __name__ == "__main__":
    main()
