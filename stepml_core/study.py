"""The H1 study on feature matrices: models, predictions, metrics, verdict (pure functions).

Models (per target, per scope):
  naive_mean         mean of the training target
  blackbox_2f        Ridge on (prefill_tokens, decode_tokens), alpha on valid, refit train+valid
  ridge_30f          Ridge on the seed's 30 features, alpha on valid, refit train+valid
  blackbox_ols_orig  original recipe: OLS on (P, D), train only
  ridge_30f_orig     original recipe: the original study's 30 features, Ridge alpha=1, train only
Scopes: per_experiment (fit on the experiment's own train block) and global (one model
pooled over all experiments' train blocks, scored on each experiment's slice).
"""

from __future__ import annotations

import numpy as np
import polars as pl
from scipy import stats

from .catalog import gpu_spec, model_spec
from .estimators import (LinearStepModel, fit_hgb_validated, fit_naive_mean, fit_nnls_basis, fit_ols_original,
                         fit_ridge_log_validated, fit_ridge_original, fit_ridge_validated, predict_model)
from .features import ORIGINAL_FEATURES, feature_columns, original_study_features, snapshot_aggregates, step_table_features
from .tables import TARGETS

BLACKBOX_FEATURES = ["prefill_tokens", "decode_tokens"]
PHYSICS_BASIS = ["t_compute_us", "t_memory_us", "num_prefill_reqs", "num_decode_reqs", "prefill_tokens", "decode_tokens"]
MODELS = {  # name: (recipe, features)
    "naive_mean": ("stepml", None),
    "blackbox_2f": ("stepml", BLACKBOX_FEATURES),
    "ridge_30f": ("stepml", "seed30"),
    "blackbox_ols_orig": ("original", BLACKBOX_FEATURES),
    "ridge_30f_orig": ("original", ORIGINAL_FEATURES),
    # beyond H1
    "ridge_log_30f": ("stepml", "seed30"),
    "nnls_physics": ("stepml", PHYSICS_BASIS),
    "hgb_30f": ("stepml", "seed30"),
}
H1_MODELS = ("naive_mean", "blackbox_2f", "ridge_30f", "blackbox_ols_orig", "ridge_30f_orig")
H1_MODEL, SUPPORT_BELOW_PCT, REFUTE_ABOVE_PCT = "ridge_30f", 25.0, 30.0
METRIC_COLUMNS = ["experiment_id", "source", "target", "model", "scope", "split", "n", "mape_pct",
                  "median_ape_pct", "p90_ape_pct", "pearson_r", "mspe_pct"]


def model_features(name: str) -> list[str]:
    spec = MODELS[name][1]
    return feature_columns() if spec == "seed30" else list(spec or [])


def build_feature_matrix(steps: pl.DataFrame, snapshots: pl.DataFrame | None, *, model: str, tp: int,
                         experiment_id: str, source: str, request_aggregates: pl.DataFrame | None = None,
                         request_source: str = "snapshot") -> pl.DataFrame:
    """Seed features + original-study features + targets, one row per kept step."""
    spec, gpu = model_spec(model), gpu_spec()
    if request_aggregates is None and snapshots is not None and snapshots.height:
        request_aggregates = snapshot_aggregates(snapshots)
    seed = step_table_features(steps, spec, gpu, tp, request_aggregates=request_aggregates, request_source=request_source)
    orig = original_study_features(steps, spec, tp)
    keep = ["step.id", "step.ts_start_ns", "batch.prefill_tokens", "batch.decode_tokens", *TARGETS]
    return (steps.select(keep).join(seed, on="step.id").join(orig, on="step.id")
            .with_columns(experiment_id=pl.lit(experiment_id), source=pl.lit(source)).sort("step.id"))


def _xy(fm: pl.DataFrame, features: list[str], target: str, splits: tuple[str, ...]):
    rows = fm.filter(pl.col("split").is_in(list(splits)) & pl.col(target).is_not_null() & pl.col(target).is_finite())
    X = rows.select(features).to_numpy() if features else np.zeros((rows.height, 0))
    return X, rows[target].to_numpy().astype(float)


