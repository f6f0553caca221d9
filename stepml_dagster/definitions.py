"""Dagster Definitions for StepML (`dagster dev -w workspace.yaml` or `dg dev`)."""

from __future__ import annotations

import dagster as dg

from .assets import PARTITIONED_ASSETS, STUDY_ASSETS, experiment_partitions
from .io_manager import ParquetIOManager
from .resources import StepMLSettings, settings_from_env
from .sensors import build_automation

# runs started by sensors and the schedule: every step in the run's own process (one process per run,
# the instance's run queue caps concurrent runs); spawning a process per step costs ~2-3 s of imports each
IN_PROCESS_RUN_CONFIG = {"execution": {"config": {"in_process": {}}}}


def build_jobs(*, max_concurrent: int = 2, local: bool = True) -> list:
    """experiment_job and study_job. local: Dagster's multi_or_in_process executor, multiprocess with at most
    max_concurrent steps by default (UI launches) and in-process with IN_PROCESS_RUN_CONFIG (sensor runs);
    otherwise the Definitions' executor (Celery in stepml_dagster.distributed)."""
    kw = dict(executor_def=dg.multi_or_in_process_executor,
              config={"execution": {"config": {"multiprocess": {"max_concurrent": max_concurrent}}}}) if local else {}
    return [dg.define_asset_job("experiment_job", selection=dg.AssetSelection.assets(*PARTITIONED_ASSETS),
                                description="Ingest, validate, featurize, split, fit and score one experiment partition.", **kw),
            dg.define_asset_job("study_job", selection=dg.AssetSelection.assets(*STUDY_ASSETS),
                                description="Pooled models, H1 verdict and the study report over all materialized experiments.", **kw)]


def build_definitions(settings: StepMLSettings | None = None, *, max_concurrent: int = 2,
                      executor: dg.ExecutorDefinition | None = None) -> dg.Definitions:
    settings = settings or settings_from_env()
    local = executor is None
    sensors, schedules = build_automation(run_config=IN_PROCESS_RUN_CONFIG if local else None)  # sensors.py
    return dg.Definitions(
        assets=[*PARTITIONED_ASSETS, *STUDY_ASSETS],
        jobs=build_jobs(max_concurrent=max_concurrent, local=local),
        sensors=sensors, schedules=schedules,
        resources={"settings": settings, "io_manager": ParquetIOManager(base_dir=str(settings.assets_dir()))},
        # default: steps as local processes; stepml_dagster.distributed passes the Celery executor (several machines)
        executor=executor or dg.multiprocess_executor.configured({"max_concurrent": max_concurrent}),
    )


defs = build_definitions()
