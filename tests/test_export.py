"""Export end to end: tune (LoRA and 4-bit) -> merge -> ONNX -> parity on four architectures, the CLI,
quantisation, and the errors a user sees."""

import json

import pytest
import torch
from typer.testing import CliRunner

from lite_sft.cli import app
from lite_sft.config import load_config
from lite_sft.export import ExportError
from lite_sft.export.pipeline import ExportOptions, export_run
from lite_sft.train import tune

pytest.importorskip("bitsandbytes")
runner = CliRunner()

# Two layers, hidden 64, grouped-query attention where the architecture has it.
DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)
ARCHS = {
    "llama": ("LlamaConfig", DECODER),
    "qwen2": ("Qwen2Config", DECODER),
    "mistral": ("MistralConfig", DECODER),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)),  # Conv1D layers
}


def build_base(path, arch, tokenizer, **dims):
    import transformers

    name, defaults = ARCHS[arch]
    config = getattr(transformers, name)(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                         **{**defaults, **dims})
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_config(base, data, out, **overrides):
    values = {"model.name_or_path": str(base), "data.path": str(data), "data.max_seq_len": 64,
              "data.validation_fraction": 0.1, "lora.r": 4, "lora.alpha": 8, "lora.dropout": 0.0,
              "train.max_steps": 2, "train.micro_batch_size": 2, "train.lr": 5e-2, "train.warmup_ratio": 0.0,
              "train.eval_every": 0, "train.save_every": 0, "output_dir": str(out)}
    return load_config(None, {**values, **overrides})


@pytest.fixture(scope="session")
def tuned(tmp_path_factory, bpe_tokenizer, chat_jsonl):
    """tuned(arch, quant) -> a finished run directory, made once per session."""
    runs = {}

    def make(arch="llama", quant="none"):
        if (arch, quant) not in runs:
            base = tmp_path_factory.getbasetemp() / f"base-{arch}"
            if not base.exists():
                build_base(base, arch, bpe_tokenizer)
            out = tmp_path_factory.mktemp(f"run-{arch}-{quant}")
            tune(run_config(base, chat_jsonl, out, **{"model.quant": quant}))
            runs[arch, quant] = out
        return runs[arch, quant]

    return make


@pytest.mark.parametrize("quant", ["none", pytest.param("4bit", marks=pytest.mark.slow)])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_tune_merge_onnx_parity(arch, quant, tuned, tmp_path):
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "export"
    report = export_run(tuned(arch, quant), out, say=lambda _: None)
    assert report["passed"] and [g["stage"] for g in report["gates"]] == ["merge", "onnx"]
    merge, onnx = report["gates"]
    assert merge["precision"] == ("float32" if quant == "none" else "float16")
    assert merge["greedy_agreement"] == 1.0 and onnx["greedy_agreement"] == 1.0
    assert onnx["max_abs_diff"] < 1e-4 and report["prompts"]["count"] == 4
    assert "held-out split" in report["prompts"]["source"]
    assert json.loads((out / "parity.json").read_text()) == report
    assert not list(tmp_path.glob("export.*"))  # no temporary or failed folder left beside it

    # merged/: a plain Hugging Face folder, no quantisation left, the chat template kept
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert getattr(merged.config, "quantization_config", None) is None and merged.config.use_cache
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert AutoTokenizer.from_pretrained(out / "merged").chat_template

    # onnx/: KV cache in and out, dynamic batch and sequence axes, and ORTModelForCausalLM generates
    # exactly what the merged PyTorch model generates.
    import onnx as onnx_lib

    graph = onnx_lib.load(str(out / "onnx" / "model.onnx"), load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert "past_key_values.0.key" in inputs and any(o.name == "present.0.key" for o in graph.output)
    assert all(isinstance(dim, str) for dim in inputs["input_ids"])  # (batch, sequence) both symbolic
    ort = ORTModelForCausalLM.from_pretrained(out / "onnx")
    ids = torch.tensor([[5, 40, 41, 42, 43]])
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ort.generate(ids, attention_mask=torch.ones_like(ids), **kwargs),
                       merged.float().generate(ids, attention_mask=torch.ones_like(ids), **kwargs))


