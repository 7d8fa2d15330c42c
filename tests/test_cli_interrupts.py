"""A run stopped part-way: by a full disk, by Ctrl-C, or resumed on the built-in data. Each says which
checkpoint is the last good one and how to go on, leaves no partial folder, and resumes from it."""

import json
import os
import signal
import subprocess
import sys
import time

from typer.testing import CliRunner

from lite_sft import checkpoint
from lite_sft.cli import app
from test_cli import small_run

runner = CliRunner()


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_a_full_disk_names_the_last_good_checkpoint_and_leaves_no_partial_one(tiny_model_dir, chat_jsonl, tmp_path,
                                                                            monkeypatch):
    out = tmp_path / "run"
    real_save = checkpoint.save_file
    writes = []

    def filling_disk(tensors, path, *args, **kwargs):
        writes.append(path)
        if len(writes) == 2:  # step 2's checkpoint: the disk fills half-way through its first file
            open(path, "wb").write(b"\0" * 16)
            raise OSError(28, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", filling_disk)
    result = runner.invoke(app, small_run(tiny_model_dir, chat_jsonl, out, "--max-steps", "3", "--eval-every", "0"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    [line] = error_lines(result.output)
    assert "checkpoint step 2" in line and "No space left on device" in line
    assert "last good checkpoint is step 1" in line and f"lite-sft tune --output-dir {out} --resume" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]  # no .tmp-step-2 left
    assert not (out / "adapter_config.json").exists()  # not mistaken for a finished run

    monkeypatch.setattr(checkpoint, "save_file", real_save)  # room again: the advertised command finishes the run
    resumed = runner.invoke(app, ["tune", "--output-dir", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from" in resumed.output and json.loads((out / "summary.json").read_text())["steps"] == 3


def test_a_full_disk_while_writing_the_adapter_keeps_the_run_resumable(tiny_model_dir, chat_jsonl, tmp_path,
                                                                      monkeypatch):
    from peft import PeftModel

    def full(self, path, *args, **kwargs):
        open(os.path.join(path, "adapter_model.safetensors"), "wb").write(b"\0" * 16)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PeftModel, "save_pretrained", full)
    out = tmp_path / "run"
    result = runner.invoke(app, small_run(tiny_model_dir, chat_jsonl, out, "--eval-every", "0"))
    assert result.exit_code == 2 and "Traceback" not in result.output
    [line] = error_lines(result.output)
    assert f"the adapter in {out}" in line and "last good checkpoint is step 2" in line and "--resume" in line
    assert not (out / "adapter_model.safetensors").exists()


def test_ctrl_c_says_what_was_saved_and_how_to_resume(tiny_model_dir, chat_jsonl, tmp_path):
    out = tmp_path / "run"
    args = small_run(tiny_model_dir, chat_jsonl, out, "--max-steps", "100000", "--eval-every", "0")
    proc = subprocess.Popen([sys.executable, "-m", "lite_sft", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 120
        while not checkpoint.list_checkpoints(out) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert checkpoint.list_checkpoints(out), "no checkpoint appeared"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("interrupted:")]
    step, path = checkpoint.list_checkpoints(out)[-1]
    assert f"last good checkpoint is step {step} ({path})" in line
    assert f"lite-sft tune --output-dir {out} --resume" in line
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_resuming_the_builtin_demo_reports_its_skill_before_and_after(tmp_path):
    out = tmp_path / "demo"
    first = runner.invoke(app, ["tune", "--output-dir", str(out), "--max-steps", "2", "--save-every", "1"])
    assert first.exit_code == 0, first.output
    before = json.loads((out / "summary.json").read_text())["skill_exact_match_before"]
    resumed = runner.invoke(app, ["tune", "--output-dir", str(out), "--resume", "--max-steps", "3"])
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["skill_exact_match_before"] == before
    assert f"{before:.1%} before ->" in resumed.output


def test_own_data_needs_a_model_and_the_demo_needs_neither(chat_jsonl, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["tune", "--data", str(chat_jsonl), "--output-dir", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    [line] = error_lines(result.output)
    assert f"--data {chat_jsonl} needs --model" in line
    assert not out.exists()
