"""Run health: runs abandoned by a dead process, and which stored partitions the study may use.

* ``stepml run`` tags every run it starts with its process id and host (``run_tags``). A run whose
  process died (a partition worker killed by the out-of-memory killer, a ``stepml run`` killed by
  hand) stays STARTED in the instance forever, and ``study_sensor`` would wait for it forever:
  ``mark_abandoned_runs`` reports such runs failed (a run of this host whose process is gone).
* The study assets read every stored partition. A partition whose latest run failed, or whose
  run folder changed since it was stored, holds results that are not current: ``study_exclusions``
  names them with the reason, and the study leaves them out and lists them in the report.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import dagster as dg

from stepml_core.runs.folders import run_folder_problems
from stepml_core.tables.ingest import fingerprint, fingerprint_digest

LAUNCHER_TAG, PID_TAG, HOST_TAG = "stepml/launcher", "stepml/pid", "stepml/host"
LAUNCHER = "stepml run"
EXPERIMENT_JOB = "experiment_job"
PARTITION_TAG = "dagster/partition"
ACTIVE_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]
FAILED_STATUSES = (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)


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


def run_error(instance: dg.DagsterInstance, run_id: str) -> str:
    """One line: the innermost error of a failed run's failing step, else its run-failure message."""
    msg = None
    for rec in instance.all_logs(run_id, of_type={dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RUN_FAILURE}):
        ev = rec.dagster_event
        err = getattr(ev.event_specific_data, "error", None) if ev else None
        if err is not None:
            while getattr(err, "cause", None) is not None:
                err = err.cause
            lines = err.message.strip().splitlines()
            if lines:
                return lines[-1]
        if ev is not None and ev.message and msg is None:
            msg = ev.message.strip().splitlines()[-1]
    return msg or "failed"


def latest_failure(instance: dg.DagsterInstance, key: str) -> tuple[str, str] | None:
    """(run id, one-line error) if the latest experiment_job run of this partition failed (or was canceled)."""
    runs = instance.get_runs(dg.RunsFilter(job_name=EXPERIMENT_JOB, tags={PARTITION_TAG: key}), limit=1)
    if runs and runs[0].status in FAILED_STATUSES:
        return runs[0].run_id, run_error(instance, runs[0].run_id)
    return None


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


def study_exclusions(
    instance: dg.DagsterInstance | None, data_root: Path, stored: dict[str, tuple[list, str]]
) -> dict[str, dict]:
    """{partition: {status: failed|stale, reason, run_id}} for stored partitions the study must leave out.

    stored: {partition: (files, data version)} as recorded by its stored raw_traces / run_summary.
    A partition whose latest run failed, or whose metadata now stops a run (what `stepml run` refuses
    before starting it), is 'failed' (its stored results are from an earlier run); otherwise one
    whose run folder changed since is 'stale'."""
    out = {}
    for key, (files, version) in stored.items():
        folder = Path(data_root) / key
        if not folder.is_dir():
            continue  # removed runs are dropped by the study already
        fail = _failure(instance, data_root, key)
        if fail is not None:
            out[key] = fail
            continue
        why = stale_reason(folder, files, version)
        if why:
            out[key] = {"status": "stale", "reason": why, "run_id": None}
    return out


def failed_without_results(
    instance: dg.DagsterInstance | None, keys: list[str], stored: set[str], data_root: Path
) -> dict[str, dict]:
    """Registered partitions with no stored results whose latest run failed or which `stepml run` refused
    (listed in the report too)."""
    out = {}
    for key in keys:
        if key in stored:
            continue
        fail = _failure(instance, data_root, key)
        if fail is not None:
            out[key] = fail
    return out


def _failure(instance: dg.DagsterInstance | None, data_root: Path, key: str) -> dict | None:
    """{status: failed, reason, run_id} if the partition's latest run failed or its metadata stops a run now."""
    fail = latest_failure(instance, key) if instance is not None else None
    if fail is not None:
        return {"status": "failed", "reason": fail[1], "run_id": fail[0]}
    problems = run_folder_problems(Path(data_root) / key, data_root=Path(data_root))
    if problems:
        return {"status": "failed", "reason": "not run: " + "; ".join(problems), "run_id": None}
    return None
