"""A base decoder graph with LoRA branches whose weights are inputs: the graph a multi-adapter export serves.

    sites = add_lora_branches(Path("OUT/onnx/model.onnx"), {"q_proj", "v_proj"})   # in place; returns the sites

The model builder writes one MatMul (MatMulNBits when int4) per projection, named `/model/layers.{i}/attn/
q_proj/MatMul`, `/model/layers.{i}/mlp/down_proj/MatMul` and so on (`.../MatMul_Q4` at int4), built with
disable_qkv_fusion so that q, k and v keep a MatMul each. Beside each projection some adapter trains, this adds
the branch lite_sft/adapters.py describes, in the graph's io dtype (float even when the base is int4 or int8):

    y' = y + MatMul(Mul(MatMul(x, lora.SITE.A), Unsqueeze(lora_mask, 1)), lora.SITE.B)

and rewires y's consumers to y'. Written by hand because nothing does it: onnxruntime-genai's builder bakes one
adapter's weights into the graph as initializers (its adapter_path option) and onnxruntime's LoRA adapters swap
those inputs for a whole batch at once, so neither gives a row its own adapter within a batch.
"""

from __future__ import annotations

import re
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from lite_sft.adapters import MASK_INPUT, Site, input_names, site_name

from . import ExportError

NODE = re.compile(r"^/model/layers\.(\d+)/(?:attn|mlp)/([A-Za-z_0-9]+)/(MatMul|MatMulNBits|MatMul_Q4)$")
RANK_DIM, BATCH_DIM = "lora_rank", "batch_size"


def projections(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """{site: the base projection node} for every decoder-layer projection the builder wrote."""
    found = {}
    for node in graph.node:
        match = NODE.match(node.name)
        if match:
            found[site_name(int(match.group(1)), match.group(2))] = node
    return found


def _fan(graph: onnx.GraphProto, node: onnx.NodeProto) -> tuple[int, int]:
    """(in, out) of a projection: its weight's shape, or MatMulNBits' K and N attributes."""
    if node.op_type == "MatMulNBits":
        attrs = {a.name: a.i for a in node.attribute}
        return attrs["K"], attrs["N"]
    weight = next((init for init in graph.initializer if init.name == node.input[1]), None)
    if weight is None or len(weight.dims) != 2:
        raise ExportError(f"{node.name}: its weight {node.input[1]!r} is not a 2-D initializer of the graph")
    return int(weight.dims[0]), int(weight.dims[1])


def io_dtype(graph: onnx.GraphProto) -> int:
    """The activations' element type: the KV cache inputs' (float, or float16 for a CUDA graph)."""
    for value in graph.input:
        if value.name.startswith("past_key_values."):
            return value.type.tensor_type.elem_type
    return TensorProto.FLOAT


def add_lora_branches(model_path: Path, modules: set[str]) -> list[Site]:
    """Add a branch beside every projection of `modules` (q_proj, v_proj, ...) in the graph at `model_path`, in
    place (its external weights file is left as it is). Returns the sites, in graph order. A module the graph has
    no projection for (a packed qkv_proj, an embedding, lm_head) is one ExportError naming it."""
    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    nodes = projections(graph)
    have = {site.split(".", 2)[2] for site in nodes}
    missing = sorted(set(modules) - have)
    if missing:
        raise ExportError(f"the base graph has no projection named {', '.join(missing)} in its decoder layers (it "
                          f"has {', '.join(sorted(have)) or 'none'}): a multi-adapter export serves LoRA on those only")
    dtype = io_dtype(graph)
    graph.input.append(helper.make_tensor_value_info(MASK_INPUT, dtype, [BATCH_DIM, RANK_DIM]))
    mask3 = f"{MASK_INPUT}/rows"
    unsqueeze = helper.make_node("Unsqueeze", [MASK_INPUT, f"{MASK_INPUT}/axes"], [mask3], name=f"/{MASK_INPUT}/Unsqueeze")
    branches: dict[int, list] = {}  # a projection's position -> its branch, inserted right after it
    graph.initializer.append(helper.make_tensor(f"{MASK_INPUT}/axes", TensorProto.INT64, [1], [1]))
    sites, renamed = [], {}
    for site, node in nodes.items():
        if site.split(".", 2)[2] not in modules:
            continue
        fan_in, fan_out = _fan(graph, node)
        a_name, b_name = input_names(site)
        graph.input.append(helper.make_tensor_value_info(a_name, dtype, [fan_in, RANK_DIM]))
        graph.input.append(helper.make_tensor_value_info(b_name, dtype, [RANK_DIM, fan_out]))
        base = node.name.rsplit("/", 1)[0] + "/lora"
        x, y = node.input[0], node.output[0]
        summed = f"{base}/Add/output_0"
        branches[node.name] = [
            helper.make_node("MatMul", [x, a_name], [f"{base}/A/output_0"], name=f"{base}/A"),  # (b, s, R)
            helper.make_node("Mul", [f"{base}/A/output_0", mask3], [f"{base}/masked"], name=f"{base}/Mask"),
            helper.make_node("MatMul", [f"{base}/masked", b_name], [f"{base}/B/output_0"], name=f"{base}/B"),
            helper.make_node("Add", [y, f"{base}/B/output_0"], [summed], name=f"{base}/Add"),  # (b, s, out)
        ]
        renamed[y] = summed
        sites.append(Site(site, fan_in, fan_out))
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    for value in graph.output:
        if value.name in renamed:
            raise ExportError(f"{value.name} is a graph output; a LoRA branch cannot follow it")
    # Topological order holds: the mask's Unsqueeze comes first, each branch right after its projection (it reads
    # x, which comes before, and its Add precedes every consumer of y, which came after).
    ordered = [unsqueeze]
    for node in graph.node:
        ordered.append(node)
        ordered.extend(branches.get(node.name, []))
    del graph.node[:]
    graph.node.extend(ordered)
    onnx.save(model, str(model_path))
    return sites

