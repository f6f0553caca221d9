"""dagster-daemon alone (no webserver): a run folder dropped into the data folder ends up in the study.

The daemon loads workspace.yaml; experiment_sensor (interval 2 s here) registers the partition and
launches experiment_job; study_sensor launches study_job once it succeeded. Nobody clicks anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from ops_helpers import ARTIFACTS, REPO, RUN_A, drop_run, open_instance, wait_for
from process_group import stop_process_group

pytestmark = pytest.mark.slow
TIMEOUT_S = float(
    os.environ.get("STEPML_DAEMON_TEST_TIMEOUT_S", 480)
)  # ~22 s on an idle machine (80-110 s with a process per step); headroom for a loaded one


@pytest.fixture
def daemon(tmp_path, real_experiments):
    home, data, out = tmp_path / "home", tmp_path / "data", tmp_path / "out"
    home.mkdir()
    data.mkdir()
    shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "STEPML_DATA_DIR": str(data),
        "STEPML_OUT_DIR": str(out),
        "STEPML_SENSOR_INTERVAL_S": "2",
        "STEPML_SENSOR_STATUS": "running",
        "PYTHONUNBUFFERED": "1",
    }
    exe = Path(sys.executable).parent / "dagster-daemon"
    log = open(tmp_path / "daemon.log", "w")
    proc = subprocess.Popen(
        [str(exe), "run", "-w", str(REPO / "workspace.yaml")],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield {"home": home, "data": data, "out": out, "proc": proc, "log": tmp_path / "daemon.log"}
    finally:
        stop_process_group(proc)  # the daemon's own process group: it, its code server, its runs
        log.close()
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(tmp_path / "daemon.log", ARTIFACTS / "daemon-test.log")


def test_daemon_picks_up_new_run_folder_and_refreshes_study(daemon, real_experiments):
    home, data, out = daemon["home"], daemon["data"], daemon["out"]
    with open_instance(home) as instance:
        # the sensor daemon is up and has evaluated the (empty) data folder at least once
        wait_for(
            lambda: daemon["proc"].poll() is None and instance.get_daemon_heartbeats().get("SENSOR"),
            90,
            1,
            "the sensor daemon's heartbeat",
        )
        time.sleep(3)
        t0 = time.time()
        drop_run(real_experiments / RUN_A, data)
        metrics = out / "assets" / "metrics" / f"{RUN_A}.parquet"
        report = out / "report.md"

        def done():
            assert daemon["proc"].poll() is None, "dagster-daemon exited:\n" + daemon["log"].read_text()[-3000:]
            failed = instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
            assert not failed, f"run {failed[0].job_name} failed; see test-artifacts/daemon-test.log"
            return (
                metrics.is_file() and report.is_file() and report.stat().st_mtime > t0 and RUN_A in report.read_text()
            )

        wait_for(done, TIMEOUT_S, 2, "metrics of the new partition and an updated study report")
        elapsed = time.time() - t0
        time.sleep(6)  # a few more sensor ticks: nothing launches twice
        exp_runs = instance.get_runs(dg.RunsFilter(job_name="experiment_job"))
        study_runs = instance.get_runs(dg.RunsFilter(job_name="study_job"))
        assert [r.tags.get("dagster/partition") for r in exp_runs] == [RUN_A]
        assert exp_runs[0].tags.get("dagster/sensor_name") == "experiment_sensor"
        assert exp_runs[0].tags.get("dagster/run_key", "").startswith(RUN_A + ":")
        assert len(study_runs) == 1 and study_runs[0].tags.get("dagster/sensor_name") == "study_sensor"
        assert instance.get_dynamic_partitions("experiment") == [RUN_A]
        for run in (*exp_runs, *study_runs):  # sensor runs execute their steps in the run's own process
            assert run.run_config["execution"]["config"] == {"in_process": {}}, run.run_config
        print(f"dropped → metrics + report in {elapsed:.0f} s")
