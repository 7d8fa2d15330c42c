"""The graphs of a multi-adapter encoder export: one shared trunk with LoRA banks as inputs, one small head per run.

    sites = trunk_sites(trunk, ["encoder.layer.0.attention.self.query", ...])    # [Site], fan-in and fan-out
    outputs = export_trunk(trunk, sites, ["input_ids", "attention_mask"], tmp / "onnx" / "model.onnx")
    export_head(merged_classifier, outputs, tmp / "heads" / "sentiment.onnx")

A classifier is a trunk (its `base_model`: BertModel, RobertaModel, ...) and a task head on the trunk's output.
Runs tuned on one base share the trunk's weights and differ in their LoRA matrices on the trunk's projections
and in their heads (trained whole: peft's modules_to_save, and whatever LoRA sits outside the trunk). So:

    onnx/model.onnx     the trunk of base/, with `y = x W + ((x A) * lora_mask[:, None, :]) B` at every site some
                        run trains (lite_sft/adapters.py's contract: inputs lora.{site}.A (in, R), lora.{site}.B
                        (R, out), lora_mask (batch, R), R dynamic); outputs last_hidden_state (batch, seq, hidden)
                        and, for a trunk with a pooler (BERT), pooler_output (batch, hidden)
    heads/NAME.onnx     the run's merged classifier with its trunk cut off: inputs the trunk's outputs (and
                        input_ids, attention_mask where the head reads them: a decoder's last-token pick), output
                        logits, (batch, labels) or (batch, seq, labels)

A site is the projection's module path inside the trunk (`encoder.layer.0.attention.self.query`), so the same
adapter file format serves encoders and decoders.

Why torch.onnx over a wrapped module rather than graph surgery (as export/lora_graph.py does on the model
builder's decoder graph): torch.onnx names nodes by the Python call path, which differs by architecture and
version, while wrapping the trunk's nn.Linear modules before export puts the branch where transformers computes
the projection, for every encoder transformers has, and the graph is checked against PyTorch by the gate.
The head is exported from the run's own merged model with its trunk replaced by a stub that hands back the
trunk's outputs, so the head is transformers' own code (a pooler-fed Linear, RoBERTa's dense-tanh-out_proj,
DistilBERT's pre_classifier), not a copy of it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lite_sft.adapters import MASK_INPUT, Site, input_names

from . import ExportError
from .exporters.dynamo import dynamo_export
from .exporters.torch_encoder import _reason as reason
from .exporters.torch_encoder import example_inputs

TRUNK_OUTPUTS = ("last_hidden_state", "pooler_output")
EXAMPLE_RANK = 5  # the banks' example width: apart from 0, 1 and the example's batch and sequence sizes


def trunk_of(model) -> torch.nn.Module:
    """The classifier's trunk: transformers' `base_model` (the module named by base_model_prefix)."""
    trunk = model.base_model
    if trunk is model:
        raise ExportError(f"{type(model).__name__} has no separate trunk (base_model_prefix "
                          f"{getattr(model, 'base_model_prefix', '')!r}): its adapters cannot share one base graph")
    return trunk


def trunk_sites(trunk: torch.nn.Module, paths: list[str]) -> list[Site]:
    """A Site (module path, fan-in, fan-out) for every path, each an nn.Linear of `trunk`; in the order given."""
    sites = []
    for path in paths:
        try:
            module = trunk.get_submodule(path)
        except AttributeError:
            raise ExportError(f"the base has no module {path!r} to put a LoRA branch beside") from None
        if not isinstance(module, torch.nn.Linear):
            raise ExportError(f"{path} is a {type(module).__name__}, not a Linear: a LoRA branch goes beside a "
                              "Linear projection")
        sites.append(Site(path, module.in_features, module.out_features))
    return sites


class _BankLinear(torch.nn.Module):
    """A trunk Linear plus its LoRA branch on the banks of the current call (set by _Trunk.forward)."""

    def __init__(self, linear: torch.nn.Linear, site: str, feed: dict):
        super().__init__()
        self.linear, self.a_name, self.b_name, self.feed = linear, *input_names(site), feed

    def forward(self, x):
        mask = self.feed[MASK_INPUT]  # (batch, R), against x (batch, seq, in) or a pooler's (batch, in)
        mask = mask.reshape(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[1]).to(x.dtype)
        delta = (x @ self.feed[self.a_name]) * mask
        return self.linear(x) + delta @ self.feed[self.b_name]


class _Trunk(torch.nn.Module):
    """The trunk with its sites' Linears wrapped, called with the token inputs, the mask and the banks (in site
    order, A then B); returns the trunk's outputs as a tuple."""

    def __init__(self, trunk: torch.nn.Module, sites: list[Site], names: list[str], outputs: list[str]):
        super().__init__()
        self.trunk, self.names, self.outputs, self.feed = trunk, names, outputs, {}
        self.banks = [name for site in sites for name in input_names(site.name)]
        for site in sites:
            parent, _, leaf = site.name.rpartition(".")
            owner = trunk.get_submodule(parent) if parent else trunk
            setattr(owner, leaf, _BankLinear(getattr(owner, leaf), site.name, self.feed))
        takes = trunk.forward.__code__.co_varnames
        self.extra = {"use_cache": False} if "use_cache" in takes else {}

    def forward(self, tokens: tuple, lora_mask, banks: tuple):
        self.feed.clear()
        self.feed.update(zip(self.banks, banks), **{MASK_INPUT: lora_mask})
        out = self.trunk(**dict(zip(self.names, tokens)), **self.extra)
        return tuple(getattr(out, name) for name in self.outputs)


