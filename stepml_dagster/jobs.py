"""The four phase jobs of StepML (experiment → models → replay → study), shared by definitions.py and the study
sensor in sensors.py (which must not import definitions.py: that imports the sensors)."""

from __future__ import annotations

import dagster as dg

from .assets import MODEL_ASSETS, PARTITIONED_ASSETS, REPLAY_ASSETS, REPORT_ASSETS

# runs started by sensors and the schedule: every step in the run's own process (one process per run,
# the instance's run queue caps concurrent runs); spawning a process per step costs ~2-3 s of imports each
IN_PROCESS_RUN_CONFIG = {"execution": {"config": {"in_process": {}}}}


JOBS = {  # name: (assets, description); run in this order (the study_sensor chains them)
    "experiment_job": (
        PARTITIONED_ASSETS,
        "Ingest, validate, featurize, split, fit and score one experiment partition; read its request log.",
    ),
    "models_job": (
        MODEL_ASSETS,
        "Study-level models: pooled and cross-validated fits, synthetic runs against the real ones, the step-time "
        "models replays use.",
    ),
    "replay_job": (
        REPLAY_ASSETS,
        "Replay one partition's request log through the simulator with every step-time model.",
    ),
    "study_job": (
        REPORT_ASSETS,
        "Replay scores (replay.csv), H1 verdict and the study report over all materialized experiments.",
    ),
}


def build_jobs(*, max_concurrent: int = 2, local: bool = True) -> list:
    """The four phase jobs. local: Dagster's multi_or_in_process executor, multiprocess with at most
    max_concurrent steps by default (UI launches) and in-process with IN_PROCESS_RUN_CONFIG (sensor runs);
    otherwise the Definitions' executor (Celery in stepml_dagster.distributed)."""
    kw = (
        dict(
            executor_def=dg.multi_or_in_process_executor,
            config={"execution": {"config": {"multiprocess": {"max_concurrent": max_concurrent}}}},
        )
        if local
        else {}
    )
    return [
        dg.define_asset_job(name, selection=dg.AssetSelection.assets(*assets), description=desc, **kw)
        for name, (assets, desc) in JOBS.items()
    ]
