#!/usr/bin/env python
"""Synthesis speed: scheduler steps per second and wall time.

    python benchmarks/bench_synth.py                  # all 16 runs at --scale 0.1, workers = cores
    python benchmarks/bench_synth.py --full           # all 16 runs at full size (scale 1.0)
    python benchmarks/bench_synth.py --scale 0.05 --runs 20260217-155451-llama-2-7b-tp1-codegen --workers 1
    python benchmarks/bench_synth.py --engine-only    # simulation alone (no files), per run, one process

Prints per-run steps / sampled steps (from provenance.json) and, for the whole set, wall time
and steps/s (scheduler steps of all runs / wall seconds). Output folders go to a temporary
directory unless --out is given.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepml_core.progress import make_progress  # noqa: E402
from stepml_core.synth import resolve_run_ids, synthesize_runs  # noqa: E402


def engine_only(run_ids, scale: float, seed: int) -> None:
    from stepml_core.synth.run_engine import simulate_synthetic_run
    from stepml_core.synth.runner import _clocks, _streams
    from stepml_core.synth.workload import build_workload

    tot_steps, tot_t = 0, 0.0
    for spec in resolve_run_ids(run_ids):
        rng_wl, rng_eng, *_ = _streams(spec.real_id, seed)
        mono0, _, _ = _clocks(spec)
        wl = build_workload(spec, scale, rng_wl)
        t0 = time.perf_counter()
        sim = simulate_synthetic_run(spec, wl, rng_eng, mono0=mono0)
        dt = time.perf_counter() - t0
        tot_steps += sim.steps
        tot_t += dt
        print(f"{spec.real_id:48s} steps {sim.steps:8d}  {dt:7.2f} s  {sim.steps / dt:9.0f} steps/s")
    print(f"engine only: {tot_steps} steps in {tot_t:.1f} s = {tot_steps / tot_t:.0f} steps/s (one process)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=float, default=0.1)
    ap.add_argument("--full", action="store_true", help="scale 1.0 (all runs at full size)")
    ap.add_argument("--runs", nargs="*", default=None)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--engine-only", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    scale = 1.0 if a.full else a.scale
    if a.engine_only:
        engine_only(a.runs, scale, a.seed)
        return 0
    out = a.out or Path(tempfile.mkdtemp(prefix="bench_synth_"))
    workers = a.workers or os.cpu_count() or 1
    try:
        t0 = time.perf_counter()
        with make_progress(
            len(resolve_run_ids(a.runs)), "synth", stream=io.StringIO() if a.quiet else None
        ) as progress:
            folders = synthesize_runs(out, a.runs, scale=scale, seed=a.seed, workers=workers, progress=progress)
        wall = time.perf_counter() - t0
        steps = sampled = reqs = 0
        for f in folders:
            c = json.loads((f / "provenance.json").read_bytes())["counts"]
            steps += c["scheduler_steps"]
            sampled += c["sampled_steps"]
            reqs += c["requests_sent"]
            print(
                f"{f.name:54s} steps {c['scheduler_steps']:8d}  sampled {c['sampled_steps']:6d}  requests {c['requests_sent']:6d}"
            )
        size = sum(p.stat().st_size for f in folders for p in f.rglob("*") if p.is_file())
        print(
            f"{len(folders)} runs at scale {scale}: {steps} scheduler steps ({sampled} sampled), {reqs} requests; "
            f"wall {wall:.1f} s with {workers} worker(s) = {steps / wall:.0f} steps/s; output {size / 1e9:.2f} GB"
        )
    finally:
        if a.out is None:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
