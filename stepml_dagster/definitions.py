"""Dagster Definitions for StepML (`dagster dev -w workspace.yaml` or `dg dev`)."""

from __future__ import annotations

import dagster as dg

from .assets import ALL_ASSETS
from .io_manager import stored_assets
from .jobs import IN_PROCESS_RUN_CONFIG, build_jobs
from .replay_assets import REQUEST_CHECKS
from .resources import StepMLSettings, settings_from_env
from .sensors import build_automation
from .whatif_assets import WHATIF_ASSETS


def build_definitions(
    settings: StepMLSettings | None = None, *, max_concurrent: int = 2, executor: dg.ExecutorDefinition | None = None
) -> dg.Definitions:
    settings = settings or settings_from_env()
    local = executor is None
    jobs = build_jobs(max_concurrent=max_concurrent, local=local)
    sensors, schedules = build_automation(run_config=IN_PROCESS_RUN_CONFIG if local else None, jobs=jobs)  # sensors.py
    # the what-if asset: launched by hand (its config on the launchpad), never by the phase sensors
    whatif_job = dg.define_asset_job(
        "whatif_job",
        selection=dg.AssetSelection.assets(*WHATIF_ASSETS),
        description="What if: capacity sweeps with the study's calibrated models (config: models, rates, SLO, ...).",
    )
    return dg.Definitions(
        assets=[*ALL_ASSETS, *WHATIF_ASSETS],
        asset_checks=REQUEST_CHECKS,
        jobs=[*jobs, whatif_job],
        sensors=sensors,
        schedules=schedules,
        resources={"settings": settings, "io_manager": stored_assets(settings)},
        # default: steps as local processes; stepml_dagster.distributed passes the Celery executor (several machines)
        executor=executor or dg.multiprocess_executor.configured({"max_concurrent": max_concurrent}),
    )


defs = build_definitions()
