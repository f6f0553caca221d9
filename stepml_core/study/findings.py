"""What the study's tables say, as data: rankings with ties, the recommendation, generalization with
flags, the effect of the split, the alignment and the alpha grid, the ablation against its noise.

The report's summary and sections render these; nothing here formats text for a reader except
short `why` strings that name the numbers they come from.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from stepml_core.stepmodels.recipes import log_target_models
from stepml_core.study.stats import combined_mean_ci, within_noise
from stepml_core.study.verdict import ABSURD_MAPE_PCT, CLEAR_MARGIN_REL, rank_with_ties, recommend, simplicity_order
from stepml_core.tables.steps import TARGETS

DEPLOY_SCOPE = "per_model"  # a simulator models one LLM over its workloads
RANK_SCOPES = ("per_model", "per_experiment", "global")
NO_CHANGE_PT = 0.01  # an ablation change below 0.01 point is reported as no change (numerical noise of the refit)


def rankings(predictions: pl.DataFrame, *, seed: int = 0, reps: int = 400) -> dict[str, dict[str, pl.DataFrame]]:
    """{target: {scope: rank_with_ties table}} over the StepML models (the *_orig recipes are reproduction only)."""
    out: dict[str, dict[str, pl.DataFrame]] = {}
    for target in TARGETS:
        for scope in RANK_SCOPES:
            r = rank_with_ties(predictions, target, scope, simplicity_order(), reps=reps, seed=seed)
            if r.height:
                out.setdefault(target, {})[scope] = r
    return out


def recommendations(ranks: dict) -> dict[str, dict]:
    """{target: recommend(...) on the deployment scope (per_model), else per_experiment}."""
    out = {}
    for target, by_scope in ranks.items():
        r = by_scope.get(DEPLOY_SCOPE)
        if r is None:
            r = by_scope.get("per_experiment")
        rec = recommend(r) if r is not None else None
        if rec:
            out[target] = rec
    return out


def generalization_summary(gen_metrics: pl.DataFrame | None, gen_predictions: pl.DataFrame | None) -> pl.DataFrame:
    """Per target × scope × model over held-out experiments' test blocks: median (ranked on) and mean MAPE,
    worst experiment, and a flag with its explanation where a value is absurd (> ABSURD_MAPE_PCT)."""
    schema = {
        "target": pl.Utf8,
        "scope": pl.Utf8,
        "model": pl.Utf8,
        "median_mape_pct": pl.Float64,
        "mean_mape_pct": pl.Float64,
        "max_mape_pct": pl.Float64,
        "worst_run": pl.Utf8,
        "n": pl.Int64,
        "absurd": pl.Boolean,
        "why": pl.Utf8,
    }
    if gen_metrics is None or gen_metrics.height == 0:
        return pl.DataFrame(schema=schema)
    t = gen_metrics.filter(pl.col("split") == "test")
    g = (
        t.group_by("target", "scope", "model")
        .agg(
            median_mape_pct=pl.col("mape_pct").median(),
            mean_mape_pct=pl.col("mape_pct").mean(),
            max_mape_pct=pl.col("mape_pct").max(),
            worst_run=pl.col("experiment_id").sort_by("mape_pct").last(),
            n=pl.len().cast(pl.Int64),
        )
        .with_columns(absurd=pl.col("max_mape_pct") > ABSURD_MAPE_PCT)
    )
    whys = []
    for r in g.iter_rows(named=True):
        why = ""
        if r["absurd"]:
            why = f"worst held-out run `{r['worst_run']}` {r['max_mape_pct']:,.0f} %"
            if gen_predictions is not None and gen_predictions.height:
                p = gen_predictions.filter(
                    (pl.col("target") == r["target"])
                    & (pl.col("scope") == r["scope"])
                    & (pl.col("model") == r["model"])
                    & (pl.col("experiment_id") == r["worst_run"])
                    & (pl.col("y") > 0)
                )
                if p.height:
                    ratio = (p["y_pred"] / p["y"]).to_numpy()
                    why += f": there it predicts a median {np.nanmedian(ratio):,.3g}× (up to {np.nanmax(ratio):,.3g}×) the observed step time"
            why += (
                f"; {log_target_models()[r['model']]} extrapolates exponentially when a held-out run's features leave the training range"
                if r["model"] in log_target_models()
                else "; the held-out run's step times are on another scale than the training runs', whose level the model keeps"
            )
        whys.append(why)
    return (
        g.with_columns(why=pl.Series(whys, dtype=pl.Utf8))
        .select(list(schema))
        .sort("target", "scope", "median_mape_pct")
    )


def transfer_statement(gen: pl.DataFrame, target: str, scope: str = "leave_one_model_out") -> dict | None:
    """Does any model beat the naive mean on held-out models (median MAPE at least CLEAR_MARGIN_REL lower)?"""
    g = gen.filter((pl.col("target") == target) & (pl.col("scope") == scope))
    if g.height == 0 or g.filter(pl.col("model") == "naive_mean").height == 0:
        return None
    naive = float(g.filter(pl.col("model") == "naive_mean")["median_mape_pct"][0])
    best = g.sort("median_mape_pct").row(0, named=True)
    transfers = best["model"] != "naive_mean" and best["median_mape_pct"] <= (1 - CLEAR_MARGIN_REL) * naive
    return {
        "target": target,
        "scope": scope,
        "naive_median_pct": naive,
        "best_model": best["model"],
        "best_median_pct": float(best["median_mape_pct"]),
        "range_pct": [float(g["median_mape_pct"].min()), float(g["median_mape_pct"].max())],
        "n_held_out": int(g["n"].max()),
        "transfers": bool(transfers),
    }


def split_effect(checks_splits: pl.DataFrame | None, checks_mix: pl.DataFrame | None) -> dict:
    """Mean test MAPE per target × scheme × model over experiments, and the blocks' mean share of the last load stage."""
    out: dict = {"mape": pl.DataFrame(), "last_stage_share": {}}
    if checks_splits is not None and checks_splits.height:
        out["mape"] = (
            checks_splits.group_by("target", "scheme", "model")
            .agg(mean_mape_pct=pl.col("mape_pct").mean(), n_experiments=pl.len())
            .sort("target", "model", "scheme")
        )
    if checks_mix is not None and checks_mix.height:
        last = checks_mix.group_by("experiment_id").agg(last=pl.col("load_stage").max())
        multi = last.filter(pl.col("last") > 0)  # runs with one load stage have nothing to mix
        m = checks_mix.join(multi, on="experiment_id").with_columns(is_last=pl.col("load_stage") == pl.col("last"))
        per = (
            m.group_by("experiment_id", "scheme", "block")
            .agg(share=(pl.col("share") * pl.col("is_last")).sum())
            .group_by("scheme", "block")
            .agg(pl.col("share").mean())
        )
        out["last_stage_share"] = {(r["scheme"], r["block"]): r["share"] for r in per.iter_rows(named=True)}
        out["multi_stage_runs"], out["runs"] = multi.height, last.height
    return out


