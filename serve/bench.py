"""`lite-sft bench`: every backend of one model side by side, through the same generation loop.

    lite-sft bench exports/demo --quick                  # a short table on the embedded default's export
    lite-sft bench exports/qwen --prompt-lens 128,1024 --output-lens 128 --runs 20
    python -m lite_sft.serve.bench exports/qwen --backends torch-merged,onnx-fp32

What it finds in MODEL_OR_RUN_DIR (find_backends):
    an export OUT        torch-adapter  base + adapter unmerged, from the run directory parity.json names
                         torch-merged   OUT/merged
                         onnx-fp32 / onnx-fp16 (GPU only)   OUT/onnx;  onnx-int8, onnx-int4   OUT/onnx-int8|int4
    a tune run directory torch-adapter, and torch-merged (merged in memory with peft); no ONNX rows
    an ONNX folder       that one backend;   a Hugging Face folder   torch-merged
A backend that is not there gets a row saying why (re-export with --quantize int4 for an int4 row).

An encoder classifier (a seq-cls or token-cls export, or its folders) is measured as it is served: one forward
pass per batch of `batch` random sequences of each `prompt_lens` length (output lengths do not apply), giving
latency per batch (p50/p95/p99) and sequences/s, for torch-merged, onnx-fp32 (fp16) and onnx-int8 (int4).

For each backend and each (batch, prompt length, output length): `warmup` untimed runs, then `runs` timed
ones on seeded random prompt ids, greedy, no stop token (every run makes exactly the output length).
Per run: TTFT (start to first token: prefill and one sample), TPOT (mean time per later token), ITL (every
gap between tokens), end-to-end latency, decode tokens/s (batch x later tokens / their time) and overall
tokens/s; each reported as p50/p95/p99 over the runs. Peak memory is the process's peak resident set while
the backend was loaded and run (Linux resets the count per backend; imports and libraries, several hundred
MB, are in it: rss_before_load_bytes says how much), or CUDA's peak allocation.
The roofline: decoding one token at batch 1 reads every weight once (the input-embedding table aside: a
lookup reads one row), so tokens/s cannot pass bandwidth / those bytes ("roof %" is how close a backend
gets); the bandwidth is measured as a plain 256 MiB buffer copy on the same device (bytes read + written).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from . import ServeError
from .generate import SamplingParams, generate
from lite_sft.options import BACKENDS, BenchOptions

METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "decode_tok_s", "tok_s")
ENCODER_METRICS = ("latency_ms", "seq_s")
ENCODER_TASKS = ("seq-cls", "token-cls")


@dataclass
class Candidate:
    name: str
    source: str
    load: Callable[[], object] | None = None
    skip: str | None = None


def bench_task(path: Path) -> str:
    """The task of what `path` holds (runtime.TASKS); a tune run directory's from its adapter's peft task type."""
    from .runtime import model_task

    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        task_type = json.loads((path / "adapter_config.json").read_text()).get("task_type")
        return {"SEQ_CLS": "seq-cls", "TOKEN_CLS": "token-cls", "SEQ_2_SEQ_LM": "seq2seq"}.get(task_type, "causal-lm")
    if not any((path / name).is_file() for name in ("parity.json", "config.json")):
        return "causal-lm"  # nothing to read a task from: find_backends says what the folder lacks
    return model_task(path)


def find_backends(path: Path, device: str, threads: int | None, task: str = "causal-lm") -> list[Candidate]:
    from .encoder import OrtEncoderBackend, TorchEncoderBackend
    from .runtime import ONNX_FILE, OrtBackend, check_tokenizer
    from .torch_backend import TorchBackend, pick_device

    path = Path(path)
    if not path.is_dir():
        raise ServeError(f"{path} does not exist or is not a folder")
    gpu = pick_device(device).type == "cuda"
    out: list[Candidate] = []
    encoder = task in ENCODER_TASKS

    def ort(folder: Path):
        return OrtEncoderBackend(folder, task, device, threads) if encoder else OrtBackend(folder, device, threads)

    def torch_merged(folder: Path):
        if encoder:
            return TorchEncoderBackend.from_folder(folder, task, device, threads=threads)
        return TorchBackend.from_folder(folder, device, threads=threads)

    def onnx(folder: Path, names=("onnx-fp32", "onnx-fp16")) -> None:
        if not (folder / ONNX_FILE).is_file():
            for name in names:
                out.append(Candidate(name, str(folder), skip=f"not exported (no {folder.name}/{ONNX_FILE})"))
            return
        check_tokenizer(folder)
        fp16 = "float16" in _float_type(folder / ONNX_FILE)
        for name in names:
            if name.endswith("fp16") != fp16 and len(names) > 1:
                out.append(Candidate(name, str(folder), skip=f"not exported (onnx/ is {'fp16' if fp16 else 'fp32'}; "
                                     f"export again with --dtype {name[-4:]})"))
            elif fp16 and not gpu:
                out.append(Candidate(name, str(folder), skip="GPU only: onnxruntime's CPU fp16 kernels are slower than fp32"))
            else:
                out.append(Candidate(name, str(folder), lambda f=folder: ort(f)))

    if (path / "parity.json").is_file():
        run_dir = Path(json.loads((path / "parity.json").read_text()).get("run_dir", ""))
        if encoder:
            out.append(Candidate("torch-adapter", str(run_dir), skip="base + adapter are measured for causal LMs; "
                                 "torch-merged is this classifier's PyTorch row"))
        elif (run_dir / "adapter_config.json").is_file():
            out.append(Candidate("torch-adapter", str(run_dir), lambda: _adapter_backend(run_dir, device, threads)))
        else:
            out.append(Candidate("torch-adapter", str(run_dir), skip=f"the run directory {run_dir} named in "
                                 "parity.json is not there (bench the run directory itself, or restore it)"))
        merged = path / "merged"
        out.append(Candidate("torch-merged", str(merged), lambda: torch_merged(merged))
                   if (merged / "config.json").is_file() else Candidate("torch-merged", str(merged), skip="no merged/"))
        onnx(path / "onnx")
        onnx(path / "onnx-int8", ("onnx-int8",))
        onnx(path / "onnx-int4", ("onnx-int4",))
    elif (path / "adapter_config.json").is_file():
        out.append(Candidate("torch-adapter", str(path), lambda: _adapter_backend(path, device, threads)))
        out.append(Candidate("torch-merged", str(path), lambda: _adapter_backend(path, device, threads, merge=True)))
        for name in BACKENDS[2:]:
            out.append(Candidate(name, str(path), skip=f"a run directory: `lite-sft export {path} --out OUT`, then bench OUT"))
    elif (path / ONNX_FILE).is_file():
        onnx(path, ("onnx-" + ("fp16" if "float16" in _float_type(path / ONNX_FILE) else path.name.split("-")[-1]
                               if path.name.startswith("onnx-") else "fp32"),))
    elif (path / "config.json").is_file():
        check_tokenizer(path)
        out.append(Candidate("torch-merged", str(path), lambda: torch_merged(path)))
    else:
        raise ServeError(f"{path} is not an export OUT, a tune run directory, an ONNX folder or a Hugging Face folder")
    return out


def _float_type(model_file: Path) -> str:
    """The graph's float type, as its KV cache (a decoder) or its logits (a classifier) have it."""
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    past = next((i for i in graph.input if i.name.startswith("past_key_values")), None)
    if past is None:
        past = next((o for o in graph.output if o.name == "logits"), None)
    return onnx.TensorProto.DataType.Name(past.type.tensor_type.elem_type).lower() if past is not None else ""


