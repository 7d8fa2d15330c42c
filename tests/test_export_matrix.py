"""Every decoder family, tuned with LoRA and on a 4-bit base: export passes its gates, and the served ONNX model
(lite-sft's OrtBackend through generate()) decodes what the merged PyTorch model decodes, alone and in a padded
batch. An architecture no exporter takes fails in one line; a builder failure falls back to torch.onnx."""

import json

import pytest
import torch

from lite_sft.export.pipeline import export_run
from lite_sft.options import ExportOptions
from test_export import ARCHS, padding, run_config, runner, tuned_run

pytest.importorskip("bitsandbytes")

NEW_TOKENS = 8
# Two chat prompts of different lengths: the shorter is left-padded when they run together.
QUESTIONS = ("hello there", "the quick brown fox jumps over the lazy dog, how are you?")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, bpe_tokenizer, chat_jsonl):
    """exported(arch, quant) -> an export OUT of that tuned run (two parity prompts, few tokens: fast)."""
    done = {}

    def make(arch, quant):
        if (arch, quant) not in done:
            run = tuned_run(tmp_path_factory, bpe_tokenizer, chat_jsonl, arch, quant)
            out = tmp_path_factory.mktemp(f"matrix-{arch}-{quant}") / "export"
            report = export_run(run, out, ExportOptions(parity_prompts=2, parity_tokens=6), say=lambda _: None)
            done[arch, quant] = run, out, report
        return done[arch, quant]

    return make


@pytest.mark.parametrize("quant", ["none", pytest.param("4bit", marks=pytest.mark.slow)])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_export_and_serve_every_architecture(arch, quant, exported):
    import onnx
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lite_sft.serve.generate import SamplingParams, generate_ids
    from lite_sft.serve.backends.folder import stop_ids
    from lite_sft.serve.backends.ort import OrtBackend
    from lite_sft.stops import read_stop_tokens

    run, out, report = exported(arch, quant)
    assert report["passed"] and [g["stage"] for g in report["gates"]] == ["merge", "onnx"]
    merge, fp = report["gates"]
    assert merge["precision"] == ("float32" if quant == "none" else "float16")
    assert merge["greedy_agreement"] == 1.0 and fp["greedy_agreement"] == 1.0 and fp["max_abs_diff"] < 1e-4
    batch = fp["batch"]
    assert batch["passed"] and batch["greedy_agreement"] == 1.0 and padding(batch) > 0
    assert json.loads((out / "parity.json").read_text()) == report

    # merged/: a plain Hugging Face folder, no quantisation or adapter left, the chat template kept.
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    assert getattr(merged.config, "quantization_config", None) is None and merged.config.use_cache
    assert not any("lora" in name for name, _ in merged.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(out / "onnx")
    assert tokenizer.chat_template

    # onnx/: a KV cache in and out, batch and sequence axes symbolic.
    graph = onnx.load(str(out / "onnx" / "model.onnx"), load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert "past_key_values.0.key" in inputs and any(o.name == "present.0.key" for o in graph.output)
    assert all(isinstance(dim, str) for dim in inputs["input_ids"])

    # One stop list: the run's, in every folder, and what the server stops at (EOS </s> and <|im_end|>).
    stops = stop_ids(out / "onnx", tokenizer)
    assert stops == report["stop_ids"] == read_stop_tokens(out / "merged") == read_stop_tokens(run)
    assert {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} <= set(stops)

    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                               return_dict=False)
               for q in QUESTIONS]
    assert len(prompts[0]) < len(prompts[1])
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            new = merged.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                                  eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
            cut = next((i + 1 for i, t in enumerate(new) if t in stops), len(new))
            expected.append(new[:cut])
    backend = OrtBackend(out / "onnx", "cpu", threads=1)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, stop_ids=stops)
    assert [generate_ids(backend, [p], params)[0] for p in prompts] == expected  # alone
    assert generate_ids(backend, prompts, params) == expected  # left-padded, in one batch


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def test_an_architecture_no_exporter_takes_is_one_line_from_the_cli(tmp_path, tmp_path_factory,
                                                                       bpe_tokenizer, chat_jsonl):
    import shutil

    import yaml
    from transformers import MambaConfig

    from lite_sft.cli import app

    MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1).save_pretrained(tmp_path / "mamba")
    run = tmp_path / "run"
    shutil.copytree(tuned_run(tmp_path_factory, bpe_tokenizer, chat_jsonl, "llama"), run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["name_or_path"] = str(tmp_path / "mamba")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    line = one_error_line(runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "out")]))
    assert "no ONNX exporter takes this mamba model" in line and "--no-onnx" in line
    assert "builder:" in line and "torch:" in line  # why each exporter refused it
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.*"))


def test_a_builder_failure_falls_back_to_torch_and_a_failure_of_both_is_one_line(tmp_path, tmp_path_factory,
                                                                                 bpe_tokenizer, chat_jsonl,
                                                                                 monkeypatch):
    """The builder failing at export time hands over to torch.onnx (said in the log and parity.json); when the
    torch exporter fails too, one line, nothing written, and --no-onnx still exports the merged model."""
    from lite_sft.cli import app
    from lite_sft.export import ExportError
    from lite_sft.export.exporters import builder, torch_decoder

    def broken(name):
        def export(*args, **kwargs):
            raise ExportError(f"{name} broke (test)")
        return export

    run = tuned_run(tmp_path_factory, bpe_tokenizer, chat_jsonl, "llama")
    monkeypatch.setattr(builder, "export", broken("builder"))
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "out"), "--parity-prompts", "2",
                                 "--parity-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert "the builder exporter failed (builder broke (test)); trying torch" in result.output
    report = json.loads((tmp_path / "out" / "parity.json").read_text())
    assert report["passed"] and report["exporter"]["name"] == "torch"
    assert report["exporter"]["fallback_from"] == "builder failed (builder broke (test))"

    monkeypatch.setattr(torch_decoder, "export", broken("torch"))
    line = one_error_line(runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "again"),
                                              "--parity-prompts", "2", "--parity-tokens", "2"]))
    assert "torch broke (test)" in line
    assert not (tmp_path / "again").exists() and not list(tmp_path.glob("again.*"))
    forced = one_error_line(runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "again"),
                                                "--exporter", "builder"]))
    assert "builder broke (test)" in forced  # forced: no fallback
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "again"), "--no-onnx",
                                 "--parity-prompts", "2", "--parity-tokens", "2"])
    assert result.exit_code == 0, result.output  # the merged model alone, as the message says
