"""tools/process_group.py: a started process group is stopped whole, also a member that ignores SIGTERM."""

from __future__ import annotations

import os
import subprocess
import time

from process_group import stop_process_group


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_group_whose_child_ignores_sigterm_is_killed_whole():
    # the leader exits on SIGTERM; its child ignores SIGTERM and lives on unless the group is SIGKILLed
    script = "trap '' TERM; sleep 600 & trap - TERM; wait"
    proc = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    time.sleep(0.5)
    assert _alive(proc.pid)
    rc = stop_process_group(proc, wait_s=2.0, kill_wait_s=5.0)
    assert rc is not None
    deadline = time.monotonic() + 5
    while _alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(proc.pid), "a member of the group outlived stop_process_group"


def test_a_leader_that_ignores_sigterm_is_killed_and_an_exited_one_is_fine():
    proc = subprocess.Popen(["bash", "-c", "trap '' TERM; sleep 600 & wait; sleep 600"], start_new_session=True)
    time.sleep(0.5)
    assert stop_process_group(proc, wait_s=1.0, kill_wait_s=5.0) == -9
    done = subprocess.Popen(["true"], start_new_session=True)
    done.wait()
    assert stop_process_group(done) == 0
