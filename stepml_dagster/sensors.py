"""Automation: a sensor on the data folder, a sensor that refreshes the study, a re-run schedule.

* ``experiment_sensor`` watches ``settings.data_dir``. A new run folder, or a run whose input files
  changed (size/mtime first; sha256 only when those changed), registers the ``experiment`` partition
  and requests ``experiment_job`` for it with run key ``<run id>:<data version>`` (the data version is
  the fingerprint digest that ``raw_traces`` also records as its Dagster data version). Folders still
  being written are left for a later tick: any file or folder whose size/mtime changed since the last
  tick (unless everything is older than ``sensor_settle_s``), a plain ``traces.json`` without a
  trailing newline, a ``traces.json.gz`` whose gzip stream does not end cleanly. The cursor is JSON
  of per-run fingerprints, stored by Dagster with the sensor, so it survives daemon restarts.
* ``study_sensor`` requests ``study_job`` once no ``experiment_job`` run is queued or in progress and
  an experiment-level asset the study reads was materialized after the last study run started; the
  run key ``study:<storage id of that materialization>`` makes one burst of partitions give one
  study run.
* ``rerun_schedule`` (cron ``STEPML_RERUN_CRON``, default ``0 3 * * *``, STOPPED by default)
  requests one ``experiment_job`` run per registered partition whose folder still exists; the study
  sensor then refreshes the study once they are done.

A tick stays within ``sensor_time_budget_s`` (default 20 s, a third of Dagster's 60 s tick
limit) whatever the folder holds: folders not reached are left for the next tick, a gzip whose
completeness cannot be checked in time (a gzip bomb inflates for minutes) is launched once settled
(the run applies the input limits), a file too big to hash in one budget gets a size/mtime
fingerprint (the run hashes what it reads). An entry the daemon cannot read (permissions, a
vanished file) is skipped with a warning and retried next tick; a trace entry that is not a
regular file (FIFO, directory) is never opened here: its run is launched and fails saying so.

A registered partition whose run folder is gone is deleted by ``experiment_sensor``
(``build_delete_request``; logged, and kept under ``deleted`` in the cursor): the partition set is
what the assets read.

A tick's limits are fields of the settings resource (``sensor_settle_s`` 60, ``sensor_hash_budget_mb``
4096 per tick, ``sensor_time_budget_s`` 20; unset: ``STEPML_SENSOR_SETTLE_S`` / ``_HASH_BUDGET_MB`` /
``_TIME_BUDGET_S``). Read when the code location loads (they shape the definitions):
``STEPML_SENSOR_INTERVAL_S`` (30), ``STEPML_SENSOR_STATUS`` (``running``/``stopped``, default
running), ``STEPML_RERUN_CRON``, ``STEPML_RERUN_TZ`` (UTC).
"""

from __future__ import annotations

import json
import os
import time

import dagster as dg

from stepml_core.runs.folders import (
    RunIdError,
    RunMetadataError,
    find_trace_file,
)

from .folder_scan import load_cursor, scan_data_folder, trace_file_complete  # noqa: F401 (tests read it here)
from .health import ACTIVE_STATUSES, mark_abandoned_runs
from .partitions import experiment_partitions
from .resources import StepMLSettings

PARTITIONS_DEF_NAME = "experiment"
EXPERIMENT_JOB = "experiment_job"
MODELS_JOB = "models_job"
REPLAY_JOB = "replay_job"
STUDY_JOB = "study_job"
STUDY_OUTPUT = "study_report"


def study_inputs() -> list[dg.AssetKey]:
    """Experiment-level assets the study chain reads (models and report phases, plus request_log for the replays):
    a new materialization of any makes the study stale."""
    from .assets import PARTITIONED_ASSETS, STUDY_ASSETS

    partitioned = {k for a in PARTITIONED_ASSETS for k in a.keys}
    keys = {k for a in STUDY_ASSETS for k in a.dependency_keys if k in partitioned} | {dg.AssetKey("request_log")}
    return sorted(keys, key=lambda k: k.to_user_string())


DELETED_KEPT = 100  # partitions deleted by experiment_sensor, newest last, kept in its cursor as a record
DATA_VERSION_TAG = "stepml/data_version"
TRIGGER_TAG = "stepml/trigger"


def _env_int(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, default)))
    except ValueError:
        return default


def sensor_interval_s() -> int:
    return _env_int("STEPML_SENSOR_INTERVAL_S", 30)


