"""The temporary folder an export builds in, OUT.tmp-<pid>, and what an export killed outright left there.

An error or Ctrl-C removes the folder (pipeline.export_run); SIGKILL, the out-of-memory killer or a power cut
leave it, and the next export into the same OUT removes it and says so. A PID alone cannot tell a leftover
from a folder another export is still writing (PIDs are reused), so each folder holds a lock its export keeps.
"""

from __future__ import annotations

import glob
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from . import ExportError

try:
    import fcntl
except ImportError:  # Windows: no flock; a leftover folder is then judged by its PID alone
    fcntl = None

# In every OUT.tmp-<pid> folder: a file its export holds locked (flock) from the moment it has written its
# PID into it until the folder is installed, kept as OUT.parity-failed or removed. The kernel drops the lock
# when the process ends, however it ends, so a later export tells a folder left by a killed export (PID
# written, unlocked) from one still being written (locked), whatever its PID belongs to by then.
TMP_LOCK = ".export-lock"


def hold_tmp(tmp: Path):
    """Create the temporary folder and lock it; closing the returned file releases it."""
    tmp.mkdir(parents=True)
    lock = open(tmp / TMP_LOCK, "a")
    if fcntl is not None:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocks only while a starting export looks at this folder
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def remove_leftovers(out: Path, say: Callable[[str], None]) -> None:
    """Remove the OUT.tmp-<pid> folders of exports that ended without cleaning up (SIGKILL, the OOM killer,
    a power cut), saying so; leave alone, and say so, any an export may still be writing."""
    for tmp in sorted(out.parent.glob(f"{glob.escape(out.name)}.tmp-*")):
        pid = tmp.name.rpartition(".tmp-")[2]
        if not pid.isdigit() or not tmp.is_dir():
            continue
        pid, mine = int(pid), int(pid) == os.getpid()
        with _try_lock(tmp) as state:
            if state == "locked":
                if mine:
                    raise ExportError(f"{tmp} is being written by another export in this process; wait for it")
                say(f"left {tmp} alone: export process {pid} is still writing it")
                continue
            if state == "unlocked":
                why = "which ended without cleaning up"
            elif mine:  # no PID in the lock: an older lite-sft's folder, or one killed as it started
                why = "a process that had this one's id"
            elif not _running(pid):
                why = "which is no longer running"
            else:  # a live export of an older lite-sft, or a reused PID: nothing tells them apart
                say(f"left {tmp} alone: process {pid} is running and may be the export writing it; "
                    "delete the folder yourself if no export is")
                continue
            shutil.rmtree(tmp, ignore_errors=True)
            say(f"removed {tmp}: left by export process {pid}, {why}")


@contextmanager
def _try_lock(tmp: Path):
    """Yield "locked" (an export holds it), "unlocked" (its export wrote its PID and ended) or "none"
    (no lock, or no PID in it yet); the lock is held, when taken, until the block ends."""
    try:
        lock = open(tmp / TMP_LOCK)
    except OSError:
        yield "none"
        return
    with lock:
        if fcntl is None:
            yield "none"
            return
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield "locked"
            return
        yield "unlocked" if lock.read().strip() else "none"


def _running(pid: int) -> bool:
    if os.name == "nt":
        return True  # os.kill(pid, 0) there would send Ctrl-C, not ask; keep the folder
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
