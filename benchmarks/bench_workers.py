#!/usr/bin/env python
"""Partition worker start-up: workers forked from a fork server that imported StepML and Dagster once
(stepml_dagster.workers.worker_context) against spawned workers (each imports them again), in this process.

    python benchmarks/bench_workers.py [--workers 8]

Each variant starts `--workers` workers one partition each (tasks_per_worker=1, two at a time: a study replaces
its workers every PARTITIONS_PER_WORKER partitions), and each worker imports what a partition worker imports
(stepml_dagster.definitions). Printed per variant: wall, the CPU seconds the workers spent importing (their own
measure), and the ratio spawn / fork server. The fork server's own import (once per process) is in the first
variant's wall: the fork-server variant runs first.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time


def _import_definitions(_unused: int, key: str) -> float:
    """CPU seconds this worker spent importing what a partition needs (0 where it was imported already)."""
    t = time.process_time()
    import stepml_dagster.definitions  # noqa: F401

    return time.process_time() - t


def run(context_name: str, workers: int) -> tuple[float, float]:
    import stepml_dagster.workers as w

    original = w.worker_context
    if context_name == "spawn":
        w.worker_context = lambda: mp.get_context("spawn")
    try:
        t = time.perf_counter()
        got = list(w.run_in_workers(_import_definitions, (0,), [f"k{i}" for i in range(workers)], 2, 1))
        wall = time.perf_counter() - t
    finally:
        w.worker_context = original
    return wall, sum(r for _, r, _ in got)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=8, help="workers started (a 16-run study starts 8: 2 phases x 4)")
    a = ap.parse_args(argv)
    print(f"{a.workers} workers, 2 at a time, load average {os.getloadavg()[0]:.1f}")
    res = {}
    for name in ("forkserver", "spawn"):
        res[name] = run(name, a.workers)
        print(f"  {name:<10} wall {res[name][0]:6.2f} s   workers' import CPU {res[name][1]:6.2f} s", flush=True)
    print(f"spawn / fork server, wall: {res['spawn'][0] / res['forkserver'][0]:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
