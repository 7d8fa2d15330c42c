"""The graphs of a multi-adapter classifier export (export/encoder_lora.py): the trunk with LoRA banks as inputs and
each classifier's head on its own give what PyTorch gives with that adapter merged, row by row in a padded batch
whose rows use different adapters (and one none), for BERT sequence and token classifiers, a pooler site
included."""

import copy

import numpy as np
import pytest
import torch

from lite_sft.adapters import MASK_INPUT
from lite_sft.export import ExportError
from lite_sft.export.encoder_lora import export_head, export_trunk, trunk_of, trunk_sites
from lite_sft.export.multi_gate import bank

pytest.importorskip("onnxruntime")
NAMES = ["input_ids", "attention_mask", "token_type_ids"]


def tiny_bert(kind: str):
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=64, pad_token_id=0, num_labels=3 if kind == "seq-cls" else 5)
    model = (BertForSequenceClassification if kind == "seq-cls" else BertForTokenClassification)(config)
    return model.eval()


def adapters(trunk, sites: dict[str, list[str]], ranks: list[int]) -> list[dict]:
    """Random nonzero LoRA matrices per adapter: {site: {"A": (in, r), "B": (r, out)}}, adapter k on sites[k]."""
    made = []
    for paths, rank in zip(sites, ranks):
        pairs = {}
        for path in paths:
            linear = trunk.get_submodule(path)
            pairs[path] = {"A": np.random.randn(linear.in_features, rank).astype(np.float32) * 0.3,
                           "B": np.random.randn(rank, linear.out_features).astype(np.float32) * 0.3}
        made.append(pairs)
    return made


def merged(model, pairs: dict):
    """`model` with an adapter merged: W (out, in) += (A B)^T."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for path, pair in pairs.items():
            trunk_of(model).get_submodule(path).weight += torch.from_numpy(pair["A"] @ pair["B"]).T
    return model


def batch():
    """Three rows, right-padded to 7 tokens: lengths 7, 4 and 5."""
    ids = torch.tensor([[2, 5, 9, 14, 22, 31, 3], [2, 40, 7, 3, 0, 0, 0], [2, 11, 12, 13, 3, 0, 0]])
    mask = (ids != 0).long()
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def run(trunk_file, head_file, inputs, feed, mask) -> np.ndarray:
    import onnxruntime as ort

    trunk = ort.InferenceSession(str(trunk_file), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in trunk.get_outputs()]
    tokens = {name: inputs[name].numpy() for name in NAMES}
    values = dict(zip(outputs, trunk.run(outputs, {**tokens, **feed, MASK_INPUT: mask})))
    head = ort.InferenceSession(str(head_file), providers=["CPUExecutionProvider"])
    given = {**values, **tokens}
    return head.run(["logits"], {i.name: given[i.name] for i in head.get_inputs()})[0]


@pytest.mark.parametrize("kind", ["seq-cls", "token-cls"])
def test_trunk_and_head_graphs_give_each_rows_merged_model(kind, tmp_path):
    np.random.seed(0)
    model = tiny_bert(kind)
    paths = ["encoder.layer.0.attention.self.query", "encoder.layer.1.output.dense"]
    if kind == "seq-cls":
        paths.append("pooler.dense")  # the pooler's Linear takes (batch, hidden), not (batch, seq, hidden)
    # Adapter 0 trains every site at rank 2, adapter 1 the first site only at rank 3.
    pairs = adapters(trunk_of(model), [paths, paths[:1]], [2, 3])
    trunk = copy.deepcopy(trunk_of(model))
    sites = trunk_sites(trunk, paths)
    assert [(s.fan_in, s.fan_out) for s in sites] == [(32, 32), (64, 32), (32, 32)][:len(paths)]
    outputs = export_trunk(trunk, sites, NAMES, tmp_path / "onnx" / "model.onnx")
    assert outputs == (["last_hidden_state", "pooler_output"] if kind == "seq-cls" else ["last_hidden_state"])
    head_inputs = export_head(copy.deepcopy(model), outputs, tmp_path / "head.onnx")
    assert set(head_inputs) <= {*outputs, "input_ids", "attention_mask"}

    inputs = batch()
    feed, spans = bank(sites, pairs, [2, 3])
    mask = np.zeros((3, 5), np.float32)
    mask[0, spans[0]], mask[1, spans[1]] = 1.0, 1.0  # row 2: no adapter, the base itself
    got = torch.from_numpy(run(tmp_path / "onnx" / "model.onnx", tmp_path / "head.onnx", inputs, feed, mask))
    with torch.no_grad():
        for row, reference in enumerate([merged(model, pairs[0]), merged(model, pairs[1]), model]):
            alone = {name: value[row:row + 1, :int(inputs["attention_mask"][row].sum())]
                     for name, value in inputs.items()}
            expected = reference(**alone).logits[0]
            length = alone["input_ids"].shape[1]
            torch.testing.assert_close(got[row] if kind == "seq-cls" else got[row, :length], expected,
                                       atol=1e-5, rtol=1e-4)
    # The branches did something: adapter 0's row differs from the base's on the same input.
    with torch.no_grad():
        base = model(**{name: value[:1] for name, value in inputs.items()}).logits[0]
    assert (got[0] - base).abs().max() > 1e-3


def test_a_site_that_is_not_a_linear_of_the_trunk_is_one_line():
    trunk = trunk_of(tiny_bert("seq-cls"))
    with pytest.raises(ExportError, match="no module 'encoder.layer.9.attention.self.query'"):
        trunk_sites(trunk, ["encoder.layer.9.attention.self.query"])
    with pytest.raises(ExportError, match="is a LayerNorm, not a Linear"):
        trunk_sites(trunk, ["encoder.layer.0.output.LayerNorm"])
