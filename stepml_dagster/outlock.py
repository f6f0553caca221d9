"""One `stepml run` (or `stepml backfill`) at a time per output folder.

Two runs writing one ``--out`` would interleave their partitions' assets and reports (a study
then reads a file the other is replacing). The lock is ``flock`` on ``<out>/.stepml.lock``, held
for the whole command and released when the process ends, however it ends (the kernel drops
it), so a killed run never leaves a stale lock. The file says who holds it. A second command
fails at once (OutDirBusy: `stepml` prints the one line and exits with status 2, nothing written)
naming the holder, or waits ``STEPML_LOCK_WAIT_S`` seconds for it (default 0). Runs launched by the Dagster daemon do not take this lock: the daemon's run queue
orders them, and every asset file is written atomically (see io_manager).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from stepml_core.errors import StepMLError

LOCK_NAME = ".stepml.lock"


def lock_wait_s() -> float:
    try:
        return max(0.0, float(os.environ.get("STEPML_LOCK_WAIT_S", 0)))
    except ValueError:
        return 0.0


class OutDirBusy(StepMLError):
    """Another stepml command holds the output folder (one line naming the holder)."""


@contextmanager
def out_dir_lock(out_dir: Path, wait_s: float | None = None, command: str = "stepml run"):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    wait_s = lock_wait_s() if wait_s is None else wait_s
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    try:
                        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
                        who = f"{holder.get('command', 'stepml')} (pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started')})"
                    except (ValueError, OSError):
                        who = "another stepml command"
                    raise OutDirBusy(
                        f"the output folder {out_dir} is in use by {who}; wait for it to finish "
                        f"or choose another --out (lock file {path}; STEPML_LOCK_WAIT_S waits for it, "
                        f"waited {wait_s:g} s)"
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            json.dumps(
                {
                    "command": command,
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
            ).encode(),
            0,
        )
        yield path
    finally:
        os.close(fd)  # releases the lock
