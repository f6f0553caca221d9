"""Run health: runs abandoned by a dead process, and which stored partitions the study may use.

* ``stepml run`` tags every run it starts with its process id and host (``run_tags``). A run whose
  process died (a partition worker killed by the out-of-memory killer, a ``stepml run`` killed by
  hand) stays STARTED in the instance forever, and ``study_sensor`` would wait for it forever:
  ``mark_abandoned_runs`` reports such runs failed (a run of this host whose process is gone).
* A stored partition whose run folder changed since it was stored holds results that are not current:
  ``stale_reason`` says which files changed (status.py turns it into the run_status asset's 'stale').
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import dagster as dg

from stepml_core.tables.ingest import fingerprint, fingerprint_digest

LAUNCHER_TAG, PID_TAG, HOST_TAG = "stepml/launcher", "stepml/pid", "stepml/host"
LAUNCHER = "stepml run"
PARTITION_TAG = "dagster/partition"
ACTIVE_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def run_tags() -> dict[str, str]:
    """Tags of a run executed by this process for `stepml run` (who runs it, so a dead one can be found)."""
    return {LAUNCHER_TAG: LAUNCHER, PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_abandoned_runs(instance: dg.DagsterInstance, *, pid: int | None = None, why: str | None = None) -> list[str]:
    """Report failed the active runs `stepml run` started on this host whose process is gone (or, with
    pid, the runs of that process). Returns their run ids."""
    host = socket.gethostname()
    runs = instance.get_runs(dg.RunsFilter(statuses=ACTIVE_STATUSES, tags={LAUNCHER_TAG: LAUNCHER, HOST_TAG: host}))
    marked = []
    for r in runs:
        try:
            p = int(r.tags.get(PID_TAG) or 0)
        except ValueError:
            continue
        if (pid is not None and p != pid) or (pid is None and pid_alive(p)):
            continue
        instance.report_run_failed(r, message=why or f"abandoned: the process that ran it (pid {p} on {host}) is gone")
        marked.append(r.run_id)
    return marked


def stale_reason(folder: Path, stored_files: list[dict] | None, stored_version: str | None) -> str | None:
    """Why a stored partition's inputs differ from its run folder now (None: current).

    Size and mtime first; the content hash only where those differ (a touched file is still current)."""
    if not stored_files or not stored_version:
        return None
    try:
        now = {f["file"]: f for f in fingerprint(folder, with_hash=False)}
    except OSError as e:
        return f"its run folder cannot be read now ({e.strerror or e})"
    if {k: (v["size_bytes"], v["mtime_ns"]) for k, v in now.items()} == {
        f["file"]: (f["size_bytes"], f["mtime_ns"]) for f in stored_files
    }:
        return None
    try:
        digest = fingerprint_digest(fingerprint(folder))
    except (OSError, ValueError) as e:
        return f"its run folder cannot be read now ({e})"
    if digest == stored_version:
        return None
    changed = sorted(
        set(now) ^ {f["file"] for f in stored_files}
        | {f["file"] for f in stored_files if f["file"] in now and now[f["file"]]["size_bytes"] != f["size_bytes"]}
    )
    what = ", ".join(changed) if changed else "file contents"
    return f"its input files changed since it was processed (data version {stored_version} → {digest}: {what})"
