"""The what-if checked against a study's recorded runs, out of sample (stepml_core.whatif.check; docs/whatif.md).

    python benchmarks/whatif_check.py --study out-real [--data data/real] [--out DIR] [--workers 2]

Each run's latencies predicted from its profile alone with the leave-one-workload-out calibration (fitted on the same
LLM model's other workloads; template tokens from those runs), scored against its clients; the `general` runs per load
stage; per run the predicted saturation rate of its shape against whether the run saturated (the study's run status,
stepml_core.runs.rules.is_saturated). Prints the issue's goal figures; writes DIR/whatif_check.csv and
DIR/whatif_saturation.csv (default DIR: out/whatif_check in this checkout; the study is only read).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def load(study: Path, data: Path):
    import polars as pl

    from stepml_dagster.export_cli import _load_study, _stored
    from stepml_dagster.whatif_cli import study_runs

    _, specs, _, _, _, saturated = _load_study(study)
    runs = study_runs(study, data)
    requests = {
        r.experiment_id: _stored(study / "assets" / "request_log" / r.experiment_id, "request_log", True)["requests"]
        for r in runs
    }
    fid = _stored(study / "assets" / "replay_fidelity" / "__all__", "replay_fidelity", True)
    st = fid["runs"]
    truth = dict(zip(st["experiment_id"].to_list(), st["ground_truth"].to_list()))
    return runs, specs, requests, set(saturated or ()), truth, pl


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=REPO / "data" / "real")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    from stepml_core.progress import make_progress
    from stepml_core.whatif.check import check_runs, goal_lines

    runs, specs, requests, saturated, truth, pl = load(a.study, a.data)
    t0 = time.perf_counter()
    with make_progress(len(runs), "whatif check") as bar:
        table, sat = check_runs(runs, specs, requests, seed=a.seed, workers=a.workers, progress=bar)
    seconds = time.perf_counter() - t0
    out = a.out or REPO / "out" / "whatif_check"
    out.mkdir(parents=True, exist_ok=True)
    table.write_csv(out / "whatif_check.csv")
    sat = sat.with_columns(observed_saturated=pl.col("experiment_id").is_in(sorted(saturated)))
    sat.write_csv(out / "whatif_saturation.csv")
    pl.Config.set_tbl_rows(64)
    pl.Config.set_tbl_width_chars(200)
    whole = table.filter(pl.col("stage") == "all", pl.col("metric").is_in(["ttft_mean", "e2e_mean"]))
    print(whole.pivot(on="metric", index=["experiment_id"], values="rel_err_pct"))
    print(
        sat.select(
            "experiment_id",
            "max_stage_rate_rps",
            "predicted_saturation_rate_rps",
            "predicted_overloaded",
            "observed_saturated",
        )
    )
    for line in goal_lines(table, sat, saturated, truth):
        print(line)
    print(f"{len(runs)} runs checked in {seconds:.0f} s ({a.workers} workers); tables under {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
