#!/usr/bin/env python
"""Replay speed on the 16 real request logs (../shared/real; skips cleanly without it).

    python benchmarks/bench_replay.py                 # largest run on one core per step-model kind, then all 16 on 2 cores
    python benchmarks/bench_replay.py --workers 1     # all 16 in this process

Prints, per replay, wall seconds and the ratio of simulated time to wall time (× real time); targets
from issue 15: the largest run (16,800 requests, 20 minutes of traffic) < 10 s on one core, all 16
runs < 1 min on 2 cores (physics clock). Each line also shows the ratio to the physics replay of the
same run measured in this process (the baseline).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STEPML_SHARED", str(REPO.parent / "shared")))
LARGEST = "20260218-150304-codellama-34b-tp2-general"


def _prepare(folder: Path):
    from stepml_core.pipeline import replay_context
    from stepml_core.replay.simulate import replay_workload
    from stepml_core.runs.folders import read_run_metadata
    from stepml_core.runs.request_log import read_request_log

    meta = read_run_metadata(folder)
    log = read_request_log(folder)
    ctx = replay_context(folder.name, meta, log.header)
    return log, ctx, replay_workload(log.table, ctx)


def _one(folder: str) -> tuple[str, float, float, int]:
    from stepml_core.replay.simulate import replay
    from stepml_core.replay.specs import physics_spec, serving_model

    log, ctx, w = _prepare(Path(folder))
    t = time.perf_counter()
    r = replay(w, serving_model(physics_spec()), ctx)
    return Path(folder).name, time.perf_counter() - t, r.sim_seconds, r.steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    if not (SHARED / "real" / "requests").is_dir():
        print(f"skipped: no real request logs under {SHARED / 'real' / 'requests'}")
        return 0
    from stepml_core.replay.simulate import StepServingModel, replay
    from stepml_core.replay.specs import physics_spec, serving_model
    from stepml_core.runs.real_data import assemble_real_runs
    from stepml_core.stepmodels.sim_step_time import LinearStepTime

    with tempfile.TemporaryDirectory() as d:
        folders = assemble_real_runs(SHARED, Path(d))
        big = next(f for f in folders if f.name == LARGEST)
        log, ctx, w = _prepare(big)
        print(f"largest run {big.name}: {log.table.height} requests, one core")
        lin = LinearStepTime(
            {
                "version": 1,
                "step_time": {
                    "model_type": "linear",
                    "intercept": 14000.0,
                    "feature_coefficients": {"prefill_tokens": 30.0, "decode_tokens": 15.0},
                },
            }
        )
        base = None
        for name, model in (
            ("physics", serving_model(physics_spec())),
            ("linear (BLIS form)", StepServingModel("lin", lin)),
        ):
            t = time.perf_counter()
            r = replay(w, model, ctx)
            dt = time.perf_counter() - t
            base = base or dt
            print(
                f"  {name:20s} {dt:6.2f} s  {r.steps:7d} steps  {r.sim_seconds / dt:6.0f}x real time  "
                f"{dt / base:4.2f}x the physics replay   (target < 10 s: {'met' if dt < 10 else 'MISSED'})"
            )
        t0 = time.perf_counter()
        if a.workers > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(a.workers) as pool:
                results = pool.map(_one, [str(f) for f in folders])
        else:
            results = [_one(str(f)) for f in folders]
        wall = time.perf_counter() - t0
        for name, dt, sim, steps in results:
            print(f"  {name:48s} {dt:6.2f} s {steps:7d} steps {sim / dt:6.0f}x real time")
        print(
            f"all {len(folders)} runs, physics, {a.workers} worker(s): {wall:.1f} s wall "
            f"(Σ {sum(r[1] for r in results):.1f} s of replay; target < 60 s: {'met' if wall < 60 else 'MISSED'})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
