"""deploy/dagster-postgres.yaml against a real PostgreSQL server started for the test (127.0.0.1, free port).

The harness runs initdb into a temp folder and pg_ctl start as a non-root user (``runuser -u postgres``
when the tests run as root). Skipped, with the reason, when the PostgreSQL binaries or psycopg2 are absent.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import dagster as dg
import pytest
from ops_helpers import REPO, RUN_A, copy_run, free_port, open_instance

PG_USER, PG_PASSWORD, PG_DB = "stepml", "stepml-test-pw", "stepml_dagster"


def _pg_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    cands = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    return Path(cands[-1]).parent if cands else None


def _as_db_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--", *cmd]
    return ["su", "postgres", "-s", "/bin/sh", "-c", " ".join(cmd)]


@pytest.fixture(scope="module")
def pg_server():
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    pytest.importorskip("psycopg2", reason="psycopg2 missing: pip install -e '.[postgres]'")
    pytest.importorskip("dagster_postgres", reason="dagster-postgres missing: pip install -e '.[postgres]'")
    if os.geteuid() == 0:
        try:
            import pwd

            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
    base = Path(tempfile.mkdtemp(prefix="stepml-pg-"))
    if os.geteuid() == 0:
        os.chown(base, pw.pw_uid, pw.pw_gid)
    pwfile = base / "pw"
    pwfile.write_text(PG_PASSWORD + "\n")
    if os.geteuid() == 0:
        os.chown(pwfile, pw.pw_uid, pw.pw_gid)
    data, port = base / "data", free_port()

    def run(cmd, **kw):
        return subprocess.run(_as_db_user(cmd), check=True, capture_output=True, text=True, timeout=120, **kw)

    try:
        run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                PG_USER,
                f"--pwfile={pwfile}",
                "-E",
                "UTF8",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ]
        )
        run(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(base / "server.log"),
                "-w",
                "-t",
                "60",
                "-o",
                f"-p {port} -h 127.0.0.1 -k {base}",
                "start",
            ]
        )
    except subprocess.CalledProcessError as e:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {e.stderr or e.stdout}")
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", port=port, user=PG_USER, password=PG_PASSWORD, dbname="postgres")
    conn.autocommit = True
    conn.cursor().execute(f"CREATE DATABASE {PG_DB}")
    conn.close()
    try:
        yield {"host": "127.0.0.1", "port": port}
    finally:
        subprocess.run(
            _as_db_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
            capture_output=True,
            timeout=120,
        )
        shutil.rmtree(base, ignore_errors=True)


def test_materialize_one_partition_on_postgres_instance(pg_server, real_experiments, tmp_path, monkeypatch):
    from stepml_dagster.definitions import build_definitions
    from stepml_dagster.resources import StepMLSettings

    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "deploy" / "dagster-postgres.yaml", home / "dagster.yaml")
    for k, v in {
        "DAGSTER_PG_HOST": pg_server["host"],
        "DAGSTER_PG_PORT": str(pg_server["port"]),
        "DAGSTER_PG_USERNAME": PG_USER,
        "DAGSTER_PG_PASSWORD": PG_PASSWORD,
        "DAGSTER_PG_DB": PG_DB,
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    data = tmp_path / "data"
    copy_run(real_experiments / RUN_A, data / RUN_A)
    defs = build_definitions(StepMLSettings(data_dir=str(data), out_dir=str(tmp_path / "out")))
    with open_instance(home) as instance:
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
        instance.add_dynamic_partitions("experiment", [RUN_A])
        res = defs.resolve_job_def("experiment_job").execute_in_process(
            partition_key=RUN_A,
            instance=instance,
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        )
        assert res.success
    # a fresh instance from the same DAGSTER_HOME (e.g. the daemon) sees it; so does the database itself
    with open_instance(home) as again:
        ev = again.get_latest_materialization_event(dg.AssetKey("metrics"))
        assert ev is not None and ev.dagster_event.partition == RUN_A
        assert again.get_dynamic_partitions("experiment") == [RUN_A]
    import psycopg2

    with psycopg2.connect(
        host=pg_server["host"], port=pg_server["port"], user=PG_USER, password=PG_PASSWORD, dbname=PG_DB
    ) as conn:
        cur = conn.cursor()
        cur.execute(
            "SELECT DISTINCT asset_key FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION' AND partition = %s",
            (RUN_A,),
        )
        keys = {r[0] for r in cur.fetchall()}
        cur.execute("SELECT status FROM runs")
        statuses = [r[0] for r in cur.fetchall()]
    assert any("raw_traces" in k for k in keys) and any("metrics" in k for k in keys) and len(keys) >= 9
    assert statuses == ["SUCCESS"]
