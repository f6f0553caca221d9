"""Evidence only (issue 24/25 diagnosis): how much of a `general` run's profile-alone TTFT miss comes from how its
leave-one-workload-out calibration treats the saturated `reasoning` run. The calibration is redone on the same runs
with the saturated-run setting as inner validation chose it, then forced one-sided (weight 0.1 and 1), and the
what-if check predicts the held-out run from its profile alone with each (stepml_core.whatif.check.check_run).
Nothing here is adopted: forcing a setting after seeing the scored run's error is not out of sample.

    python benchmarks/saturated_setting_evidence.py --study OUT --data REAL [--model mixtral-8x7b] [--workload general]

OUT: a `stepml run --data REAL` output folder (its stored request logs); needs ground truth for the scored run.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

import polars as pl


def main(argv=None) -> int:
    from stepml_core import pipeline
    from stepml_core.calibration import fit as F
    from stepml_core.whatif.check import check_run
    from stepml_core.whatif.study import template_tokens
    from stepml_dagster.export_cli import _stored
    from stepml_dagster.whatif_cli import study_runs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", default="mixtral-8x7b")
    ap.add_argument("--workload", default="general")
    a = ap.parse_args(argv)
    folder = a.study / "assets" / "request_log"
    key = a.model.replace("x7b", "x7b-v0-1") if a.model == "mixtral-8x7b" else a.model
    logs = {p.name: _stored(p, p.name, True) for p in sorted(folder.iterdir()) if p.is_dir() and key in p.name}
    if not logs:
        print(f"no request logs of {a.model} under {folder}")
        return 0
    metas = {e: pipeline.stored_run_metadata(e, logs[e], a.data) for e in logs}
    _, load = pipeline.calibration_inputs(metas, logs)
    scored = next(e for e in logs if e.endswith(a.workload) or f"-{a.workload}" in e)
    cal_runs = [load(e) for e in logs if e != scored]
    runs = {r.experiment_id: r for r in study_runs(a.study, a.data)}
    chosen = F.choose_saturated_setting
    try:
        for label, forced in (
            ("as inner validation chose", None),
            ("one-sided, weight 0.1", 0.1),
            ("one-sided, weight 1", 1.0),
        ):
            F.choose_saturated_setting = (
                chosen if forced is None else (lambda tls, prior, w=forced: F.SaturatedSetting(True, w, "forced", {}))
            )
            cal = F.calibrate(cal_runs, seed=0, n_boot=0)
            p = cal.params
            spec = {
                **{"name": "requests_lowo", "kind": "blis_linear", "llm_model": a.model, "protocol": "lowo"},
                **{"fitted_on": list(cal.fitted_on), "for_runs": [scored], "doc": p.blis_doc(), "params": asdict(p)},
            }
            res = check_run(
                spec, runs[scored], template_tokens([runs[e] for e in cal.fitted_on]), logs[scored]["requests"]
            )
            t = pl.DataFrame(res["rows"]).filter(
                pl.col("metric").is_in(["ttft_mean", "e2e_mean", "decode_time_per_token_mean"])
            )
            s = cal.saturated_setting
            print(
                f"\n{label}: one_sided={s.one_sided} weight={s.weight}; β_kv {p.b_kv_us:.3f} µs/token, β0 {p.b0_us:.0f} µs"
            )
            print(t.select("stage", "metric", "predicted", "observed", "rel_err_pct"))
    finally:
        F.choose_saturated_setting = chosen
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