def fit_models(fm: pl.DataFrame, target: str, scope: str, names: tuple[str, ...] | None = None, seed: int = 0) -> list[dict]:
    """Fit the models in MODELS (or `names`) for one target on a matrix with a `split` column; plain dicts out."""
    out = []
    for name in names or tuple(MODELS):
        recipe = MODELS[name][0]
        feats = model_features(name)
        X_tr, y_tr = _xy(fm, feats, target, ("train",))
        if len(y_tr) < 2:
            continue
        X_va, y_va = _xy(fm, feats, target, ("valid",))
        if name == "naive_mean":
            m = fit_naive_mean(target, y_tr).to_dict()
        elif recipe == "original" and name.startswith("blackbox"):
            m = fit_ols_original(name, target, feats, X_tr, y_tr).to_dict()
        elif recipe == "original":
            m = fit_ridge_original(name, target, feats, X_tr, y_tr).to_dict()
        elif name == "ridge_log_30f":
            m = fit_ridge_log_validated(name, target, feats, X_tr, y_tr, X_va, y_va)
        elif name == "nnls_physics":
            m = fit_nnls_basis(name, target, feats, X_tr, y_tr, X_va, y_va)
        elif name == "hgb_30f":
            m = fit_hgb_validated(name, target, feats, X_tr, y_tr, X_va, y_va, seed=seed)
            m.pop("_sklearn", None)
        else:
            m = fit_ridge_validated(name, target, feats, X_tr, y_tr, X_va, y_va).to_dict()
        m.setdefault("kind", "linear")
        m["name"], m["scope"] = name, scope
        out.append(m)
    return out


def predict(fm: pl.DataFrame, models: list[dict], scope: str) -> pl.DataFrame:
    """Long table: experiment_id, source, step.id, split, target, model, scope, y, y_pred (rows with a target)."""
    parts = []
    for m in models:
        rows = fm.filter(pl.col(m["target"]).is_not_null() & pl.col(m["target"]).is_finite())
        if rows.height == 0:
            continue
        X = rows.select(m["features"]).to_numpy() if m["features"] else np.zeros((rows.height, 0))
        yhat = predict_model(m, X)
        parts.append(rows.select("experiment_id", "source", "step.id", "split", "load_stage").with_columns(
            target=pl.lit(m["target"]), model=pl.lit(m["name"]), scope=pl.lit(scope),
            y=rows[m["target"]].cast(pl.Float64), y_pred=pl.Series(yhat, dtype=pl.Float64)))
    return pl.concat(parts) if parts else pl.DataFrame()


def metrics_from_predictions(pred: pl.DataFrame) -> pl.DataFrame:
    """n, MAPE, median/p90 APE, Pearson r, MSPE per experiment × target × model × scope × split.

    APE over rows with y ≠ 0; MAPE = 100·mean(|ŷ−y|/y); MSPE = 100·mean((ŷ−y)/y) (signed).
    """
    keys = ["experiment_id", "source", "target", "model", "scope", "split"]
    p = pred.filter(pl.col("y") != 0).with_columns(ape=100 * (pl.col("y_pred") - pl.col("y")).abs() / pl.col("y").abs(),
                                                   spe=100 * (pl.col("y_pred") - pl.col("y")) / pl.col("y").abs())
    m = p.group_by(keys).agg(
        n=pl.len(), mape_pct=pl.col("ape").mean(), median_ape_pct=pl.col("ape").median(),
        p90_ape_pct=pl.col("ape").quantile(0.9, "linear"), pearson_r=pl.corr("y", "y_pred"), mspe_pct=pl.col("spe").mean(),
    )
    return m.select(METRIC_COLUMNS).sort(keys)