@pytest.mark.parametrize("method, arch", [("int8", "llama"), ("int4", "llama"), ("int4", "gpt2")])
def test_quantized_onnx_is_smaller_and_gated(method, arch, tuned, tmp_path):
    import onnx as onnx_lib

    out = tmp_path / "export"
    report = export_run(tuned(arch), out, ExportOptions(quantize=method, block_size=32), say=lambda _: None)
    gate = report["gates"][-1]
    assert gate["stage"] == method and gate["passed"]
    assert gate["size_bytes_after"] < 0.6 * gate["size_bytes_before"]
    assert gate["perplexity_before"] > 0 and gate["perplexity_after"] > 0
    ops = {n.op_type for n in onnx_lib.load(str(out / f"onnx-{method}" / "model.onnx")).graph.node}
    assert ("MatMulNBits" if method == "int4" else "MatMulInteger") in ops
    assert "Gemm" not in ops  # GPT-2's Conv1D layers were rewritten to MatMul and quantised too
    assert (out / "onnx" / "model.onnx").is_file() and (out / f"onnx-{method}" / "tokenizer.json").is_file()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_external_data_layout_loads_and_quantizes(method, tuned, tmp_path, monkeypatch):
    """Over 2 GB the weights live beside the graph; FORCE_ONNX_EXTERNAL_DATA makes optimum do that for a tiny model."""
    monkeypatch.setenv("FORCE_ONNX_EXTERNAL_DATA", "1")
    out = tmp_path / "export"
    report = export_run(tuned("llama"), out, ExportOptions(quantize=method), say=lambda _: None)
    assert report["passed"] and (out / "onnx" / "model.onnx_data").is_file()
    quantized = {p.name for p in (out / f"onnx-{method}").iterdir()}
    assert "model.onnx" in quantized and any("data" in name and "onnx" in name for name in quantized - {"model.onnx"})
    gate = report["gates"][-1]
    assert gate["size_bytes_after"] < 0.6 * gate["size_bytes_before"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fp16_onnx(arch, tuned, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="lite_sft.export.onnx"):
        report = export_run(tuned(arch), tmp_path / "export", ExportOptions(dtype="fp16"), say=lambda _: None)
    onnx = report["gates"][1]
    assert onnx["precision"] == "float16" and onnx["passed"]
    assert 0 < onnx["max_abs_diff"] < 1e-2
    # Traced in fp16 on CPU, GPT-2's LayerNorm graph is one onnxruntime refuses: the fp32 graph is converted.
    assert ("converting the fp32 graph" in caplog.text) == (arch == "gpt2" and not torch.cuda.is_available())


def test_lite_sft_serve_runtime_loads_the_export(tuned, tmp_path):
    """The serving runtime (serve/runtime.py) reads the export OUT as written: decoding through its KV cache
    gives the merged model's logits."""
    import numpy as np

    runtime = pytest.importorskip("lite_sft.serve.runtime")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "export"
    export_run(tuned("qwen2"), out, ExportOptions(quantize="int4"), say=lambda _: None)
    backend, _ = runtime.load_backend(out, device="cpu", threads=1)
    ids = np.array([[5, 40, 41, 42, 43]])
    logits, state = backend.prefill(ids, np.ones_like(ids), capacity=ids.shape[1] + 6)
    steps = [logits]
    for _ in range(6):
        steps.append(backend.decode(state, steps[-1].argmax(-1)))
    seq = torch.tensor([list(ids[0]) + [int(s.argmax(-1)[0]) for s in steps[:-1]]])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(out / "merged").float()(input_ids=seq).logits[0, 4:]
    torch.testing.assert_close(torch.tensor(np.concatenate(steps)), expected, atol=1e-4, rtol=1e-4)
    quantized, _ = runtime.load_backend(out, device="cpu", threads=1, variant="int4")
    assert quantized.prefill(ids, np.ones_like(ids), capacity=8)[0].shape == (1, expected.shape[-1])


def test_cli_export_writes_every_artefact(tuned, tmp_path):
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(tuned("llama")), "--out", str(out), "--quantize", "int8"])
    assert result.exit_code == 0, result.output
    assert "parity on" in result.output and "FAIL" not in result.output and f"exported to {out}" in result.output
    assert {p.name for p in out.iterdir()} == {"merged", "onnx", "onnx-int8", "parity.json"}
    again = runner.invoke(app, ["export", str(tuned("llama")), "--out", str(out), "--no-onnx"])
    assert again.exit_code == 2 and "already exists" in again.output and "--overwrite" in again.output
    bad = runner.invoke(app, ["export", str(tuned("llama")), "--out", str(tmp_path / "x"), "--quantize", "int3"])
    assert bad.exit_code == 2 and "--quantize 'int3'" in bad.output


