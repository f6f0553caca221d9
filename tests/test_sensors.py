"""experiment_sensor, study_sensor and rerun_schedule, evaluated directly (no daemon): fast."""

from __future__ import annotations

import gzip
import json
import os
import time
from pathlib import Path

import dagster as dg
import pytest
from ops_helpers import open_instance

from stepml_core.tables.ingest import fingerprint, fingerprint_digest
from stepml_dagster import sensors as S
from stepml_dagster.resources import StepMLSettings

RID = "20260101-120000-llama-2-70b-hf-tp4-codegen"
RID2 = "20260102-120000-codellama-34b-tp2-general"
OLD = time.time() - 3600  # an hour ago: settled


def make_run(
    root: Path, rid: str, *, body: bytes = b'{"a": 1}\n{"b": 2}\n', gz: bool = False, old: bool = True
) -> Path:
    d = root / rid
    d.mkdir(parents=True)
    (d / "exp-config.yaml").write_text("tensor_parallelism: 4\n")
    (d / ("traces.json.gz" if gz else "traces.json")).write_bytes(gzip.compress(body) if gz else body)
    if old:
        age(d)
    return d


def age(folder: Path, t: float = OLD) -> None:
    for p in [*folder.rglob("*"), folder]:
        os.utime(p, (t, t))


@pytest.fixture
def instance(tmp_path):
    with open_instance(tmp_path / "home") as inst:  # not dg.instance_for_test(): see open_instance
        yield inst


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "data"
    r.mkdir()
    return r


def tick(instance, root, cursor=None, sensor=None):
    sensor = sensor or S.build_experiment_sensor(minimum_interval_seconds=1)
    ctx = dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        resources={"settings": StepMLSettings(data_dir=str(root), out_dir=str(root.parent / "out"))},
    )
    res = sensor(ctx)
    if isinstance(res, dg.SkipReason):
        return [], cursor, res
    return list(res.run_requests or []), res.cursor, res


def test_new_run_folder_registers_partition_and_requests_run_once(instance, root):
    folder = make_run(root, RID)
    reqs, cursor, res = tick(instance, root)
    digest = fingerprint_digest(fingerprint(folder))
    assert [(r.partition_key, r.run_key) for r in reqs] == [(RID, f"{RID}:{digest}")]
    assert reqs[0].tags[S.DATA_VERSION_TAG] == digest
    (add,) = res.dynamic_partitions_requests
    assert add.partitions_def_name == "experiment" and list(add.partition_keys) == [RID]
    c = json.loads(cursor)
    assert c["runs"][RID]["version"] == digest and {f["file"] for f in c["runs"][RID]["files"]} == {
        "traces.json",
        "exp-config.yaml",
    }
    assert all("sha256" in f for f in c["runs"][RID]["files"])
    # next tick, and a fresh sensor definition (daemon restart: Dagster hands back the stored cursor)
    assert tick(instance, root, cursor)[0] == []
    assert tick(instance, root, cursor, sensor=S.build_experiment_sensor(minimum_interval_seconds=1))[0] == []


def test_changed_trace_file_relaunches_with_new_version_touch_does_not(instance, root):
    folder = make_run(root, RID)
    instance.add_dynamic_partitions("experiment", [RID])
    (r1,), cursor, _ = tick(instance, root)
    # same content, new mtime: hashed again, same digest → no run
    age(folder, OLD + 60)
    reqs, cursor, _ = tick(instance, root, cursor)
    assert reqs == []
    # new content (an extra line), settled
    (folder / "traces.json").write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": 3}\n')
    age(folder, OLD + 120)
    (r2,), cursor, res = tick(instance, root, cursor)
    assert r2.partition_key == RID and r2.run_key != r1.run_key and r2.run_key.startswith(RID + ":")
    assert not res.dynamic_partitions_requests  # already registered
    # content back to the first version: a distinct run key (history), not silently deduplicated
    (folder / "traces.json").write_bytes(b'{"a": 1}\n{"b": 2}\n')
    age(folder, OLD + 180)
    (r3,), cursor, _ = tick(instance, root, cursor)
    assert r3.run_key not in {r1.run_key, r2.run_key} and r3.tags[S.DATA_VERSION_TAG] == r1.tags[S.DATA_VERSION_TAG]


def test_file_still_being_written_waits_for_later_tick(instance, root, monkeypatch):
    monkeypatch.setenv("STEPML_SENSOR_SETTLE_S", "3600")
    folder = make_run(root, RID, body=b'{"a": 1}\n{"b": ', old=False)  # fresh, last line incomplete
    reqs, cursor, res = tick(instance, root)
    assert reqs == [] and RID in json.loads(cursor)["pending"] and "still being written" in res.skip_reason.skip_message
    reqs, cursor, _ = tick(instance, root, cursor)  # same size, but no trailing newline
    assert reqs == []
    with open(folder / "traces.json", "ab") as f:
        f.write(b"2}\n")
    reqs, cursor, _ = tick(instance, root, cursor)  # size changed since the last tick
    assert reqs == []
    (r,), cursor, _ = tick(instance, root, cursor)  # unchanged across two ticks and complete
    assert r.partition_key == RID and json.loads(cursor)["pending"] == {}


