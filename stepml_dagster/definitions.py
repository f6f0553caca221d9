"""Dagster Definitions for StepML (`dagster dev -w workspace.yaml` or `dg dev`)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from .assets import PARTITIONED_ASSETS, STUDY_ASSETS, experiment_partitions
from .io_manager import ParquetIOManager
from .resources import StepMLSettings, settings_from_env
from .sensors import build_automation

experiment_job = dg.define_asset_job(
    "experiment_job", selection=dg.AssetSelection.assets(*PARTITIONED_ASSETS),
    description="Ingest, validate, featurize, split, fit and score one experiment partition.")
study_job = dg.define_asset_job(
    "study_job", selection=dg.AssetSelection.assets(*STUDY_ASSETS),
    description="Pooled models, H1 verdict and the study report over all materialized experiments.")


def build_definitions(settings: StepMLSettings | None = None, *, max_concurrent: int = 2,
                      executor: dg.ExecutorDefinition | None = None) -> dg.Definitions:
    settings = settings or settings_from_env()
    sensors, schedules = build_automation()  # experiment_sensor, study_sensor, rerun_schedule (sensors.py)
    return dg.Definitions(
        assets=[*PARTITIONED_ASSETS, *STUDY_ASSETS],
        jobs=[experiment_job, study_job],
        sensors=sensors, schedules=schedules,
        resources={"settings": settings, "io_manager": ParquetIOManager(base_dir=str(Path(settings.out_dir) / "assets"))},
        # default: steps as local processes; stepml_dagster.distributed passes the Celery executor (several machines)
        executor=executor or dg.multiprocess_executor.configured({"max_concurrent": max_concurrent}),
    )


defs = build_definitions()
