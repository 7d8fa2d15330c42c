"""Merging: onto the dequantised 4-bit weights for QLoRA, DoRA, the saved folder, broken adapters."""

import json
import logging

import pytest
import torch

from lite_sft.config import load_config
from lite_sft.export import ExportError
from lite_sft.export.merge import load_reference, merge, save_merged, unquantized_base
from lite_sft.export.pipeline import export_run
from lite_sft.options import ExportOptions
from lite_sft.train import tune
from test_export import build_base, run_config

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, bpe_tokenizer, chat_jsonl):
    """runs(arch, quant, dora) -> a finished run directory, made once per module."""
    made = {}

    def make(arch="llama", quant="4bit", dora=False):
        key = (arch, quant, dora)
        if key not in made:
            base = tmp_path_factory.getbasetemp() / f"merge-base-{arch}"
            if not base.exists():
                build_base(base, arch, bpe_tokenizer)
            out = tmp_path_factory.mktemp(f"merge-run-{arch}-{quant}-{dora}")
            tune(run_config(base, chat_jsonl, out, **{"model.quant": quant, "lora.use_dora": dora}))
            made[key] = out
        return made[key]

    return make


def logits_after_merge(run, onto, ids):
    cfg = load_config(run / "config.yaml")
    reference, tokenizer = load_reference(run, cfg)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        merged = merge(unquantized_base(reference, tokenizer, cfg, run, onto), cfg, run)
        return expected, merged(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_qlora_merge_onto_dequantized_weights_matches_the_adapter_model(arch, runs, caplog):
    """The adapter learned to correct the NF4 weights; merged onto the originals it no longer fits."""
    ids = torch.randint(10, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    expected, dequantized = logits_after_merge(runs(arch), "dequantized", ids)
    with caplog.at_level(logging.WARNING, logger="lite_sft.export.merge"):
        _, original = logits_after_merge(runs(arch), "original", ids)
    assert "ORIGINAL base weights" in caplog.text
    good, bad = (expected - dequantized).abs().max().item(), (expected - original).abs().max().item()
    assert good < 1e-5, good  # the same model up to fp32 rounding (GPT-2's Conv1D transposed right too)
    assert bad > 1e-3 and bad > 1000 * good, (good, bad)


def test_dora_on_4bit_merges_and_passes_the_gate(runs, tmp_path):
    run = runs("llama", "4bit", dora=True)
    assert json.loads((run / "adapter_config.json").read_text())["use_dora"]
    report = export_run(run, tmp_path / "export", ExportOptions(onnx=False, merged_dtype="fp32"), say=lambda _: None)
    (gate,) = report["gates"]
    assert gate["passed"] and gate["greedy_agreement"] == 1.0 and gate["max_abs_diff"] < 1e-4
    assert report["merged_dtype"] == "float32" and report["adapter"]["dora"]


def test_merged_folder_is_sharded_when_large_and_loads_unchanged(runs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    run = runs("llama", "none")
    cfg = load_config(run / "config.yaml")
    reference, tokenizer = load_reference(run, cfg)
    merged = merge(reference, cfg, run)
    save_merged(merged, tokenizer, tmp_path / "merged", torch.float32, max_shard_size="100KB")
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 1
    assert {"config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"} <= files
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.tensor([[5, 40, 41, 42]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, merged(input_ids=ids).logits)
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == tokenizer.chat_template
    # It stops where the tuned model learned to: EOS </s> and the chat template's end of turn <|im_end|>.
    stops = sorted([tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")])
    assert GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id == stops


def test_a_nan_adapter_is_refused(runs, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(runs("llama", "none"), run)
    weights = load_file(str(run / "adapter_model.safetensors"))
    name = next(n for n in weights if "lora_B" in n)
    weights[name][0, 0] = float("nan")
    save_file(weights, str(run / "adapter_model.safetensors"))
    with pytest.raises(ExportError, match=r"merged tensor .*NaN"):
        export_run(run, tmp_path / "export", ExportOptions(onnx=False), say=lambda _: None)
    assert not (tmp_path / "export").exists() and not list(tmp_path.glob("export.*"))


def test_an_8bit_run_merges_onto_its_int8_weights(runs, tmp_path):
    report = export_run(runs("llama", "8bit"), tmp_path / "export", ExportOptions(onnx=False, merged_dtype="fp32"),
                        say=lambda _: None)
    (gate,) = report["gates"]
    # LLM.int8 also quantises activations, which no float model reproduces: the int8 tolerance applies.
    assert gate["passed"] and gate["thresholds"]["min_agreement"] == 0.85 and gate["merge_onto"] == "dequantized"