def _example(trunk, names: list[str]) -> tuple[torch.Tensor, ...]:
    """torch_encoder's example: two rows of eight tokens, the second right-padded."""
    example = example_inputs(trunk, names)
    return tuple(example[name] for name in names)


def trunk_outputs(trunk: torch.nn.Module, names: list[str]) -> list[str]:
    """What the trunk returns of TRUNK_OUTPUTS (a trunk without a pooler gives no pooler_output)."""
    with torch.no_grad():
        out = trunk(**dict(zip(names, _example(trunk, names))))
    return [name for name in TRUNK_OUTPUTS if getattr(out, name, None) is not None]


def export_trunk(trunk: torch.nn.Module, sites: list[Site], names: list[str], out_file: Path) -> list[str]:
    """Write the trunk graph with LoRA branches at `sites` to `out_file` (fp32); `names` are the token inputs the
    model reads (torch_encoder.input_names). Returns the graph's outputs (trunk_outputs). The trunk's Linears are
    wrapped in place: pass a trunk loaded for this export only."""
    outputs = trunk_outputs(trunk, names)
    module = _Trunk(trunk.eval(), sites, names, outputs)
    banks = tuple(torch.randn(*shape) * 0.02 for site in sites
                  for shape in ((site.fan_in, EXAMPLE_RANK), (EXAMPLE_RANK, site.fan_out)))
    tokens = _example(trunk, names)
    batch, seq, rank = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length"), torch.export.Dim("lora_rank")
    dynamic = (tuple({0: batch, 1: seq} for _ in names), {0: batch, 1: rank},
               tuple({1: rank} if i % 2 == 0 else {0: rank} for i in range(len(banks))))
    try:
        program = dynamo_export(module, (tokens, torch.ones(2, EXAMPLE_RANK), banks),
                                input_names=[*names, MASK_INPUT, *module.banks], output_names=outputs,
                                dynamic_shapes=dynamic)
    except Exception as err:  # noqa: BLE001  (torch.export and onnxscript raise anything from deep inside)
        raise ExportError(f"torch.onnx could not export the {trunk.config.model_type} trunk with LoRA branches "
                          f"({reason(err)}); export each run alone instead") from err
    _portable(program)
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    program.save(str(out_file))
    return outputs


class _Stub(torch.nn.Module):
    """Stands where the trunk was: hands back the outputs the head graph was given."""

    def __init__(self, output_type):
        super().__init__()
        self.output_type, self.value = output_type, None

    def forward(self, *_args, **_kwargs):
        return self.value


class _Head(torch.nn.Module):
    def __init__(self, model, output_type, outputs: list[str]):
        super().__init__()
        self.model, self.outputs = model, outputs
        self.stub = _Stub(output_type)
        setattr(model, model.base_model_prefix, self.stub)

    def forward(self, trunk: tuple, input_ids, attention_mask):
        self.stub.value = self.stub.output_type(**dict(zip(self.outputs, trunk)))
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def export_head(model, outputs: list[str], out_file: Path) -> list[str]:
    """Write `model`'s head (a merged classifier, fp32: everything but its trunk) to `out_file`; its inputs are the
    trunk's `outputs` and, where the head reads them, input_ids and attention_mask. Returns the graph's inputs.
    The model's trunk is replaced in place: pass a model loaded for this export only."""
    trunk = trunk_of(model)
    names = ["input_ids", "attention_mask"]
    tokens = _example(trunk, names)
    with torch.no_grad():
        out = trunk(input_ids=tokens[0], attention_mask=tokens[1])
    outputs = [name for name in outputs if getattr(out, name, None) is not None]  # a token head reads no pooler
    given = tuple(getattr(out, name) for name in outputs)
    module = _Head(model.eval(), type(out), outputs)
    batch, seq = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
    shapes = {"last_hidden_state": {0: batch, 1: seq}, "pooler_output": {0: batch}}
    try:
        program = dynamo_export(module, (given, *tokens), input_names=[*outputs, *names], output_names=["logits"],
                                dynamic_shapes=(tuple(shapes[name] for name in outputs), {0: batch, 1: seq},
                                                {0: batch, 1: seq}))
    except Exception as err:  # noqa: BLE001
        raise ExportError(f"torch.onnx could not export the {type(model).__name__} head on its own "
                          f"({reason(err)}); export the run alone instead") from err
    _portable(program)
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    program.save(str(out_file))
    return [value.name for value in program.model.graph.inputs]


def _portable(program) -> None:
    """As torch_encoder.export: no stale weight shapes in value_info (the int8 quantiser's shape inference trips on
    them), no node metadata (the Python stack of this machine)."""
    from onnx_ir.passes.common import ClearMetadataAndDocStringPass

    for value in program.model.graph.initializers.values():
        value.shape, value.type = None, None
    ClearMetadataAndDocStringPass()(program.model)

