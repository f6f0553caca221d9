"""The H1 verdict and the model ranking, with the statistics a reviewer needs beside them.

H1: the 30-feature Ridge (`ridge_30f`) reaches < 25 % per-step MAPE on the last 20 % of each run
*and clearly beats* the 2-feature blackbox (`blackbox_2f`) and the naive mean (`naive_mean`).
The three are compared like for like: each is fitted on train + valid of its own run (Ridge
alpha chosen on valid), predictions floored at the model's positive floor, scored on test.

Verdict per target (all per-experiment test MAPE, per_experiment scope):

1. threshold (the seed's rule): mean over experiments < 25 % → below; > 30 % → above;
   otherwise between.
2. each baseline B, per experiment e: d = mean over test rows of APE(ridge) − APE(B) with a 95 %
   circular block bootstrap interval [lo, hi]; margin m = CLEAR_MARGIN_REL × MAPE(B).
   better: hi < 0 and d ≤ −m (significantly lower, by at least the margin);
   not better: lo > −m (95 % sure the gain is under the margin, or ridge is worse);
   otherwise undecided.
   Across experiments: with ≥ WILCOXON_MIN_N experiments a one-sided Wilcoxon signed-rank test
   on the relative changes r_e = d_e / MAPE_e(B) decides (clearly beats: p(r < 0) < 0.05 and
   median r ≤ −margin; does not: p(r > −margin) < 0.05); with fewer (the test cannot reach
   p < 0.05, so no p-value is shown as evidence) H1 is checked run by run (clearly beats: better
   in every run; does not: not better in some run).
3. verdict: refuted if the threshold is above, or some baseline is not clearly beaten;
   supported if the threshold is below and every baseline is clearly beaten; otherwise
   inconclusive. `reasons` says which numbers decided it.

When the naive mean itself is below 25 %, the threshold cannot separate models on that target:
the verdict says so and gives skill = 1 − MAPE(ridge) / MAPE(naive mean) beside MAPE.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from stepml_core.study.stats import (
    ALPHA_TEST,
    BOOT_REPS,
    WILCOXON_MIN_N,
    bootstrap_means,
    circular_block_indices,
    percentile_ci,
    wilcoxon_one_sided,
)
from stepml_core.tables.steps import TARGETS

H1_MODEL, SUPPORT_BELOW_PCT, REFUTE_ABOVE_PCT = "ridge_30f", 25.0, 30.0
H1_BASELINES = ("blackbox_2f", "naive_mean")
CLEAR_MARGIN_REL = 0.10  # "clearly beats": MAPE at least 10 % (relative) below the baseline's, beyond noise
ABSURD_MAPE_PCT = 1000.0  # a per-run MAPE above 1,000 % is flagged as absurd, explained, and never ranked as a tie

RULE = (
    f"threshold: mean per-experiment test MAPE of {H1_MODEL} < {SUPPORT_BELOW_PCT:g} % (supported side), "
    f"> {REFUTE_ABOVE_PCT:g} % refuted; comparison: {H1_MODEL} must clearly beat {' and '.join(H1_BASELINES)} "
    f"(lower MAPE by ≥ {100 * CLEAR_MARGIN_REL:g} % of the baseline's, beyond the 95 % interval; Wilcoxon "
    f"across experiments from {WILCOXON_MIN_N} experiments, run by run below that); supported = threshold met "
    "and both beaten; refuted = threshold missed or a baseline not clearly beaten; otherwise inconclusive. "
    "Like for like: all three fitted on train + valid of each run, floored predictions, scored on test"
)


def test_ape(
    predictions: pl.DataFrame, target: str, scope: str = "per_experiment"
) -> dict[tuple[str, str], np.ndarray]:
    """{(experiment, model): APE % of the test rows in step order} for one target and scope (rows with y ≠ 0)."""
    p = (
        predictions.filter(
            (pl.col("target") == target) & (pl.col("split") == "test") & (pl.col("scope") == scope) & (pl.col("y") != 0)
        )
        .sort("experiment_id", "model", "step.id")
        .with_columns(ape=100 * (pl.col("y_pred") - pl.col("y")).abs() / pl.col("y").abs())
    )
    out = {}
    for (e, m), g in p.group_by(["experiment_id", "model"], maintain_order=True):
        out[(e, m)] = g["ape"].to_numpy()
    return out


def compare_run(ape_model: np.ndarray, ape_base: np.ndarray, *, reps: int, seed: int) -> dict:
    """One run: mean APE difference (model − baseline, points) with its 95 % interval and outcome."""
    d = ape_model - ape_base
    lo, hi = percentile_ci(bootstrap_means(d, reps, seed)) if len(d) >= 2 else (float("nan"), float("nan"))
    diff, base_mape = float(d.mean()), float(ape_base.mean())
    margin = CLEAR_MARGIN_REL * base_mape
    outcome = "better" if (hi < 0 and diff <= -margin) else "not_better" if lo > -margin else "undecided"
    return {
        "mape_diff_pct": diff,
        "ci95": [lo, hi],
        "margin_pct": margin,
        "ridge_better": bool(hi < 0),
        "outcome": outcome,
        "n_test": int(len(d)),
        "baseline_mape_pct": base_mape,
        "model_mape_pct": float(ape_model.mean()),
    }


def compare_across(runs: dict[str, dict]) -> dict:
    """Across runs: clearly_beats / does_not_clearly_beat / undecided, and how it was decided."""
    rel = np.array([r["mape_diff_pct"] / r["baseline_mape_pct"] for r in runs.values() if r["baseline_mape_pct"] > 0])
    w = wilcoxon_one_sided(rel, "less")
    w_not = wilcoxon_one_sided(rel + CLEAR_MARGIN_REL, "greater")
    if w["reachable"] and len(rel) >= WILCOXON_MIN_N:
        beats = w["p"] < ALPHA_TEST and float(np.median(rel)) <= -CLEAR_MARGIN_REL
        not_beaten = w_not["p"] is not None and w_not["p"] < ALPHA_TEST
        decided_by = f"one-sided Wilcoxon signed-rank test across {len(rel)} experiments (relative MAPE change)"
    else:
        outs = [r["outcome"] for r in runs.values()]
        beats = bool(outs) and all(o == "better" for o in outs)
        not_beaten = any(o == "not_better" for o in outs)
        decided_by = (
            f"run by run (per-run 95 % block-bootstrap intervals): with {len(runs)} experiment(s) a signed-rank "
            f"test cannot reach p < {ALPHA_TEST:g} (needs ≥ {WILCOXON_MIN_N})"
        )
    outcome = "clearly_beats" if beats else "does_not_clearly_beat" if not_beaten else "undecided"
    return {
        "outcome": outcome,
        "decided_by": decided_by,
        "relative_change_median": float(np.median(rel)) if len(rel) else None,
        "wilcoxon_p_one_sided": w["p"],
        "wilcoxon_reachable": w["reachable"],
        "wilcoxon_min_p": w["min_p"],
        "significant": bool(w["p"] is not None and w["p"] < ALPHA_TEST),
    }


def _threshold(mean_mape: float) -> str:
    return "below" if mean_mape < SUPPORT_BELOW_PCT else "above" if mean_mape > REFUTE_ABOVE_PCT else "between"


_NO_PAIRS = {
    "outcome": "undecided",
    "decided_by": "no paired test rows",
    "wilcoxon_p_one_sided": None,
    "wilcoxon_reachable": False,
    "wilcoxon_min_p": 1.0,
    "significant": False,
    "relative_change_median": None,
}


def _compare_baseline(
    t: pl.DataFrame, experiments: list[str], apes: dict, base: str, k: int, *, reps: int, seed: int
) -> dict:
    """H1 model vs one baseline (the k-th of H1_BASELINES): per-run bootstrap comparisons (seed + 1000 k + i for the
    i-th experiment) and the decision across runs."""
    b = t.filter(pl.col("model") == base).sort("experiment_id")
    runs = {}
    for i, e in enumerate(experiments):
        a, c = apes.get((e, H1_MODEL)), apes.get((e, base))
        if a is None or c is None or len(a) != len(c) or len(a) == 0:
            continue
        runs[e] = compare_run(a, c, reps=reps, seed=seed + 1000 * k + i)
    across = compare_across(runs) if runs else dict(_NO_PAIRS)
    return {
        "mean_test_mape_pct": float(b["mape_pct"].mean()) if b.height else None,
        "median_test_mape_pct": float(b["mape_pct"].median()) if b.height else None,
        "ridge_lower_in": sum(r["mape_diff_pct"] < 0 for r in runs.values()),
        "n_experiments": len(runs),
        **across,
        "per_experiment_bootstrap": runs,
    }


def _skill_vs_naive_mean(res: dict) -> float | None:
    """Mean over runs of skill = 1 − MAPE(H1 model) / MAPE(naive mean) (runs with a positive naive MAPE)."""
    skills = [
        1 - r["model_mape_pct"] / r["baseline_mape_pct"]
        for r in res["baselines"].get("naive_mean", {}).get("per_experiment_bootstrap", {}).values()
        if r["baseline_mape_pct"] > 0
    ]
    return float(np.mean(skills)) if skills else None


def _verdict_reasons(
    res: dict, outcomes: dict[str, str], target: str, mean_mape: float, naive: float | None
) -> list[str]:
    """The sentences that decided the verdict: the threshold, each baseline's outcome, the naive mean caveat."""
    reasons = []
    if res["threshold"] == "above":
        reasons.append(f"mean test MAPE {mean_mape:.2f} % > {REFUTE_ABOVE_PCT:g} %")
    elif res["threshold"] == "between":
        reasons.append(
            f"mean test MAPE {mean_mape:.2f} % lies between {SUPPORT_BELOW_PCT:g} and {REFUTE_ABOVE_PCT:g} %"
        )
    else:
        reasons.append(f"mean test MAPE {mean_mape:.2f} % < {SUPPORT_BELOW_PCT:g} %")
    for base, o in outcomes.items():
        v = res["baselines"][base]
        words = {
            "clearly_beats": "clearly better than",
            "does_not_clearly_beat": "not clearly better than",
            "undecided": "not shown to be clearly better than",
        }[o]
        reasons.append(
            f"{words} {base} ({v['mean_test_mape_pct']:.2f} %)"
            if v["mean_test_mape_pct"] is not None
            else f"{words} {base}"
        )
    if res["naive_mean_below_threshold"]:
        reasons.append(
            f"the {SUPPORT_BELOW_PCT:g} % threshold does not separate models on {target}: the naive mean reaches {naive:.2f} %"
        )
    return reasons


