"""The classifiers (seq-cls, token-cls) through torch's own exporter: BERT-like encoders, and decoders with a
classification head (LlamaForSequenceClassification and kin).

    lite-sft export runs/sentiment --out exports/sentiment --quantize int8   # onnx/model.onnx from torch.onnx

torch.onnx.export(dynamo=True) captures the model with torch.export, so the graph keeps dynamic batch and
sequence axes instead of the shapes a trace saw. The folder:
    model.onnx        inputs input_ids, attention_mask (and token_type_ids where the model takes them and the
                      tokenizer gives them), each (batch, sequence) int64; output logits, seq-cls (batch, labels),
                      token-cls (batch, sequence, labels); weights over 2 GB in model.onnx.data
    config.json       the merged model's, labels included (id2label, label2id)
    tokenizer files   the merged folder's, copied as they are

No fusion pass is written into the graph: onnxruntime fuses it when a session loads it at ORT_ENABLE_ALL (as
open() below and the server do): SkipLayerNormalization, BiasGelu, FusedMatMul, and once quantised
DynamicQuantizeMatMul / MatMulIntegerToFloat. Measured on all-MiniLM-L6-v2, SST-2 dev, one thread
(benchmarks/encoder_onnx.py --fusions, results/encoder_onnx-20261205-065533.json), ms per batch:
                      batch 32 (45 tokens)     batch 1 (24 tokens)
                      fp32     int8            fp32     int8
    eager PyTorch     392                      14.6
    this graph        386      164 (23.0 MB)    7.9     3.4
    optimize_for_ort  389      210 (30.9 MB)    7.5     4.3
    + QAttention      374      168 (23.0 MB)    7.3     3.1
onnxscript's optimize_for_ort fuses Attention, but takes its weight as a Concat of Q, K and V made at run time,
with qkv_hidden_sizes and an additive attention_bias, and onnxruntime's quantize_dynamic then leaves Q, K and V
in fp32. Making it a QAttention (fold the weight, drop the attribute, pass the mask as mask_index) takes graph
surgery that holds only for padding masks, for no gain in int8 at batch 32 and 10% at batch 1. The plain
graph quantises every projection, Q, K and V included, as MatMulInteger with export/quantize.py unchanged,
hence no quantize() here. fp32 at batch 32 is matrix-multiply bound (about 80 GFLOP/s on one core for either
library), so it runs at eager's speed; the 1.8x at batch 1 is PyTorch's per-op overhead.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import NamedTuple

import torch

from lite_sft.artifacts import ONNX_FILE, TOKENIZER_CONFIG, TOKENIZER_FILES, copy_model_files

from .. import ExportError
from ..onnx import one_line
from .dynamo import dynamo_export

NAME = "torch"
# What a classifier may read, in the order the graph declares them (optimum's order, kept for its readers).
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def refuses(config, dtype: str) -> str | None:
    """Why this exporter cannot export the transformers `config` at `dtype`, or None when it can."""
    if dtype != "fp32":
        return f"--dtype {dtype}: classifiers export in fp32 (shrink them with --quantize int8 or int4)"
    if getattr(config, "is_encoder_decoder", False):
        return (f"{config.model_type} is an encoder-decoder: its classifier runs a decoder too, which this exporter "
                "of single-stack classifiers does not take")
    return None


def input_names(model, merged: Path) -> list[str]:
    """input_ids and attention_mask, and token_type_ids when the model reads them and the tokenizer gives them
    (BERT, not RoBERTa, whose single token type the model fills in itself)."""
    from transformers import AutoTokenizer

    takes = inspect.signature(model.forward).parameters
    # transformers 5 makes up an empty tokenizer for a folder without one, so its files are looked for first.
    if not any((merged / name).is_file() for name in (TOKENIZER_FILES[0], TOKENIZER_CONFIG)):
        raise ExportError(f"{merged} holds no tokenizer ({TOKENIZER_FILES[0]} or {TOKENIZER_CONFIG}) to copy beside "
                          "the graph; the merged folder keeps the run's tokenizer: merge again")
    try:
        given = set(AutoTokenizer.from_pretrained(merged).model_input_names)
    except (OSError, ValueError) as err:
        raise ExportError(f"the tokenizer in {merged} cannot be read ({one_line(err)}); merge again") from err
    return [n for n in INPUTS if n in takes and (n != "token_type_ids" or n in given)]


class Logits(torch.nn.Module):
    """The classifier with its logits as the one output: a decoder's head would also return its KV cache, which
    torch.export cannot flatten (DynamicCache) and the graph does not need."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        takes = inspect.signature(model.forward).parameters
        self.extra = {"use_cache": False} if "use_cache" in takes else {}

    def forward(self, input_ids, attention_mask, token_type_ids=None):  # named: torch.export keys shapes by name
        extra = {**self.extra, **({} if token_type_ids is None else {"token_type_ids": token_type_ids})}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits


def example_inputs(model, names: list[str]) -> dict[str, torch.Tensor]:
    """Two rows of eight tokens, the second padded: sizes apart from 0, 1 and each other, which torch.export would
    otherwise specialise the graph to, and a padded row so a decoder head's last-token pick is captured as such."""
    vocab, pad = model.config.vocab_size, model.config.pad_token_id
    pad = pad if isinstance(pad, int) else 0
    ids = torch.full((2, 8), (pad + 1) % vocab, dtype=torch.long)
    mask = torch.ones_like(ids)
    ids[1, 5:], mask[1, 5:] = pad, 0
    example = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return {name: example[name] for name in names}


def export(model, merged: Path, out: Path, dtype: str) -> None:
    """Write `out` (model.onnx, config.json, the tokenizer) from `model`, the merged classifier loaded in fp32 from
    the Hugging Face folder `merged`."""
    from onnx_ir.passes.common import ClearMetadataAndDocStringPass

    why = refuses(model.config, dtype)
    if why:
        raise ExportError(f"torch exporter: {why}")
    names = input_names(model, merged)
    kwargs = example_inputs(model, names)
    batch, seq = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
    try:
        program = dynamo_export(Logits(model.eval()), (), kwargs=kwargs, input_names=names, output_names=["logits"],
                                dynamic_shapes={name: {0: batch, 1: seq} for name in names})
    except Exception as err:  # noqa: BLE001  (torch.export and onnxscript raise anything from deep inside)
        raise ExportError(f"torch.onnx could not export this {model.config.model_type} classifier "
                          f"({_reason(err)}); the merged model is fine: export it alone with --no-onnx") from err
    # torch.onnx declares every weight's shape in value_info too, where a tool that rewrites a weight leaves it
    # stale: quantize.py's Gemm -> MatMul transposes the classifier's, and onnxruntime's quantiser then fails
    # shape inference ("Inferred shape and existing shape differ"). The weight carries its own shape.
    for value in program.model.graph.initializers.values():
        value.shape, value.type = None, None
    # Each node's metadata holds the Python stack that made it: this machine's paths, and no use to a runtime.
    ClearMetadataAndDocStringPass()(program.model)
    out.mkdir(parents=True)
    copy_model_files(merged, out)  # config (labels) and tokenizer
    program.save(out / ONNX_FILE)  # external data past the 2 GB protobuf limit


def _reason(err: BaseException) -> str:
    """torch.onnx's errors open with a generic 'Failed to export ... step 1/3' and name the cause in an
    'Exception summary' line `<class 'X'>: message`; that line, else the first."""
    for line in str(err).splitlines():
        if line.startswith("<class '"):
            return line.removeprefix("<class '").replace("'>", "", 1)[:300]
    return one_line(err)


class Output(NamedTuple):
    logits: torch.Tensor
    """seq-cls (batch, labels), token-cls (batch, sequence, labels), float32."""


def gate_session(model_file: Path):
    """An onnxruntime CPU session for a classifier graph the gate runs (this folder's, or a multi-adapter export's
    trunk and heads), fused at ORT_ENABLE_ALL as the server loads it; a graph that does not load is an ExportError."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # The gate runs this beside the PyTorch model in one process; onnxruntime's default pool takes every core
    # and spins between runs, which slows torch's own threads, so both get the same count.
    options.intra_op_num_threads = torch.get_num_threads()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # the fusions (docstring)
    try:
        return ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001  (onnxruntime raises its own Fail / InvalidProtobuf / ... types)
        raise ExportError(f"onnxruntime could not load {model_file}: {one_line(err)}") from err


class OrtClassifier:
    """An exported folder on onnxruntime's CPU provider, called as the PyTorch classifier is:
    `runner(input_ids=..., attention_mask=...).logits`, a torch.Tensor (what parity_tasks.py does with it)."""

    def __init__(self, folder: Path):
        self.session = gate_session(Path(folder) / ONNX_FILE)
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, **inputs: torch.Tensor) -> Output:
        if "token_type_ids" in self.inputs and "token_type_ids" not in inputs:  # a tokenizer that gives none
            inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
        feed = {name: inputs[name].long().numpy() for name in self.inputs}
        return Output(torch.from_numpy(self.session.run(["logits"], feed)[0]))


def open(folder: Path) -> OrtClassifier:  # noqa: A001  (the name every exporter module gives its runner)
    """What the parity gate runs the exported folder with."""
    return OrtClassifier(folder)
