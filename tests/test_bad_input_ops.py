"""Hostile input, operational side (issue 11): each case is a run folder next to a good run, taken
through the real sensor or the real `stepml run`, with its exact outcome.

* point 9: a partition worker killed (as the out-of-memory killer would) fails that partition only;
  its run is marked failed in the instance, the study sensor is not held back, the report says so;
* point 11: a gzip bomb and an unreadable run folder cannot stop the experiment sensor: a tick
  stays within its time budget and the good run is launched;
* point 12: a second `stepml run` on the same output folder fails at once naming the holder; asset
  files are replaced atomically (a failed write leaves the old value whole);
* point 1: partition keys map to file names one-to-one.
"""

from __future__ import annotations

import builtins
import fcntl
import gzip
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from stepml_core.synth import synthesize_runs
from stepml_dagster import sensors as S
from stepml_dagster.cli import main, run_study
from stepml_dagster.io_manager import UNPARTITIONED, ParquetIOManager, file_name, read_object, write_object
from stepml_dagster.resources import StepMLSettings

BASE = "20260217-155451-llama-2-7b-tp1-codegen"
SLUG = "llama-2-7b-tp1-codegen"


def rid(n: int) -> str:
    return f"20260401-{n:06d}-{SLUG}-synth"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("ops_base")
    [src] = synthesize_runs(base, [BASE], scale=0.03, seed=5, workers=1)
    return src


def _copy(src: Path, data: Path, name: str) -> Path:
    d = data / name
    shutil.copytree(src, d)
    return d


# --------------------------------------------------------------------------------------------
# point 9: a dead partition worker
# --------------------------------------------------------------------------------------------


def _kill_when_started(key: str, stop: threading.Event, killed: dict) -> None:
    """Wait for the partition's run to be STARTED, then SIGKILL the process that runs it (from the event log)."""
    inst = dg.DagsterInstance.get()
    while not stop.is_set():
        runs = inst.get_runs(dg.RunsFilter(tags={"dagster/partition": key}, statuses=[dg.DagsterRunStatus.STARTED]))
        for r in runs:
            pids = {
                rec.dagster_event.pid for rec in inst.all_logs(r.run_id) if rec.dagster_event and rec.dagster_event.pid
            }
            pids.discard(os.getpid())
            if pids:
                pid = pids.pop()
                os.kill(pid, signal.SIGKILL)
                killed.update(pid=pid, run_id=r.run_id)
                return
        time.sleep(0.05)