def sensor_default_status() -> dg.DefaultSensorStatus:
    v = os.environ.get("STEPML_SENSOR_STATUS", "running").strip().lower()
    return (
        dg.DefaultSensorStatus.STOPPED
        if v in {"stopped", "off", "0", "false", "no"}
        else dg.DefaultSensorStatus.RUNNING
    )


def rerun_cron() -> str:
    return os.environ.get("STEPML_RERUN_CRON", "0 3 * * *").strip() or "0 3 * * *"


# --------------------------------------------------------------------------------------------
# Dagster definitions
# --------------------------------------------------------------------------------------------


def _logger(context):
    def say(level: str, msg: str) -> None:
        getattr(context.log, level)(msg)

    return say


def build_experiment_sensor(
    *,
    minimum_interval_seconds: int | None = None,
    default_status: dg.DefaultSensorStatus | None = None,
    run_config: dict | None = None,
) -> dg.SensorDefinition:
    @dg.sensor(
        name="experiment_sensor",
        job_name=EXPERIMENT_JOB,
        minimum_interval_seconds=minimum_interval_seconds or sensor_interval_s(),
        default_status=default_status or sensor_default_status(),
        description="Watches the data folder: a new run folder or changed input files register the experiment "
        "partition and launch experiment_job (run key <run id>:<data version>); folders still being "
        "written wait for a later tick.",
    )
    def experiment_sensor(context: dg.SensorEvaluationContext, settings: StepMLSettings):
        launches, cursor = scan_data_folder(settings, load_cursor(context.cursor), log=_logger(context))
        gone = partitions_without_folder(context.instance, settings)
        for k in gone:
            context.log.info(
                f"{k}: run folder gone from {settings.data_root()}: partition deleted (its stored results stay "
                f"on disk; the study no longer reads them)"
            )
        if gone:
            stamp = time.time()
            cursor["deleted"] = (list(cursor.get("deleted", [])) + [{"run_id": k, "at": stamp} for k in gone])[
                -DELETED_KEPT:
            ]
        deletes = [experiment_partitions.build_delete_request(gone)] if gone else []
        done = [l for l in launches if partition_up_to_date(context.instance, l["run_id"], l["data_version"])]
        for l in done:  # e.g. materialized by `stepml run`/`backfill` on the same instance, or a reset cursor
            context.log.info(f"{l['run_id']}: already materialized from data version {l['data_version']}; not launched")
        launches = [l for l in launches if l not in done]
        new_keys = [
            l["run_id"]
            for l in launches
            if not context.instance.has_dynamic_partition(PARTITIONS_DEF_NAME, l["run_id"])
        ]
        requests = [
            dg.RunRequest(
                run_key=l["run_key"],
                partition_key=l["run_id"],
                run_config=run_config or {},
                tags={DATA_VERSION_TAG: l["data_version"], TRIGGER_TAG: l["reason"]},
            )
            for l in launches
        ]
        for l in launches:
            context.log.info(
                f"{l['run_id']}: {l['reason']}, data version {l['data_version']}: requesting experiment_job"
            )
        cursor_text = json.dumps(cursor, sort_keys=True, separators=(",", ":"))
        if not requests:
            n_pending = len(cursor["pending"])
            why = f"{n_pending} run folder(s) still being written" if n_pending else "no new or changed run folders"
            if cursor.get("unreadable"):
                why += f"; {len(cursor['unreadable'])} run folder(s) unreadable: " + "; ".join(
                    f"{k}: {v}" for k, v in sorted(cursor["unreadable"].items())
                )
            if gone:
                why += f"; {len(gone)} partition(s) deleted (run folder gone): {', '.join(gone)}"
            return dg.SensorResult(skip_reason=why, cursor=cursor_text, dynamic_partitions_requests=deletes)
        adds = [experiment_partitions.build_add_request(new_keys)] if new_keys else []
        return dg.SensorResult(run_requests=requests, cursor=cursor_text, dynamic_partitions_requests=[*adds, *deletes])

    return experiment_sensor


def partitions_without_folder(instance: dg.DagsterInstance, settings: StepMLSettings) -> list[str]:
    """Registered experiment partitions whose run folder is no longer in the data folder (sorted). None while the
    data folder itself is missing (an unmounted disk must not empty the partition set); a key that is not a valid
    run id stays (it names no folder to check)."""
    root = settings.data_root()
    if not root.is_dir():
        return []
    gone = []
    for key in instance.get_dynamic_partitions(PARTITIONS_DEF_NAME):
        try:
            folder = settings.run_folder(key)
        except (RunIdError, RunMetadataError):
            continue
        if not folder.is_dir():
            gone.append(key)
    return sorted(gone)