def test_old_incomplete_file_is_launched_after_settle_time(instance, root, monkeypatch):
    monkeypatch.setenv("STEPML_SENSOR_SETTLE_S", "60")
    make_run(root, RID, body=b'{"a": 1}\n{"b": ')  # an hour old: the writer is gone; the reader quarantines the line
    (r,), _, _ = tick(instance, root)
    assert r.partition_key == RID


def test_gzip_completeness(tmp_path):
    body = b"".join(b'{"line": %d}\n' % i for i in range(20000))
    whole = gzip.compress(body)
    p = tmp_path / "traces.json.gz"
    p.write_bytes(whole)
    assert S.trace_file_complete(p) == (True, "")
    p.write_bytes(whole[: len(whole) // 2])
    ok, why = S.trace_file_complete(p)
    assert not ok and "does not end cleanly" in why
    p.write_bytes(whole + gzip.compress(b'{"more": 1}\n'))  # appended second member
    assert S.trace_file_complete(p)[0]
    p.write_bytes(whole + gzip.compress(b'{"more": 1}\n')[:10])  # second member cut short
    assert not S.trace_file_complete(p)[0]
    p.write_bytes(b"not gzip at all\n")
    ok, why = S.trace_file_complete(p)
    assert not ok and "corrupt" in why


def test_truncated_gzip_run_waits(instance, root, monkeypatch):
    monkeypatch.setenv("STEPML_SENSOR_SETTLE_S", "3600")
    folder = make_run(root, RID, gz=True, old=False)
    data = (folder / "traces.json.gz").read_bytes()
    (folder / "traces.json.gz").write_bytes(data[:-6])
    reqs, cursor, _ = tick(instance, root)
    reqs, cursor, res = tick(instance, root, cursor)
    assert reqs == [] and RID in json.loads(cursor)["pending"]
    (folder / "traces.json.gz").write_bytes(data)
    reqs, cursor, _ = tick(instance, root, cursor)  # changed since the last tick
    assert reqs == []
    reqs, cursor, _ = tick(instance, root, cursor)
    assert [r.partition_key for r in reqs] == [RID]


def test_bad_names_and_symlinks_out_of_root_rejected_others_launch(instance, root, tmp_path):
    make_run(root, RID)
    outside = make_run(tmp_path / "outside", RID2)
    (root / RID2).symlink_to(outside, target_is_directory=True)  # valid id, points out of the data root
    make_run(root, "not-a-run")
    make_run(root, RID + "-x")
    make_run(root, "20261301-000000-llama-2-70b-hf-tp4-codegen")  # month 13
    (root / "..sneaky").mkdir()
    reqs, cursor, res = tick(instance, root)
    assert [r.partition_key for r in reqs] == [RID]
    assert list(res.dynamic_partitions_requests[0].partition_keys) == [RID]
    assert set(json.loads(cursor)["runs"]) == {RID}


def test_removed_folder_is_forgotten(instance, root):
    import shutil

    make_run(root, RID)
    make_run(root, RID2)
    reqs, cursor, _ = tick(instance, root)
    assert len(reqs) == 2
    shutil.rmtree(root / RID2)
    reqs, cursor, _ = tick(instance, root, cursor)
    assert reqs == [] and set(json.loads(cursor)["runs"]) == {RID}


def test_partition_whose_run_folder_is_gone_is_deleted_and_recorded(instance, root):
    import shutil

    make_run(root, RID)
    make_run(root, RID2)
    _, cursor, _ = tick(instance, root)
    instance.add_dynamic_partitions("experiment", [RID, RID2])  # what the daemon does with the add request
    shutil.rmtree(root / RID2)
    reqs, cursor, res = tick(instance, root, cursor)
    (delete,) = res.dynamic_partitions_requests
    assert isinstance(delete, dg.DeleteDynamicPartitionsRequest) and list(delete.partition_keys) == [RID2]
    assert reqs == [] and "1 partition(s) deleted (run folder gone): " + RID2 in res.skip_reason.skip_message
    assert [d["run_id"] for d in json.loads(cursor)["deleted"]] == [RID2]
    # with a launch in the same tick: the add and the delete requests together
    shutil.rmtree(root / RID)
    make_run(root, RID2)
    reqs, cursor, res = tick(instance, root, cursor)
    assert [r.partition_key for r in reqs] == [RID2]
    kinds = {type(r).__name__: list(r.partition_keys) for r in res.dynamic_partitions_requests}
    assert kinds == {"DeleteDynamicPartitionsRequest": [RID]}  # RID2 is still registered: nothing to add
    assert [d["run_id"] for d in json.loads(cursor)["deleted"]] == [RID2, RID]


def test_no_partition_deleted_while_the_data_folder_itself_is_missing(instance, root):
    make_run(root, RID)
    instance.add_dynamic_partitions("experiment", [RID])
    settings = StepMLSettings(data_dir=str(root.parent / "unmounted"), out_dir=str(root.parent / "out"))
    assert S.partitions_without_folder(instance, settings) == []
    assert (
        S.partitions_without_folder(instance, StepMLSettings(data_dir=str(root), out_dir=str(root.parent / "out")))
        == []
    )


def test_sensor_limits_come_from_the_settings_resource(monkeypatch):
    monkeypatch.setenv("STEPML_SENSOR_SETTLE_S", "5")
    monkeypatch.setenv("STEPML_SENSOR_HASH_BUDGET_MB", "not a number")
    lim = StepMLSettings().sensor_limits()  # fields unset: the environment, else the defaults
    assert (lim.settle_s, lim.hash_budget_bytes, lim.time_budget_s) == (5.0, 4096 * 2**20, 20.0)
    lim = StepMLSettings(sensor_settle_s=7, sensor_hash_budget_mb=1, sensor_time_budget_s=3).sensor_limits()
    assert (lim.settle_s, lim.hash_budget_bytes, lim.time_budget_s) == (7.0, 2**20, 3.0)


def test_corrupt_cursor_starts_over(instance, root):
    make_run(root, RID)
    reqs, _, _ = tick(instance, root, cursor="{not json")
    assert [r.partition_key for r in reqs] == [RID]


def test_schedule_one_request_per_registered_partition_with_a_folder(instance, root, monkeypatch):
    make_run(root, RID)
    make_run(root, RID2)
    instance.add_dynamic_partitions(
        "experiment", [RID, RID2, "20260103-120000-llama-2-70b-hf-tp4-chat"]
    )  # last: folder gone
    monkeypatch.setenv("STEPML_RERUN_CRON", "*/15 * * * *")
    sched = S.build_rerun_schedule()
    assert sched.cron_schedule == "*/15 * * * *" and sched.default_status == dg.DefaultScheduleStatus.STOPPED
    assert S.build_automation()[1][0].default_status == dg.DefaultScheduleStatus.STOPPED
    monkeypatch.delenv("STEPML_RERUN_CRON")
    assert S.build_rerun_schedule().cron_schedule == "0 3 * * *"
    from datetime import datetime, timezone

    ctx = dg.build_schedule_context(
        instance=instance,
        scheduled_execution_time=datetime(2026, 1, 5, 3, tzinfo=timezone.utc),
        resources={"settings": StepMLSettings(data_dir=str(root), out_dir=str(root.parent / "out"))},
    )
    reqs = list(sched(ctx))
    assert sorted(r.partition_key for r in reqs) == sorted([RID, RID2])
    assert len({r.run_key for r in reqs}) == 2


def test_sensor_settings_from_env(monkeypatch):
    monkeypatch.setenv("STEPML_SENSOR_INTERVAL_S", "2")
    monkeypatch.setenv("STEPML_SENSOR_STATUS", "stopped")
    sensors, _ = S.build_automation()
    assert {s.minimum_interval_seconds for s in sensors} == {2}
    assert {s.default_status for s in sensors} == {dg.DefaultSensorStatus.STOPPED}
    monkeypatch.delenv("STEPML_SENSOR_STATUS")
    assert {s.default_status for s in S.build_automation()[0]} == {dg.DefaultSensorStatus.RUNNING}


def test_study_sensor_waits_for_experiments(instance):
    st = S.build_study_sensor(minimum_interval_seconds=1)
    res = st(dg.build_sensor_context(instance=instance))
    assert isinstance(res, dg.SkipReason) and "no experiment materialized" in res.skip_message


def test_hash_budget_spreads_big_landing_zone_over_ticks(instance, root, monkeypatch):
    monkeypatch.setenv("STEPML_SENSOR_HASH_BUDGET_MB", "0.000001")  # one run folder per tick
    make_run(root, RID)
    make_run(root, RID2)
    reqs1, cursor, _ = tick(instance, root)
    reqs2, cursor, _ = tick(instance, root, cursor)
    reqs3, cursor, _ = tick(instance, root, cursor)
    assert [len(reqs1), len(reqs2), len(reqs3)] == [1, 1, 0]
    assert {reqs1[0].partition_key, reqs2[0].partition_key} == {RID, RID2}