def alignment_summary(align: pl.DataFrame | None) -> pl.DataFrame:
    """Per model × alignment: mean test MAPE over experiments, mean difference to alignment N with a 95 % interval
    (per-run bootstrap intervals combined), `within_noise`, rows used."""
    schema = {
        "model": pl.Utf8,
        "alignment": pl.Utf8,
        "mean_mape_pct": pl.Float64,
        "diff_vs_N_pct": pl.Float64,
        "diff_lo_pct": pl.Float64,
        "diff_hi_pct": pl.Float64,
        "within_noise": pl.Boolean,
        "n_experiments": pl.Int64,
        "n_rows": pl.Int64,
        "n_test": pl.Int64,
    }
    if align is None or align.height == 0 or "mape_pct" not in align.columns:
        return pl.DataFrame(schema=schema)
    a = align.filter(pl.col("mape_pct").is_not_null())
    rows = []
    for (model, alignment), g in a.group_by(["model", "alignment"], maintain_order=True):
        ses = ((g["diff_hi_pct"] - g["diff_lo_pct"]) / 3.92).to_list()
        c = combined_mean_ci(g["diff_vs_N_pct"].to_list(), ses)
        rows.append(
            {
                "model": model,
                "alignment": alignment,
                "mean_mape_pct": float(g["mape_pct"].mean()),
                "diff_vs_N_pct": c["mean"],
                "diff_lo_pct": c["ci95"][0],
                "diff_hi_pct": c["ci95"][1],
                "within_noise": alignment == "N" or within_noise(c["ci95"]),
                "n_experiments": g.height,
                "n_rows": int(g["n_rows"].sum()),
                "n_test": int(g["n_test"].sum()),
            }
        )
    return pl.DataFrame(rows, schema=schema) if rows else pl.DataFrame(schema=schema)


