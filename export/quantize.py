"""Quantise an exported ONNX model with onnxruntime's own quantisers, beside the one it came from.

    lite-sft export runs/qwen --out exports/qwen --quantize int8              # onnx/ and onnx-int8/
    lite-sft export runs/qwen --out exports/qwen --quantize int4 --block-size 32

int8: dynamic quantisation (quantize_dynamic): weights stored as int8 per output channel, activations
quantised on the fly, MatMul becomes MatMulInteger. No calibration data needed.
int4: weight-only quantisation (MatMulNBitsQuantizer, round-to-nearest, asymmetric): every MatMul with a
constant weight becomes MatMulNBits with one scale and zero point per `block_size` input channels;
activations stay in float. Embedding lookups (Gather) stay in float in both.

Neither quantiser takes Gemm, the node GPT-2-style Conv1D layers export as, so such graphs are first
rewritten to MatMul + Add (exactly equivalent); otherwise those layers would silently stay in fp32.

Both start from the fp32 graph; the parity gate then compares the result with the merged PyTorch model
and the held-out perplexity before and after is reported beside the sizes on disk.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from . import ExportError
from .onnx import is_model_file

QUANTIZE_CHOICES = ("none", "int8", "int4")
MODEL_FILE = "model.onnx"


def quantize(src: Path, dst: Path, method: str, block_size: int = 32) -> None:
    """Write a quantised copy of the ONNX folder `src` to `dst` (config, tokenizer and all)."""
    if method not in ("int8", "int4"):
        raise ExportError(f"--quantize {method!r}: choose one of {', '.join(QUANTIZE_CHOICES)}")
    if method == "int4" and (block_size < 16 or block_size & (block_size - 1)):
        raise ExportError(f"--block-size {block_size}: MatMulNBits needs a power of two, at least 16")
    # Everything but the graph and its weights is copied unchanged: config, generation config, tokenizer.
    shutil.copytree(src, dst, ignore=lambda _, names: [n for n in names if is_model_file(n)])
    large = any(is_model_file(p.name) and not p.name.endswith(".onnx") for p in src.iterdir())  # over 2 GB
    # The int4 quantiser logs every node at INFO; the parity report says what matters.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    staged = _matmul_graph(src / MODEL_FILE, dst, large)
    try:
        if method == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(staged, dst / MODEL_FILE, weight_type=QuantType.QInt8, per_channel=True,
                             use_external_data_format=large)
        else:
            import onnx
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            quantizer = MatMulNBitsQuantizer(onnx.load(str(staged)), bits=4, block_size=block_size, is_symmetric=False)
            quantizer.process()
            quantizer.model.save_model_to_file(str(dst / MODEL_FILE), use_external_data_format=large)
    finally:
        for p in dst.glob(STAGED + "*"):
            p.unlink()


STAGED = "matmul-staged.onnx"


def _matmul_graph(model_file: Path, workdir: Path, large: bool) -> Path:
    """`model_file`, or a copy in `workdir` with every Gemm on a constant weight rewritten as MatMul + Add."""
    import onnx
    from onnx import helper, numpy_helper

    if not any(n.op_type == "Gemm" for n in onnx.load(str(model_file), load_external_data=False).graph.node):
        return model_file
    model = onnx.load(str(model_file))
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in weights or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        if attrs.get("transB", 0):  # MatMul wants (in, out)
            w = weights[node.input[1]]
            w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w).T.copy(), w.name))
        has_bias = len(node.input) > 2 and node.input[2]
        product = node.output[0] + "_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", node.input[:2], [product], name=node.name + "_MatMul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], node.output, name=node.name + "_Add"))
    graph.ClearField("node")
    graph.node.extend(nodes)
    staged = workdir / STAGED
    onnx.save(model, str(staged), save_as_external_data=large, location=STAGED + "_data")
    return staged