def test_9_dead_worker_fails_its_partition_the_rest_finish(small_run, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    victim, good = rid(1), [rid(2), rid(3)]
    for name in [victim, *good]:
        _copy(small_run, data, name)
    dg.DagsterInstance.get()  # the instance's storage exists before three processes open it at once
    stop, killed, result = threading.Event(), {}, {}
    killer = threading.Thread(target=_kill_when_started, args=(victim, stop, killed), daemon=True)
    killer.start()
    runner = threading.Thread(
        target=lambda: result.update(res=run_study(data, out, synth_if_empty=False, quiet=True, workers=2)), daemon=True
    )
    runner.start()
    runner.join(timeout=420)
    stop.set()
    assert not runner.is_alive(), "stepml run hangs after a partition worker died"
    assert killed, "the victim's worker was never seen running"
    res = result["res"]
    assert res["failed"] == [victim] and res["study_ok"]
    err = res["errors"][victim]
    assert err == (
        f"the worker process (pid {killed['pid']}) running this partition died: killed by SIGKILL "
        "(the out-of-memory killer sends SIGKILL: check `dmesg`/the memory limit)"
    )
    inst = dg.DagsterInstance.get()
    assert inst.get_run_by_id(killed["run_id"]).status == dg.DagsterRunStatus.FAILURE
    assert inst.get_runs_count(dg.RunsFilter(job_name="experiment_job", statuses=S.ACTIVE_STATUSES)) == 0
    skip = S.build_study_sensor(minimum_interval_seconds=1)(dg.build_sensor_context(instance=inst))
    assert not (isinstance(skip, dg.SkipReason) and "in progress" in (skip.skip_message or ""))
    metrics = pl.read_csv(out / "metrics.csv")
    assert set(good) <= set(metrics["experiment_id"]) and victim not in set(metrics["experiment_id"])
    row = next(l for l in (out / "report.md").read_text().splitlines() if l.startswith(f"| `{victim}` |"))
    assert "**failed**" in row and "died: killed by SIGKILL" in row


# --------------------------------------------------------------------------------------------
# point 11: the sensor's time budget; unreadable entries
# --------------------------------------------------------------------------------------------


def _deny_reads_under(monkeypatch, folder: Path) -> None:
    """Opening any file under folder raises PermissionError (as for a daemon without read access; tests run as root)."""
    real_open, real_os_open = builtins.open, os.open
    prefix = str(folder)

    def guarded(path, *a, **kw):
        if isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(prefix):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return None

    monkeypatch.setattr(builtins, "open", lambda path, *a, **kw: guarded(path) or real_open(path, *a, **kw))
    monkeypatch.setattr(os, "open", lambda path, *a, **kw: guarded(path) or real_os_open(path, *a, **kw))


def test_11_gzip_bomb_and_unreadable_folder_cannot_stop_the_sensor(small_run, tmp_path, monkeypatch):
    data = tmp_path / "data"
    bomb, unreadable, good = rid(11), rid(12), rid(13)
    d = _copy(small_run, data, bomb)
    (d / "traces.json.gz").write_bytes(
        gzip.compress(b"x\n" * (32 << 20), compresslevel=9, mtime=0) * 64
    )  # 4 MB → 4 GiB
    _copy(small_run, data, unreadable)
    _copy(small_run, data, good)
    monkeypatch.setenv("STEPML_SENSOR_SETTLE_S", "0")
    monkeypatch.setenv("STEPML_SENSOR_TIME_BUDGET_S", "2")
    _deny_reads_under(monkeypatch, data / unreadable)
    sensor = S.build_experiment_sensor(minimum_interval_seconds=1)
    with dg.instance_for_test() as inst:

        def tick(cursor):
            ctx = dg.build_sensor_context(
                instance=inst,
                cursor=cursor,
                resources={"settings": StepMLSettings(data_dir=str(data), out_dir=str(tmp_path / "out"))},
            )
            t = time.monotonic()
            res = sensor(ctx)
            return res, time.monotonic() - t

        res1, secs1 = tick(None)
        assert secs1 < 8, f"one tick took {secs1:.1f} s with a 2 s budget"
        assert [r.partition_key for r in res1.run_requests] == [
            bomb
        ]  # not checked in time: launched, the run applies its limits
        c1 = json.loads(res1.cursor)
        assert set(c1["pending"]) == {unreadable, good}  # the tick's time was used up: next tick
        res2, secs2 = tick(res1.cursor)
        assert secs2 < 8 and [r.partition_key for r in res2.run_requests] == [good]
        c2 = json.loads(res2.cursor)
        assert list(c2["unreadable"]) == [unreadable] and c2["unreadable"][unreadable].startswith("PermissionError: ")
        assert "Permission denied" in c2["unreadable"][unreadable]


# --------------------------------------------------------------------------------------------
# point 12: two `stepml run` on one output folder; atomic asset writes
# --------------------------------------------------------------------------------------------


def _locked(path: Path) -> bool:
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_12_second_stepml_run_on_the_same_out_fails_at_once_naming_the_holder(small_run, tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    _copy(small_run, data, rid(21))
    result = {}
    first = threading.Thread(
        target=lambda: result.update(res=run_study(data, out, synth_if_empty=False, quiet=True, workers=1)), daemon=True
    )
    first.start()
    deadline = time.monotonic() + 120
    while not _locked(out / ".stepml.lock") and time.monotonic() < deadline:
        time.sleep(0.02)
    t = time.monotonic()
    rc = main(["run", "--data", str(data), "--out", str(out), "--workers", "1"])
    assert time.monotonic() - t < 5  # at once
    err = [
        l for l in capsys.readouterr().err.splitlines() if l.startswith("stepml")
    ]  # (the first run's thread may warn)
    assert rc == 2 and len(err) == 1, err  # refused before anything ran: one line
    msg = err[0]
    assert msg.startswith(f"stepml run: the output folder {out} is in use by stepml run (pid {os.getpid()} on ")
    assert msg.endswith(
        "wait for it to finish or choose another --out (lock file "
        f"{out / '.stepml.lock'}; STEPML_LOCK_WAIT_S waits for it, waited 0 s)"
    )
    first.join(timeout=420)
    assert not first.is_alive() and result["res"]["study_ok"] and not result["res"]["failed"]
    assert (out / "report.md").is_file() and not _locked(out / ".stepml.lock")  # released at the end


def test_12_asset_writes_are_atomic(tmp_path, monkeypatch):
    """A write that fails half way (disk full, killed) leaves the previous value whole, and no temporary file."""
    stem = tmp_path / "assets" / "step_table" / file_name(rid(31))
    old = pl.DataFrame({"x": [1, 2, 3]})
    write_object(stem, old)
    write_object(tmp_path / "assets" / "raw" / "p", {"t": old, "n": 1})

    def broken(self, path, *a, **kw):
        Path(path).write_bytes(b"PAR1 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", broken)
    with pytest.raises(OSError):
        write_object(stem, pl.DataFrame({"x": [9]}))
    with pytest.raises(OSError):
        write_object(tmp_path / "assets" / "raw" / "p", {"t": pl.DataFrame({"x": [9]}), "n": 2})
    monkeypatch.undo()
    assert read_object(stem).equals(old)
    stored = read_object(tmp_path / "assets" / "raw" / "p")
    assert stored["n"] == 1 and stored["t"].equals(old)
    assert not [p for p in (tmp_path / "assets").rglob(".tmp-*")]


def test_8_limits_come_from_settings_then_environment_then_defaults(monkeypatch):
    from stepml_core.runs.limits import DEFAULT_LIMITS, InputLimitError, InputLimits

    assert StepMLSettings().input_limits() == DEFAULT_LIMITS
    monkeypatch.setenv("STEPML_MAX_LINE_BYTES", "1e6")
    monkeypatch.setenv("STEPML_MAX_INFLATE_RATIO", "50.5")
    lim = StepMLSettings(max_quarantine_rows=7).input_limits()
    assert (lim.max_line_bytes, lim.max_inflate_ratio, lim.max_quarantine_rows) == (1_000_000, 50.5, 7)
    assert StepMLSettings(max_line_bytes=5).input_limits().max_line_bytes == 5  # the field wins over the environment
    monkeypatch.setenv("STEPML_MAX_YAML_NODES", "lots")
    with pytest.raises(InputLimitError, match="STEPML_MAX_YAML_NODES='lots': not a number"):
        InputLimits.from_env()


# --------------------------------------------------------------------------------------------
# point 1: partition keys ↔ file names
# --------------------------------------------------------------------------------------------


def test_1_partition_keys_map_to_file_names_one_to_one():
    keys = [
        "20260101-000000-mixtral-8x7b-v0.1-tp2-general",
        "20260101-000000-mixtral-8x7b-v0.1-tp2-codegen",
        "a",
        "a.json",
        "a.parquet",
        "a%2Ejson",
        ".hidden",
        "..",
        "__all__",
        "x/y",
        "x%2Fy",
        "",
        "é",
        "a\nb",
        "a b",
        "A",
        "x" * 500,
        "x" * 501,
    ]
    names = [file_name(k) for k in keys]
    assert len(set(names)) == len(keys)
    assert names[0] == keys[0]  # run ids stay readable
    for n in names:
        assert n and "/" not in n and "\x00" not in n and not n.startswith(".") and len(n) <= 200 and n.isascii()
        assert not n.endswith((".json", ".parquet")) and n != UNPARTITIONED
    # every stored form of one key differs from every stored form of another
    forms = [f for n in names for f in (n, n + ".json", n + ".parquet")]
    assert len(set(forms)) == len(forms)
    io = ParquetIOManager(base_dir="/tmp/x")
    assert io._stem(dg.AssetKey("m"), keys[0]) != io._stem(dg.AssetKey("m"), keys[1])


def test_real_data_answers_bad_options_with_one_line_and_never_deletes_your_files(tmp_path, capsys):
    """Issue 21: `stepml real-data` into a run folder holding the user's own files deleted them without a word; a
    bad --out, --shared or --runs gave tracebacks. Built on a shared folder of one run laid out as ../shared is."""
    run = "20260217-155451-llama-2-7b-tp1-codegen"
    shared = tmp_path / "shared"
    (shared / "real" / "requests" / run).mkdir(parents=True)
    (shared / "real" / "requests" / run / "requests.json").write_text(json.dumps({"requests": []}))
    (shared / "reference" / "experiments" / run).mkdir(parents=True)
    (shared / "reference" / "experiments" / run / "exp-config.yaml").write_text("tensor_parallelism: 1\n")
    out = tmp_path / "real"
    assert main(["real-data", "--shared", str(shared), "--out", str(out)]) == 0
    assert main(["real-data", "--shared", str(shared), "--out", str(out)]) == 0  # ours: replaced
    (out / run / "notes.txt").write_text("my notes")
    (tmp_path / "afile").write_text("mine")
    capsys.readouterr()
    for argv, needle in (
        (["--out", str(out)], f"{out / run}: holds 1 file(s) stepml real-data did not write (notes.txt)"),
        (["--out", str(tmp_path / "afile")], f"--out {tmp_path / 'afile'}: not a folder"),
        (["--out", str(out), "--runs", "20990101-000000-x-tp1-y"], "--runs: not real runs under"),
    ):
        assert main(["real-data", "--shared", str(shared), *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and needle in err, err
    assert main(["real-data", "--shared", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert f"--shared {tmp_path / 'nope'}: no folder" in capsys.readouterr().err
    assert (out / run / "notes.txt").read_text() == "my notes" and (tmp_path / "afile").read_text() == "mine"
