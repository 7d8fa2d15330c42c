"""Which variant `lite-sft serve OUT` serves: the quantised one the export made and whose gate passed (as
parity.json records it), else fp; an explicit variant wins, and the start-up lines say which is served."""

import json
import shutil

import pytest

from lite_sft.serve import ServeError
from lite_sft.serve.backends.factory import resolve_model
from lite_sft.serve.server import serve


def gate(stage: str, passed: bool = True) -> dict:
    return {"stage": stage, "artefact": "merged" if stage == "merge" else "onnx" if stage == "onnx"
            else f"onnx-{stage}", "passed": passed}


def export_out(root, stages=("merge", "onnx", "int8"), passed=True, folders=("onnx", "onnx-int8")):
    """An export OUT's layout (files stand in for the graphs; resolve_model reads the layout only)."""
    out = root / "out"
    for name in folders:
        (out / name).mkdir(parents=True)
        for file in ("model.onnx", "config.json", "tokenizer.json"):
            (out / name / file).write_text("{}")
    gates = [gate(s, passed or s != stages[-1]) for s in stages]
    (out / "parity.json").write_text(json.dumps({"task": "causal-lm", "passed": passed, "gates": gates}))
    return out


def test_the_gated_quantised_variant_is_served_unless_told(tmp_path):
    out = export_out(tmp_path)
    assert resolve_model(out) == ("onnx", out / "onnx-int8")
    assert resolve_model(out, "fp") == ("onnx", out / "onnx")
    assert resolve_model(out, "int8") == ("onnx", out / "onnx-int8")


def test_int4_is_found_the_same_way(tmp_path):
    out = export_out(tmp_path, ("merge", "onnx", "int4"), folders=("onnx", "onnx-int4"))
    assert resolve_model(out) == ("onnx", out / "onnx-int4")


@pytest.mark.parametrize("case", ["failed gate", "no gate recorded", "folder gone"])
def test_fp_is_served_when_no_quantised_variant_passed(tmp_path, case):
    out = export_out(tmp_path, passed=case != "failed gate",
                     folders=("onnx",) if case == "folder gone" else ("onnx", "onnx-int8"))
    if case == "no gate recorded":  # an export made by hand, or by an older lite-sft
        (out / "parity.json").write_text(json.dumps({"task": "causal-lm"}))
    assert resolve_model(out) == ("onnx", out / "onnx")


def test_a_broken_parity_file_is_one_clear_error(tmp_path):
    out = export_out(tmp_path)
    (out / "parity.json").write_text("[1, 2")
    with pytest.raises(ServeError, match="parity.json is not a JSON object.*re-export"):
        resolve_model(out)


def test_serve_says_which_variant_it_serves(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import LlamaForCausalLM

    from lite_sft.export.onnx import export_onnx

    out = tmp_path / "qwen"
    export_onnx(LlamaForCausalLM.from_pretrained(tiny_model_dir), out / "onnx")
    shutil.copytree(out / "onnx", out / "onnx-int8")  # the int8 graph's layout is all serving reads here
    (out / "parity.json").write_text(json.dumps({"task": "causal-lm", "passed": True,
                                                 "gates": [gate("merge"), gate("onnx"), gate("int8")]}))
    monkeypatch.setattr("uvicorn.Server.run", lambda self, sockets: None)
    for variant, expected in ((None, "int8"), ("fp", "fp")):
        lines = []
        serve(out, say=lines.append, port=0, device="cpu", threads=1, variant=variant)
        said = "\n".join(lines)
        assert f"variant {expected} (onnx{'-int8' if expected == 'int8' else ''}/)" in said, said
        assert ("passed its parity gate" in said) == (variant is None), said


def test_the_cli_leaves_the_variant_to_the_export_unless_given(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from lite_sft.cli import app as cli

    seen = {}
    monkeypatch.setattr("lite_sft.serve.server.serve", lambda folder, **options: seen.update(options))
    assert CliRunner().invoke(cli, ["serve", str(export_out(tmp_path))]).exit_code == 0
    assert seen["variant"] is None
