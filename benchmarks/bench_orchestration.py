#!/usr/bin/env python
"""Orchestration: `stepml run` (stepml_dagster/local.py) against Dagster's own facilities, on one seeded synthetic study.

    python benchmarks/bench_orchestration.py                    # the 16 runs at scale 0.05, seed 0
    python benchmarks/bench_orchestration.py --scale 0.1 --skip-daemon --json orch.json

One data folder, synthesized once; each variant runs in a child process with its own out folder and
DAGSTER_HOME, one after the other, in this process (ratios to variant A; the machine is shared, so
the load average is printed with each):
  A. local.py with --workers 2 (the default on 2 cores): one in-process Dagster run per partition, in
     hand-rolled worker processes (stepml_dagster/workers.py), then the study chain in-process;
  B. local.py with --workers 1: the same runs, all in one process (Dagster's execute_in_process only);
  C. Dagster's daemon (what `stepml ui` runs): experiment_sensor requests one run per partition,
     study_sensor chains models, replays and study; the queued run coordinator starts at most 2 runs at
     once (deploy/dagster.yaml) and the default run launcher gives each run its own process. Wall: daemon
     start → end of the last run (the quiet ticks after it are not counted);
  D. Dagster's single-run backfill: experiment_job over the whole partition range in ONE in-process run
     (tags dagster/asset_partition_range_start/end, what a BackfillPolicy.single_run backfill launches).
Each: wall, CPU seconds and peak RSS of the process tree; A, B and C must give byte-identical
metrics.csv and verdict.json (printed). Temp folders are removed unless --keep.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from _common import (
    REPO,
    PeakRSS,
    children_cpu_s,
    event_log_breakdown,
    load_avg,
    run_stepml,
    sampled_steps,
    synthesize_seeds,
)  # noqa: E402
from process_group import stop_process_group  # noqa: E402

OUTPUTS = ("metrics.csv", "verdict.json")

SINGLE_RUN = r"""
import json, sys, time
from pathlib import Path
import dagster as dg
from stepml_dagster.definitions import build_definitions
from stepml_dagster.instance import sync_partitions
from stepml_dagster.local import PhaseJobs, run_error
from stepml_dagster.resources import StepMLSettings
data, out = sys.argv[1:3]
inst = dg.DagsterInstance.get()
keys = sorted(p.name for p in Path(data).iterdir() if p.is_dir() and not p.name.startswith("."))
sync_partitions(inst, keys)
job = PhaseJobs.of(build_definitions(StepMLSettings(data_dir=data, out_dir=out, seed=0))).experiment
keys = job.partitions_def.get_partition_keys(dynamic_partitions_store=inst)
t = time.perf_counter()
res = job.execute_in_process(instance=inst, raise_on_error=False,
                             tags={"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]},
                             run_config={"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}})
steps = [e.step_key for e in res.all_events if e.is_step_success]
print(json.dumps({"success": res.success, "run_s": time.perf_counter() - t, "error": run_error(res), "steps_ok": steps}))
"""


def digest(out: Path) -> dict[str, str | None]:
    return {
        n: (hashlib.sha256((out / n).read_bytes()).hexdigest()[:16] if (out / n).is_file() else None) for n in OUTPUTS
    }


def phases(home: Path) -> dict[str, str]:
    """Per phase job: runs succeeded/started, and first start → last end in seconds after the first run started."""
    import dagster as dg

    inst = dg.DagsterInstance.from_config(str(home))
    try:
        recs = inst.get_run_records()
    finally:
        inst.dispose()
    t0 = min((r.start_time for r in recs if r.start_time), default=0.0)
    out = {}
    for job in ("experiment_job", "models_job", "replay_job", "study_job"):
        rs = [r for r in recs if r.dagster_run.job_name == job]
        if rs:
            ok = sum(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in rs)
            start = (
                min(r.start_time for r in rs if r.start_time) - t0 if any(r.start_time for r in rs) else float("nan")
            )
            end = max(r.end_time for r in rs if r.end_time) - t0 if any(r.end_time for r in rs) else float("nan")
            out[job] = f"{ok}/{len(rs)} ok, {start:.0f} → {end:.0f} s"
    return out


def local_variant(root: Path, tmp: Path, name: str, workers: int) -> dict:
    out = tmp / name
    r = run_stepml(
        ["run", "--data", str(root), "--out", str(out), "--no-synth", "--workers", str(workers)],
        out / "dagster_home",
        log=tmp / f"{name}.log",
    )
    runs = [x for x in event_log_breakdown(out / "dagster_home")["runs"] if x["job"] == "experiment_job"]
    overhead = sum(x["wall_s"] - x["steps_s"] for x in runs)  # run start, plan, event writes around the steps
    return {
        **r,
        "ok": r["rc"] == 0,
        "outputs": digest(out),
        "experiment_runs": len(runs),
        "experiment_run_overhead_s": overhead,
        "phases": phases(out / "dagster_home"),
    }


def _chain_done(recs, n_runs: int) -> bool:
    """Nothing queued or running, study_job succeeded and every experiment_job run has ended."""
    import dagster as dg

    S = dg.DagsterRunStatus
    active = [r for r in recs if r.dagster_run.status in (S.QUEUED, S.STARTING, S.STARTED, S.NOT_STARTED)]
    study_done = any(r.dagster_run.job_name == "study_job" and r.dagster_run.status == S.SUCCESS for r in recs)
    exp_done = sum(r.dagster_run.job_name == "experiment_job" and r.end_time is not None for r in recs)
    return not active and study_done and exp_done >= n_runs


def _run_record_summary(recs, t0: float, status: str) -> dict:
    """ok, status, wall_s (t0 → the last run's end), runs per job and the failed runs, from the daemon's run records."""
    import dagster as dg

    ends = [r.end_time for r in recs if r.end_time]
    by_job: dict[str, int] = {}
    for r in recs:
        by_job[r.dagster_run.job_name] = by_job.get(r.dagster_run.job_name, 0) + 1
    failed = [
        f"{r.dagster_run.job_name}[{r.dagster_run.tags.get('dagster/partition', '')}]"
        for r in recs
        if r.dagster_run.status == dg.DagsterRunStatus.FAILURE
    ]
    return {
        "ok": status == "done" and not failed,
        "status": status,
        "wall_s": (max(ends) - t0) if ends else float("nan"),
        "runs": by_job,
        "failed_runs": failed,
    }


def daemon_variant(root: Path, tmp: Path, name: str, n_runs: int, timeout_s: float, interval_s: int) -> dict:
    """dagster-daemon on workspace.yaml until every phase's runs have finished and nothing is queued or running."""
    import dagster as dg

    home, out = tmp / name / "dagster_home", tmp / name
    home.mkdir(parents=True)
    shutil.copy(REPO / "deploy" / "dagster.yaml", home / "dagster.yaml")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "STEPML_DATA_DIR": str(root),
        "STEPML_OUT_DIR": str(out),
        "STEPML_SENSOR_INTERVAL_S": str(interval_s),
        "STEPML_SENSOR_STATUS": "running",
        "STEPML_SENSOR_SETTLE_S": "0",
        "PYTHONUNBUFFERED": "1",
    }
    exe = Path(sys.executable).parent / "dagster-daemon"
    inst = dg.DagsterInstance.from_config(
        str(home)
    )  # creates the SQLite storage before the daemon opens it (two at once race)
    cpu0, load0, t0 = children_cpu_s(), load_avg(), time.time()
    log = open(tmp / f"{name}.log", "w")
    proc = subprocess.Popen(
        [str(exe), "run", "-w", str(REPO / "workspace.yaml")],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    status = "timed out"
    try:
        with PeakRSS(proc.pid) as mem:
            quiet_since = None
            while time.time() - t0 < timeout_s:
                time.sleep(1)
                if proc.poll() is not None:
                    status = "daemon exited"
                    break
                if not _chain_done(inst.get_run_records(), n_runs):
                    quiet_since = None
                    continue
                quiet_since = quiet_since or time.time()
                if time.time() - quiet_since >= 4 * interval_s:  # a few ticks with nothing requested: the chain is done
                    status = "done"
                    break
    finally:
        stopped = time.time()
        stop_process_group(proc)  # the daemon's process group: it, its code server, its runs
        log.close()
    recs = inst.get_run_records()
    inst.dispose()
    if status != "done":  # runs the kill interrupted are not failures of theirs
        recs = [r for r in recs if r.end_time is not None and r.end_time < stopped]
    return {
        **_run_record_summary(recs, t0, status),
        "cpu_s": children_cpu_s() - cpu0,
        "peak_rss_gb": mem.peak / 1e9,
        "peak_one_process_gb": mem.peak_one / 1e9,
        "load_before": load0,
        "load_after": load_avg(),
        "outputs": digest(out),
        "phases": phases(home),
    }


def single_run_variant(root: Path, tmp: Path, name: str) -> dict:
    home, out = tmp / name / "dagster_home", tmp / name
    home.mkdir(parents=True)
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    cpu0, load0, t0 = children_cpu_s(), load_avg(), time.perf_counter()
    p = subprocess.Popen(
        [sys.executable, "-c", SINGLE_RUN, str(root), str(out)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with PeakRSS(p.pid) as mem:
        stdout, stderr = p.communicate()
    wall = time.perf_counter() - t0
    try:
        res = json.loads(stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        res = {"success": False, "error": (stderr or stdout).strip().splitlines()[-1:] or ["no output"]}
    return {
        **res,
        "ok": bool(res.get("success")),
        "wall_s": wall,
        "cpu_s": children_cpu_s() - cpu0,
        "peak_rss_gb": mem.peak / 1e9,
        "load_before": load0,
        "load_after": load_avg(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-daemon", action="store_true")
    ap.add_argument("--daemon-timeout", type=float, default=900.0)
    ap.add_argument("--sensor-interval", type=int, default=1, help="STEPML_SENSOR_INTERVAL_S of the daemon variant")
    ap.add_argument("--order", default="ABCD", help="which variants run, in this order (e.g. CDAB)")
    ap.add_argument("--keep", type=Path, help="keep data/outs/instances under this folder instead of a temp folder")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    tmp = a.keep or Path(tempfile.mkdtemp(prefix="bench_orch_"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        folders = synthesize_seeds(tmp / "pool", [a.seed], scale=a.scale, workers=2)[a.seed]
        root = folders[0].parent
        print(
            f"{len(folders)} synthetic runs (scale {a.scale}, seed {a.seed}, {sampled_steps(folders)} sampled steps) in {root}; "
            f"{os.cpu_count()} cores, load average {load_avg():.1f}",
            flush=True,
        )
        res: dict = {
            "scale": a.scale,
            "seed": a.seed,
            "runs": len(folders),
            "sampled_steps": sampled_steps(folders),
            "cores": os.cpu_count(),
        }
        variants = [
            ("A_local_workers2", lambda: local_variant(root, tmp, "A_local_workers2", 2)),
            ("B_local_workers1", lambda: local_variant(root, tmp, "B_local_workers1", 1)),
        ]
        if not a.skip_daemon:
            variants.append(
                (
                    "C_daemon",
                    lambda: daemon_variant(root, tmp, "C_daemon", len(folders), a.daemon_timeout, a.sensor_interval),
                )
            )
        variants.append(("D_single_run_range", lambda: single_run_variant(root, tmp, "D_single_run_range")))
        order = {v[0][0]: v for v in variants}
        for name, fn in [order[c] for c in a.order if c in order]:
            print(f"{name} ...", flush=True)
            res[name] = r = fn()
            print(
                f"  {'ok' if r['ok'] else 'FAILED'}: wall {r['wall_s']:.1f} s, {r['cpu_s']:.0f} CPU-s, peak RSS "
                f"{r['peak_rss_gb']:.2f} GB (load {r['load_before']:.1f} → {r['load_after']:.1f})"
                + (f"; error: {r.get('error')}" if not r["ok"] and r.get("error") else "")
                + (
                    f"; status {r['status']}, runs {r['runs']}, failed {r['failed_runs']}"
                    if "runs" in r and isinstance(r["runs"], dict)
                    else ""
                ),
                flush=True,
            )
            for job, what in r.get("phases", {}).items():
                print(f"    {job:<15} {what}", flush=True)
        base = res["A_local_workers2"]
        print(f"\n  {'variant':<22} {'wall s':>8} {'× A':>6} {'peak RSS GB':>12} {'× A':>6}  outputs = A's")
        for name in [n for n, _ in variants if n in res]:
            r = res[name]
            same = "" if "outputs" not in r else ("yes" if r["outputs"] == base["outputs"] and r["ok"] else "NO")
            print(
                f"  {name:<22} {r['wall_s']:8.1f} {r['wall_s'] / base['wall_s']:6.2f} {r['peak_rss_gb']:12.2f} "
                f"{r['peak_rss_gb'] / base['peak_rss_gb']:6.2f}  {same if r['ok'] else 'FAILED'}"
            )
        for name in ("A_local_workers2", "B_local_workers1"):
            r = res[name]
            print(
                f"  {name}: Σ over its {r['experiment_runs']} experiment_job runs of (run wall − Σ step durations) = "
                f"{r['experiment_run_overhead_s']:.1f} s: the most one run over the partition range could save"
            )
        if a.json:
            a.json.write_text(json.dumps(res, indent=1, default=str))
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
