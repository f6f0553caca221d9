#!/usr/bin/env python
"""The out-of-sample audit on the full-size real request logs (issue 20; stepml_core.oos_audit).

For every run of ../shared/real with ground truth: delete its ground_truth file, run the request level of the study
again (calibrations of every protocol, every run replayed with every request-calibrated model, recommendation,
intervals), and report what moved for that run. A run passes when its out-of-sample rows and intervals are
bit-identical, no candidate exists only because of its truth, and its recommended model is unchanged where its
candidates are the same.

    python benchmarks/oos_audit.py [--shared ../shared] [--work /tmp/oos-audit] [--seconds S] [--runs ID,...]

--seconds cuts every request log to its first S seconds of arrivals (what tests/test_out_of_sample.py does with
120); by default the full logs (≈ 1 hour on 2 cores: 15 studies, each recomputing only what the deleted truth fed).
Skips (exit 0) where ../shared/real is absent.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--work", type=Path, default=Path("/tmp/stepml-oos-audit"))
    ap.add_argument("--seconds", type=float, default=None, help="cut each request log to its first S seconds")
    ap.add_argument("--runs", default="", help="comma-separated run ids to audit (default: every scored run)")
    ap.add_argument("--n-boot", type=int, default=60)
    ap.add_argument("--refine-evals", type=int, default=6)
    a = ap.parse_args()
    if not (a.shared / "real" / "requests").is_dir():
        print(f"skipped: no real request logs under {a.shared / 'real' / 'requests'}")
        return 0
    import shutil

    import polars as pl

    from stepml_core.oos_audit import audit
    from stepml_core.runs.real_data import assemble_real_runs, cut_request_logs

    if a.work.exists():
        shutil.rmtree(a.work)
    root = a.work / "data"
    assemble_real_runs(a.shared, root)
    if a.seconds:
        root = cut_request_logs(root, a.work / "cut", a.seconds)
    t0 = time.perf_counter()
    say = lambda i, n, r: print(f"  [{i}/{n}] {r}: {time.perf_counter() - t0:.0f} s", flush=True)  # noqa: E731
    table, _ = audit(
        root,
        a.work / "audit",
        runs=[r for r in a.runs.split(",") if r] or None,
        progress=say,
        n_boot=a.n_boot,
        refine_evals=a.refine_evals,
    )
    pl.Config.set_tbl_rows(-1)
    pl.Config.set_tbl_width_chars(200)
    pl.Config.set_fmt_str_lengths(50)
    print(table)
    bad = table.filter(
        ~pl.col("rows_identical")
        | ~pl.col("scores_identical")
        | (pl.col("candidates_added_by_truth") != "")
        | (pl.col("recommended_same") == False)  # noqa: E712
    )
    print(
        f"{table.height} run(s) audited in {time.perf_counter() - t0:.0f} s: "
        f"{table.height - bad.height} pass, {bad.height} fail" + (f" ({', '.join(bad['run'])})" if bad.height else "")
    )
    return 1 if bad.height else 0


if __name__ == "__main__":
    raise SystemExit(main())
