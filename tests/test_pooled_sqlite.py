"""stepml_dagster.pooled_sqlite: the instance deploy/dagster.yaml makes keeps one engine per SQLite file per process,
on the very files Dagster's default SQLite storage uses; forked children and other processes are safe."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from dagster._core.storage.runs.sqlite.sqlite_run_storage import SqliteRunStorage
from dagster._core.storage.schedules.sqlite.sqlite_schedule_storage import SqliteScheduleStorage

from stepml_dagster import pooled_sqlite as P
from stepml_dagster.instance import INSTANCE_CONFIG, ensure_instance_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "default.yaml"  # beside dagster.yaml in the same instance folder: Dagster's default storage
# deploy/dagster.yaml at d20f88b, before the pooled storage (a study instance made then has it)
EARLIER_DEPLOY_CONFIG = """\
# StepML instance, default: embedded SQLite under $DAGSTER_HOME (runs, event log, schedules, sensor cursors).
# Copy to $DAGSTER_HOME/dagster.yaml (the README uses DAGSTER_HOME=.dagster_home in the project).
# Storage defaults need no lines here: SQLite files go to $DAGSTER_HOME/history, storage/, schedules/.
concurrency:
  runs:
    # runs the daemon's queue starts at once (each run also caps its own steps: max_concurrent 2)
    max_concurrent_runs: 2
telemetry:
  enabled: false
"""


@dg.asset(partitions_def=dg.StaticPartitionsDefinition([f"p{i}" for i in range(8)]))
def tiny(context) -> int:
    return len(context.partition_key)


def _home(tmp_path: Path) -> Path:
    """An instance folder with deploy/dagster.yaml, and default.yaml: the same settings, Dagster's default storage."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copyfile(INSTANCE_CONFIG, home / "dagster.yaml")
    (home / DEFAULT_CONFIG).write_text("telemetry:\n  enabled: false\n")
    return home


@pytest.fixture
def instances(tmp_path):
    """(instance folder, a pooled instance from deploy/dagster.yaml, a default one on the same folder)."""
    home = _home(tmp_path)
    pooled = dg.DagsterInstance.from_config(str(home))
    default = dg.DagsterInstance.from_config(str(home), config_filename=DEFAULT_CONFIG)
    try:
        yield home, pooled, default
    finally:
        pooled.dispose()
        default.dispose()


def _materialize(instance, key: str) -> str:
    res = dg.materialize([tiny], instance=instance, partition_key=key)
    assert res.success
    return res.run_id


