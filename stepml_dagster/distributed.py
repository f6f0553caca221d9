"""StepML past one machine: the same assets and jobs, each step run by a Celery worker (dagster-celery).

    pip install -e '.[celery,postgres]'
    export STEPML_CELERY_BROKER=redis://broker-host:6379/0 STEPML_CELERY_BACKEND=redis://broker-host:6379/1
    dagster-celery worker start -A dagster_celery.app -y deploy/celery-worker.yaml    # on every worker machine
    dagster dev -h 127.0.0.1 -m stepml_dagster.distributed                            # or a workspace entry for this module

Every process (webserver, daemon, the process that launches a run, each worker) needs the same
instance (deploy/dagster-postgres.yaml: run/event/schedule storage in PostgreSQL), the same
STEPML_DATA_DIR / STEPML_OUT_DIR on storage they all see (the parquet IO manager writes files
there), and this package installed. The launching process submits one Celery task per step to the
broker's `dagster` queue; a worker rebuilds the job from this module and runs the step against the
instance. tests/test_celery_executor.py runs a study this way with a real broker and worker.
"""

from __future__ import annotations

import dagster as dg

from .definitions import build_definitions
from .resources import settings_from_env

BROKER_ENV, BACKEND_ENV = "STEPML_CELERY_BROKER", "STEPML_CELERY_BACKEND"


def celery_executor_def() -> dg.ExecutorDefinition:
    """dagster-celery's executor with broker and result backend read from the environment at run time."""
    from dagster_celery import celery_executor

    return celery_executor.configured(
        {"broker": {"env": BROKER_ENV}, "backend": {"env": BACKEND_ENV}}, name="stepml_celery"
    )


def build_distributed_definitions() -> dg.Definitions:
    """Definitions whose jobs run every step through Celery (settings from STEPML_* environment variables;
    STEPML_CELERY_BROKER and STEPML_CELERY_BACKEND are read when a run starts)."""
    return build_definitions(settings_from_env(), executor=celery_executor_def())


def celery_experiment_job() -> dg.JobDefinition:
    """experiment_job with the Celery executor (a module-level function, so dg.reconstructable can point at it)."""
    return build_distributed_definitions().resolve_job_def("experiment_job")


def celery_models_job() -> dg.JobDefinition:
    return build_distributed_definitions().resolve_job_def("models_job")


def celery_replay_job() -> dg.JobDefinition:
    return build_distributed_definitions().resolve_job_def("replay_job")


def celery_study_job() -> dg.JobDefinition:
    return build_distributed_definitions().resolve_job_def("study_job")


defs = build_distributed_definitions()
