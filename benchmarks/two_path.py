#!/usr/bin/env python
"""Two-path replays of the 16 real runs (issue 23, point 2): GPU path only vs max(GPU path, CPU path).

    python benchmarks/two_path.py --study OUT [--out DIR]

OUT is a `stepml run` output folder over the 16 real runs: its ``assets/replay_models/__all__.json`` (the replay
specs) and ``replay.csv`` (which model is recommended out of sample per run, and the physics rows beside it).
Needs ../shared/real (request logs and the test-split ``schedule()`` times); skips cleanly without it or OUT.

Per run: the GPU path = the spec StepML recommends for it out of sample; the CPU path = a plateau while the engine
is saturated, learned from the other runs' test-split schedule() times (stepml_core.replay.two_path). Also, for
the saturated runs, the "in-sample ceiling": the two-path model with the run's OWN plateau (its own steps; not an
out-of-sample figure — it says what the two-path form reaches when the CPU level is known). Writes DIR/two_path.csv
(one row per run, variant and metric), DIR/two_path_plateaus.csv, DIR/two_path_queue.csv and DIR/two_path.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STEPML_SHARED", str(REPO.parent / "shared")))


def load_runs(root: Path, study: Path) -> tuple[dict, object]:
    """{run: TwoPathRun} of the assembled real runs with the recommended spec of the study as GPU path; the study's
    replay.csv."""
    import polars as pl

    from stepml_core.pipeline import replay_context
    from stepml_core.replay.specs import ReplaySpec, specs_for_run
    from stepml_core.replay.two_path import TwoPathRun, read_test_steps
    from stepml_core.runs.folders import read_run_metadata
    from stepml_core.runs.request_log import read_request_log

    specs = json.loads((study / "assets" / "replay_models" / "__all__.json").read_text())
    replay_csv = pl.read_csv(study / "replay.csv", infer_schema_length=100000)
    rec = dict(replay_csv.filter(pl.col("recommended")).select("experiment_id", "step_model").unique().iter_rows())
    steps = read_test_steps(SHARED / "real" / "xgboost_round1_test_predictions.csv.gz")
    runs = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        meta = read_run_metadata(folder)
        log = read_request_log(folder)
        ctx = replay_context(folder.name, meta, log.header)
        gpu = None
        if folder.name in rec:
            cands = [ReplaySpec.of(s) for s in specs_for_run(specs, folder.name, meta.model)]
            gpu = next(s for s in cands if s.name == rec[folder.name])
        runs[folder.name] = TwoPathRun(log, ctx, meta.model, int(meta.tp), steps.get(folder.name), gpu)
    return runs, replay_csv


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", type=Path, default=None, help="a `stepml run` output folder over the 16 real runs")
    ap.add_argument("--out", type=Path, default=Path("two_path_out"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--queue-frac", type=float, default=1.0, help="saturation entered: waiting >= this x max_num_seqs")
    ap.add_argument("--no-hold", action="store_true", help="saturation not held at the cap while anything waits")
    a = ap.parse_args(argv)
    if not (SHARED / "real" / "requests").is_dir():
        print(f"skipped: no real data under {SHARED / 'real'}")
        return 0
    if a.study is None or not (a.study / "assets" / "replay_models" / "__all__.json").is_file():
        print("skipped: --study OUT (a `stepml run` output folder with assets/replay_models) is required")
        return 0
    import polars as pl

    from stepml_core.replay.scores import load_blis4a
    from stepml_core.replay.two_path import blis_forms, comparison_table, transfer_errors, two_path_study
    from stepml_core.report.two_path import two_path_markdown, write_queue_plots
    from stepml_core.runs.real_data import assemble_real_runs
    from stepml_core.stepmodels.two_path import CpuPath

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        assemble_real_runs(SHARED, Path(tmp))
        runs, replay_csv = load_runs(Path(tmp), a.study)
        template = CpuPath(0.0, queue_frac=a.queue_frac, hold=not a.no_hold)
        res = two_path_study(runs, seed=a.seed, template=template)
    rows = res["rows"]
    a.out.mkdir(parents=True, exist_ok=True)
    rows.write_csv(a.out / "two_path.csv")
    pl.DataFrame([p.__dict__ for p in res["plateaus"]]).write_csv(a.out / "two_path_plateaus.csv")
    pl.DataFrame(res["details"]).write_csv(a.out / "two_path_replays.csv")
    table = comparison_table(rows, replay_csv, load_blis4a())
    table.write_csv(a.out / "two_path_table.csv")
    q = [
        {"experiment_id": eid, "variant": v, "t_s": float(t), "observed": int(o), "predicted": int(p)}
        for eid, per in res["queues"].items()
        for v, (grid, obs, pred) in per.items()
        for t, o, p in zip(grid, obs, pred)
    ]
    pl.DataFrame(q).write_csv(a.out / "two_path_queue.csv")
    plots = write_queue_plots(res["queues"], res["plateaus"], a.out)
    transfers = pl.DataFrame(transfer_errors(res["plateaus"]))
    transfers.write_csv(a.out / "two_path_transfer.csv")
    (a.out / "blis").mkdir(exist_ok=True)
    for eid, form in blis_forms(runs, res).items():
        (a.out / "blis" / f"{eid}.json").write_text(json.dumps(form, indent=1))
    md = two_path_markdown(table, res["plateaus"], res["cpu_paths"], plots, out_dir=a.out, transfers=transfers)
    (a.out / "two_path.md").write_text(md)
    print(md)
    print(f"\n{time.perf_counter() - t0:.0f} s; wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