def test_failed_gate_keeps_the_artefact_under_a_failed_name_and_exits_1(tuned, tmp_path):
    """Merging a QLoRA adapter onto the original weights gives another model: the gate catches it."""
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(tuned("llama", "4bit")), "--out", str(out), "--merge-onto", "original",
                                 "--merged-dtype", "fp32"])
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.output and "parity.json" in result.output
    failed = tmp_path / "export.parity-failed"
    assert not out.exists() and (failed / "merged" / "model.safetensors").is_file()
    report = json.loads((failed / "parity.json").read_text())
    assert not report["passed"] and report["not_run"] == ["onnx"]
    assert report["gates"][0]["merge_onto"] == "original"


def test_overwrite_replaces_only_after_success(tuned, tmp_path, monkeypatch):
    out = tmp_path / "export"
    export_run(tuned("llama"), out, ExportOptions(onnx=False), say=lambda _: None)
    before = (out / "parity.json").read_text()
    with pytest.raises(ExportError, match="already exists"):
        export_run(tuned("llama"), out, ExportOptions(onnx=False), say=lambda _: None)

    import lite_sft.export.pipeline as pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(pipeline, "export_onnx", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_run(tuned("llama"), out, ExportOptions(overwrite=True), say=lambda _: None)
    assert (out / "parity.json").read_text() == before  # the old export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # and nothing half-written beside it
    monkeypatch.undo()
    export_run(tuned("llama"), out, ExportOptions(overwrite=True), say=lambda _: None)
    assert (out / "onnx" / "model.onnx").is_file()

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(ExportError, match="not an earlier export"):
        export_run(tuned("llama"), tmp_path / "mine", ExportOptions(overwrite=True), say=lambda _: None)
    with pytest.raises(ExportError, match="would hold the run directory"):
        export_run(tuned("llama"), tuned("llama").parent, ExportOptions(overwrite=True), say=lambda _: None)


def test_not_enough_disk_is_refused_before_writing(tuned, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    run = tuned("llama")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(ExportError, match="not enough disk space"):
        export_run(run, tmp_path / "export", say=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_bad_run_directories(tuned, tmp_path, bpe_tokenizer):
    import shutil

    import yaml

    with pytest.raises(ExportError, match="does not exist"):
        export_run(tmp_path / "nope", tmp_path / "out")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(tuned("llama") / "config.yaml", unfinished / "config.yaml")
    with pytest.raises(ExportError, match="holds no adapter.*--resume"):
        export_run(unfinished, tmp_path / "out")

    def moved(name, base):
        run = tmp_path / name
        shutil.copytree(tuned("llama"), run)
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["model"]["name_or_path"] = str(base)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        return run

    with pytest.raises(ExportError, match=r"model.name_or_path: .*gone.*does not exist"):
        export_run(moved("missing", tmp_path / "gone"), tmp_path / "out")
    other = build_base(tmp_path / "narrow", "llama", bpe_tokenizer, hidden_size=32)
    with pytest.raises(ExportError, match="not the model the adapter was trained on.*size mismatch"):
        export_run(moved("mismatch", other), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.*"))


def test_unsupported_architecture_names_it_and_what_is_supported(tuned, tmp_path):
    import shutil

    import yaml
    from transformers import MambaConfig

    base = tmp_path / "mamba"
    MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1).save_pretrained(base)
    run = tmp_path / "run"
    shutil.copytree(tuned("llama"), run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["name_or_path"] = str(base)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ExportError, match=r"'mamba'.*Supported: .*gpt2.*llama.*mistral.*qwen2.*--no-onnx"):
        export_run(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
