"""A run records where its base model is so that export, generate and eval find it from any directory."""

from __future__ import annotations

import json
import shutil

import yaml
from typer.testing import CliRunner

from lite_sft.cli import app

runner = CliRunner()


def test_a_relative_model_path_is_recorded_absolute_and_a_moved_base_is_named(tiny_model_dir, chat_jsonl, tmp_path,
                                                                               monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(tiny_model_dir, work / "base")
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    tuned = runner.invoke(app, ["tune", "--model", "base", "--data", str(chat_jsonl), "--output-dir", "run",
                                "--max-steps", "1", "--micro-batch-size", "2", "--lora-r", "4", "--max-seq-len", "64"])
    assert tuned.exit_code == 0, tuned.output
    run = work / "run"
    base = str(work / "base")
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["name_or_path"] == base
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == base

    monkeypatch.chdir(elsewhere)
    answered = runner.invoke(app, ["generate", str(run), "--prompt", "hello there", "--max-new-tokens", "3"])
    assert answered.exit_code == 0, answered.output
    exported = runner.invoke(app, ["export", str(run), "--out", str(elsewhere / "export"), "--no-onnx"])
    assert exported.exit_code == 0, exported.output

    (work / "base").rename(work / "moved")
    for command in (["generate", str(run), "--prompt", "hi"], ["eval", str(run), "--data", str(chat_jsonl)],
                    ["export", str(run), "--out", str(elsewhere / "export2"), "--no-onnx"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, (command, result.output)
        error = result.output[result.output.index("error:"):].strip()
        assert f"base folder not found: {base}" in error and "config.yaml" in error and "\n" not in error, error
        assert result.exception is None or isinstance(result.exception, SystemExit)
