"""What `lite-sft bench` measures and how: the timings of a generation run, peak memory, copy bandwidth.

    time_run(backend, prompts, 32)      # seconds from the start to each generated token (row 0's)
    summarize([times, ...], batch=1)    # p50/p95/p99 of TTFT, TPOT, ITL, e2e and tokens/s over the runs

bench.py runs these over its grid of shapes; the module docstring there says what each figure means.
"""

from __future__ import annotations

import gc
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from lite_sft.errors import ServeError

from .generate import SamplingParams, generate

METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "decode_tok_s", "tok_s")


# -- memory ------------------------------------------------------------------------------------------------


def _proc_status(key: str) -> int | None:
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return None


def reset_peak() -> int | None:
    """Start a fresh peak-RSS count for the next backend; returns the resident set now."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed memory; give the last backend's back
        Path("/proc/self/clear_refs").write_text("5")  # Linux: restart the peak-RSS (VmHWM) count
    except (OSError, AttributeError):
        pass  # elsewhere the peak is the process's whole life's
    return _proc_status("VmRSS")


def peak_memory(device) -> dict:
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
    pct = percentiles
    ttft = [t[0] * 1e3 for t in runs]
    e2e = [t[-1] * 1e3 for t in runs]
    itl = [(b - a) * 1e3 for t in runs for a, b in zip(t, t[1:])]
    tpot = [(t[-1] - t[0]) * 1e3 / (len(t) - 1) for t in runs]
    decode = [batch * (len(t) - 1) / (t[-1] - t[0]) for t in runs]
    overall = [batch * len(t) / t[-1] for t in runs]
    return dict(zip(METRICS, map(pct, (ttft, tpot, itl, e2e, decode, overall))))


def percentiles(values) -> dict:
    return {f"p{q}": float(np.percentile(values, q)) for q in (50, 95, 99)}


def device_info(device, threads: int) -> dict:
    import torch

    info = {"type": device.type, "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": threads}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def versions() -> dict:
    import onnxruntime
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
