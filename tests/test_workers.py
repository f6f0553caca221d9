"""Partition workers (`stepml run --workers N`): a worker that has done its share of partitions is
replaced, never handed one more partition that it would drop by exiting (seen on the real 16:
"the worker process ... died: exited with code 0")."""

import operator

from stepml_dagster.workers import run_in_workers


def test_workers_replaced_after_their_share_lose_no_partition():
    keys = [f"k{i:02d}" for i in range(24)]
    got = list(run_in_workers(operator.add, ("p-",), keys, workers=2, tasks_per_worker=1))
    assert [m for _, _, m in got if m] == []
    assert sorted(k for k, _, _ in got) == keys
    assert all(r == "p-" + k for k, r, _ in got)


_PARENT = r"""
import sys, time
from stepml_dagster.workers import run_in_workers
for key, res, err in run_in_workers(time.sleep, (), [60.0, 60.0], workers=2, tasks_per_worker=1):
    pass
"""


def test_workers_die_with_a_killed_parent(tmp_path):
    """A `stepml run` killed by SIGKILL (the OOM killer) leaves no worker computing on (Linux): the fork server
    sees its parent gone and exits, its workers die with it (PR_SET_PDEATHSIG)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import pytest

    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux-only")
    parent = subprocess.Popen([sys.executable, "-c", _PARENT])

    def descendants() -> list[int]:  # workers are children of the fork server, itself a child of the parent
        out, todo = [], [parent.pid]
        while todo:
            ps = subprocess.run(["ps", "-o", "pid=", "--ppid", str(todo.pop())], capture_output=True, text=True)
            kids = [int(x) for x in ps.stdout.split()]
            out += kids
            todo += kids
        return out

    deadline = time.monotonic() + 60
    while len(kids := [k for k in descendants() if _is_worker(k)]) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(kids) >= 2, "the two workers did not start"
    time.sleep(1.0)  # let them reach their task
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    while any(os.path.exists(f"/proc/{k}") and _state(k) != "Z" for k in kids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [k for k in kids if os.path.exists(f"/proc/{k}") and _state(k) != "Z"], "workers outlived their parent"


def _is_worker(pid: int) -> bool:
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        return b"spawn_main" in cmd or b"forkserver" in cmd
    except OSError:
        return False


def _state(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def test_partitions_start_biggest_run_folder_first(tmp_path):
    """`stepml run --workers N` hands out the partitions by run-folder size, largest first (the phase's idle tail);
    equal sizes and unreadable folders keep their order."""
    from stepml_dagster.local import largest_first

    for name, size in (("a", 10), ("b", 300), ("c", 10), ("d", 50)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "traces.json").write_bytes(b"x" * size)
    (tmp_path / "b" / "results").mkdir()
    (tmp_path / "b" / "results" / "more.json").write_bytes(b"x" * 5)
    assert largest_first(tmp_path, ["a", "b", "c", "d", "missing"]) == ["b", "d", "a", "c", "missing"]


def test_workers_come_from_a_fork_server_with_stepml_imported():
    """A worker starts with StepML and Dagster imported (the fork server imported them once): a study replaces its
    workers every few partitions, and a spawned worker imported them again each time (≈ 3 CPU-s)."""
    import multiprocessing as mp

    import pytest

    from stepml_dagster.workers import worker_context

    if "forkserver" not in mp.get_all_start_methods():
        pytest.skip("no fork server on this platform: workers are spawned")
    got = list(run_in_workers(_imported_already, ("stepml_dagster.definitions",), ["a", "b"], 2, 1))
    assert worker_context().get_start_method() == "forkserver"
    assert [r for _, r, _ in got] == [True, True]


def _imported_already(module: str, key: str) -> bool:
    import sys

    return module in sys.modules


def test_a_worker_sees_the_environment_of_its_starter_now_not_the_fork_servers(monkeypatch):
    """The fork server starts once per process with the environment of that moment; a study sets DAGSTER_HOME to its
    own instance, so a later study's workers must see the later value (they would write to the first instance)."""
    monkeypatch.setenv("STEPML_TEST_WORKER_ENV", "first")
    list(run_in_workers(_env_of, ("STEPML_TEST_WORKER_ENV",), ["a"], 1, 1))  # the server is running from here on
    monkeypatch.setenv("STEPML_TEST_WORKER_ENV", "second")
    got = list(run_in_workers(_env_of, ("STEPML_TEST_WORKER_ENV",), ["a", "b"], 2, 1))
    assert [r for _, r, _ in got] == ["second", "second"]


def _env_of(name: str, key: str) -> str | None:
    import os

    return os.environ.get(name)


def test_a_phase_counts_the_cpu_of_fork_server_workers():
    """A fork server's worker is not a waited-for child of `stepml run` (RUSAGE_CHILDREN and /usr/bin/time miss
    it): each reports its CPU seconds with its result, and the phase line counts them (it said 0.0 before)."""
    from stepml_core.progress import PhaseClock

    clock = PhaseClock()
    with clock.phase("work"):
        got = list(run_in_workers(_burn_cpu, (0.4,), ["a", "b"], 2, 1))
    assert [m for _, _, m in got] == [None, None]
    wall_s, cpu_s = clock.phases["work"]
    assert cpu_s >= 0.7  # two workers x 0.4 CPU-s each (the parent only waited)
    assert "worker peak RSS" in clock.summary()


def _burn_cpu(seconds: float, key: str) -> str:
    import time

    t = time.process_time()
    while time.process_time() - t < seconds:
        pass
    return key
