#!/usr/bin/env python
"""The BLIS round trip on a `stepml run` output: export (model files + each run's trace and `blis run` script), run
every script in the real BLIS binary, and compare with StepML's replay of the same file, in this process.

    python benchmarks/bench_blis_round_trip.py --study out-real            # every run of the study
    python benchmarks/bench_blis_round_trip.py --study out-real --runs RUN  # some runs

Prints per run: StepML's replay (wall s), BLIS (wall s, CSV reading included) and their ratio; BLIS's mean TTFT and
E2E against StepML's (%, E2E also against StepML's E2E + each request's last step, which BLIS counts once more), and
the errors against the observed means. A run whose StepML replay has client timeouts (saturated) is not run in BLIS
(no client timeout there). Also the time to write the export. BLIS: $STEPML_BLIS, else ../shared/tools/blis/blis;
skips with the reason without it. Writes the table as CSV with --csv.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", type=Path, required=True, help="a `stepml run` output folder")
    ap.add_argument("--runs", nargs="*", default=None, help="only these runs (default: all with a request log)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--csv", type=Path, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="write the export here (default: a temporary folder)")
    a = ap.parse_args(argv)

    import polars as pl

    from stepml_core import pipeline
    from stepml_core.replay import blis_round_trip as brt
    from stepml_core.replay.blis_trace import find_blis
    from stepml_dagster.io_manager import read_object

    blis, why = find_blis(REPO)
    if blis is None:
        print(f"skipped: {why}")
        return 0
    study = a.study
    fid = read_object(study / "assets" / "replay_fidelity" / "__all__")
    rows = pl.read_csv(study / "replay.csv", schema_overrides={"observed": pl.Float64, "rel_err_pct": pl.Float64})
    chosen = pipeline.export_choice(
        rows,
        read_object(study / "assets" / "replay_models" / "__all__"),
        read_object(study / "assets" / "request_calibration" / "__all__"),
        fid,
    )
    keys = sorted(p.name for p in (study / "assets" / "request_log").iterdir() if p.is_dir())
    keys = [k for k in keys if a.runs is None or k in a.runs]
    t0 = time.perf_counter()
    runs = [
        pipeline.blis_bundle_run(k, read_object(study / "assets" / "request_log" / k), REPO / "data", seed=a.seed)
        for k in keys
    ]
    t_read = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        out = a.keep or Path(tmp)
        t0 = time.perf_counter()
        brt.write_bundle(chosen, runs, out, source=str(study), seed=a.seed)
        t_write = time.perf_counter() - t0
        size_mb = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
        print(f"export: {len(runs)} run(s) read in {t_read:.1f} s, written in {t_write:.1f} s ({size_mb:.0f} MB)")
        table = brt.agreement_table(chosen, runs, out, blis, seed=a.seed)
    print(f"BLIS: {blis}")
    for r in table.iter_rows(named=True):
        ratio = r["blis_s"] / r["stepml_s"] if r["blis_s"] else None
        print(
            f"{r['experiment_id']}: n={r['requests']} StepML {r['stepml_s']:.1f} s, "
            + (f"BLIS {r['blis_s']:.1f} s (×{ratio:.1f}); " if ratio else "")
            + (
                f"BLIS vs StepML TTFT {r['blis_vs_stepml_ttft_pct']:+.3f} %, E2E {r['blis_vs_stepml_e2e_pct']:+.3f} %, "
                f"E2E +1 step {r['blis_vs_stepml_e2e_plus_step_pct']:+.3f} %"
                if r["blis_status"] == "compared"
                else r["blis_status"]
            )
        )
    if a.csv:
        table.write_csv(a.csv)
    cmp_ = table.filter(pl.col("blis_status") == "compared")
    if cmp_.height:
        within = cmp_.filter(
            (pl.col("blis_vs_stepml_ttft_pct").abs() <= brt.AGREEMENT_PCT)
            & (pl.col("blis_vs_stepml_e2e_plus_step_pct").abs() <= brt.AGREEMENT_PCT)
        ).height
        print(
            f"within ±{brt.AGREEMENT_PCT:g} % (TTFT and E2E +1 step): {within} of {cmp_.height} run(s); "
            f"StepML {cmp_['stepml_s'].sum():.1f} s, BLIS {cmp_['blis_s'].sum():.1f} s "
            f"(×{cmp_['blis_s'].sum() / cmp_['stepml_s'].sum():.1f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