def _block_bootstrap_diff(ape_a: np.ndarray, ape_b: np.ndarray, reps: int, seed: int) -> tuple[float, float]:
    """95 % moving-block bootstrap interval of mean(ape_a − ape_b) over time-ordered rows."""
    d = ape_a - ape_b
    n = len(d)
    if n < 2:
        return float("nan"), float("nan")
    block = max(1, int(round(n ** 0.5)))
    rng = np.random.default_rng(seed)
    n_blocks = int(np.ceil(n / block))
    starts = rng.integers(0, n - block + 1, size=(reps, n_blocks))
    idx = (starts[:, :, None] + np.arange(block)[None, None, :]).reshape(reps, -1)[:, :n]
    means = d[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def h1_verdict(metrics: pl.DataFrame, predictions: pl.DataFrame, *, seed: int = 0, reps: int = 1000) -> dict:
    """The seed's rule per target, with paired tests against the baselines.

    Mean test MAPE of ridge_30f (per-experiment scope) over experiments: < 25 % supported,
    > 30 % refuted, otherwise inconclusive. Beats a baseline: one-sided Wilcoxon signed-rank
    test across experiments (p < 0.05), and per experiment a 95 % moving-block bootstrap
    interval of the MAPE difference on the test rows.
    """
    out = {"rule": f"mean per-experiment test MAPE of {H1_MODEL}: < {SUPPORT_BELOW_PCT}% supported, > {REFUTE_ABOVE_PCT}% refuted, otherwise inconclusive", "targets": {}}
    test = metrics.filter((pl.col("split") == "test") & (pl.col("scope") == "per_experiment"))
    for target in TARGETS:
        t = test.filter(pl.col("target") == target)
        ridge = t.filter(pl.col("model") == H1_MODEL).sort("experiment_id")
        if ridge.height == 0:
            out["targets"][target] = {"verdict": "no data", "n_experiments": 0}
            continue
        mean_mape = float(ridge["mape_pct"].mean())
        verdict = "supported" if mean_mape < SUPPORT_BELOW_PCT else "refuted" if mean_mape > REFUTE_ABOVE_PCT else "inconclusive"
        res = {"verdict": verdict, "mean_test_mape_pct": mean_mape, "median_test_mape_pct": float(ridge["mape_pct"].median()),
               "n_experiments": ridge.height, "n_test_rows": int(ridge["n"].sum()),
               "sources": sorted(set(ridge["source"].to_list())), "per_experiment": {}, "baselines": {}}
        for e, mp, n in ridge.select("experiment_id", "mape_pct", "n").iter_rows():
            res["per_experiment"][e] = {"ridge_30f_test_mape_pct": mp, "n_test": n}
        for base in ("blackbox_2f", "naive_mean"):
            b = t.filter(pl.col("model") == base).sort("experiment_id")
            joined = ridge.select("experiment_id", r="mape_pct").join(b.select("experiment_id", b="mape_pct"), on="experiment_id")
            diffs = (joined["r"] - joined["b"]).to_numpy()
            p = float("nan")
            if len(diffs) >= 1 and np.any(diffs != 0):
                p = float(stats.wilcoxon(diffs, alternative="less").pvalue)
            per_exp = {}
            for e in joined["experiment_id"].to_list():
                pe = predictions.filter((pl.col("experiment_id") == e) & (pl.col("target") == target) & (pl.col("split") == "test")
                                        & (pl.col("scope") == "per_experiment") & (pl.col("y") != 0))
                a = pe.filter(pl.col("model") == H1_MODEL).sort("step.id")
                c = pe.filter(pl.col("model") == base).sort("step.id")
                if a.height == 0 or a.height != c.height:
                    continue
                ape = lambda x: (100 * (x["y_pred"] - x["y"]).abs() / x["y"].abs()).to_numpy()
                lo, hi = _block_bootstrap_diff(ape(a), ape(c), reps, seed)
                per_exp[e] = {"mape_diff_pct": float(np.mean(ape(a) - ape(c))), "ci95": [lo, hi], "ridge_better": bool(hi < 0)}
            res["baselines"][base] = {
                "mean_test_mape_pct": float(b["mape_pct"].mean()) if b.height else None,
                "ridge_lower_in": int((diffs < 0).sum()), "n_experiments": len(diffs),
                "wilcoxon_p_one_sided": p, "significant": bool(p < 0.05) if p == p else False,
                "per_experiment_bootstrap": per_exp,
            }
        res["clearly_beats_baselines"] = all(res["baselines"][b]["significant"] for b in res["baselines"])
        out["targets"][target] = res
    return out


def with_split(fm: pl.DataFrame, split: pl.DataFrame) -> pl.DataFrame:
    """Attach split and load_stage columns to a feature matrix."""
    return fm.join(split.select("step.id", "split", "load_stage"), on="step.id", how="inner")


def fit_experiment(fm_split: pl.DataFrame, scope: str = "per_experiment") -> dict[str, list[dict]]:
    """{target: [fitted model dicts]} for one matrix with splits (per experiment or pooled)."""
    return {t: fit_models(fm_split, t, scope) for t in TARGETS}


def predict_experiment(fm_split: pl.DataFrame, fitted: dict[str, list[dict]], scope: str = "per_experiment") -> pl.DataFrame:
    return predict(fm_split, [d for t in TARGETS for d in fitted.get(t, [])], scope)


def fit_global(matrices: dict[str, pl.DataFrame]) -> dict:
    """One pooled model per target over all experiments' train blocks, scored per experiment slice."""
    frames = [m for m in matrices.values() if m.height]
    if not frames:
        return {"models": {}, "predictions": pl.DataFrame(), "metrics": pl.DataFrame(schema={c: pl.Utf8 for c in METRIC_COLUMNS})}
    pooled = pl.concat(frames, how="diagonal_relaxed")
    fitted = fit_experiment(pooled, "global")
    pred = predict_experiment(pooled, fitted, "global")
    return {"models": fitted, "predictions": pred, "metrics": metrics_from_predictions(pred)}
