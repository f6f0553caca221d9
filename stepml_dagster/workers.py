"""Partition worker processes for `stepml run --workers N` that notice when a worker dies.

``multiprocessing.Pool`` loses the task of a worker that is killed (the out-of-memory killer sends
SIGKILL) and waits for its result forever. Here each worker has its own pipe and the parent waits
on the pipes and the processes' sentinels together: a worker that exits while it holds a
partition fails that partition with a message saying how it died, a fresh worker takes the
remaining partitions, and the rest finish. A worker also exits after ``tasks_per_worker``
partitions and is replaced (its heap creeps up with each partition).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections import deque
from collections.abc import Callable, Iterator
from multiprocessing.connection import wait

from stepml_core.progress import add_reported_usage


def _die_with_parent() -> None:
    """Linux: the kernel sends this worker SIGKILL when the process that started it dies, however it dies
    (a SIGKILLed `stepml run` would otherwise leave its workers computing their partition to the end)."""
    import ctypes
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


# what a partition worker imports anyway (≈ 3 CPU-s from scratch): imported once by the fork server
PRELOAD = ("stepml_dagster.definitions", "stepml_dagster.local")


def worker_context():
    """Where workers come from: a fork server (Linux, macOS) that imported PRELOAD once — a worker is a fork of it,
    started in milliseconds with StepML and Dagster imported, where a spawned one imports them again (a study
    replaces its workers every few partitions); "spawn" where there is no fork server (Windows). The server is a
    fresh single-threaded process (never a fork of this one, which runs Dagster's threads)."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))
    return ctx


def start_worker_server() -> None:
    """Start the fork server now, where workers come from one (worker_context): it imports PRELOAD (≈ 2 s) while the
    caller goes on (`stepml run` synthesizes its runs meanwhile) instead of when the first worker is asked for."""
    ctx = worker_context()
    if ctx.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def _exit_with_parent() -> None:
    """A worker from the fork server is the server's child, so PR_SET_PDEATHSIG watches the server, and the server
    lives while its workers hold its liveness pipe: a thread here waits on the pipe to the process that started this
    worker (multiprocessing's parent sentinel: it reads EOF when that process is gone, however it died) and then
    kills this worker, as the kernel does for a spawned one."""
    import threading

    parent = mp.parent_process()
    if parent is None or parent.sentinel is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _own_cpu_s() -> float:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _own_peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _worker_main(conn, fn: Callable, common: tuple, max_tasks: int, env: dict | None = None) -> None:
    used = 0.0
    _die_with_parent()
    _exit_with_parent()
    if env is not None and env != dict(os.environ):  # the starter's environment now (a fork server keeps its own)
        os.environ.clear()
        os.environ.update(env)
    for _ in range(max_tasks):
        try:
            key = conn.recv()
        except EOFError:
            return
        if key is None:
            return
        res = fn(*common, key)
        now = _own_cpu_s()
        conn.send((res, now - used, _own_peak_rss_mb()))  # a fork server's worker: its starter cannot wait for it
        used = now


def death_message(pid: int, exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        how = f"killed by {name}" + (
            " (the out-of-memory killer sends SIGKILL: check `dmesg`/the memory limit)"
            if -exitcode == signal.SIGKILL
            else ""
        )
    else:
        how = f"exited with code {exitcode}"
    return f"the worker process (pid {pid}) running this partition died: {how}"


class _Worker:
    def __init__(self, ctx, fn, common, max_tasks):
        self.conn, child = ctx.Pipe()
        # the environment goes along: a fork server's workers would have the server's, fixed when it started (a
        # study sets DAGSTER_HOME to its own instance; spawn and cwd/sys.path are handled by multiprocessing)
        env = dict(os.environ)
        self.proc = ctx.Process(target=_worker_main, args=(child, fn, common, max_tasks, env), daemon=True)
        self.proc.start()
        child.close()
        self.key: str | None = None
        self.tasks_left = max_tasks  # partitions it will still take; at 0 it exits by itself after its last result


def run_in_workers(
    fn: Callable,
    common: tuple,
    keys: list[str],
    workers: int,
    tasks_per_worker: int,
    on_death: Callable[[str, int, str], None] | None = None,
) -> Iterator[tuple[str, object | None, str | None]]:
    """Yield (key, fn(*common, key), None) as partitions finish, or (key, None, message) for a partition
    whose worker died; on_death(key, pid, message) is called first. Every worker has exited on return."""
    ctx = worker_context()
    reported = ctx.get_start_method() == "forkserver"
    todo = deque(keys)
    pool: list[_Worker] = []
    try:
        while todo or any(w.key is not None for w in pool):
            for w in [
                w for w in pool if w.key is None and w.tasks_left == 0
            ]:  # done its share: let it exit, never hand it more
                _retire(w)
                pool.remove(w)
            busy = sum(w.key is not None for w in pool)
            while len(pool) < workers and len(pool) < busy + len(todo):
                pool.append(_Worker(ctx, fn, common, tasks_per_worker))
            for w in pool:
                if w.key is None and todo and w.tasks_left > 0:
                    w.key = todo.popleft()
                    w.tasks_left -= 1
                    try:
                        w.conn.send(w.key)
                    except (BrokenPipeError, OSError):
                        pass  # it died idle: its sentinel says so below
            waiting = [w.conn for w in pool if w.key is not None] + [w.proc.sentinel for w in pool]
            ready = set(wait(waiting))
            for w in list(pool):
                if w.key is not None and (w.conn in ready or w.proc.sentinel in ready) and w.conn.poll():
                    try:
                        res, cpu_s, rss_mb = w.conn.recv()
                    except (EOFError, OSError):
                        res = None
                    else:
                        if reported:  # not a waited-for child: its usage counts where it says so
                            add_reported_usage(cpu_s, rss_mb)
                        key, w.key = w.key, None
                        yield key, res, None
                if w.proc.sentinel in ready or not w.proc.is_alive():
                    w.proc.join()
                    if w.key is not None:  # died holding a partition
                        msg = death_message(w.proc.pid, w.proc.exitcode)
                        key, w.key = w.key, None
                        if on_death is not None:
                            on_death(key, w.proc.pid, msg)
                        yield key, None, msg
                    w.conn.close()
                    pool.remove(w)
    finally:
        for w in pool:
            try:
                w.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for w in pool:
            _retire(w)


def _retire(w: _Worker) -> None:
    """Wait for a worker that was told to stop (or has done its share) to exit; kill it after 30 s."""
    w.proc.join(timeout=30)
    if w.proc.is_alive():
        w.proc.kill()
        w.proc.join()
    w.conn.close()