def _verdict_word(res: dict, outcomes: dict[str, str]) -> str:
    """refuted / supported / inconclusive from the threshold and the baselines' outcomes (module docstring, step 3)."""
    if res["threshold"] == "above" or "does_not_clearly_beat" in outcomes.values():
        return "refuted"
    if res["threshold"] == "below" and res["clearly_beats_baselines"]:
        return "supported"
    return "inconclusive"


def verdict_for_target(test_metrics: pl.DataFrame, apes: dict, target: str, *, reps: int, seed: int) -> dict:
    """The verdict for one target from per_experiment test metrics and test APE arrays."""
    t = test_metrics.filter(pl.col("target") == target)
    ridge = t.filter(pl.col("model") == H1_MODEL).sort("experiment_id")
    if ridge.height == 0:
        return {"verdict": "no data", "n_experiments": 0, "reasons": [f"no {H1_MODEL} test rows for {target}"]}
    mean_mape = float(ridge["mape_pct"].mean())
    res = {
        "mean_test_mape_pct": mean_mape,
        "median_test_mape_pct": float(ridge["mape_pct"].median()),
        "n_experiments": ridge.height,
        "n_test_rows": int(ridge["n"].sum()),
        "threshold": _threshold(mean_mape),
        "n_below_threshold": int((ridge["mape_pct"] < SUPPORT_BELOW_PCT).sum()),
        "sources": sorted(set(ridge["source"].to_list())),
        "per_experiment": {},
        "baselines": {},
    }
    for e, mp, n in ridge.select("experiment_id", "mape_pct", "n").iter_rows():
        res["per_experiment"][e] = {"ridge_30f_test_mape_pct": mp, "n_test": n}
    experiments = ridge["experiment_id"].to_list()
    for k, base in enumerate(H1_BASELINES):
        res["baselines"][base] = _compare_baseline(t, experiments, apes, base, k, reps=reps, seed=seed)
    naive = res["baselines"].get("naive_mean", {}).get("mean_test_mape_pct")
    res["naive_mean_below_threshold"] = bool(naive is not None and naive < SUPPORT_BELOW_PCT)
    res["threshold_separates"] = not res["naive_mean_below_threshold"]
    res["skill_vs_naive_mean"] = _skill_vs_naive_mean(res)
    outcomes = {b: v["outcome"] for b, v in res["baselines"].items()}
    res["clearly_beats_baselines"] = all(o == "clearly_beats" for o in outcomes.values())
    reasons = _verdict_reasons(res, outcomes, target, mean_mape, naive)
    res["decided_by"] = next((v["decided_by"] for v in res["baselines"].values()), "")
    res["verdict"] = _verdict_word(res, outcomes)
    res["reasons"] = reasons
    return res


