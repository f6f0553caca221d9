"""Run status as Dagster sees it: each run (experiment partition) is current, stale (why) or failed (which step, error).

The status assets (assets.run_status, replay_assets.replay_status) store this per run, with an asset check that
fails while any run is not current; the study assets read their stored value instead of each looking at the
instance themselves. The rules:

* failed: Dagster's partition status of one of the run's assets is FAILED (its latest planned materialization was
  in a run that failed or was abandoned: the red partition in the UI's partition bar); step and error are those of
  that run's first step failure. A run folder whose metadata stops a run now (what `stepml run` refuses before
  starting it) is failed too, with no step.
* stale: not failed, but its run folder's files differ from the fingerprint stored with its results
  (health.stale_reason: size and mtime, then the content hash).
* current: otherwise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import dagster as dg

CURRENT, STALE, FAILED = "current", "stale", "failed"


@dataclass(frozen=True)
class RunStatus:
    """One run's status; stored as JSON ({run: as_dict()}) by the status assets."""

    status: str  # current | stale | failed
    reason: str = ""
    step: str | None = None  # the failed step (an asset's step key), None when no step ran or none failed
    run_id: str | None = None  # the Dagster run that failed

    def as_dict(self) -> dict:
        return asdict(self)


def not_current(statuses: dict[str, dict]) -> dict[str, dict]:
    """{run: status record} of the runs a study must leave out (stale or failed), from a status asset's value."""
    return {k: dict(v) for k, v in statuses.items() if v["status"] != CURRENT}


def failed_step(instance: dg.DagsterInstance, run_id: str) -> tuple[str | None, str]:
    """(step key, one-line error) of a failed run: its first step failure's innermost error, else its run-failure
    message (a run abandoned by a dead process has no step failure)."""
    msg = None
    for rec in instance.all_logs(run_id, of_type={dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RUN_FAILURE}):
        ev = rec.dagster_event
        err = getattr(ev.event_specific_data, "error", None) if ev else None
        if err is not None:
            while getattr(err, "cause", None) is not None:  # the user error under Dagster's wrapper
                err = err.cause
            lines = err.message.strip().splitlines()
            if lines:
                return (ev.step_key if ev else None), lines[-1]
        if ev is not None and ev.message and msg is None:
            msg = ev.message.strip().splitlines()[-1]
    return None, msg or "failed"


def failed_partitions(
    instance: dg.DagsterInstance,
    asset_keys: list[dg.AssetKey],
    keys: list[str],
    partitions_def: dg.PartitionsDefinition,
) -> dict[str, RunStatus]:
    """{partition: failed RunStatus} for the partitions of `keys` where one of `asset_keys` has Dagster's partition
    status FAILED; step and error from the run of that asset's latest planned materialization."""
    out: dict[str, RunStatus] = {}
    if not keys:
        return out
    for asset_key in asset_keys:
        by_partition = instance.get_status_by_partition(asset_key, keys, partitions_def) or {}
        for key, status in by_partition.items():
            if key in out or status != dg.AssetPartitionStatus.FAILED:
                continue
            planned = instance.get_latest_planned_materialization_info(asset_key, key)
            run_id = planned.run_id if planned is not None else None
            step, error = failed_step(instance, run_id) if run_id else (None, "failed")
            out[key] = RunStatus(FAILED, error, step, run_id)
    return out


def stored_fingerprints(run_summary, request_log) -> dict[str, tuple[list | None, str | None]]:
    """{run: (files, data version)} stored with its results: run_summary's, else (request logs only) request_log's."""
    out = {e: (run_summary[e].get("files"), run_summary[e].get("data_version")) for e in run_summary}
    for e in request_log:
        if e not in out:
            out[e] = (request_log[e].get("run_files"), request_log[e].get("data_version"))
    return out


def run_statuses(
    instance: dg.DagsterInstance | None,
    data_root: Path,
    partitions_def: dg.PartitionsDefinition,
    asset_keys: list[dg.AssetKey],
    stored: dict[str, tuple[list | None, str | None]],
) -> dict[str, RunStatus]:
    """{run: RunStatus} for every registered partition and every stored one whose run folder is still there.

    stored: {run: (files, data version)} as recorded with its stored results (run_summary, else request_log)."""
    from stepml_core.runs.folders import run_folder_problems

    from .health import stale_reason

    registered = partitions_def.get_partition_keys(dynamic_partitions_store=instance) if instance is not None else []
    keys = sorted(k for k in set(registered) | set(stored) if (Path(data_root) / k).is_dir())
    failed = failed_partitions(instance, asset_keys, keys, partitions_def) if instance is not None else {}
    out = {}
    for key in keys:
        if key in failed:
            out[key] = failed[key]
        elif problems := run_folder_problems(Path(data_root) / key, data_root=Path(data_root)):
            out[key] = RunStatus(FAILED, "not run: " + "; ".join(problems))
        elif key in stored and (why := stale_reason(Path(data_root) / key, *stored[key])):
            out[key] = RunStatus(STALE, why)
        else:
            out[key] = RunStatus(CURRENT)
    return out


def replay_statuses(
    instance: dg.DagsterInstance | None,
    partitions_def: dg.PartitionsDefinition,
    replays,
    request_log,
    specs: list | None,
    run_status: dict[str, dict],
) -> dict[str, RunStatus]:
    """{run: RunStatus} for every stored replay: the run's own status (run_status) when it is not current; else stale
    when the replay was made from an earlier request log or with other step models than `specs` give the run now
    (pipeline.stale_replay_reason: not replayed since, e.g. the models phase failed); else failed when Dagster's
    partition status of the replay asset is FAILED; else current."""
    from stepml_core import pipeline

    keys = sorted(replays)
    failed = failed_partitions(instance, [dg.AssetKey("replay")], keys, partitions_def) if instance is not None else {}
    out = {}
    for e in keys:
        run = run_status.get(e)
        if run is not None and run["status"] != CURRENT:
            out[e] = RunStatus(**run)
        elif why := pipeline.stale_replay_reason(e, replays[e] or {}, request_log.get(e), specs):
            out[e] = RunStatus(STALE, why)
        elif e in failed:
            f = failed[e]
            out[e] = RunStatus(FAILED, "replay: " + f.reason, f.step, f.run_id)
        else:
            out[e] = RunStatus(CURRENT)
    return out


def status_metadata(statuses: dict[str, dict], what: str) -> dict:
    """Materialization metadata of a status asset: counts per status and a table of the runs not current."""
    bad = not_current(statuses)
    rows = [f"| `{k}` | {v['status']} | {v.get('step') or '–'} | {v['reason']} |" for k, v in sorted(bad.items())]
    table = "\n".join([f"| {what} | status | step | why |", "|---|---|---|---|", *rows]) if rows else "all current"
    return {
        **{s: sum(v["status"] == s for v in statuses.values()) for s in (CURRENT, STALE, FAILED)},
        "not_current": dg.MetadataValue.md(table),
        "statuses": dg.MetadataValue.json(statuses),
    }


def all_current_check(statuses: dict[str, dict], check_name: str, asset: str) -> dg.AssetCheckResult:
    """Passes when every run is current; a warning naming each stale or failed run (the study leaves them out)."""
    bad = not_current(statuses)
    return dg.AssetCheckResult(
        check_name=check_name,
        asset_key=asset,
        passed=not bad,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "not_current": len(bad),
            "runs": dg.MetadataValue.json({k: f"{v['status']}: {v['reason']}" for k, v in sorted(bad.items())}),
        },
    )
