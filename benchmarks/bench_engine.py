#!/usr/bin/env python
"""The simulator's speed on one run's replays, this checkout against another one in the same process.

    python benchmarks/bench_engine.py --out OUT --data DATA [--base DIR] [--run SUBSTRING] [--repeat 5]

OUT is a finished `stepml run --out OUT --data DATA` (its stored request logs and replay models are read). Each step
model that applies to the run is replayed `--repeat` times (no intervals) by this checkout's stepml_core and, with
--base (a checkout of another commit: `git worktree add /tmp/base REV`), by that one's, alternating, in this
process: both see the same load. A line per model: the least CPU seconds of its repeats per version, their ratio, the
steps, and whether the per-request predictions of the two versions are identical (they must be).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULES = ("stepml_core.pipeline", "stepml_core.replay.specs", "stepml_core.replay.simulate")


def load_core(root: Path) -> dict:
    """stepml_core as found under root: {module name: module} of every stepml_core module it imported (kept apart
    from another checkout's, use_core puts them back before a replay: lazy imports inside functions resolve then)."""
    for name in [n for n in sys.modules if n == "stepml_core" or n.startswith("stepml_core.")]:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        for name in MODULES:
            importlib.import_module(name)
        importlib.import_module("stepml_core.synth.physics_clock")
        importlib.import_module("stepml_core.replay.intervals")
    finally:
        sys.path.remove(str(root))
    return {n: m for n, m in sys.modules.items() if n == "stepml_core" or n.startswith("stepml_core.")}


def use_core(mods: dict):
    sys.modules.update(mods)
    return mods["stepml_core.pipeline"], mods["stepml_core.replay.specs"], mods["stepml_core.replay.simulate"]


def prepare(mods: dict, out: str, data: str, run: str):
    """(run id, log, context, specs, workload) of the first run folder whose name contains `run`."""
    from stepml_dagster.io_manager import stored_assets
    from stepml_dagster.resources import StepMLSettings

    pipeline, rm, sim = use_core(mods)
    io = stored_assets(StepMLSettings(data_dir=data, out_dir=out))
    key = sorted(p.name for p in Path(data).iterdir() if p.is_dir() and run in p.name)[0]
    stored = io.stored_partitions("request_log", [key])[key]
    meta = pipeline.stored_run_metadata(key, stored, Path(data))
    log = pipeline.log_from_stored(stored)
    ctx = pipeline.replay_context(key, meta, log.header)
    specs = rm.specs_for_run(list(io.stored_value("replay_models")), key, meta.model, meta.stands_for)
    return key, log, ctx, specs, sim.replay_workload(log.table, ctx, seed=0)


def time_replay(mods: dict, prepared, spec) -> tuple[float, int, str]:
    """(CPU s, steps, digest of the per-request predictions) of one replay."""
    _, rm, sim = use_core(mods)
    _, _, ctx, _, w = prepared
    t = time.process_time()
    r = sim.replay(w, rm.serving_model(spec), ctx, seed=0)
    secs = time.process_time() - t
    return secs, r.steps, hashlib.sha256(r.per_request.write_csv().encode()).hexdigest()[:12]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--base", help="a checkout of the commit to compare with")
    ap.add_argument("--run", default="llama-2-7b-tp1-general")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args(argv)
    versions = {"new": load_core(REPO)}
    if a.base:
        versions["base"] = load_core(Path(a.base).resolve())
    prepared = {v: prepare(m, a.out, a.data, a.run) for v, m in versions.items()}
    key, log, _, specs, _ = prepared["new"]
    print(
        f"{key}: {log.table.height} requests, {len(specs)} step models, {a.repeat} repeats, versions {list(versions)}"
    )
    totals = dict.fromkeys(versions, 0.0)
    for i, spec in enumerate(specs):
        best, digests, steps = dict.fromkeys(versions, float("inf")), {}, 0
        for _ in range(a.repeat):
            for v, mods in versions.items():
                secs, steps, digests[v] = time_replay(mods, prepared[v], prepared[v][3][i])
                best[v] = min(best[v], secs)
        for v in versions:
            totals[v] += best[v]
        same = "identical" if len(set(digests.values())) == 1 else f"DIFFERENT {digests}"
        ratio = f"  base/new {best['base'] / best['new']:.2f}x" if "base" in best else ""
        times = "  ".join(f"{v} {best[v]:5.2f}" for v in versions)
        print(f"  {spec['name']:<14} {times} CPU-s{ratio}  {steps} steps  predictions {same}", flush=True)
    ratio = f"  base/new {totals['base'] / totals['new']:.2f}x" if "base" in totals else ""
    print("total  " + "  ".join(f"{v} {totals[v]:.2f}" for v in versions) + " CPU-s" + ratio)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
