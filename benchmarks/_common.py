"""Helpers shared by bench_study.py and bench_scale.py: synthesis of several seeds, running `stepml`
in a child process with peak-RSS polling of its process tree, and reading step durations back
from the Dagster instance's event log."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ process tree memory ---
def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def tree_rss(pid: int) -> dict[int, int]:
    """{pid: VmRSS bytes} for a process and all its descendants (Linux /proc)."""
    out, todo = {}, [pid]
    while todo:
        p = todo.pop()
        if p in out:
            continue
        try:
            with open(f"/proc/{p}/statm") as f:
                out[p] = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            continue
        todo += _children(p)
    return out


def tree_rss_bytes(pid: int) -> int:
    """Sum of VmRSS over a process and all its descendants."""
    return sum(tree_rss(pid).values())


class PeakRSS:
    """Polls the RSS of a process tree every `interval` seconds: .peak (sum over the tree, bytes), .peak_at
    (seconds after start), .peak_root (the root process alone), .peak_one (largest single process)."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval, self._stop = pid, interval, threading.Event()
        self.peak = self.peak_root = self.peak_one = 0
        self.peak_at = 0.0
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        t0 = time.perf_counter()
        while not self._stop.is_set():
            r = tree_rss(self.pid)
            tot = sum(r.values())
            if tot > self.peak:
                self.peak, self.peak_at = tot, time.perf_counter() - t0
            self.peak_root = max(self.peak_root, r.get(self.pid, 0))
            self.peak_one = max([self.peak_one, *r.values()])
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load_avg() -> float:
    return os.getloadavg()[0]


def run_stepml(args: list[str], dagster_home: Path, log: Path | None = None, code: Path | None = None) -> dict:
    """`stepml <args>` in a child process: wall, CPU seconds of the tree, peak tree RSS, exit code. code: another
    copy of the project to run instead of this one (e.g. an earlier commit's tree, `git archive REF | tar -x -C DIR`)."""
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home)}
    Path(dagster_home).mkdir(parents=True, exist_ok=True)
    cpu0, load0 = children_cpu_s(), load_avg()
    t0 = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL
    try:
        p = subprocess.Popen(
            [sys.executable, "-m", "stepml_dagster.cli", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=code or REPO,
        )
        with PeakRSS(p.pid) as mem:
            rc = p.wait()
    finally:
        if log:
            out.close()
    wall = time.perf_counter() - t0
    return {
        "rc": rc,
        "wall_s": wall,
        "cpu_s": children_cpu_s() - cpu0,
        "peak_rss_gb": mem.peak / 1e9,
        "peak_at_s": mem.peak_at,
        "peak_main_gb": mem.peak_root / 1e9,
        "peak_one_process_gb": mem.peak_one / 1e9,
        "load_before": load0,
        "load_after": load_avg(),
    }


# ---------------------------------------------------------------------------- synthesis ---
def shifted_id(run_id: str, seconds: int) -> str:
    """The same run id with its start time moved by `seconds` (a distinct id for another seed's copy)."""
    from stepml_core.runs.folders import parse_run_id

    r = parse_run_id(run_id)
    stamp = (r.started_at + timedelta(seconds=seconds)).strftime("%Y%m%d-%H%M%S")
    return stamp + run_id[15:]


def synthesize_seeds(
    pool: Path,
    seeds: list[int],
    *,
    scale: float = 1.0,
    workers: int | None = None,
    runs: list[str] | None = None,
    quiet: bool = True,
) -> dict[int, list[Path]]:
    """Synthesize the 16 runs once per seed into pool/seed<k>/, ids shifted by k seconds (k > 0) so
    several seeds can share one data folder. Already-complete seeds are reused."""
    from stepml_core.synth import synthesize_runs

    out = {}
    for k in seeds:
        d = Path(pool) / f"seed{k}"
        done = d / ".complete"
        if not done.exists():
            shutil.rmtree(d, ignore_errors=True)
            tmp = Path(pool) / f".seed{k}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            folders = synthesize_runs(tmp, runs, scale=scale, seed=k, workers=workers)
            for f in folders:
                os.rename(f, tmp / shifted_id(f.name, k))
            (tmp / ".complete").write_text(json.dumps({"seed": k, "scale": scale}))
            os.rename(tmp, d)
            if not quiet:
                print(f"synthesized seed {k} into {d}", flush=True)
        out[k] = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
    return out


def link_data_folder(folders: list[Path], data: Path) -> Path:
    """A data folder of hard links to run folders' files (no extra disk; plain files, not symlinks)."""
    data.mkdir(parents=True, exist_ok=True)
    for f in folders:
        dst = data / f.name
        if not dst.exists():
            shutil.copytree(f, dst, copy_function=os.link)
    return data


def sampled_steps(folders: list[Path]) -> int:
    n = 0
    for f in folders:
        prov = f / "provenance.json"
        if prov.is_file():
            n += int(json.loads(prov.read_bytes())["counts"]["sampled_steps"])
    return n


# ------------------------------------------------------------------------- event log ---
def event_log_breakdown(dagster_home: Path, run_ids: set[str] | None = None) -> dict:
    """Per job and asset step: Σ STEP_SUCCESS durations; per run: wall (start→end) and Σ step durations.

    Returns {"assets": {(job, step): seconds}, "runs": [{run_id, job, partition, wall_s, steps_s, start, end}],
    "materializations": {(asset, partition or None): count}}.
    """
    import dagster as dg
    from dagster import DagsterEventType as T

    inst = dg.DagsterInstance.from_config(str(dagster_home))
    try:
        assets, runs = defaultdict(float), []
        for rec in inst.get_run_records():
            run = rec.dagster_run
            if run_ids is not None and run.run_id not in run_ids:
                continue
            steps = 0.0
            for e in inst.all_logs(run.run_id, of_type={T.STEP_SUCCESS}):
                d = e.dagster_event.event_specific_data.duration_ms / 1e3
                assets[(run.job_name, e.step_key)] += d
                steps += d
            runs.append(
                {
                    "run_id": run.run_id,
                    "job": run.job_name,
                    "partition": run.tags.get("dagster/partition"),
                    "start": rec.start_time,
                    "end": rec.end_time,
                    "wall_s": (rec.end_time - rec.start_time) if rec.end_time and rec.start_time else float("nan"),
                    "steps_s": steps,
                }
            )
        mats = defaultdict(int)
        for rec in inst.get_run_records():
            if run_ids is not None and rec.dagster_run.run_id not in run_ids:
                continue
            for e in inst.all_logs(rec.dagster_run.run_id, of_type={T.ASSET_MATERIALIZATION}):
                m = e.dagster_event.event_specific_data.materialization
                mats[(m.asset_key.to_user_string(), m.partition)] += 1
        return {"assets": dict(assets), "runs": runs, "materializations": dict(mats)}
    finally:
        inst.dispose()


def fmt_s(x: float) -> str:
    return f"{x:7.1f} s"
