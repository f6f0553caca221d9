#!/usr/bin/env python
"""Whole-study speed: `stepml run` over the 16 full-size synthetic runs, where the time goes, and one new run landing.

    python benchmarks/bench_study.py                        # synthesize the 16 runs (scale 1.0, seed 0) into a temp folder
    python benchmarks/bench_study.py --data DIR             # an existing folder of run folders (not modified unless --incremental)
    python benchmarks/bench_study.py --workers 1 --skip-incremental --json study.json
    git archive REF | tar -x -C /tmp/before && python benchmarks/bench_study.py --before /tmp/before   # vs earlier code

Measures, in this order and in this process:
  1. baseline: the same work called directly on stepml_core (benchmarks/bare_path.py; no Dagster, no
     stored assets), partitions and replays in `--workers` spawn processes like `stepml run`, the models and the
     report in-process;
  2. `stepml run --data D --out O --workers N` in a child process with a fresh DAGSTER_HOME: wall, CPU
     seconds and peak RSS of its process tree; from the instance's event log: Σ STEP_SUCCESS durations per
     asset (summed over partitions), run walls, the partition and study phases, Dagster overhead;
  2b. with --before DIR: the same `stepml run` with the code in DIR (an earlier commit's tree), fresh DAGSTER_HOME and
     output folder, after the baseline and before this code's run: its wall and per-asset step sums beside this
     code's, both as ratios to the same baseline, and whether metrics.csv and verdict.json are byte-identical;
  3. incremental (unless --skip-incremental): one new run folder lands in D (a copy of --incremental-run
     synthesized with another seed under a new id), `stepml run --experiment NEW` re-materializes its
     partition and the study; the instance's materialization events show which (asset, partition) pairs
     were recomputed. Baseline: bare partition + the study's models, the new run's replay and the report, in-process.
Targets: whole study < 120 s on 2 cores; incremental < 20 s. Every figure is printed against its target
and as a ratio to the baseline measured in the same process. Temp folders are removed unless --keep.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import (
    children_cpu_s,
    event_log_breakdown,
    load_avg,
    run_stepml,
    sampled_steps,
    self_cpu_s,  # noqa: E402
    shifted_id,
    synthesize_seeds,
)
from bare_path import bare_models, bare_partition, bare_partition_worker, bare_replay_worker, bare_report  # noqa: E402

TARGET_STUDY_S, TARGET_INCREMENTAL_S = 120.0, 20.0
DEFAULT_INCREMENTAL_RUN = "20260218-150304-codellama-34b-tp2-general"  # a mid-sized run (≈ 6.5 k sampled steps)
PARTITIONED = [  # step keys of experiment_job (experiment_features and experiment_models: several assets, one step)
    "raw_traces",
    "experiment_features",
    "experiment_models",
    "request_log",
]
EXPERIMENT_FEATURES = ["step_tables", "request_context", "feature_matrix", "split"]  # the bare path's parts of it
EXPERIMENT_MODELS = [
    "fitted_models",
    "predictions",
    "metrics",
    "run_summary",
    "ablation",
    "e2e_fidelity",
    "method_checks",
]
# step keys of the study chain (pooled_models materializes global_models + generalization); replay is per partition
STUDY = [
    "pooled_models",
    "synthetic_vs_real",
    "request_calibration",
    "replay_models",
    "replay",
    "replay_fidelity",
    "calibration_fidelity",
    "study_report",
]
STUDY_JOBS = ("models_job", "replay_job", "study_job")


def _pool_map(fn, workers: int, *iterables):
    if workers == 1:
        return list(map(fn, *iterables))
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        return list(pool.map(fn, *iterables))


def bare_baseline(folders: list[Path], root: Path, out: Path, workers: int, real_reference_dir: str = "") -> dict:
    """The same work on stepml_core alone: partitions and replays in `workers` spawn processes (as `stepml run`),
    the models and the report in-process."""
    cpu0, t0, load0 = self_cpu_s() + children_cpu_s(), time.perf_counter(), load_avg()
    parts, per_asset = {}, defaultdict(float)
    for name, keep, times in _pool_map(
        bare_partition_worker, workers, [str(f) for f in folders], [str(root)] * len(folders)
    ):
        parts[name] = keep
        for k, v in times.items():
            if not k.startswith("_"):
                per_asset[k] += v
                if k in EXPERIMENT_MODELS:  # the bare work of experiment_models' step
                    per_asset["experiment_models"] += v
                if k in EXPERIMENT_FEATURES:  # the bare work of experiment_features' step
                    per_asset["experiment_features"] += v
    t1 = time.perf_counter()
    models, st = bare_models(parts, root, real_reference_dir=real_reference_dir)
    logs = sorted(e for e in parts if parts[e].get("request_log") is not None)
    replays = {}
    for name, value, secs in _pool_map(
        bare_replay_worker,
        workers,
        [str(root / e) for e in logs],
        [str(root)] * len(logs),
        [parts[e]["request_log"] for e in logs],
        [models["replay_models"]] * len(logs),
        [str(out)] * len(logs),
    ):
        replays[name] = value
        per_asset["replay"] += secs
    _, sr = bare_report(parts, models, replays, out)
    t2 = time.perf_counter()
    return {
        "wall_s": t2 - t0,
        "partition_phase_s": t1 - t0,
        "study_phase_s": t2 - t1,
        "cpu_s": self_cpu_s() + children_cpu_s() - cpu0,
        "assets": {**per_asset, **st, **sr},
        "load_before": load0,
        "load_after": load_avg(),
        "_parts": parts,
    }


def dagster_breakdown(home: Path, total_wall: float, workers: int, run_ids: set[str] | None = None) -> dict:
    """From the instance's event log: the partition phase (experiment_job runs, first start → last end), the study
    phase (models_job, replay_job runs first start → last end, study_job), Σ step durations per asset."""
    ev = event_log_breakdown(home, run_ids)
    runs = ev["runs"]
    exp = [r for r in runs if r["job"] == "experiment_job"]
    stu = [r for r in runs if r["job"] in STUDY_JOBS]
    span = lambda rs: (max(r["end"] for r in rs) - min(r["start"] for r in rs)) if rs else 0.0  # noqa: E731
    part_phase, study_phase = span(exp), span(stu)
    per_asset = defaultdict(float)
    for (_job, step), s in ev["assets"].items():
        per_asset[step.split("[")[0]] += s
    steps_part = sum(r["steps_s"] for r in exp)
    steps_study = sum(r["steps_s"] for r in stu)
    return {
        "wall_s": total_wall,
        "partition_phase_s": part_phase,
        "study_phase_s": study_phase,
        "assets": dict(per_asset),
        "sum_asset_work_s": steps_part + steps_study,
        "partition_asset_work_s": steps_part,
        "study_asset_work_s": steps_study,
        "in_run_overhead_s": sum(
            r["wall_s"] - r["steps_s"] for r in runs
        ),  # run start/plan/event writes around the steps
        "outside_runs_s": total_wall
        - part_phase
        - study_phase,  # interpreter, imports, definitions, partitions, worker spawn
        "partition_idle_core_s": part_phase * workers - steps_part,
        "runs": len(runs),
        "materializations": ev["materializations"],
    }


def _row(name, target, measured, baseline=None, unit="s"):
    t = f"< {target:.0f} {unit}" if target else "–"
    verdict = (
        ""
        if not target
        else ("met" if measured < target else f"MISSED by {measured - target:.1f} {unit} ({measured / target:.2f}x)")
    )
    ratio = f"{measured / baseline:5.2f}x baseline ({baseline:.1f} {unit})" if baseline else ""
    print(f"  {name:<44} {measured:8.1f} {unit}  target {t:<10} {verdict:<28} {ratio}")


def land_new_run(root: Path, tmp: Path, real_id: str, seed: int = 100) -> str:
    """Synthesize real_id with another seed and rename it into root under a new id (hidden name first)."""
    from stepml_core.synth import synthesize_runs

    stage = tmp / "incoming"
    (f,) = synthesize_runs(stage, [real_id], scale=1.0, seed=seed, workers=1)
    new_id = shifted_id(f.name, seed)
    hidden = root / f".incoming-{new_id}"
    shutil.move(str(f), str(hidden))
    os.rename(hidden, root / new_id)
    return new_id


def _data(a, tmp: Path, res: dict) -> tuple[Path, list[Path]]:
    """The data folder (synthesized, or hard links to --data when a run will be added) and its run folders."""
    from stepml_core.runs.folders import discover_run_folders, resolve_data_root

    if a.data:
        root = resolve_data_root(a.data)
        if not a.skip_incremental:  # never add a run to the caller's folder: work on hard links
            from _common import link_data_folder

            root = link_data_folder(discover_run_folders(root)[0], tmp / "data")
    else:
        t = time.perf_counter()
        root = synthesize_seeds(tmp / "pool", [0], scale=a.scale, workers=a.workers)[0][0].parent
        res["synth_s"] = time.perf_counter() - t
        print(f"synthesized 16 runs (scale {a.scale}) in {res['synth_s']:.1f} s")
    folders = discover_run_folders(root)[0]
    res["runs"], res["sampled_steps"] = len(folders), sampled_steps(folders)
    print(
        f"{len(folders)} run folders in {root}; {res['sampled_steps']} sampled steps; workers {a.workers}; "
        f"load average {load_avg():.1f} on {os.cpu_count()} cores"
    )
    return root, folders


def _print_whole_study(r: dict, d: dict, bare: dict | None, folders: list[Path], res: dict, workers: int) -> None:
    B = bare or {"assets": {}}
    print(
        f"\nWhole study: {len(folders)} runs, {res['sampled_steps']} sampled steps, {workers} worker(s); "
        f"load average {r['load_before']:.1f} → {r['load_after']:.1f}; stepml run used {r['cpu_s']:.0f} CPU-s "
        f"({r['cpu_s'] / r['wall_s']:.2f} cores busy), peak RSS {r['peak_rss_gb']:.2f} GB at {r['peak_at_s']:.0f} s "
        f"(main process {r['peak_main_gb']:.2f} GB, largest process {r['peak_one_process_gb']:.2f} GB)"
    )
    _row("stepml run, wall", TARGET_STUDY_S, r["wall_s"], B.get("wall_s"))
    _row("  partition phase (experiment_job runs)", None, d["partition_phase_s"], B.get("partition_phase_s"))
    _row("  study phase (models, replay, study jobs)", None, d["study_phase_s"], B.get("study_phase_s"))
    _row("  outside runs (start-up, imports, defs, spawn)", None, d["outside_runs_s"])
    _row(
        "  Σ asset work (STEP_SUCCESS durations)",
        None,
        d["sum_asset_work_s"],
        sum(v for k, v in B["assets"].items() if k not in ("experiment_models", "experiment_features")) or None,
    )
    _row("  Dagster overhead in runs (Σ run wall − Σ steps)", None, d["in_run_overhead_s"])
    _row(
        "  wall − Σ asset work / workers",
        None,
        r["wall_s"] - d["partition_asset_work_s"] / workers - d["study_asset_work_s"],
    )
    print(
        f"\n  {'asset':<18} {'Dagster Σ s':>11} {'bare Σ s':>9} {'ratio':>6}   (Dagster step = load inputs + compute + store outputs)"
    )
    for k in PARTITIONED + STUDY:
        dv = d["assets"].get(k, 0.0)
        bv = B["assets"].get(k)
        print(
            f"  {k:<18} {dv:11.1f} {bv if bv is not None else float('nan'):9.1f} {dv / bv if bv else float('nan'):6.2f}"
        )
    if bare:
        print(
            f"\n  bare baseline: wall {bare['wall_s']:.1f} s (partitions {bare['partition_phase_s']:.1f} s, study "
            f"{bare['study_phase_s']:.1f} s), {bare['cpu_s']:.0f} CPU-s; load average {bare['load_before']:.1f} → {bare['load_after']:.1f}"
        )


def _print_before(r: dict, d: dict, rb: dict, db: dict, bare: dict | None, same: dict[str, bool]) -> None:
    """This code's `stepml run` against the earlier code's (--before), both against the same bare baseline."""
    B = bare or {"assets": {}, "wall_s": None}
    print(
        f"\nBefore (--before): stepml run with the earlier code; load average {rb['load_before']:.1f} → {rb['load_after']:.1f}"
    )
    _row("stepml run, wall, earlier code", None, rb["wall_s"], B.get("wall_s"))
    _row("stepml run, wall, this code", None, r["wall_s"], B.get("wall_s"))
    _row("  this code / earlier code", None, r["wall_s"], rb["wall_s"])
    print(f"\n  {'asset':<18} {'before Σ s':>10} {'now Σ s':>8} {'bare Σ s':>9}")
    for k in sorted(
        set(db["assets"]) | set(d["assets"]), key=lambda k: -max(db["assets"].get(k, 0), d["assets"].get(k, 0))
    ):
        bv = B["assets"].get(k)
        print(
            f"  {k:<18} {db['assets'].get(k, 0.0):10.1f} {d['assets'].get(k, 0.0):8.1f} {bv if bv is not None else float('nan'):9.1f}"
        )
    print(
        "  outputs byte-identical to the earlier code's: "
        + ", ".join(f"{n} {'yes' if ok else 'NO'}" for n, ok in same.items())
    )


def _run_before(a, root: Path, tmp: Path) -> tuple[dict, dict]:
    """`stepml run` with the code in --before on the same data: (run figures, event-log breakdown)."""
    print(f"stepml run with the earlier code in {a.before} ...", flush=True)
    home = tmp / "home_before"
    rb = run_stepml(
        ["run", "--data", str(root), "--out", str(tmp / "out_before"), "--no-synth", "--workers", str(a.workers)],
        home,
        log=tmp / "stepml_run_before.log",
        code=a.before.resolve(),
    )
    if rb["rc"] != 0:
        print((tmp / "stepml_run_before.log").read_text()[-3000:])
        raise SystemExit(f"stepml run with the earlier code failed (rc {rb['rc']})")
    return rb, dagster_breakdown(home, rb["wall_s"], a.workers)


def _expected_keys() -> tuple[set[str], set[str]]:
    """(asset keys of one partition: experiment_job + replay_job, asset keys of the study: models_job + study_job)."""
    from stepml_dagster.jobs import JOBS

    keys = lambda jobs: {k.to_user_string() for j in jobs for a in JOBS[j][0] for k in a.keys}  # noqa: E731
    return keys(("experiment_job", "replay_job")), keys(("models_job", "study_job"))


def _incremental(a, root: Path, tmp: Path, out: Path, home: Path, bare: dict | None) -> dict:
    """One new run lands; `stepml run --experiment NEW`: its partition and the study chain only."""
    new_id = land_new_run(root, tmp, a.incremental_run)
    old_run_ids = {x["run_id"] for x in event_log_breakdown(home)["runs"]}
    print(f"\nincremental: {new_id} landed; stepml run --experiment {new_id} ...", flush=True)
    ri = run_stepml(
        ["run", "--data", str(root), "--out", str(out), "--no-synth", "--experiment", new_id],
        home,
        log=tmp / "stepml_incremental.log",
    )
    if ri["rc"] != 0:
        print((tmp / "stepml_incremental.log").read_text()[-3000:])
        raise SystemExit(f"incremental stepml run failed (rc {ri['rc']})")
    after = event_log_breakdown(home)
    di = dagster_breakdown(home, ri["wall_s"], 1, {x["run_id"] for x in after["runs"]} - old_run_ids)
    mats = di["materializations"]
    recomputed = sorted(f"{k}[{p}]" if p else k for (k, p) in mats)
    other = sorted({p for (k, p) in mats if p and p != new_id})
    study_keys, part_keys = {k for (k, p) in mats if p is None}, {k for (k, p) in mats if p == new_id}
    want_part, want_study = _expected_keys()
    ok = not other and study_keys == want_study and part_keys == want_part
    counts_old = {(k, p): n for (k, p), n in after["materializations"].items() if p and p != new_id}
    ib = None
    if bare:
        t = time.perf_counter()
        parts = bare.pop("_parts")
        keep, _ = bare_partition(root / new_id, root)
        parts[new_id] = keep
        models, _ = bare_models(parts, root, real_reference_dir=a.real_reference_dir)
        replays = {}
        if keep.get("request_log") is not None:  # `stepml run --experiment NEW` replays the new run only
            replays[new_id] = bare_replay_worker(
                str(root / new_id), str(root), keep["request_log"], models["replay_models"], str(tmp / "bare_out")
            )[1]
        bare_report(parts, models, replays, tmp / "bare_out")
        ib = time.perf_counter() - t
    res = {
        **ri,
        "new_run": new_id,
        "partition_phase_s": di["partition_phase_s"],
        "study_phase_s": di["study_phase_s"],
        "assets": di["assets"],
        "recomputed": recomputed,
        "other_partitions_recomputed": other,
        "only_new_partition_and_study": ok,
        "old_partitions_materialized_once": all(n == 1 for n in counts_old.values()),
        "bare_s": ib,
    }
    print(f"\nIncremental: one new run ({new_id}); load average {ri['load_before']:.1f} → {ri['load_after']:.1f}")
    _row("stepml run --experiment NEW (partition + study)", TARGET_INCREMENTAL_S, ri["wall_s"], ib)
    _row("  its partition (experiment_job)", None, di["partition_phase_s"])
    _row("  study phase (models, replay, study jobs)", None, di["study_phase_s"])
    print(
        f"  materialized by the new runs: {len(recomputed)} (asset, partition) pairs: the new partition's "
        f"{len(part_keys)} assets + study assets {sorted(study_keys)}; other partitions recomputed: {other or 'none'}; "
        f"every older partition still has exactly one materialization per asset: "
        f"{res['old_partitions_materialized_once']}  → {'OK' if ok else 'UNEXPECTED'}"
    )
    return res


def main(argv=None) -> int:
    from stepml_dagster.resources import DEFAULT_REAL_REFERENCE_DIR

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, help="folder of run folders (default: synthesize the 16 runs at --scale)")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--skip-bare", action="store_true", help="no bare stepml_core baseline")
    ap.add_argument("--skip-incremental", action="store_true")
    ap.add_argument("--incremental-run", default=DEFAULT_INCREMENTAL_RUN)
    ap.add_argument("--keep", type=Path, help="keep data/out/DAGSTER_HOME under this folder instead of a temp folder")
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--before", type=Path, help="a tree of earlier code (git archive REF | tar -x -C DIR): its `stepml run` too"
    )
    a = ap.parse_args(argv)
    a.real_reference_dir = DEFAULT_REAL_REFERENCE_DIR  # what `stepml run`'s synthetic_vs_real asset compares with

    tmp = a.keep or Path(tempfile.mkdtemp(prefix="bench_study_"))
    tmp.mkdir(parents=True, exist_ok=True)
    res: dict = {"workers": a.workers, "cores": os.cpu_count()}
    try:
        root, folders = _data(a, tmp, res)
        bare = None
        if not a.skip_bare:
            print("baseline: bare stepml_core path ...", flush=True)
            bare = bare_baseline(folders, root, tmp / "bare_out", a.workers, a.real_reference_dir)
            res["bare"] = {k: v for k, v in bare.items() if k != "_parts"}
        before = _run_before(a, root, tmp) if a.before else None
        print("stepml run ...", flush=True)
        home, out = tmp / "home", tmp / "out"
        r = run_stepml(
            ["run", "--data", str(root), "--out", str(out), "--no-synth", "--workers", str(a.workers)],
            home,
            log=tmp / "stepml_run.log",
        )
        if r["rc"] != 0:
            print((tmp / "stepml_run.log").read_text()[-3000:])
            raise SystemExit(f"stepml run failed (rc {r['rc']})")
        d = dagster_breakdown(home, r["wall_s"], a.workers)
        res["dagster"] = {**r, **{k: v for k, v in d.items() if k != "materializations"}}
        _print_whole_study(r, d, bare, folders, res, a.workers)
        if before:
            rb, db = before
            same = {
                n: (out / n).read_bytes() == (tmp / "out_before" / n).read_bytes()
                for n in ("metrics.csv", "verdict.json")
            }
            _print_before(r, d, rb, db, bare, same)
            res["before"] = {
                **rb,
                **{k: v for k, v in db.items() if k != "materializations"},
                "outputs_identical": same,
            }
        if not a.skip_incremental:
            res["incremental"] = _incremental(a, root, tmp, out, home, bare)
        if a.json:
            a.json.write_text(json.dumps(res, indent=2, default=str))
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
