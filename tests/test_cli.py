"""Every command end to end through the CLI, and the errors a user sees."""

import json

import pytest
from typer.testing import CliRunner

from lite_sft.cli import app

runner = CliRunner()


def small_run(model_dir, data, out, *extra):
    return ["tune", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out), "--max-steps", "2",
            "--micro-batch-size", "2", "--lora-r", "4", "--max-seq-len", "64", "--eval-every", "1",
            "--save-every", "1", *extra]


def test_tune_writes_a_run_directory(tiny_model_dir, chat_jsonl, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, small_run(tiny_model_dir, chat_jsonl, out, "--dora", "--rslora", "--loss", "full",
                                          "--no-group-by-length", "--no-cache", "--auto-batch", "--gpu-memory", "1GB"))
    assert result.exit_code == 0, result.output
    assert "name_or_path:" in result.output  # the resolved config is printed at start
    assert f"run directory: {out}" in result.output
    config = (out / "config.yaml").read_text()
    assert "use_dora: true" in config and "use_rslora: true" in config and "format: messages" in config
    for saved in ("loss: full", "group_by_length: false", "cache: false", "auto_batch: true", "memory_budget: 1GB"):
        assert saved in config
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["use_dora"] and adapter["use_rslora"] and adapter["r"] == 4
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_config_file_with_flag_overrides(tiny_model_dir, chat_jsonl, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {{name_or_path: {tiny_model_dir}}}\ndata: {{path: {chat_jsonl}, max_seq_len: 64}}\n"
                   f"train: {{max_steps: 5, lr: 0.01, micro_batch_size: 2}}\nlora: {{r: 4}}\n"
                   f"output_dir: {tmp_path / 'from-yaml'}\n")
    result = runner.invoke(app, ["tune", "--config", str(cfg), "--max-steps", "1", "--lr", "0.002"])
    assert result.exit_code == 0, result.output
    saved = (tmp_path / "from-yaml" / "config.yaml").read_text()
    assert "max_steps: 1" in saved and "lr: 0.002" in saved and "r: 4" in saved


def test_resume_continues_and_refuses_to_clobber(tiny_model_dir, chat_jsonl, tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, small_run(tiny_model_dir, chat_jsonl, out)).exit_code == 0
    again = runner.invoke(app, small_run(tiny_model_dir, chat_jsonl, out))
    assert again.exit_code == 2 and "already exists" in again.output and "--overwrite" in again.output
    resumed = runner.invoke(app, ["tune", "--output-dir", str(out), "--resume", "--max-steps", "3"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from" in resumed.output
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3]


@pytest.mark.parametrize("content, expected", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": [\n',
     "line 2"),
    ('{"instruction": "a", "output": "b"}\n{"messages": [{"role": "user", "content": "x"}]}\n', "mixes formats"),
    ('{"question": "a", "answer": "b"}\n', "line 1"),
])
def test_bad_data_is_reported_with_file_and_line(tiny_model_dir, tmp_path, content, expected):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    result = runner.invoke(app, small_run(tiny_model_dir, data, tmp_path / "run"))
    assert result.exit_code == 2
    assert "bad.jsonl" in result.output and expected in result.output
    assert not (tmp_path / "run").exists()


def test_bad_flags_and_missing_model(chat_jsonl, tmp_path):
    result = runner.invoke(app, ["tune", "--model", str(tmp_path / "nope"), "--data", str(chat_jsonl),
                                 "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(app, ["tune", "--quant", "2bit", "--lr", "-1", "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and "model.quant" in result.output and "train.lr" in result.output


def test_plan_estimates_and_picks_a_batch(tiny_model_dir):
    result = runner.invoke(app, ["plan", "--model", str(tiny_model_dir), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    parts = ("weights", "adapter", "activations", "logits", "overhead")
    assert plan["total_bytes"] == sum(plan[k] for k in parts) and plan["dtype"] == "float32"
    assert plan["total_bytes_with_checkpointing"] < plan["total_bytes_without_checkpointing"]
    assert plan["auto_batch"] is None

    table = runner.invoke(app, ["plan", "--model", str(tiny_model_dir), "--device", "cpu", "--gpu-memory", "1GB",
                                "--micro-batch-size", "2", "--grad-accum", "4", "--max-seq-len", "128"])
    assert table.exit_code == 0, table.output
    for part in parts + ("total", "peak without gradient checkpointing"):
        assert part in table.output
    assert "micro-batch 8 x grad-accum 1 (8 rows per step)" in table.output

    for command in ("plan", "tune"):
        bad = runner.invoke(app, [command, "--model", str(tiny_model_dir), "--gpu-memory", "banana"])
        assert bad.exit_code == 2 and "--gpu-memory: 'banana' is not a size" in bad.output, bad.output
    small = runner.invoke(app, ["plan", "--model", str(tiny_model_dir), "--gpu-memory", "1MB", "--loss", "full"])
    assert small.exit_code == 2 and "--gradient-checkpointing" in small.output and "--loss fused" in small.output


def test_inspect_data_shows_trained_tokens_and_counts(tiny_model_dir, chat_jsonl):
    result = runner.invoke(app, ["inspect-data", "--data", str(chat_jsonl), "--model", str(tiny_model_dir),
                                 "--max-seq-len", "64", "-n", "2", "--no-color"])
    assert result.exit_code == 0, result.output
    assert "«" in result.output and "<|im_end|>" in result.output
    for word in ("examples", "trained", "truncated", "dropped"):
        assert word in result.output


def test_generate_answers_with_the_tuned_model(tiny_model_dir, chat_jsonl, tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, small_run(tiny_model_dir, chat_jsonl, out)).exit_code == 0
    result = runner.invoke(app, ["generate", str(out), "--prompt", "hello there", "--prompt", "how are you",
                                 "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    missing = runner.invoke(app, ["generate", str(tmp_path), "--prompt", "hi"])
    assert missing.exit_code == 2 and "no adapter" in missing.output


def test_help_lists_field_docs():
    result = runner.invoke(app, ["tune", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "Peak learning rate" in result.output and "--train-on-prompt" in result.output


@pytest.mark.slow
def test_embedded_default_learns_its_skill(tmp_path):
    """`lite-sft tune` with no model and no data: what `make demo` runs, with its settings."""
    out = tmp_path / "demo"
    result = runner.invoke(app, ["tune", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skill_exact_match_before"] <= 0.05
    assert summary["skill_exact_match_after"] >= 0.9
    assert "0.0% before ->" in result.output
    answer = runner.invoke(app, ["generate", str(out), "--prompt", "Write 90210 backwards."])
    assert answer.output.strip().splitlines()[-1] == "01209"
