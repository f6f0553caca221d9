"""Coverage of the 90 % intervals of the request-calibrated out-of-sample predictions, bootstrap only and widened
(stepml_core.conformal), per protocol and metric (README, *Calibration from request logs*).

    python benchmarks/interval_coverage.py --study OUT [--metrics all]

Reads OUT/replay_intervals.csv of a `stepml run`. A file written before the widening (no ``boot_lo`` column) holds the
bootstrap intervals only: they are widened here exactly as ``replay_fidelity`` does (the LLM model and workload of each
run from its run id), so the figures of an earlier study are recomputed without replaying anything.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    import polars as pl

    from stepml_core.calibration_report import METRICS, _coverage
    from stepml_core.conformal import widen_intervals
    from stepml_core.replay_report import _workload
    from stepml_core.runs import parse_run_id

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", type=Path, required=True, help="a `stepml run` output folder")
    ap.add_argument(
        "--metrics",
        choices=("report", "all"),
        default="report",
        help=f"report: {', '.join(METRICS)} (the report's table); all: every replayed metric",
    )
    a = ap.parse_args(argv)
    iv = pl.read_csv(a.study / "replay_intervals.csv", infer_schema_length=None)
    if "boot_lo" not in iv.columns:
        runs = {e: {"llm_model": parse_run_id(e).model, "workload": _workload(e)} for e in iv["experiment_id"].unique()}
        iv = widen_intervals(iv, runs)
        print(f"{a.study / 'replay_intervals.csv'}: bootstrap intervals only; widened here")
    metrics = tuple(sorted(iv["metric"].unique())) if a.metrics == "all" else METRICS
    cov = _coverage(iv, pl.DataFrame(), metrics)
    x = iv.filter(pl.col("inside").is_not_null() & pl.col("metric").is_in(list(metrics)))
    print(
        f"{'protocol':8s} {'metric':22s} {'n':>3s}  {'bootstrap cov %':>15s} {'width %':>8s}  {'widened cov %':>13s} "
        f"{'width %':>8s} {'median q %':>10s} {'scores':>7s}  pool"
    )
    for r in cov.iter_rows(named=True):
        print(
            f"{r['protocol']:8s} {r['metric']:22s} {r['predictions']:3d}  {r['boot_coverage_pct']:15.0f} "
            f"{r['boot_median_width_pct']:8.1f}  {r['coverage_pct']:13.0f} {r['median_width_pct']:8.1f} "
            f"{r['median_q_pct']:10.1f} {r['scores_min']:>3d}–{r['scores_max']:<3d}  {r['pool']}"
        )
    for p, g in x.group_by("protocol", maintain_order=True):
        print(
            f"{p[0]}: {g.height} predictions, bootstrap {g['boot_inside'].mean() * 100:.0f} %, "
            f"widened {g['inside'].mean() * 100:.0f} % inside"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
