"""Coverage of the 90 % intervals of the request-calibrated out-of-sample predictions, bootstrap only and widened
(stepml_core.replay.intervals), per protocol, metric and regime (observed saturated or not), each k/n with its exact 95 %
binomial interval, the widened coverage the method gives by construction, and the intervals that carry no evidence
counted apart (stepml_core.replay.coverage; README, *Calibration from request logs*).

    python benchmarks/interval_coverage.py --study OUT [--metrics all] [--data RUNS]
    python benchmarks/interval_coverage.py --request-level RUNS --study OUT   # run the request level first

--request-level RUNS runs the request level of `stepml run` on the run folders RUNS into OUT first
(stepml_core.oos_audit.request_level_study: the same calibrations, replays and intervals, without the step-level
study and the report; ≈ 15 min on the 16 real runs on 2 cores), then reports as above.

Reads OUT/replay_intervals.csv of a `stepml run`, and OUT/replay.csv with the per-request tables under OUT/replay/
for each run's regime (replay_report.run_status, the study's own rule). A file written before the widening (no
``boot_lo`` column) holds the bootstrap intervals only: they are widened here exactly as ``replay_fidelity`` does (the
LLM model and workload of each run from its run id), so the figures of an earlier study are recomputed without
replaying anything.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def saturation(study: Path, data: Path | None = None) -> dict[str, bool]:
    """Per scored run: saturated as the study decides it (replay_report.run_status over replay.csv); each run's request
    count from its per-request replay table under OUT/replay/, or from its request log under ``data``; a run with
    neither is left out (regime 'unknown'). Empty where replay.csv is missing."""
    import polars as pl

    from stepml_core.replay.scores import run_status
    from stepml_core.runs.request_log import read_request_log

    if not (study / "replay.csv").is_file():
        return {}
    rows = pl.read_csv(study / "replay.csv", infer_schema_length=None)
    requests = {}
    for e in rows["experiment_id"].unique().to_list():
        tables = sorted((study / "replay" / e).glob("*.parquet"))
        if tables:
            requests[e] = pl.scan_parquet(tables[0]).select(pl.len()).collect().item()
        elif data is not None and (data / e).is_dir():
            requests[e] = read_request_log(data / e).table.height
    st = run_status(rows, requests)
    # without its request count a run's failures cannot be told: its regime stays unknown
    return {
        r["experiment_id"]: bool(r["saturated"])
        for r in st.iter_rows(named=True)
        if r["scored"] and r["experiment_id"] in requests
    }


INTERVALS = (
    ("boot_", "bootstrap (calibration noise)"),
    ("", "widened: bootstrap + split-conformal q (the interval reported: lo, hi, inside)"),
    ("brun_", "bootstrap + between-run term (leave one calibration run out)"),
)


def print_table(cov, pre: str, title: str) -> None:
    from stepml_core.replay.coverage import coverage_cell, not_counted_cell

    extra = pre == ""
    print(f"\n{title}")
    print(
        f"{'protocol':8s} {'metric':22s} {'regime':13s} {'n':>3s}  {'inside / counted = % [95 % CI]':30s} "
        f"{'width %':>7s}" + (f" {'constr %':>8s} {'q %':>6s} {'scores':>7s}" if extra else "") + "  not counted; wide"
    )
    for r in cov.iter_rows(named=True):
        w = r[f"{pre}median_width_pct"]
        line = (
            f"{r['protocol']:8s} {r['metric']:22s} {r['regime']:13s} {r['predictions']:3d}  "
            f"{coverage_cell(r[f'{pre}inside'], r[f'{pre}counted'], r[f'{pre}cp_lo_pct'], r[f'{pre}cp_hi_pct']):30s} "
            f"{'–' if w is None else f'{w:.1f}':>7s}"
        )
        if extra:
            bc = r["by_construction_pct"]
            line += (
                f" {'–' if bc is None else f'{bc:.0f}':>8s} {r['median_q_pct']:6.1f} "
                f"{r['scores_min']:>3d}–{r['scores_max']:<3d}"
            )
        print(f"{line}  {not_counted_cell(r, pre)}")


def main(argv=None) -> int:
    import polars as pl

    from stepml_core.replay.coverage import WIDE_PCT, clopper_pearson, coverage_table
    from stepml_core.replay.intervals import CONFORMAL_LEVEL, widen_intervals
    from stepml_core.replay.scores import _workload
    from stepml_core.report.calibration import METRICS
    from stepml_core.runs.folders import parse_run_id

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", type=Path, required=True, help="a `stepml run` output folder")
    ap.add_argument(
        "--metrics",
        choices=("report", "all"),
        default="report",
        help=f"report: {', '.join(METRICS)} (the report's table); all: every replayed metric",
    )
    ap.add_argument("--data", type=Path, help="the run folders, for request counts where OUT/replay/ is absent")
    ap.add_argument("--request-level", type=Path, help="run folders: run the request level into --study first")
    a = ap.parse_args(argv)
    if a.request_level:
        from stepml_core.oos_audit import ReplayMemo, request_level_study

        request_level_study(a.request_level, a.study, cache_dir=a.study / "calibration-cache", memo=ReplayMemo())
        a.data = a.data or a.request_level
    iv = pl.read_csv(a.study / "replay_intervals.csv", infer_schema_length=None)
    if "boot_lo" not in iv.columns:
        runs = {e: {"llm_model": parse_run_id(e).model, "workload": _workload(e)} for e in iv["experiment_id"].unique()}
        iv = widen_intervals(iv, runs)
        print(f"{a.study / 'replay_intervals.csv'}: bootstrap intervals only; widened here")
    metrics = tuple(sorted(iv["metric"].unique())) if a.metrics == "all" else METRICS
    sat = saturation(a.study, a.data)
    cov = coverage_table(iv, sat, metrics, level=CONFORMAL_LEVEL)
    print(
        f"k/n over the bounded intervals that are not points; [95 % CI] exact binomial (Clopper–Pearson); wide = "
        f"width "
        f">= {WIDE_PCT:.0f} % of the prediction (counted); constr = widened coverage by construction on exchangeable "
        f"runs; regime: observed saturated or not (known for {len(sat)} scored runs, {sum(sat.values())} saturated)\n"
    )
    for pre, title in INTERVALS:
        print_table(cov, pre, title)
    # one row per protocol and metric: 'all', or the only regime there is
    tot = cov.filter((pl.col("regime") == "all") | (pl.len().over("protocol", "metric") == 1))
    print()
    for p, g in tot.group_by("protocol", maintain_order=True):
        for pre, what in (("boot_", "bootstrap"), ("", "widened"), ("brun_", "between-run")):
            k, n = int(g[f"{pre}inside"].sum()), int(g[f"{pre}counted"].sum())
            lo, hi = clopper_pearson(k, n)
            print(
                f"{p[0]} {what}: {k}/{n} counted predictions inside"
                + (f" = {100 * k / n:.0f} % [{100 * lo:.0f}, {100 * hi:.0f}]" if n else "")
                + f" (metrics pooled: not independent); {g['predictions'].sum()} predictions"
            )
    paired(iv, metrics)
    return 0


def paired(iv, metrics) -> None:
    """Widened vs between-run on the same predictions: those where both intervals are counted (bounded, not a point)."""
    import polars as pl

    from stepml_core.replay.coverage import clopper_pearson, with_kinds
    from stepml_core.replay.intervals import CONFORMAL_LEVEL

    x = with_kinds(iv.filter(pl.col("inside").is_not_null() & pl.col("metric").is_in(list(metrics))), CONFORMAL_LEVEL)
    both = x.filter(pl.col("kind").is_in(["informative", "wide"]) & pl.col("brun_kind").is_in(["informative", "wide"]))
    print("\nsame predictions (both intervals counted): widened vs bootstrap + between-run")
    for p, g in both.group_by("protocol", maintain_order=True):
        cells = []
        for pre, what in (("", "widened"), ("brun_", "between-run")):
            k, n = int(g[f"{pre}inside"].sum()), g.height
            lo, hi = clopper_pearson(k, n)
            w = ((g[f"{pre}hi"] - g[f"{pre}lo"]) / g["predicted"].abs() * 100).median()
            wide = int((g[f"{pre}kind"] == "wide").sum())
            cells.append(
                f"{what} {k}/{n} = {100 * k / n:.0f} % [{100 * lo:.0f}, {100 * hi:.0f}], median width {w:.0f} %, wide {wide}"
            )
        print(f"{p[0]}: " + "; ".join(cells))


if __name__ == "__main__":
    raise SystemExit(main())
