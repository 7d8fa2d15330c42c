"""Export's perplexity is tune's validation perplexity: the run's held-out examples, mean cross-entropy over
their trained tokens, exp of it; the console says which examples it was measured on."""

import json

import pytest
from typer.testing import CliRunner

from lite_sft.cli import app
from lite_sft.train import tune

from test_export import build_base, run_config


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_export_reports_tunes_validation_perplexity(quantize, tmp_path_factory, bpe_tokenizer, chat_jsonl, tmp_path):
    base = tmp_path_factory.getbasetemp() / "base-llama"
    if not base.exists():
        build_base(base, "llama", bpe_tokenizer)
    run = tmp_path / "run"
    # fp32 in tune as in export: autocast's bf16 on a CPU that has it would move tune's figure by ~1%.
    tune(run_config(base, chat_jsonl, run, **{"model.dtype": "float32", "train.max_steps": 6}))
    tuned = json.loads((run / "summary.json").read_text())["final_evaluation"]["val_perplexity"]

    out = tmp_path / "export"
    result = CliRunner().invoke(app, ["export", str(run), "--out", str(out), "--quantize", quantize]
                                + (["--no-onnx"] if quantize == "none" else []))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "parity.json").read_text())
    merge = report["gates"][0]
    assert merge["perplexity_reference"] == pytest.approx(tuned, rel=1e-4)  # the adapter model tune evaluated
    assert merge["perplexity"] == pytest.approx(tuned, rel=1e-4)  # merged in fp32
    on = "the 5 held-out examples in validation_split.json, trained tokens only, as tune's validation perplexity"
    assert report["perplexity_on"] == on
    line = next(line for line in result.output.splitlines() if line.startswith("perplexity on "))
    figures = f"adapter model {merge['perplexity_reference']:.4f}, merged/ {merge['perplexity']:.4f}"
    assert line.startswith(f"perplexity on {on}: {figures}")
    if quantize != "none":
        onnx, int8 = report["gates"][1:]
        assert onnx["perplexity"] == pytest.approx(tuned, rel=1e-4)
        assert int8["perplexity_before"] == onnx["perplexity"] and int8["perplexity_after"] == int8["perplexity"]
        assert line.endswith(f", onnx/ {onnx['perplexity']:.4f}, onnx-int8/ {int8['perplexity']:.4f}")