def _adapter_backend(run_dir: Path, device: str, threads: int | None, merge: bool = False):
    """Base + adapter as `lite-sft tune` left them, by tune's own loader (loading code, not training code: see
    this package's docstring)."""
    import torch

    from lite_sft.model import ModelError, load_tuned

    from .torch_backend import TorchBackend, pick_device

    if threads:
        torch.set_num_threads(threads)
    try:
        model, _, cfg = load_tuned(run_dir, pick_device(device))
    except ModelError as err:
        raise ServeError(str(err)) from err
    precision = str(next(model.parameters()).dtype).replace("torch.", "").replace("float", "fp")
    if cfg.model.quant != "none":
        precision += f" ({cfg.model.quant} base)"
    if merge:
        return TorchBackend.from_model(model.merge_and_unload(), "torch-merged", precision)
    return TorchBackend.from_model(model, "torch-adapter", precision)


# -- memory ------------------------------------------------------------------------------------------------


def _proc_status(key: str) -> int | None:
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return None


def _reset_peak() -> int | None:
    """Start a fresh peak-RSS count for the next backend; returns the resident set now."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed memory; give the last backend's back
        Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the peak-RSS (VmHWM) count
    except (OSError, AttributeError):
        pass  # elsewhere the peak is the process's whole life's
    return _proc_status("VmRSS")


def _peak_memory(device) -> dict:
    import torch

    if device.type == "cuda":
        return {"peak_gpu_allocated_bytes": torch.cuda.max_memory_allocated(), "gpu_used_bytes":
                (lambda free_total: free_total[1] - free_total[0])(torch.cuda.mem_get_info())}
    if _proc_status("VmHWM") is not None:
        return {"peak_rss_bytes": _proc_status("VmHWM")}
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_bytes": rss if sys.platform == "darwin" else rss * 1024}


def copy_bandwidth(device) -> float:
    """Bytes per second a plain buffer copy moves (read + write) on `device`; the decode roofline's bound."""
    import torch

    size = 256 * 2**20
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size / best


