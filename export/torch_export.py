"""The encoder tasks (seq-cls, token-cls) through torch's own exporter, fused for onnxruntime by onnxscript.

    lite-sft export runs/sentiment --out exports/sentiment --quantize int8   # onnx/model.onnx from torch.onnx

Why not optimum: optimum-onnx's last release requires transformers < 4.58, so lite-sft moves off it one
task at a time, and a BERT-like classifier is the simplest graph to move first. exporter_for says which
exporter writes a task's graph for an architecture; every other pair stays on optimum (onnx.py).

torch.onnx.export(dynamo=True) captures the model with torch.export, so no Python-side shape check is
frozen into the graph as tracing did. onnxscript's optimize_for_ort then fuses what onnxruntime has kernels
for (com.microsoft Attention, SkipLayerNormalization, BiasGelu, ...): on a MiniLM-sized BERT the logits
stayed within 2e-7 of PyTorch's. The folder keeps optimum's layout, so ORTModelFor*Classification, the
server (serve/encoder.py) and the quantisers (quantize.py) read it as they read optimum's:
    model.onnx          inputs input_ids, attention_mask (and token_type_ids where the tokenizer gives them),
                        each (batch, sequence) int64; output logits (seq-cls: batch, labels;
                        token-cls: batch, sequence, labels); batch and sequence axes dynamic
    model.onnx_data     the weights, for a model over the 2 GB protobuf limit
    config.json         the merged model's, labels included (id2label, label2id)
    tokenizer files     the merged folder's tokenizer
"""

from __future__ import annotations

import inspect
import logging
import warnings
from pathlib import Path

# The tasks torch's exporter writes, for the architectures in ENCODERS.
TORCH_TASKS = ("seq-cls", "token-cls")
# Encoders whose tiny classifiers export, fuse and give PyTorch's logits (within 1e-7) on a padded batch.
# A decoder used as a classifier (Llama) stays on optimum: onnxscript fuses its attention into
# GroupQueryAttention, which onnxruntime then refuses for a batch of more than one row.
ENCODERS = frozenset({"albert", "bert", "deberta-v2", "distilbert", "electra", "mpnet", "roberta", "xlm-roberta"})
# Inputs in the order optimum's encoder graphs declare them.
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Weights past this go to model.onnx_data: the protobuf limit is 2 GB for the graph and its weights together.
EXTERNAL_DATA_BYTES = 1_800_000_000


def exporter_for(task: str, model_type: str) -> str:
    """`torch` or `optimum`: which exporter writes the ONNX folder of `task` for the architecture `model_type`."""
    return "torch" if task in TORCH_TASKS and model_type.replace("_", "-") in ENCODERS else "optimum"


def input_names(model, tokenizer) -> list[str]:
    """What the graph takes: input_ids and attention_mask, and token_type_ids when the tokenizer gives them
    and the model reads them (BERT), as optimum's graph for the architecture declares them."""
    takes = inspect.signature(model.forward).parameters
    given = set(tokenizer.model_input_names) | {"input_ids", "attention_mask"}
    return [name for name in INPUTS if name in takes and name in given]


def export_encoder(model, out: Path) -> dict:
    """Write `model` (a merged *ForSequenceClassification or *ForTokenClassification, fp32 on CPU) to
    `out`/model.onnx with its config and tokenizer; returns onnxscript's fusion counts, as {fusion: count}."""
    import onnx_ir
    import torch
    from onnxscript.rewriter.ort_fusions import optimize_for_ort
    from transformers import AutoTokenizer

    # The tokenizer comes from model.config._name_or_path, the merged/ folder, as optimum takes it.
    tokenizer = AutoTokenizer.from_pretrained(model.config._name_or_path)
    names = input_names(model, tokenizer)
    model = model.eval().float()
    # Two rows of eight tokens, the second padded: sizes apart from each other and from 0 and 1, which
    # torch.export would otherwise specialise the graph to.
    ids = torch.full((2, 8), tokenizer.unk_token_id or 1, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    example = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    # The axis names optimum gives them.
    batch, seq = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
    kwargs = {name: example[name] for name in names}
    shapes = {name: {0: batch, 1: seq} for name in names}
    quiet = logging.getLogger("torch.onnx")  # it warns of every torchvision op it cannot register
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", (FutureWarning, UserWarning, DeprecationWarning))
            program = torch.onnx.export(model, (), kwargs=kwargs, dynamo=True, dynamic_shapes=shapes,
                                        input_names=names, output_names=["logits"], verbose=False)
    finally:
        quiet.setLevel(level)
    graph, stats = optimize_for_ort(program.model)
    # onnx_ir would also declare every weight's shape in value_info, where a tool that rewrites a weight
    # leaves it stale: quantize.py's Gemm -> MatMul transposes the classifier's, and onnxruntime's quantiser
    # then failed shape inference (so did its quantize_dynamic alone). The weight carries its own shape.
    for value in graph.graph.initializers.values():
        value.shape, value.type = None, None
    out.mkdir(parents=True, exist_ok=True)
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    onnx_ir.save(graph, out / "model.onnx", external_data="model.onnx_data" if large else None)
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {name: count for name, count in stats.items() if count}