def _wal_files(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*.db-wal"))


def _latest_partitions(instance) -> set[str]:
    recs = instance.fetch_materializations(tiny.key, limit=100).records
    return {r.partition_key for r in recs}


def test_deploy_config_makes_pooled_storages_on_the_default_files(instances):
    home, pooled, default = instances
    assert isinstance(pooled, P.PooledSqliteInstance)
    assert isinstance(pooled.run_storage, P.PooledSqliteRunStorage)
    assert isinstance(pooled.event_log_storage, P.PooledSqliteEventLogStorage)
    assert isinstance(pooled.schedule_storage, P.PooledSqliteScheduleStorage)
    assert type(default.run_storage) is SqliteRunStorage  # the comparison below is with Dagster's own classes
    assert type(default.event_log_storage) is SqliteEventLogStorage
    assert type(default.schedule_storage) is SqliteScheduleStorage
    assert pooled.run_storage._conn_string == default.run_storage._conn_string
    assert pooled.schedule_storage._conn_string == default.schedule_storage._conn_string
    assert pooled.event_log_storage._base_dir == default.event_log_storage._base_dir
    for f in ("history/runs.db", "history/runs/index.db", "schedules/schedules.db"):
        assert (home / f).is_file(), f


def test_pooled_and_default_instances_see_each_others_writes(instances):
    home, pooled, default = instances
    run_a = _materialize(pooled, "p0")  # the pooled instance's connections stay open from here on
    assert default.get_run_by_id(run_a).is_success
    assert _latest_partitions(default) == {"p0"}
    assert len(default.all_logs(run_a)) == len(pooled.all_logs(run_a)) > 0
    run_b = _materialize(default, "p1")
    assert pooled.get_run_by_id(run_b).is_success  # read on a kept connection: sees the other writer's commit
    assert _latest_partitions(pooled) == {"p0", "p1"}
    assert len(pooled.all_logs(run_b)) == len(default.all_logs(run_b)) > 0
    default.add_dynamic_partitions("experiment", ["a"])
    pooled.add_dynamic_partitions("experiment", ["b"])
    assert set(pooled.get_dynamic_partitions("experiment")) == set(default.get_dynamic_partitions("experiment"))
    assert P.cached_engine_count() >= 3  # runs.db, index.db, schedules.db and the run files


def test_wipe_then_write_reaches_the_new_files(instances):
    """wipe() deletes the run files: an engine kept on one would go on writing to the deleted file."""
    home, pooled, default = instances
    run_id = dg.DagsterRun(job_name="j").run_id
    pooled.report_engine_event("before", dg.DagsterRun(job_name="j", run_id=run_id))
    pooled.wipe()
    pooled.report_engine_event("after", dg.DagsterRun(job_name="j", run_id=run_id))
    assert [e.message for e in default.all_logs(run_id)] == ["after"]


def test_threads_share_one_instance(tmp_path):
    home = _home(tmp_path)
    pooled = dg.DagsterInstance.from_config(str(home))
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            for j in range(10):
                pooled.report_runless_asset_event(dg.AssetMaterialization(f"t{i}", partition=str(j)))
        except BaseException as e:  # noqa: BLE001 — reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        for i in range(4):
            assert len(pooled.fetch_materializations(dg.AssetKey(f"t{i}"), limit=100).records) == 10
    finally:
        pooled.dispose()


_WRITER = """
import sys, dagster as dg
sys.path.insert(0, sys.argv[3])
from test_pooled_sqlite import tiny
inst = dg.DagsterInstance.from_config(sys.argv[1])
for key in sys.argv[2].split(","):
    assert dg.materialize([tiny], instance=inst, partition_key=key).success
"""


def test_two_processes_write_at_once(tmp_path):
    home = _home(tmp_path)
    dg.DagsterInstance.from_config(str(home)).dispose()  # the storage exists before two processes open it at once
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(home), keys, str(REPO / "tests")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for keys in ("p0,p1,p2,p3", "p4,p5,p6,p7")
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    # no check of leftover -wal files here: two processes closing their last connections at the same moment may
    # both fail to take the lock that checkpoints the WAL (so with Dagster's own storages); the next opener
    # recovers it. The exit hook is checked alone: test_a_multiprocessing_child_closes_its_connections_at_exit.
    default = dg.DagsterInstance.from_config(str(home), config_filename=DEFAULT_CONFIG)
    try:
        assert len(default.get_runs()) == 8
        assert all(r.is_success for r in default.get_runs())
        assert _latest_partitions(default) == {f"p{i}" for i in range(8)}
    finally:
        default.dispose()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork")
def test_forked_child_never_uses_or_closes_the_parents_connections(tmp_path):
    """The child writes through the instance it inherited, opens more files than the cache keeps, disposes the
    instance and exits as a process does (atexit): none of it may check out or close a connection the parent made."""
    home = _home(tmp_path)
    made_in: dict[int, int] = {}  # id(DBAPI connection) → pid of the process that opened it
    foreign: list[str] = []  # events on a connection another process opened

    def on_connect(dbapi_conn, _rec):
        made_in[id(dbapi_conn)] = os.getpid()

    def on_use(what):
        def listener(dbapi_conn, *_):
            if made_in.get(id(dbapi_conn), os.getpid()) != os.getpid():
                foreign.append(what)

        return listener

    listeners = [("connect", on_connect), ("checkout", on_use("checkout")), ("close", on_use("close"))]
    for name, fn in listeners:
        sa.event.listen(sa.pool.Pool, name, fn)
    pooled = dg.DagsterInstance.from_config(str(home))
    try:
        _materialize(pooled, "p0")
        assert made_in, "the parent holds open connections"
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: always leaves through os._exit
            code = 1
            try:
                os.close(read)
                _materialize(pooled, "p1")
                for i in range(P.MAX_ENGINES + 2):  # evictions
                    with P.engine_for(f"sqlite:///{tmp_path}/extra{i}.db").connect() as c:
                        c.execute(sa.text("select 1"))
                pooled.dispose()
                P._dispose_own_engines()  # what atexit runs
                os.write(write, ",".join(foreign).encode() or b"none")
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        report = os.read(read, 4096).decode()
        os.close(read)
        assert os.waitpid(pid, 0)[1] == 0
        assert report == "none", f"the child used or closed the parent's connections: {report}"
        _materialize(pooled, "p2")  # the parent's kept connections still work
        assert _latest_partitions(pooled) == {"p0", "p1", "p2"}
    finally:
        for name, fn in listeners:
            sa.event.remove(sa.pool.Pool, name, fn)
        pooled.dispose()


def test_an_unchanged_earlier_deploy_config_is_replaced(tmp_path):
    """A study instance made with the earlier deploy/dagster.yaml gets the pooled storage; an edited one is kept."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "dagster.yaml").write_text(EARLIER_DEPLOY_CONFIG)
    ensure_instance_config(old)
    assert (old / "dagster.yaml").read_bytes() == INSTANCE_CONFIG.read_bytes()
    edited = tmp_path / "edited"
    edited.mkdir()
    (edited / "dagster.yaml").write_text(
        EARLIER_DEPLOY_CONFIG.replace("max_concurrent_runs: 2", "max_concurrent_runs: 4")
    )
    ensure_instance_config(edited)
    assert "max_concurrent_runs: 4" in (edited / "dagster.yaml").read_text()


def _materialize_in_child(home: str) -> None:
    _materialize(dg.DagsterInstance.from_config(home), "p0")


def test_a_multiprocessing_child_closes_its_connections_at_exit(tmp_path):
    """A multiprocessing child (a `stepml run` partition worker) ends without atexit: its connections are closed by
    multiprocessing's exit finalizers, so no -wal file of its run is left behind, as with Dagster's storages."""
    home = _home(tmp_path)
    child = mp.get_context("fork").Process(target=_materialize_in_child, args=(str(home),))
    child.start()
    child.join(120)
    assert child.exitcode == 0
    assert _wal_files(home) == []
