#!/usr/bin/env python
"""Scale: the whole study at 1×, 3× and 10× the 16 runs (10× ≈ 1.2 M sampled steps), end to end.

    python benchmarks/bench_scale.py                          # factors 1 3 10, pool of seeds under a temp folder
    python benchmarks/bench_scale.py --factors 1 3 --pool /tmp/stepml_pool --keep-pool

k× = the 16 runs synthesized with seeds 0…k−1 (run ids of seed k shifted by k seconds so they share one
data folder; synthesis scale ≤ 1, so more data means more runs). Each factor gets a data folder of hard
links (no extra disk) and a fresh DAGSTER_HOME, and `stepml run` runs in a child process: wall, CPU
seconds, peak RSS of the whole process tree (polled every 0.2 s from /proc), time per sampled step, and
the partition/study phases from the event log. The 1× run is the baseline: linear growth means
time per sampled step at k× ≈ that at 1× (ratio ≈ 1). Targets: peak RSS < 8 GB at 10×; growth linear.
Disk: the pool takes ≈ 1.8 GB per seed; removed afterwards unless --keep-pool.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import link_data_folder, load_avg, run_stepml, sampled_steps, synthesize_seeds  # noqa: E402
from bench_study import dagster_breakdown  # noqa: E402

TARGET_PEAK_GB = 8.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--factors", type=int, nargs="+", default=[1, 3, 10])
    ap.add_argument("--pool", type=Path, help="where the synthesized seeds live (reused if complete)")
    ap.add_argument("--keep-pool", action="store_true")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    pool = a.pool or tmp / "pool"
    rows = []
    try:
        t = time.perf_counter()
        seeds = synthesize_seeds(pool, list(range(max(a.factors))), workers=a.workers, quiet=False)
        print(f"pool of {len(seeds)} seeds ready in {time.perf_counter() - t:.0f} s", flush=True)
        for k in sorted(a.factors):
            folders = [f for s in range(k) for f in seeds[s]]
            data = link_data_folder(folders, tmp / f"data_x{k}")
            n = sampled_steps(folders)
            print(f"\n{k}×: {len(folders)} runs, {n} sampled steps; load average {load_avg():.1f} ...", flush=True)
            home, out = tmp / f"home_x{k}", tmp / f"out_x{k}"
            r = run_stepml(
                ["run", "--data", str(data), "--out", str(out), "--no-synth", "--workers", str(a.workers)],
                home,
                log=tmp / f"run_x{k}.log",
            )
            if r["rc"] != 0:
                print((tmp / f"run_x{k}.log").read_text()[-3000:])
            d = dagster_breakdown(home, r["wall_s"], a.workers) if r["rc"] == 0 else {}
            rows.append(
                {
                    "factor": k,
                    "runs": len(folders),
                    "sampled_steps": n,
                    **r,
                    "us_per_step": r["wall_s"] / n * 1e6,
                    "cpu_us_per_step": r["cpu_s"] / n * 1e6,
                    "partition_phase_s": d.get("partition_phase_s"),
                    "study_phase_s": d.get("study_phase_s"),
                    "out_gb": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e9,
                }
            )
            x = rows[-1]
            print(
                f"  wall {x['wall_s']:.1f} s (partitions {x['partition_phase_s'] or float('nan'):.1f} s, study "
                f"{x['study_phase_s'] or float('nan'):.1f} s), {x['cpu_s']:.0f} CPU-s, peak RSS {x['peak_rss_gb']:.2f} GB at {x['peak_at_s']:.0f} s "
                f"(main process alone {x['peak_main_gb']:.2f} GB, largest process {x['peak_one_process_gb']:.2f} GB), "
                f"{x['us_per_step']:.0f} µs/step wall, {x['cpu_us_per_step']:.0f} µs/step CPU; outputs {x['out_gb']:.2f} GB; "
                f"load {x['load_before']:.1f} → {x['load_after']:.1f}",
                flush=True,
            )
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(data, ignore_errors=True)
        base = rows[0]
        print(
            f"\n  {'factor':>6} {'steps':>9} {'wall s':>8} {'CPU s':>8} {'µs/step':>8} {'CPU µs/step':>11} {'× 1× per step':>13} "
            f"{'study s':>8} {'peak RSS GB':>11}  target < {TARGET_PEAK_GB:.0f} GB"
        )
        for x in rows:
            ratio = x["us_per_step"] / base["us_per_step"]
            print(
                f"  {x['factor']:>5}× {x['sampled_steps']:>9} {x['wall_s']:8.1f} {x['cpu_s']:8.0f} {x['us_per_step']:8.0f} "
                f"{x['cpu_us_per_step']:11.0f} {ratio:13.2f} {x['study_phase_s'] or float('nan'):8.1f} {x['peak_rss_gb']:11.2f}  "
                f"{'met' if x['peak_rss_gb'] < TARGET_PEAK_GB else 'MISSED'}"
            )
        if a.json:
            a.json.write_text(json.dumps(rows, indent=2))
    finally:  # a --pool given by the caller is never removed; the temp pool only with --keep-pool
        for p in tmp.iterdir():
            if not (p == pool and a.keep_pool):
                shutil.rmtree(p, ignore_errors=True)
        if not any(tmp.iterdir()):
            tmp.rmdir()
        else:
            print(f"pool kept in {pool}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