def alpha_summary(alpha: pl.DataFrame | None) -> pl.DataFrame:
    """Per scope × target × model: fits, how many chose the lowest / highest alpha of the grid."""
    if alpha is None or alpha.height == 0:
        return pl.DataFrame()
    return (
        alpha.group_by("scope", "target", "model")
        .agg(
            fits=pl.len(),
            at_low_edge=pl.col("at_low_edge").sum(),
            at_high_edge=pl.col("at_high_edge").sum(),
            alpha_min=pl.col("alpha").min(),
            alpha_max=pl.col("alpha").max(),
        )
        .sort("scope", "target", "model")
    )


def ablation_summary(ablation: pl.DataFrame | None) -> pl.DataFrame:
    """Per target × group: mean test MAPE with all / without / only, the change (without − all) with a 95 % interval
    from the per-run bootstrap errors, and `effect`: carried (interval > 0), dropping helps (< 0) or within noise."""
    if ablation is None or ablation.height == 0:
        return pl.DataFrame()
    rows = []
    for (target, group), g in ablation.group_by(["target", "group"], maintain_order=True):
        g = g.filter(pl.col("mape_without_pct").is_not_null() & pl.col("mape_all_pct").is_not_null())
        if g.height == 0:
            continue
        ses = g["change_se_pct"].to_list() if "change_se_pct" in g.columns else [float("nan")] * g.height
        c = combined_mean_ci((g["mape_without_pct"] - g["mape_all_pct"]).to_list(), ses)
        lo, hi = c["ci95"]
        effect = "carried the fit" if lo > 0 else "dropping it helps" if hi < 0 else "within noise"
        if abs(c["mean"]) < NO_CHANGE_PT:
            effect = "no change"
        elif not np.isfinite(lo):
            effect = "no noise estimate"
        rows.append(
            {
                "target": target,
                "group": group,
                "all": float(g["mape_all_pct"].mean()),
                "without": float(g["mape_without_pct"].mean()),
                "only": float(g["mape_only_pct"].mean()) if g["mape_only_pct"].null_count() < g.height else None,
                "change": c["mean"],
                "change_lo": lo,
                "change_hi": hi,
                "effect": effect,
                "n": g.height,
            }
        )
    return pl.DataFrame(rows).sort("target", "group") if rows else pl.DataFrame()


def _one_run_per_model(predictions: pl.DataFrame) -> bool:
    from stepml_core.runs.folders import parse_run_id

    exps = sorted(set(predictions["experiment_id"].to_list())) if predictions.height else []
    models = [parse_run_id(e).model for e in exps]
    return bool(exps) and len(set(models)) == len(models)


def _lomo_equals_lowo(gen_metrics: pl.DataFrame | None) -> bool:
    if gen_metrics is None or gen_metrics.height == 0:
        return False
    key = ["experiment_id", "target", "model", "split"]
    a = gen_metrics.filter(pl.col("scope") == "leave_one_model_out").select(*key, "mape_pct").sort(key)
    b = gen_metrics.filter(pl.col("scope") == "leave_one_workload_out").select(*key, "mape_pct").sort(key)
    return a.height > 0 and a.equals(b)


def study_findings(
    *,
    predictions: pl.DataFrame,
    generalization: dict | None = None,
    ablation: pl.DataFrame | None = None,
    checks: dict[str, pl.DataFrame] | None = None,
    seed: int = 0,
) -> dict:
    """Everything the summary and the sections past the verdict read (see the functions above)."""
    checks = checks or {}
    gen_m = (generalization or {}).get("metrics")
    gen_p = (generalization or {}).get("predictions")
    ranks = rankings(predictions, seed=seed)
    gen = generalization_summary(gen_m, gen_p)
    return {
        "rankings": ranks,
        "recommendations": recommendations(ranks),
        "generalization": gen,
        "transfer": {t: transfer_statement(gen, t) for t in TARGETS},
        "split_effect": split_effect(checks.get("splits"), checks.get("stage_mix")),
        "alignment": alignment_summary(checks.get("alignment")),
        "alpha": alpha_summary(checks.get("alpha")),
        "ablation": ablation_summary(ablation),
        "cycle_rule": checks.get("cycle_rule"),
        "one_run_per_model": _one_run_per_model(predictions),
        "lomo_equals_lowo": _lomo_equals_lowo(gen_m),
    }
