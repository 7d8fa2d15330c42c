"""An export killed outright (SIGKILL, the OOM killer, a power cut) runs no cleanup: the next export into the
same OUT removes what it left behind, and leaves alone what a live export is still writing."""

import os
import signal
import subprocess
import sys
import time

import pytest

from lite_sft.export.pipeline import TMP_LOCK, hold_tmp

from test_export import tuned  # noqa: F401  (the session's tuned runs)


def export_command(run, out):
    return [sys.executable, "-m", "lite_sft", "export", str(run), "--out", str(out), "--no-onnx"]


def dead_pid() -> int:
    """A PID no process has: past the kernel's largest one."""
    try:
        with open("/proc/sys/kernel/pid_max") as fh:
            return int(fh.read()) + 1
    except OSError:
        return 2**22 + 1  # Linux's highest pid_max; macOS's is far lower


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and flock are POSIX")
def test_a_rerun_removes_what_a_killed_export_left_and_not_what_a_live_one_is_writing(tuned, tmp_path):
    run, out = tuned("llama"), tmp_path / "export"
    killed = subprocess.Popen(export_command(run, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    left = tmp_path / f"export.tmp-{killed.pid}"
    deadline = time.monotonic() + 120
    while not (left / TMP_LOCK).exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert left.is_dir()  # no cleanup ran

    older = tmp_path / f"export.tmp-{dead_pid()}"  # an older lite-sft's leftover: no lock in it
    (older / "merged").mkdir(parents=True)
    live = tmp_path / f"export.tmp-{os.getpid()}"  # this process is exporting into the same OUT right now
    with hold_tmp(live):
        (live / "merged").mkdir()
        rerun = subprocess.run(export_command(run, out), capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert live.is_dir() and (live / "merged").is_dir()
    assert not left.exists() and not older.exists()
    said = rerun.stdout.splitlines()
    assert [line for line in said if str(left) in line] == [
        f"removed {left}: left by export process {killed.pid}, which ended without cleaning up"]
    assert [line for line in said if str(older) in line] == [
        f"removed {older}: left by export process {dead_pid()}, which is no longer running"]
    assert [line for line in said if str(live) in line] == [
        f"left {live} alone: export process {os.getpid()} is still writing it"]
    assert (out / "parity.json").is_file() and not (out / TMP_LOCK).exists()
    assert sorted(p.name for p in tmp_path.glob("export*")) == ["export", live.name]


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_a_leftover_of_a_live_pid_without_a_lock_is_left_alone(tuned, tmp_path):
    """A folder from before the lock (an older lite-sft) whose PID is alive: maybe a live export, maybe a
    reused PID; nothing tells them apart, so it stays, and the line says how to remove it."""
    run, out = tuned("llama"), tmp_path / "export"
    live = tmp_path / f"export.tmp-{os.getpid()}"
    (live / "merged").mkdir(parents=True)
    rerun = subprocess.run(export_command(run, out), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert (live / "merged").is_dir()
    assert (f"left {live} alone: process {os.getpid()} is running and may be the export writing it; "
            "delete the folder yourself if no export is") in rerun.stdout