def partition_up_to_date(instance: dg.DagsterInstance, run_id: str, data_version: str) -> bool:
    """raw_traces of this partition was materialized from this data version and every other
    experiment-level asset of the partition was materialized after it."""
    from .assets import PARTITIONED_ASSETS

    if not instance.has_dynamic_partition(PARTITIONS_DEF_NAME, run_id):
        return False
    latest = {}
    for key in {k for a in PARTITIONED_ASSETS for k in a.keys}:
        recs = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, asset_partitions=[run_id]), limit=1
        ).records
        if recs:
            latest[key] = recs[0]
    if not latest:
        return False
    raw = latest.get(dg.AssetKey("raw_traces")) or latest.get(dg.AssetKey("request_log"))  # request-log-only runs
    if (
        raw is None
        or raw.asset_materialization is None
        or raw.asset_materialization.tags.get("dagster/data_version") != data_version
    ):
        return False
    return all(r.storage_id >= raw.storage_id for r in latest.values())


PHASE_JOBS = (EXPERIMENT_JOB, MODELS_JOB, REPLAY_JOB, STUDY_JOB)


def _latest(instance: dg.DagsterInstance, keys, partitions: list[str] | None = None):
    """The newest materialization record among `keys` (optionally of those partitions), or None."""
    best = None
    for key in keys:
        f = dg.AssetRecordsFilter(asset_key=key, asset_partitions=partitions) if partitions else key
        recs = instance.fetch_materializations(f, limit=1).records
        if recs and (best is None or recs[0].storage_id > best.storage_id):
            best = recs[0]
    return best


def _run_start(instance: dg.DagsterInstance, rec) -> float | None:
    """When the run that wrote a materialization started (its timestamp if the run is gone)."""
    if rec is None:
        return None
    rr = instance.get_run_record_by_id(rec.run_id) if rec.run_id else None
    return (rr.start_time or rr.create_timestamp.timestamp()) if rr else rec.timestamp


def study_staleness(instance: dg.DagsterInstance) -> dict:
    """Where the study chain stands: active phase runs, and per phase what is newer than its last run.

    {'active': {job: n}, 'models': (storage id, ts) or None when models_job is due, 'replay': [partitions due],
     'study': (storage id, ts) or None when study_job is due, 'replay_models': storage id or None}."""
    from .assets import MODEL_ASSETS

    active = {j: instance.get_runs_count(dg.RunsFilter(job_name=j, statuses=ACTIVE_STATUSES)) for j in PHASE_JOBS}
    out = {
        "active": active,
        "models": None,
        "replay": [],
        "study": None,
        "replay_models": None,
        "latest_input": None,
        "study_started": None,
    }
    inputs = study_inputs()
    latest_in = _latest(instance, inputs)
    out["latest_input"] = (latest_in.storage_id, latest_in.timestamp) if latest_in else None
    models_rec = _latest(instance, [dg.AssetKey("replay_models")])
    if latest_in is not None and (models_rec is None or latest_in.timestamp > _run_start(instance, models_rec)):
        out["models"] = (latest_in.storage_id, latest_in.timestamp)
        return out
    if models_rec is not None:
        out["replay_models"] = models_rec.storage_id
        for p in instance.get_dynamic_partitions(PARTITIONS_DEF_NAME):
            log_rec = _latest(instance, [dg.AssetKey("request_log")], [p])
            if log_rec is None:
                continue
            rep = _latest(instance, [dg.AssetKey("replay")], [p])
            newest = max(models_rec.timestamp, log_rec.timestamp)
            if rep is None or _run_start(instance, rep) < newest:
                out["replay"].append((p, log_rec.storage_id))
        if out["replay"]:
            return out
    report_inputs = [k for a in [*MODEL_ASSETS] for k in a.keys] + [dg.AssetKey("replay")] + inputs
    latest_rep = _latest(instance, report_inputs)
    study_rec = _latest(instance, [dg.AssetKey(STUDY_OUTPUT)])
    out["study_started"] = _run_start(instance, study_rec)
    if latest_rep is not None and (study_rec is None or latest_rep.timestamp > out["study_started"]):
        out["study"] = (latest_rep.storage_id, latest_rep.timestamp)
    return out


