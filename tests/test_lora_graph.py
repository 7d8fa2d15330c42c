"""The multi-adapter graph (export/lora_graph.py): a row's LoRA delta uses only its own adapter's columns of the
banks, a row with an all-zero mask is the base model exactly, and adapter files round-trip."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from lite_sft import tiny
from lite_sft.adapters import input_names, peft_sites, read_adapter_file, write_adapter_file
from lite_sft.errors import ExportError, ServeError
from lite_sft.export.exporters import builder
from lite_sft.export.lora_graph import add_lora_branches

ort = pytest.importorskip("onnxruntime")
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-graph")
    merged = tiny.materialize_builtin_model()
    builder._build(merged, root / "base", "fp32", "cpu", disable_qkv_fusion="true")
    shutil.copytree(root / "base", root / "lora")
    sites = add_lora_branches(root / "lora" / "model.onnx", set(TARGETS))
    return merged, root, sites


def adapter(merged, seed: int, r: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False))
    return peft.eval(), peft_sites({k: v for k, v in peft.state_dict().items() if "lora_" in k}, 2.0)


def feed(session, ids):
    head = tiny.TINY_LLAMA["hidden_size"] // tiny.TINY_LLAMA["num_attention_heads"]
    out = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values."):  # (batch, kv heads, 0 past tokens, head size)
            out[value.name] = np.zeros((ids.shape[0], value.shape[1], 0, head), np.float32)
    return out


def test_each_row_gets_its_own_adapter_and_a_zero_mask_is_the_base(graphs):
    merged, root, sites = graphs
    assert [s.name for s in sites[:3]] == ["layers.0.q_proj", "layers.0.v_proj", "layers.0.down_proj"]
    (peft_a, a), (peft_b, b) = adapter(merged, 0, 4), adapter(merged, 1, 8)
    base = ort.InferenceSession(str(root / "base" / "model.onnx"))
    lora = ort.InferenceSession(str(root / "lora" / "model.onnx"))
    ids = np.array([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]], dtype=np.int64)
    inputs = feed(lora, ids)
    for site in sites:  # bank: adapter a's 4 columns, then b's 8
        name_a, name_b = input_names(site.name)
        inputs[name_a] = np.concatenate([a[site.name]["A"], b[site.name]["A"]], 1)
        inputs[name_b] = np.concatenate([a[site.name]["B"], b[site.name]["B"]], 0)
    inputs["lora_mask"] = np.array([[1] * 4 + [0] * 8, [0] * 4 + [1] * 8, [0] * 12], np.float32)
    logits = lora.run(["logits"], inputs)[0]
    plain = base.run(["logits"], feed(base, ids))[0]
    with torch.no_grad():
        want_a = peft_a(input_ids=torch.tensor(ids[:1])).logits.numpy()
        want_b = peft_b(input_ids=torch.tensor(ids[1:2])).logits.numpy()
    assert np.abs(logits[0] - want_a[0]).max() < 1e-4 * np.abs(want_a).max()
    assert np.abs(logits[1] - want_b[0]).max() < 1e-4 * np.abs(want_b).max()
    assert np.array_equal(logits[2], plain[2])  # no adapter: the base graph's logits, bit for bit


def test_adapter_files_round_trip(tmp_path, graphs):
    merged, _, _ = graphs
    _, sites = adapter(merged, 2, 4)
    path = write_adapter_file(tmp_path / "a.onnx_adapter", sites)
    back = read_adapter_file(path)
    assert set(back) == set(sites)
    for name, pair in sites.items():
        assert np.array_equal(back[name]["A"], pair["A"]) and np.array_equal(back[name]["B"], pair["B"])


def test_a_bad_adapter_file_and_a_missing_projection_are_one_clear_error(tmp_path, graphs):
    _, root, _ = graphs
    (tmp_path / "bad.onnx_adapter").write_bytes(b"not an adapter")
    with pytest.raises(ServeError, match="bad.onnx_adapter is not an onnxruntime adapter file"):
        read_adapter_file(tmp_path / "bad.onnx_adapter")
    with pytest.raises(ServeError, match="no such adapter file"):
        read_adapter_file(tmp_path / "gone.onnx_adapter")
    shutil.copytree(root / "base", tmp_path / "g")
    with pytest.raises(ExportError, match="no projection named qkv_proj"):
        add_lora_branches(tmp_path / "g" / "model.onnx", {"qkv_proj"})
