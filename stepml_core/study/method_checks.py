"""Checks of the study's method, per experiment: what the split, the cycle rule, the batch alignment
and the alpha grid do to the numbers (the report's "Method checks" section; H1 itself is unchanged).

* stage mix of each block under the temporal, stage-matched and random splits (splits.py);
* the H1 trio (naive_mean, blackbox_2f, ridge_30f) refitted and scored under each split scheme;
* cycle rule: per-experiment cycle models scored on the test rows with the rule (cycle_us) and on
  every consecutive gap (cycle_gap_us), with the counts the rule removed (tables.py);
* alignment: for cycle(N) = ts_start[N+1] − ts_start[N], Ridge / blackbox on the features of batch N,
  of batch N−1, and of both, on the rows where steps N−1, N and N+1 were all sampled;
* alpha: the validated alpha of each Ridge fit and whether it sits at an end of the grid.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from stepml_core.features.step_features import PREV_SUFFIX, feature_columns, with_previous_step
from stepml_core.stepmodels.estimators import ALPHA_GRID, fit_ridge_validated
from stepml_core.stepmodels.fitted import predict_model
from stepml_core.stepmodels.recipes import names_with
from stepml_core.study.stats import bootstrap_means, percentile_ci
from stepml_core.tables.splits import random_split, stage_matched_split, stage_mix
from stepml_core.tables.steps import TARGETS

MIN_ALIGNMENT_ROWS = 30  # fewer rows with N−1, N and N+1 sampled: no alignment fit for that run


def scheme_labels(fm_split: pl.DataFrame, seed: int = 0) -> dict[str, np.ndarray]:
    """{scheme: split labels aligned with fm_split's rows}."""
    ids, stages = fm_split["step.id"].to_numpy(), fm_split["load_stage"].to_numpy()
    return {
        "temporal": fm_split["split"].to_numpy().astype(str),
        "stage_matched": stage_matched_split(ids, stages),
        "random": random_split(ids, seed),
    }


def stage_mix_table(fm_split: pl.DataFrame, seed: int = 0) -> pl.DataFrame:
    """experiment_id, scheme, block, load_stage, n, share: each block's load-stage mix under each scheme."""
    exp = fm_split["experiment_id"][0] if fm_split.height else ""
    parts = []
    for scheme, labels in scheme_labels(fm_split, seed).items():
        t = stage_mix(pl.DataFrame({"split": labels, "load_stage": fm_split["load_stage"]}))
        parts.append(t.with_columns(experiment_id=pl.lit(exp), scheme=pl.lit(scheme)))
    return (
        pl.concat(parts).select("experiment_id", "scheme", "block", "load_stage", "n", "share")
        if parts
        else pl.DataFrame()
    )


def split_sensitivity(fm_split: pl.DataFrame, seed: int = 0, fitted: dict | None = None) -> pl.DataFrame:
    """experiment_id, target, scheme, model, n_test, mape_pct: the H1 trio refitted and scored under each split scheme
    (the temporal scheme reuses `fitted`, the experiment's own fits, when given)."""
    from stepml_core.study.h1 import fit_models, metrics_from_predictions, predict

    trio = names_with("h1_trio")
    rows = []
    for scheme, labels in scheme_labels(fm_split, seed).items():
        fm2 = fm_split.with_columns(split=pl.Series(labels))
        if scheme == "temporal" and fitted:
            models = [m for t in TARGETS for m in fitted.get(t, []) if m["name"] in trio]
        else:
            models = [m for t in TARGETS for m in fit_models(fm2, t, "per_experiment", trio, seed)]
        met = metrics_from_predictions(predict(fm2, models, "per_experiment")).filter(pl.col("split") == "test")
        rows.append(
            met.select(
                "experiment_id",
                "target",
                pl.lit(scheme).alias("scheme"),
                "model",
                pl.col("n").cast(pl.Int64).alias("n_test"),
                "mape_pct",
            )
        )
    return pl.concat(rows) if rows else pl.DataFrame()


def cycle_rule_effect(fm_split: pl.DataFrame, fitted: dict, counts: dict) -> pl.DataFrame:
    """Per cycle model: test MAPE on cycle_us (the rule applied) and on every consecutive gap (cycle_gap_us)."""
    exp = fm_split["experiment_id"][0] if fm_split.height else ""
    rows = []
    if "cycle_gap_us" not in fm_split.columns:
        return pl.DataFrame()
    test = fm_split.filter(
        (pl.col("split") == "test") & pl.col("cycle_gap_us").is_not_null() & (pl.col("cycle_gap_us") > 0)
    )
    for m in fitted.get("cycle_us", []):
        if test.height == 0:
            break
        X = test.select(m["features"]).to_numpy() if m["features"] else np.zeros((test.height, 0))
        yhat = predict_model(m, X)
        gap, rule = test["cycle_gap_us"].to_numpy(), test["cycle_us"].to_numpy()
        kept = np.isfinite(rule.astype(float))
        ape_all = 100 * np.abs(yhat - gap) / gap
        rows.append(
            {
                "experiment_id": exp,
                "model": m["name"],
                "n_test_rule": int(kept.sum()),
                "mape_rule_pct": float(ape_all[kept].mean()) if kept.any() else None,
                "n_test_all": int(len(gap)),
                "mape_all_gaps_pct": float(ape_all.mean()),
                "pairs": counts.get("pairs", 0),
                "removed_idle": counts.get("idle", 0),
                "removed_stall": counts.get("stall", 0),
            }
        )
    return pl.DataFrame(rows) if rows else pl.DataFrame()


def alignment_comparison(fm_split: pl.DataFrame, *, reps: int = 400, seed: int = 0) -> pl.DataFrame:
    """cycle_us from batch N, batch N−1 or both (Ridge with validated alpha; 30 features or the 2 blackbox ones),
    on the rows where steps N−1, N and N+1 were sampled; test MAPE and its difference to alignment N with a 95 % interval."""
    exp = fm_split["experiment_id"][0] if fm_split.height else ""
    cols30 = feature_columns()
    fm = with_previous_step(fm_split, cols30)
    prev = lambda cols: [f"{c}{PREV_SUFFIX}" for c in cols]
    rows_ok = fm.filter(pl.col("cycle_us").is_not_null() & pl.col(f"prefill_tokens{PREV_SUFFIX}").is_not_null())
    n_tr = int((rows_ok["split"] == "train").sum()) if rows_ok.height else 0
    if rows_ok.height < MIN_ALIGNMENT_ROWS or n_tr < 10 or int((rows_ok["split"] == "test").sum()) < 5:
        return pl.DataFrame(
            [
                {
                    "experiment_id": exp,
                    "model": "ridge_30f",
                    "alignment": "N",
                    "n_rows": rows_ok.height,
                    "n_test": 0,
                    "mape_pct": None,
                    "diff_vs_N_pct": None,
                    "diff_lo_pct": None,
                    "diff_hi_pct": None,
                    "note": f"only {rows_ok.height} rows with steps N−1, N, N+1 sampled",
                }
            ]
        )
    out = []
    for model, cols in (("ridge_30f", cols30), ("blackbox_2f", ["prefill_tokens", "decode_tokens"])):
        apes = {}
        for alignment, feats in (("N", cols), ("N-1", prev(cols)), ("N and N-1", cols + prev(cols))):
            xy = lambda split: (
                rows_ok.filter(pl.col("split") == split).select(feats).to_numpy(),
                rows_ok.filter(pl.col("split") == split)["cycle_us"].to_numpy(),
            )
            (X_tr, y_tr), (X_va, y_va), (X_te, y_te) = xy("train"), xy("valid"), xy("test")
            m = fit_ridge_validated(model, "cycle_us", feats, X_tr, y_tr, X_va, y_va)
            apes[alignment] = 100 * np.abs(m.predict(np.nan_to_num(X_te)) - y_te) / y_te
        for i, (alignment, ape) in enumerate(apes.items()):
            d = ape - apes["N"]
            lo, hi = percentile_ci(bootstrap_means(d, reps, seed + i)) if alignment != "N" else (0.0, 0.0)
            out.append(
                {
                    "experiment_id": exp,
                    "model": model,
                    "alignment": alignment,
                    "n_rows": rows_ok.height,
                    "n_test": int(len(ape)),
                    "mape_pct": float(ape.mean()),
                    "diff_vs_N_pct": float(d.mean()),
                    "diff_lo_pct": lo,
                    "diff_hi_pct": hi,
                    "note": "",
                }
            )
    return pl.DataFrame(out)


def alpha_choices(fitted: dict, experiment_id: str, scope: str, group: str = "") -> pl.DataFrame:
    """Validated alpha of each StepML Ridge fit and whether it sits at the low / high end of ALPHA_GRID."""
    rows = []
    for target, models in fitted.items():
        for m in models:
            a = m.get("alpha")
            if a is None or m.get("recipe") != "stepml":
                continue
            rows.append(
                {
                    "experiment_id": experiment_id,
                    "scope": scope,
                    "group": group,
                    "target": target,
                    "model": m["name"],
                    "alpha": float(a),
                    "at_low_edge": bool(np.isclose(a, ALPHA_GRID[0])),
                    "at_high_edge": bool(np.isclose(a, ALPHA_GRID[-1])),
                }
            )
    return (
        pl.DataFrame(rows)
        if rows
        else pl.DataFrame(
            schema={
                "experiment_id": pl.Utf8,
                "scope": pl.Utf8,
                "group": pl.Utf8,
                "target": pl.Utf8,
                "model": pl.Utf8,
                "alpha": pl.Float64,
                "at_low_edge": pl.Boolean,
                "at_high_edge": pl.Boolean,
            }
        )
    )


def method_checks(fm_split: pl.DataFrame, fitted: dict, cycle_counts: dict, seed: int = 0) -> dict[str, pl.DataFrame]:
    """All per-experiment method checks (the `method_checks` asset)."""
    exp = fm_split["experiment_id"][0] if fm_split.height else ""
    return {
        "stage_mix": stage_mix_table(fm_split, seed),
        "splits": split_sensitivity(fm_split, seed, fitted),
        "cycle_rule": cycle_rule_effect(fm_split, fitted, cycle_counts),
        "alignment": alignment_comparison(fm_split, seed=seed),
        "alpha": alpha_choices(fitted, exp, "per_experiment"),
    }


def pooled_alpha(pooled_models: dict) -> pl.DataFrame:
    """alpha_choices over pooled fits ({scope: {group: {target: [models]}}})."""
    parts = [
        alpha_choices(fitted, "", scope, group)
        for scope, groups in (pooled_models or {}).items()
        for group, fitted in groups.items()
    ]
    parts = [p for p in parts if p.height]
    return pl.concat(parts) if parts else alpha_choices({}, "", "")


def gather(checks: dict[str, dict], experiments, pooled_models: dict | None = None) -> dict[str, pl.DataFrame]:
    """The per-experiment method_checks of `experiments` concatenated per table (+ pooled fits' alpha)."""
    out: dict[str, pl.DataFrame] = {}
    for key in ("stage_mix", "splits", "cycle_rule", "alignment", "alpha"):
        parts = [checks[e][key] for e in experiments if e in checks and key in checks[e] and checks[e][key].height]
        out[key] = pl.concat(parts, how="diagonal_relaxed") if parts else pl.DataFrame()
    if pooled_models:
        pa = pooled_alpha(pooled_models)
        if pa.height:
            out["alpha"] = pl.concat([out["alpha"], pa], how="diagonal_relaxed") if out["alpha"].height else pa
    return out
