"""Past one machine: a study over several partitions with dagster-celery's executor, a real Redis broker
on 127.0.0.1 and a Celery worker started by the test, on SQLite and on PostgreSQL instance storage.

The harness starts `redis-server` (apt: redis-server) on a free loopback port and `dagster-celery worker
start -A dagster_celery.app -y deploy/celery-worker.yaml`; runs are launched with dg.execute_job on
stepml_dagster.distributed's jobs, so every step is a Celery task executed by that worker. Skipped, with
the reason, when redis-server, dagster-celery or the redis client are missing (pip install -e '.[celery]').
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from ops_helpers import REPO, free_port, open_instance, wait_for, write_instance_yaml
from process_group import stop_process_group

pytestmark = pytest.mark.slow

RUNS = [
    "20260217-203421-llama-2-70b-hf-tp4-codegen",
    "20260218-150304-codellama-34b-tp2-general",
    "20260218-120914-mixtral-8x7b-v0-1-tp2-codegen",
]
WORKER_NAME = "stepml-test"


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="module")
def redis_broker(tmp_path_factory):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server not found: apt-get install redis-server (the Celery broker for this test)")
    pytest.importorskip("dagster_celery", reason="dagster-celery missing: pip install -e '.[celery]'")
    pytest.importorskip("redis", reason="redis client missing: pip install -e '.[celery]'")
    d, port = tmp_path_factory.mktemp("redis"), free_port()
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(d),
            "--protected-mode",
            "yes",
        ],
        stdout=open(d / "redis.log", "w"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: proc.poll() is not None or _ping(port), 30, 0.2, "redis-server to answer PING")
        if proc.poll() is not None:
            pytest.skip(f"redis-server could not start: {(d / 'redis.log').read_text()[-500:]}")
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory):
    from stepml_core.synth import synthesize_runs

    data = tmp_path_factory.mktemp("celery_data")
    synthesize_runs(data, RUNS, scale=0.02, seed=0, workers=1)
    return data


def _start_worker(env: dict, log: Path) -> subprocess.Popen:
    cmd = [
        str(Path(sys.executable).parent / "dagster-celery"),
        "worker",
        "start",
        "-A",
        "dagster_celery.app",
        "-y",
        str(REPO / "deploy" / "celery-worker.yaml"),
        "-q",
        "dagster",
        "-l",
        "INFO",
        "-n",
        WORKER_NAME,
        "--",
        "--concurrency=2",
        "--pool=prefork",
    ]
    # own process group: the test stops dagster-celery and the celery processes it started, and nothing else
    return subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _stop_worker(proc: subprocess.Popen) -> None:
    stop_process_group(proc, wait_s=60)


def _worker_ready(log: Path) -> bool:
    return log.is_file() and " ready." in log.read_text(errors="replace")


def _execute_the_four_jobs(instance, keys: list[str]) -> list:
    """experiment_job per partition, models_job, replay_job per partition, study_job: the Celery variants, in order."""
    from stepml_dagster import distributed

    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}

    def run(job, key=None):
        tags = {"dagster/partition": key} if key else None
        return dg.execute_job(dg.reconstructable(job), instance=instance, tags=tags, run_config=quiet)

    results = [run(distributed.celery_experiment_job, key) for key in keys]
    results.append(run(distributed.celery_models_job))
    results += [run(distributed.celery_replay_job, key) for key in keys]  # synthetic runs carry request records
    results.append(run(distributed.celery_study_job))
    return results


def _assert_every_step_ran_on_the_worker(instance, run_id: str) -> None:
    """Every step that succeeded ran as a task on our Celery worker, in a process other than this one."""
    logs = instance.all_logs(run_id)
    done = {
        e.step_key for e in logs if e.dagster_event and e.dagster_event.event_type == dg.DagsterEventType.STEP_SUCCESS
    }
    in_worker = {
        e.step_key
        for e in logs
        if e.dagster_event
        and e.dagster_event.event_type == dg.DagsterEventType.ENGINE_EVENT
        and WORKER_NAME in str(getattr(e.dagster_event.event_specific_data, "metadata", {}).get("Celery worker"))
    }
    assert done and done <= in_worker, (run_id, done - in_worker)
    pids = {
        e.dagster_event.pid
        for e in logs
        if e.dagster_event and e.dagster_event.event_type == dg.DagsterEventType.STEP_SUCCESS
    }
    assert os.getpid() not in pids


def _run_study_through_celery(home: Path, data: Path, out: Path, broker: str, env_extra: dict, monkeypatch) -> None:
    from stepml_dagster import distributed
    from stepml_dagster.assets import PARTITIONED_ASSETS, STUDY_ASSETS

    env = {
        "DAGSTER_HOME": str(home),
        "STEPML_DATA_DIR": str(data),
        "STEPML_OUT_DIR": str(out),
        distributed.BROKER_ENV: f"{broker}/0",
        distributed.BACKEND_ENV: f"{broker}/1",
        **env_extra,
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    log = home / "celery-worker.log"
    worker = _start_worker({**os.environ, **env}, log)
    try:
        wait_for(lambda: worker.poll() is not None or _worker_ready(log), 120, 0.5, "the Celery worker to be ready")
        assert worker.poll() is None, log.read_text()[-3000:]
        keys = sorted(p.name for p in data.iterdir() if p.is_dir())
        with open_instance(home) as instance:
            instance.add_dynamic_partitions("experiment", keys)
            results = _execute_the_four_jobs(instance, keys)
            assert all(r.success for r in results), [r.run_id for r in results if not r.success]
            for r in results:
                _assert_every_step_ran_on_the_worker(instance, r.run_id)
            for k in [k for a in PARTITIONED_ASSETS for k in a.keys]:
                got = {
                    r.partition_key
                    for r in instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=k), limit=100).records
                }
                assert got == set(keys), (k, got)
            for k in [k for a in STUDY_ASSETS for k in a.keys]:
                assert instance.get_latest_materialization_event(k) is not None, k
        assert (out / "report.md").is_file() and (out / "metrics.csv").is_file() and (out / "replay.csv").is_file()
    finally:
        _stop_worker(worker)


def test_study_through_celery_on_sqlite_instance(redis_broker, small_runs, tmp_path, monkeypatch):
    home = tmp_path / "home"
    write_instance_yaml(home)
    _run_study_through_celery(home, small_runs, tmp_path / "out", redis_broker, {}, monkeypatch)


def test_study_through_celery_on_postgres_instance(redis_broker, small_runs, request, tmp_path, monkeypatch):
    from test_postgres_instance import PG_DB, PG_PASSWORD, PG_USER

    pg = request.getfixturevalue("pg_server")  # starts (or skips with its reason) a PostgreSQL server on 127.0.0.1
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster-postgres.yaml", home / "dagster.yaml")
    env = {
        "DAGSTER_PG_HOST": pg["host"],
        "DAGSTER_PG_PORT": str(pg["port"]),
        "DAGSTER_PG_USERNAME": PG_USER,
        "DAGSTER_PG_PASSWORD": PG_PASSWORD,
        "DAGSTER_PG_DB": PG_DB,
    }
    _run_study_through_celery(home, small_runs, tmp_path / "out", redis_broker, env, monkeypatch)
    with open_instance(home) as inst:
        assert type(inst.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert len(inst.get_run_records()) == 2 * len(RUNS) + 2  # partitions, models, replays, study


from test_postgres_instance import pg_server  # noqa: E402,F401  (module-scoped fixture, used via getfixturevalue)
