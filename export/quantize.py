"""Quantise an exported ONNX model with onnxruntime's own quantisers, beside the one it came from.

    lite-sft export runs/qwen --out exports/qwen --quantize int8              # onnx/ and onnx-int8/
    lite-sft export runs/qwen --out exports/qwen --quantize int4 --block-size 32

int8: dynamic quantisation (quantize_dynamic): weights stored as 7-bit int8 per output channel, activations
quantised on the fly, MatMul becomes MatMulInteger. No calibration data needed. MatMulNBits with 8-bit
weights (accuracy level 4, as int4 below) was measured against it on a 100M Llama, one AVX2 core without
VNNI (onnxruntime 1.31): decoding no faster (70-75 against 77-86 tokens/s), a 128-token prompt 2.6 times
slower (its prefill kernel), so decoders keep this. Its logits were closer to fp32 (max |dlogit| 0.07
against 0.19): its full-range weights show no sign of the saturation that makes these 7-bit (_quantize_graph).
int4: weight-only quantisation (MatMulNBitsQuantizer, round-to-nearest, asymmetric): every MatMul with a
constant weight becomes MatMulNBits with one scale and zero point per `block_size` input channels, at
accuracy level 4: onnxruntime's CPU kernel quantises the activations to int8 per block and multiplies
integers, as onnxruntime-genai's models do. Without it (level 0, fp32 activations) the kernel dequantises
every weight block at every step: a 100M Llama decoded 42 tokens/s on one AVX2 core, slower than int8
(86), and 100 with it, with the same distance from the fp32 logits. GPU kernels ignore the level.
Embedding lookups (Gather) stay in float in both.

Neither quantiser takes Gemm, the node GPT-2-style Conv1D layers export as, so such graphs are first
rewritten to MatMul + Add (exactly equivalent); otherwise those layers would silently stay in fp32.

Every graph of the folder is quantised: model.onnx, or an encoder-decoder's encoder_model.onnx and
decoder_model.onnx (exporters/torch_seq2seq.py: each weight is in one of them only, so nothing is
quantised twice).

Both start from the fp32 graph; the parity gate then compares the result with the merged PyTorch model
and the held-out perplexity before and after is reported beside the sizes on disk.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from lite_sft.artifacts import is_model_file
from lite_sft.options import QUANTIZE_CHOICES

from . import ExportError

INT4_ACCURACY_LEVEL = 4  # MatMulNBits: int8 activations (see the module docstring)


def quantize(src: Path, dst: Path, method: str, block_size: int = 32) -> None:
    """Write a quantised copy of the ONNX folder `src` to `dst` (config, tokenizer and all): every graph in it."""
    if method not in ("int8", "int4"):
        raise ExportError(f"--quantize {method!r}: choose one of {', '.join(QUANTIZE_CHOICES)}")
    if method == "int4" and (block_size < 16 or block_size & (block_size - 1)):
        raise ExportError(f"--block-size {block_size}: MatMulNBits needs a power of two, at least 16")
    # Everything but the graph and its weights is copied unchanged: config, generation config, tokenizer.
    shutil.copytree(src, dst, ignore=lambda _, names: [n for n in names if is_model_file(n)])
    large = any(is_model_file(p.name) and not p.name.endswith(".onnx") for p in src.iterdir())  # over 2 GB
    # The int4 quantiser logs every node at INFO; the parity report says what matters.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    graphs = sorted(p.name for p in src.glob("*.onnx"))
    if not graphs:
        raise ExportError(f"{src} holds no ONNX graph (*.onnx) to quantise")
    for name in graphs:
        _quantize_graph(src / name, dst / name, method, block_size, large)


def _quantize_graph(src: Path, dst: Path, method: str, block_size: int, large: bool) -> None:
    staged = _matmul_graph(src, dst.parent, large)
    try:
        if method == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            # reduce_range: 7-bit weights. On x86 CPUs without VNNI (AVX2, AVX-512 before VNNI) onnxruntime
            # multiplies uint8 activations by int8 weights with VPMADDUBSW, whose int16 sums saturate at full
            # range; onnxruntime's quantisation guide asks for reduce_range with per-channel weights there. A
            # tiny BERT on an AVX2 CPU: mean |dlogit| 0.13 without it, 0.007 with it.
            quantize_dynamic(staged, dst, weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                             use_external_data_format=large)
        else:
            import onnx
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            quantizer = MatMulNBitsQuantizer(onnx.load(str(staged)), bits=4, block_size=block_size, is_symmetric=False,
                                             accuracy_level=INT4_ACCURACY_LEVEL)
            quantizer.process()
            quantizer.model.save_model_to_file(str(dst), use_external_data_format=large)
    finally:
        for p in dst.parent.glob(STAGED + "*"):
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