def h1_verdict(metrics: pl.DataFrame, predictions: pl.DataFrame, *, seed: int = 0, reps: int = BOOT_REPS) -> dict:
    """H1 per target (see the module docstring for the rule)."""
    test = metrics.filter((pl.col("split") == "test") & (pl.col("scope") == "per_experiment"))
    out = {"rule": RULE, "margin_rel": CLEAR_MARGIN_REL, "wilcoxon_min_n": WILCOXON_MIN_N, "targets": {}}
    for target in TARGETS:
        out["targets"][target] = verdict_for_target(test, test_ape(predictions, target), target, reps=reps, seed=seed)
    return out


# ------------------------------------------------------------------ ranking with ties ---


def simplicity_order() -> list[str]:
    """The ranked step models, simplest first (each recipe's ``simplicity``, stepml_core.stepmodels.recipes)."""
    from stepml_core.stepmodels.recipes import simplicity_order as order

    return order()


def rank_with_ties(
    predictions: pl.DataFrame,
    target: str,
    scope: str,
    models: list[str] | None = None,
    *,
    reps: int = 400,
    seed: int = 0,
) -> pl.DataFrame:
    """Models of one scope ranked by mean test MAPE over experiments, each against the best:
    the difference of mean-over-experiments MAPE with a 95 % interval (every experiment's test rows
    resampled by one circular block bootstrap shared by all models); `tied_with_best` when that
    interval contains 0 and the model has no absurd run (MAPE > ABSURD_MAPE_PCT where the best has
    none: one exploding run widens the interval, it does not make a model as good as the best).
    Only experiments where every model scored the same rows count."""
    apes = test_ape(predictions, target, scope)
    models = [m for m in (models or sorted({m for _, m in apes})) if any(k[1] == m for k in apes)]
    exps = sorted(
        {e for e, m in apes if all((e, mm) in apes and len(apes[(e, mm)]) == len(apes[(e, m)]) for mm in models)}
    )
    schema = {
        "model": pl.Utf8,
        "scope": pl.Utf8,
        "mean_mape_pct": pl.Float64,
        "median_mape_pct": pl.Float64,
        "diff_vs_best_pct": pl.Float64,
        "diff_lo_pct": pl.Float64,
        "diff_hi_pct": pl.Float64,
        "tied_with_best": pl.Boolean,
        "worst_run_mape_pct": pl.Float64,
        "n_experiments": pl.Int64,
        "test_rows": pl.Int64,
    }
    if not exps or not models:
        return pl.DataFrame(schema=schema)
    mape = {m: np.array([apes[(e, m)].mean() for e in exps]) for m in models}
    best = min(models, key=lambda m: mape[m].mean())
    boot = {m: np.zeros(reps) for m in models}
    for i, e in enumerate(exps):
        n = len(apes[(e, best)])
        idx = circular_block_indices(n, reps, seed + i) if n >= 2 else np.zeros((reps, max(n, 1)), dtype=np.int64)
        base = apes[(e, best)]
        for m in models:
            boot[m] += (apes[(e, m)] - base)[idx].mean(axis=1) / len(exps)
    rows = []
    best_absurd = bool((mape[best] > ABSURD_MAPE_PCT).any())
    for m in models:
        lo, hi = percentile_ci(boot[m]) if m != best else (0.0, 0.0)
        absurd = bool((mape[m] > ABSURD_MAPE_PCT).any()) and not best_absurd
        rows.append(
            {
                "model": m,
                "scope": scope,
                "mean_mape_pct": float(mape[m].mean()),
                "median_mape_pct": float(np.median(mape[m])),
                "diff_vs_best_pct": float(mape[m].mean() - mape[best].mean()),
                "diff_lo_pct": lo,
                "diff_hi_pct": hi,
                "tied_with_best": bool(m == best or (lo <= 0 and not absurd)),
                "worst_run_mape_pct": float(mape[m].max()),
                "n_experiments": len(exps),
                "test_rows": int(sum(len(apes[(e, m)]) for e in exps)),
            }
        )
    return pl.DataFrame(rows, schema=schema).sort("mean_mape_pct")


def recommend(ranking: pl.DataFrame) -> dict | None:
    """The simplest model tied with the best (simplicity_order), and the tie set."""
    if ranking.height == 0:
        return None
    tied = ranking.filter(pl.col("tied_with_best"))["model"].to_list()
    order = {m: i for i, m in enumerate(simplicity_order())}
    pick = min(tied, key=lambda m: (order.get(m, len(order)), m))
    best = ranking.row(0, named=True)
    row = ranking.filter(pl.col("model") == pick).row(0, named=True)
    return {
        "model": pick,
        "scope": row["scope"],
        "mean_mape_pct": row["mean_mape_pct"],
        "tied": tied,
        "best": best["model"],
        "best_mean_mape_pct": best["mean_mape_pct"],
    }
