"""Calibration from request logs: time to calibrate the 4 LLM models on the 16 real runs (target < 5 min on 2 cores).

    python benchmarks/bench_calibration.py [--workers 2] [--protocols] [--shared ../shared]

1. assembles the 16 real runs from ../shared (stepml_core.runs.real_data; skips cleanly without it);
2. baseline, same process: one replay of the largest run (16,800 requests) with a calibrated-form model;
3. the deployable calibration of every LLM model on all its runs with ground truth (requests_all: 4 models,
   16 runs' request logs) in ``--workers`` processes — the goal's figure;
4. with ``--protocols``: every protocol's calibrations (run roles, leave one workload out, all runs; 19 distinct
   calibration sets) as `stepml run` does them.
Prints wall seconds, the optimizer's evaluations and seconds per calibration, and ratios to the baseline.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGET_S = 300.0


def load_runs(root: Path):
    from stepml_core.pipeline import calibration_inputs, log_as_stored
    from stepml_core.runs.folders import read_run_metadata
    from stepml_core.runs.request_log import read_request_log

    folders = sorted(root.iterdir())
    metas = {f.name: read_run_metadata(f) for f in folders}
    return calibration_inputs(metas, {f.name: log_as_stored(read_request_log(f)) for f in folders})


@contextmanager
def real_runs(shared: Path):
    """(infos, load) over the 16 real runs assembled from ``shared`` into a temporary folder; None (and a
    "skipped" line) without ``shared/real/requests``."""
    if not (shared / "real" / "requests").is_dir():
        print(f"skipped: no real request logs under {shared}/real/requests")
        yield None
        return
    from stepml_core.runs.real_data import assemble_real_runs

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "real16"
        assemble_real_runs(shared, root)
        yield load_runs(root)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--protocols", action="store_true", help="also time every protocol's calibrations")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    a = ap.parse_args()
    from stepml_core.calibration import protocols as cp
    from stepml_core.calibration.params import StepParams, serving_model
    from stepml_core.replay.simulate import replay, replay_workload

    with real_runs(a.shared) as runs:
        if runs is None:
            return 0
        infos, load = runs
        big = max(infos, key=lambda r: (r.requests, r.experiment_id)).experiment_id
        run = load(big)
        p = StepParams(b0_us=13400.0, b_dec_us=0.0, b_kv_us=0.05, b_pf_us=67.0, b_npf_us=1000.0, q0_us=24000.0)
        t = time.perf_counter()
        replay(replay_workload(run.table, run.ctx), serving_model(p), run.ctx)
        base = time.perf_counter() - t
        print(f"baseline: one replay of {big} ({run.table.height} requests): {base:.1f} s")
        say = lambda i, n, w: print(f"  [{i}/{n}] {w}", flush=True)  # noqa: E731
        folds = [f for f in cp.plan_folds(infos, protocols=()) if f.protocol == "all"]
        t = time.perf_counter()
        cals = cp.run_calibrations(folds, load, workers=a.workers, progress=say)
        wall = time.perf_counter() - t
        evals = sum(c.refine.evaluations for c in cals.values() if c.refine)
        print(
            f"calibration of the 4 LLM models on all {sum(len(f.calibrate_on) for f in folds)} runs with ground truth "
            f"({len(infos)} runs; {a.workers} workers): {wall:.1f} s (target < {TARGET_S:.0f} s: "
            f"{'met' if wall < TARGET_S else 'MISSED'}); {wall / base:.1f}× the baseline replay"
        )
        for k, c in sorted(cals.items()):
            r = c.refine
            print(
                f"  {k[0]:14s} runs {len(k[1])}  closed form {c.seconds['closed_form']:.2f} s  refinement "
                f"{r.evaluations if r else 0} evaluations {c.seconds['refine']:.1f} s  bootstrap {c.seconds['bootstrap']:.1f} s"
            )
        print(f"  optimizer: {evals} simulator evaluations in total")
        if a.protocols:
            t = time.perf_counter()
            out = cp.study_calibration(infos, load, workers=a.workers, progress=say)
            wall2 = time.perf_counter() - t
            print(
                f"every protocol ({len(out['calibrations'])} distinct calibrations, {len(out['specs'])} replay models): "
                f"{wall2:.1f} s; {wall2 / base:.1f}× the baseline replay"
            )
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (figures are noisy under load)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
