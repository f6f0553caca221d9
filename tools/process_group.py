"""Stopping a child started with `start_new_session=True` together with everything it started (its process group):
the Dagster daemon and webserver with their code servers and runs, dagster-celery workers, a headless browser.
Used by the tests and benchmarks that start such processes.

    stop_process_group(proc)            SIGTERM to the group, wait; SIGKILL to the group if it is still there
"""

from __future__ import annotations

import os
import signal
import subprocess
import time


def stop_process_group(
    proc: subprocess.Popen, first_signal: int = signal.SIGTERM, wait_s: float = 30.0, kill_wait_s: float = 10.0
) -> int | None:
    """Send `first_signal` to proc's process group (proc must lead it: start_new_session=True), wait up to wait_s for
    proc to exit, then SIGKILL the group and wait up to kill_wait_s. The group is signalled even when proc has exited
    already (its children may live on). Returns proc's exit code (None if it outlived both waits)."""
    for sig, wait in ((first_signal, wait_s), (signal.SIGKILL, kill_wait_s)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the whole group is gone
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGKILL or _group_gone(proc.pid, within_s=min(wait_s, 5.0)):
            break
    return proc.poll()


def _group_gone(pgid: int, within_s: float) -> bool:
    """Whether every process of the group has exited within `within_s` (signal 0 tests without signalling)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