# -- timing ------------------------------------------------------------------------------------------------


def time_run(backend, prompts: list[list[int]], new_tokens: int) -> list[float]:
    """Seconds from the start to each generated step (row 0's tokens; every row steps together)."""
    params = SamplingParams(max_new_tokens=new_tokens)  # greedy, no stop ids: exactly new_tokens tokens
    start = time.perf_counter()
    times = [time.perf_counter() - start for event in generate(backend, prompts, params) if event.index == 0]
    if len(times) != new_tokens:
        raise ServeError(f"{backend.name} produced {len(times)} tokens for {new_tokens} asked")
    return times


def summarize(runs: list[list[float]], batch: int) -> dict:
    pct = _percentiles
    ttft = [t[0] * 1e3 for t in runs]
    e2e = [t[-1] * 1e3 for t in runs]
    itl = [(b - a) * 1e3 for t in runs for a, b in zip(t, t[1:])]
    tpot = [(t[-1] - t[0]) * 1e3 / (len(t) - 1) for t in runs]
    decode = [batch * (len(t) - 1) / (t[-1] - t[0]) for t in runs]
    overall = [batch * len(t) / t[-1] for t in runs]
    return dict(zip(METRICS, map(pct, (ttft, tpot, itl, e2e, decode, overall))))


def bench_backend(backend, opts: BenchOptions, vocab: int) -> list[dict]:
    rng = np.random.default_rng(opts.seed)
    rows = []
    for batch in opts.batch_sizes:
        for p_len in opts.prompt_lens:
            for o_len in opts.output_lens:
                if p_len + o_len > backend.max_context:
                    rows.append({"batch": batch, "prompt_len": p_len, "output_len": o_len,
                                 "skip": f"over the context ({backend.max_context})"})
                    continue
                # Ids from the upper part of the vocabulary: ordinary tokens, not the specials at its start.
                prompts = rng.integers(min(16, vocab // 2), vocab, size=(batch, p_len)).tolist()
                for _ in range(opts.warmup):
                    time_run(backend, prompts, o_len)
                runs = [time_run(backend, prompts, o_len) for _ in range(opts.runs)]
                rows.append({"batch": batch, "prompt_len": p_len, "output_len": o_len, **summarize(runs, batch)})
    return rows


def bench_encoder(backend, opts: BenchOptions) -> list[dict]:
    """Latency of one forward pass per (batch, sequence length), and sequences/s, for an encoder classifier."""
    rng = np.random.default_rng(opts.seed)
    vocab = backend.vocab_size or 1000
    rows = []
    for batch in opts.batch_sizes:
        for length in opts.prompt_lens:
            if length > backend.max_context:
                rows.append({"batch": batch, "seq_len": length, "skip": f"over the context ({backend.max_context})"})
                continue
            # Ids from the upper part of the vocabulary: ordinary tokens, not the specials at its start.
            inputs = [{"input_ids": r} for r in rng.integers(min(16, vocab // 2), vocab, size=(batch, length)).tolist()]
            for _ in range(opts.warmup):
                backend.logits(inputs)
            seconds = []
            for _ in range(opts.runs):
                start = time.perf_counter()
                backend.logits(inputs)
                seconds.append(time.perf_counter() - start)
            rows.append({"batch": batch, "seq_len": length, "latency_ms": _percentiles([t * 1e3 for t in seconds]),
                         "seq_s": _percentiles([batch / t for t in seconds])})
    return rows


def _percentiles(values) -> dict:
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 95, 99)}


def bench(path: str | Path, opts: BenchOptions | None = None, say: Callable[[str], None] = print) -> dict:
    """Measure every backend found in `path`; returns the report (see module docstring)."""
    import torch

    from .torch_backend import pick_device

    opts = opts or BenchOptions()
    opts.validate()
    threads = opts.threads or torch.get_num_threads()
    opts.threads = threads
    device = pick_device(opts.device)
    if not Path(path).is_dir():
        raise ServeError(f"{path} does not exist or is not a folder")
    task = bench_task(Path(path))
    encoder = task in ENCODER_TASKS
    if task == "seq2seq":
        raise ServeError(f"{path} is a seq2seq model: bench measures causal LMs and encoder classifiers; serve it "
                         "(`lite-sft serve`) and load-test the server with `lite-sft bench --url`")
    if encoder and (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file():
        raise ServeError(f"{path} is a {task} run directory: export it (`lite-sft export {path} --out OUT`) and "
                         "bench OUT, which measures the merged PyTorch model against its ONNX exports")
    candidates = [c for c in find_backends(Path(path), opts.device, threads, task)
                  if not opts.backends or c.name in opts.backends]
    bandwidth = None if encoder else copy_bandwidth(device)
    results = []
    for c in candidates:
        entry = {"backend": c.name, "source": c.source}
        if c.skip:
            results.append({**entry, "skip": c.skip})
            say(f"  {c.name:<14} skipped: {c.skip}")
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        before = _reset_peak()
        say(f"  {c.name:<14} loading {c.source}")
        start = time.perf_counter()
        backend = c.load()
        load_s = time.perf_counter() - start
        if encoder:
            rows, roof = bench_encoder(backend, opts), {}
        else:
            rows, read = bench_backend(backend, opts, backend.vocab_size), backend.decode_bytes()
            roof = {"decode_bytes": read, "roofline_tok_s": bandwidth / read}
        entry.update(provider=backend.provider, precision=backend.precision, load_s=round(load_s, 3),
                     weight_bytes=backend.weight_bytes(), **roof, rows=rows, rss_before_load_bytes=before,
                     **_peak_memory(device))
        results.append(entry)
        del backend
    report = {"benchmark": "serve", "task": task, "path": str(path), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": _device_info(device, threads), "copy_bandwidth_bytes_s": bandwidth,
              "options": asdict(opts), "backends": results, "versions": _versions()}
    from .bench_report import targets

    report["targets"] = targets(report)
    return report


def _device_info(device, threads: int) -> dict:
    import torch

    info = {"type": device.type, "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": threads}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _versions() -> dict:
    import onnxruntime
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lite_sft.serve.bench", description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--backends", help=f"comma-separated, from {', '.join(BACKENDS)}")
    parser.add_argument("--prompt-lens", default="32,128")
    parser.add_argument("--output-lens", default="32,128")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    opts = BenchOptions(ints(args.prompt_lens), ints(args.output_lens), runs=args.runs,
                        backends=args.backends.split(",") if args.backends else None)
    from .bench_report import format_table, save

    report = bench(args.path, opts)
    print(format_table(report))
    print(json.dumps(report))
    print("saved", *save(report, args.out))


if __name__ == "__main__":
    main()