def study_requests(instance: dg.DagsterInstance, run_config: dict | None = None):
    """The next phase's run request(s) of the study chain, or a SkipReason saying what it waits for."""
    s = study_staleness(instance)
    busy = {j: n for j, n in s["active"].items() if n}
    if busy:
        return dg.SkipReason(
            "waiting for " + ", ".join(f"{n} {j} run(s)" for j, n in busy.items()) + " queued or in progress"
        )
    rc = run_config or {}
    tags = {TRIGGER_TAG: "study chain"}
    if s["models"] is not None:
        return [dg.RunRequest(run_key=f"models:{s['models'][0]}", job_name=MODELS_JOB, run_config=rc, tags=tags)]
    if s["replay"]:
        return [
            dg.RunRequest(
                run_key=f"replay:{s['replay_models']}:{log_id}:{p}",
                job_name=REPLAY_JOB,
                partition_key=p,
                run_config=rc,
                tags=tags,
            )
            for p, log_id in s["replay"]
        ]
    if s["study"] is not None:
        return [dg.RunRequest(run_key=f"study:{s['study'][0]}", job_name=STUDY_JOB, run_config=rc, tags=tags)]
    if s["latest_input"] is None:
        return dg.SkipReason("no experiment materialized yet")
    return dg.SkipReason("study report is up to date with every materialized experiment")


def build_study_sensor(
    *,
    minimum_interval_seconds: int | None = None,
    default_status: dg.DefaultSensorStatus | None = None,
    run_config: dict | None = None,
    jobs: list | None = None,
) -> dg.SensorDefinition:
    """jobs: the models_job, replay_job and study_job definitions (default: built here, as in definitions.py)."""
    if jobs is None:
        from .jobs import build_jobs

        jobs = [j for j in build_jobs() if j.name in (MODELS_JOB, REPLAY_JOB, STUDY_JOB)]

    @dg.sensor(
        name="study_sensor",
        jobs=jobs,
        minimum_interval_seconds=minimum_interval_seconds or sensor_interval_s(),
        default_status=default_status or sensor_default_status(),
        description="Runs the study chain once no phase run is queued or in progress: models_job after experiments were "
        "materialized, then replay_job for every partition with a request log, then study_job (replay.csv, "
        "verdict, report).",
    )
    def study_sensor(context: dg.SensorEvaluationContext):
        for run_id in mark_abandoned_runs(context.instance):  # a dead `stepml run` must not hold the study back forever
            context.log.warning(f"run {run_id}: its process is gone; reported failed")
        return study_requests(context.instance, run_config)

    return study_sensor


def build_rerun_schedule(
    *,
    cron: str | None = None,
    default_status: dg.DefaultScheduleStatus = dg.DefaultScheduleStatus.STOPPED,
    run_config: dict | None = None,
) -> dg.ScheduleDefinition:
    @dg.schedule(
        name="rerun_schedule",
        job_name=EXPERIMENT_JOB,
        cron_schedule=cron or rerun_cron(),
        execution_timezone=os.environ.get("STEPML_RERUN_TZ", "UTC"),
        default_status=default_status,
        description="Re-materializes every registered experiment whose run folder still exists (one run per "
        "partition); study_sensor then refreshes the study. Off by default.",
    )
    def rerun_schedule(context: dg.ScheduleEvaluationContext, settings: StepMLSettings):
        stamp = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else str(time.time())
        requests = []
        for key in context.instance.get_dynamic_partitions(PARTITIONS_DEF_NAME):
            try:
                folder = settings.run_folder(key)
            except (RunIdError, RunMetadataError) as e:
                context.log.warning(f"partition {key!r} skipped: {e}")
                continue
            if folder.is_dir() and find_trace_file(folder):
                requests.append(
                    dg.RunRequest(
                        run_key=f"{key}@{stamp}",
                        partition_key=key,
                        run_config=run_config or {},
                        tags={TRIGGER_TAG: "rerun_schedule"},
                    )
                )
        if not requests:
            return dg.SkipReason("no registered experiment with a run folder")
        return requests

    return rerun_schedule


def build_automation(
    run_config: dict | None = None, jobs: list | None = None
) -> tuple[list[dg.SensorDefinition], list[dg.ScheduleDefinition]]:
    """Sensors and schedules, configured from the environment at load time; run_config goes on every RunRequest.
    jobs: the Definitions' job objects (the study sensor targets models_job, replay_job and study_job)."""
    chain = [j for j in jobs if j.name in (MODELS_JOB, REPLAY_JOB, STUDY_JOB)] if jobs else None
    return (
        [build_experiment_sensor(run_config=run_config), build_study_sensor(run_config=run_config, jobs=chain)],
        [build_rerun_schedule(run_config=run_config)],
    )
