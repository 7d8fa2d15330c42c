"""Quantised graphs use the fast CPU kernels (export/quantize.py) and still pass the parity gate."""

import onnx
import pytest
import torch

from lite_sft.export.onnx import export_onnx, load_ort
from lite_sft.export.parity import batch_check, compare, make_reference, ort_batch_logits, ort_logits
from lite_sft.export.prompts import Prompt
from lite_sft.export.quantize import quantize


@pytest.fixture(scope="module")
def tiny_onnx(tiny_model_dir, tmp_path_factory):
    """(the merged PyTorch model, its fp32 ONNX folder)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    out = tmp_path_factory.mktemp("quantize") / "onnx"
    export_onnx(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), out)
    return model, out


def nodes(folder, op_type):
    return [n for n in onnx.load(str(folder / "model.onnx")).graph.node if n.op_type == op_type]


def weight_matmuls(folder):
    """MatMul nodes on a stored weight: those a quantiser should have replaced (attention's are on activations)."""
    graph = onnx.load(str(folder / "model.onnx")).graph
    weights = {t.name for t in graph.initializer}
    return [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def test_int4_multiplies_int8_activations(tiny_onnx, tmp_path):
    """accuracy_level 4: onnxruntime's CPU kernel quantises activations to int8 instead of dequantising the
    weights at every step (without it a 100M Llama decoded int4 slower than int8)."""
    _, fp32 = tiny_onnx
    quantize(fp32, tmp_path / "onnx-int4", "int4", block_size=32)
    matmuls = nodes(tmp_path / "onnx-int4", "MatMulNBits")
    # 2 layers x (q, k and v fused by the builder, o, gate, up, down) + the output head
    assert len(matmuls) == 11 and not weight_matmuls(tmp_path / "onnx-int4")
    for node in matmuls:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert (attrs["bits"], attrs["block_size"], attrs.get("accuracy_level")) == (4, 32, 4), node.name


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_graph_passes_the_gate(method, tiny_onnx, tmp_path):
    """The gate as the export pipeline runs it: one prompt at a time and two padded in one batch (on the right:
    the builder's GroupQueryAttention graph)."""
    model, fp32 = tiny_onnx
    prompts = [Prompt(ids) for ids in ([5, 9, 13, 40, 41, 7], [3, 8, 22, 17, 30, 31, 60, 61, 70, 12, 11])]
    ref = make_reference(model, prompts, new_tokens=8)
    quantize(fp32, tmp_path / f"onnx-{method}", method, block_size=32)
    ort = load_ort(tmp_path / f"onnx-{method}")
    gate = compare(ref, ort_logits(ort, ref), stage=method, artefact=f"onnx-{method}", precision=method,
                   reference="merged model")
    batch_check(gate, ref, ort_batch_logits(ort, ref.subset(ref.batch_rows())), side="right" if ort.pad_right else "left")
    assert gate.passed and gate.extra["batch"]["padding_side"] == "right", gate.to_dict()
    assert gate.mean_abs_diff > 0  # it was quantised
