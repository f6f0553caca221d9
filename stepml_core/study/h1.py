"""The H1 study on feature matrices: models, predictions, metrics, verdict (pure functions).

Models: stepml_core.stepmodels.recipes, one class per model registered by name (naive_mean, blackbox_2f,
ridge_30f, the original recipes blackbox_ols_orig and ridge_30f_orig, then ridge_log_30f,
nnls_physics, hgb_30f), each fitted per target and per scope by `fit_models`.
The H1 comparison (naive_mean, blackbox_2f, ridge_30f) is like for like: the same fit rows
(train + valid), the same positive floor on predictions (estimators.apply_floor), scored on test.
Scopes: per_experiment (fit on the experiment's own blocks) and pooled scopes (global, per
model, leave-one-out), scored on each experiment's slice. The verdict is in stepml_core.study.verdict.
"""

# long module: the per-run and pooled fits, their scores, the ablation and the request context share the matrix helpers
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import polars as pl

from stepml_core.catalog import gpu_spec, model_spec
from stepml_core.features.step_features import (
    FEATURE_GROUPS,
    feature_columns,
    feature_group_columns,
    original_study_features,
    snapshot_aggregates,
    step_table_features,
)
from stepml_core.stepmodels.estimators import fit_ridge_validated
from stepml_core.stepmodels.fitted import predict_model
from stepml_core.stepmodels.recipes import REGISTRY, names_with
from stepml_core.study.verdict import H1_MODEL, REFUTE_ABOVE_PCT, SUPPORT_BELOW_PCT, h1_verdict  # noqa: F401  (re-exported)
from stepml_core.tables.steps import TARGETS

MODELS = REGISTRY  # {name: StepModel}, in fitting order (stepml_core.stepmodels.recipes)
METRIC_COLUMNS = [
    "experiment_id",
    "source",
    "target",
    "model",
    "scope",
    "split",
    "n",
    "mape_pct",
    "median_ape_pct",
    "p90_ape_pct",
    "pearson_r",
    "mspe_pct",
]


def build_feature_matrix(
    steps: pl.DataFrame,
    snapshots: pl.DataFrame | None,
    *,
    model: str,
    tp: int,
    experiment_id: str,
    source: str,
    request_aggregates: pl.DataFrame | None = None,
    request_source: str = "snapshot",
) -> pl.DataFrame:
    """Seed features + original-study features + targets, one row per kept step."""
    spec, gpu = model_spec(model), gpu_spec()
    if request_aggregates is None and snapshots is not None and snapshots.height:
        request_aggregates = snapshot_aggregates(snapshots)
    seed = step_table_features(
        steps, spec, gpu, tp, request_aggregates=request_aggregates, request_source=request_source
    )
    orig = original_study_features(steps, spec, tp)
    keep = [
        "step.id",
        "step.ts_start_ns",
        "batch.prefill_tokens",
        "batch.decode_tokens",
        *TARGETS,
        *[c for c in ("cycle_gap_us", "cycle_excluded") if c in steps.columns],
    ]  # the cycle rule's inputs, for its check
    return (
        steps.select(keep)
        .join(seed, on="step.id")
        .join(orig, on="step.id")
        .with_columns(experiment_id=pl.lit(experiment_id), source=pl.lit(source))
        .sort("step.id")
    )


def _target_rows(fm: pl.DataFrame, target: str, splits: tuple[str, ...]) -> pl.DataFrame:
    """The rows of `splits` with a finite `target`: what a fit or a test of `target` reads."""
    return fm.filter(pl.col("split").is_in(list(splits)) & pl.col(target).is_not_null() & pl.col(target).is_finite())


def _xy_of(rows: pl.DataFrame, features: list[str], target: str):
    """(X, y) of rows from _target_rows: the feature columns in order, the target as float."""
    X = rows.select(features).to_numpy() if features else np.zeros((rows.height, 0))
    return X, rows[target].to_numpy().astype(float)


def fit_models(
    fm: pl.DataFrame, target: str, scope: str, names: tuple[str, ...] | None = None, seed: int = 0
) -> list[dict]:
    """Fit the registered models (or `names`) for one target on a matrix with a `split` column; plain dicts out."""
    out = []
    train, valid = (_target_rows(fm, target, (s,)) for s in ("train", "valid"))  # once per target, not per model
    for name in names or tuple(MODELS):
        model = MODELS[name]
        feats = model.feature_columns()
        X_tr, y_tr = _xy_of(train, feats, target)
        if len(y_tr) < 2:
            continue
        X_va, y_va = _xy_of(valid, feats, target)
        m = model.fit(target, X_tr, y_tr, X_va, y_va, seed=seed)
        m.setdefault("kind", "linear")
        m["name"], m["scope"] = name, scope
        out.append(m)
    return out


PREDICTION_SCHEMA = {
    "experiment_id": pl.Utf8,
    "source": pl.Utf8,
    "step.id": pl.Int64,
    "split": pl.Utf8,
    "load_stage": pl.Int64,
    "kv_mean": pl.Float64,
    "batch_size": pl.Float64,
    "target": pl.Utf8,
    "model": pl.Utf8,
    "scope": pl.Utf8,
    "y": pl.Float64,
    "y_pred": pl.Float64,
    "at_floor": pl.Boolean,
}


def predict(fm: pl.DataFrame, models: list[dict], scope: str) -> pl.DataFrame:
    """Long table: experiment_id, source, step.id, split, target, model, scope, y, y_pred (rows with a target);
    at_floor: the prediction was raised to the model's positive floor (estimators.apply_floor)."""
    parts = []
    for m in models:
        rows = fm.filter(pl.col(m["target"]).is_not_null() & pl.col(m["target"]).is_finite())
        if rows.height == 0:
            continue
        X = rows.select(m["features"]).to_numpy() if m["features"] else np.zeros((rows.height, 0))
        yhat = predict_model(m, X)
        parts.append(
            rows.select(
                "experiment_id",
                "source",
                "step.id",
                "split",
                "load_stage",
                "kv_mean",
                batch_size=pl.col("num_prefill_reqs") + pl.col("num_decode_reqs"),
            ).with_columns(
                target=pl.lit(m["target"]),
                model=pl.lit(m["name"]),
                scope=pl.lit(scope),
                y=rows[m["target"]].cast(pl.Float64),
                y_pred=pl.Series(yhat, dtype=pl.Float64),
                at_floor=pl.Series(
                    yhat <= m["floor_us"] if m.get("floor_us") is not None else np.zeros(len(yhat), bool)
                ),
            )
        )
    return pl.concat(parts) if parts else pl.DataFrame(schema=PREDICTION_SCHEMA)  # an empty run still has the columns


def metrics_from_predictions(pred: pl.DataFrame) -> pl.DataFrame:
    """n, MAPE, median/p90 APE, Pearson r, MSPE per experiment × target × model × scope × split.

    APE over rows with y ≠ 0; MAPE = 100·mean(|ŷ−y|/y); MSPE = 100·mean((ŷ−y)/y) (signed).
    """
    keys = ["experiment_id", "source", "target", "model", "scope", "split"]
    p = pred.filter(pl.col("y") != 0).with_columns(
        ape=100 * (pl.col("y_pred") - pl.col("y")).abs() / pl.col("y").abs(),
        spe=100 * (pl.col("y_pred") - pl.col("y")) / pl.col("y").abs(),
    )
    m = p.group_by(keys).agg(
        n=pl.len(),
        mape_pct=pl.col("ape").mean(),
        median_ape_pct=pl.col("ape").median(),
        p90_ape_pct=pl.col("ape").quantile(0.9, "linear"),
        pearson_r=pl.corr("y", "y_pred"),
        mspe_pct=pl.col("spe").mean(),
    )
    return m.select(METRIC_COLUMNS).sort(keys)


def with_split(fm: pl.DataFrame, split: pl.DataFrame) -> pl.DataFrame:
    """Attach split and load_stage columns to a feature matrix."""
    return fm.join(split.select("step.id", "split", "load_stage"), on="step.id", how="inner")


def fit_experiment(fm_split: pl.DataFrame, scope: str = "per_experiment") -> dict[str, list[dict]]:
    """{target: [fitted model dicts]} for one matrix with splits (per experiment or pooled)."""
    return {t: fit_models(fm_split, t, scope) for t in TARGETS}


def predict_experiment(
    fm_split: pl.DataFrame, fitted: dict[str, list[dict]], scope: str = "per_experiment"
) -> pl.DataFrame:
    return predict(fm_split, [d for t in TARGETS for d in fitted.get(t, [])], scope)


def _run_attr(experiment_id: str, attr: str) -> str:
    from stepml_core.runs.folders import parse_run_id

    r = parse_run_id(experiment_id)
    return r.model if attr == "model" else r.workload


def pooled_folds(experiments: list[str], scope: str) -> list[tuple[str, list[str], list[str]]]:
    """(group, train experiments, scored experiments) for a pooled scope.

    global: all on all; per_model: each model's runs on themselves; leave_one_model_out /
    leave_one_workload_out: all other models' (workloads') runs → the held-out ones.
    """
    if scope == "global":
        return [("all", experiments, experiments)]
    attr = "model" if scope in ("per_model", "leave_one_model_out") else "workload"
    groups = sorted({_run_attr(e, attr) for e in experiments})
    folds = []
    for g in groups:
        inside = [e for e in experiments if _run_attr(e, attr) == g]
        outside = [e for e in experiments if _run_attr(e, attr) != g]
        if scope == "per_model":
            folds.append((g, inside, inside))
        elif outside:
            folds.append((g, outside, inside))
    return folds


def fit_pooled_sets(
    matrices: dict[str, pl.DataFrame],
    sets: dict[str, tuple[tuple[str, ...], tuple[str, ...] | None]],
    seed: int = 0,
    threads: int = 1,
    caches: "dict[str, FoldCache] | None" = None,
    score: bool = True,
) -> dict[str, dict]:
    """Several sets of pooled fits ({set: (scopes, model names)}) over one pool of folds.

    Every fold (scope, group) is fitted on its training experiments and scored on its scored ones
    (metrics on all splits; predictions kept for the test split only, what the verdict and plots
    read — all-split predictions of every pooled model grow with the study and are reduced to
    metrics one model at a time). Folds run in `threads` threads, largest training set first
    (scikit-learn, numpy and polars release the GIL; each fit stays single-threaded inside);
    results are assembled in fold order, so any thread count gives the same output. With
    `caches`, a fold whose training matrices, model names, seed and code are unchanged reuses its
    stored fit (one new run leaves most per-model and leave-one-out folds untouched); scoring
    always runs on the current matrices. score=False only fills the caches (fits missing folds; no
    scoring, no pruning): a caller can fit ahead while other work runs.
    """
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    exps = sorted(e for e, m in matrices.items() if m.height)
    jobs = _fold_jobs(
        sets, exps, {e: matrix_fingerprint(matrices[e]) for e in exps} if caches else {}, seed, bool(caches)
    )
    rows = {e: matrices[e].height for e in exps}
    cached = [bool(caches) and caches.get(j.set) is not None and caches[j.set].has(j.key) for j in jobs]
    # folds to fit first, largest training set first, reused folds (scoring only) last: the threads end together
    order = sorted(range(len(jobs)), key=lambda i: (cached[i], -sum(rows[e] for e in jobs[i].train)))
    run = functools.partial(_run_fold, matrices=matrices, caches=caches, seed=seed, score=score)
    with threadpool_limits(1):  # set once, outside the threads: nested limits inside threads would race
        if threads > 1 and len(jobs) > 1:
            with ThreadPoolExecutor(threads) as pool:
                done = dict(zip(order, pool.map(run, [jobs[i] for i in order])))
        else:
            done = {i: run(jobs[i]) for i in order}
    return {name: _collect_set(name, jobs, done, caches, score) for name in sets}


class _FoldJob(NamedTuple):
    set: str  # the pooled set (asset) the fold belongs to
    scope: str
    group: str
    train: list[str]  # experiments it is fitted on
    scored: list[str]  # experiments it is scored on
    names: tuple[str, ...] | None  # model names (None: every registered model)
    key: str | None  # fold cache key (None without caches)


def _fold_jobs(sets: dict, exps: list[str], prints: dict[str, str], seed: int, keyed: bool) -> list[_FoldJob]:
    jobs = []
    for name, (scopes, names) in sets.items():
        for scope in scopes:
            for group, train_exps, score_exps in pooled_folds(exps, scope):
                key = fold_key(scope, group, [prints[e] for e in train_exps], names, seed) if keyed else None
                jobs.append(_FoldJob(name, scope, group, train_exps, score_exps, names, key))
    return jobs


def _run_fold(job: _FoldJob, *, matrices: dict[str, pl.DataFrame], caches, seed: int, score: bool):
    """(fitted {target: [models]}, metrics parts, test-prediction parts, reused) of one fold."""
    cache = caches.get(job.set) if caches else None
    if not score and cache is not None and cache.has(job.key):
        return None, [], [], True  # fitting ahead: a stored fold needs no reading
    fitted = cache.get(job.key) if cache is not None else None
    reused = fitted is not None
    if fitted is None:
        train = pl.concat([matrices[e] for e in job.train], how="diagonal_relaxed")
        fitted = {t: fit_models(train, t, job.scope, job.names, seed) for t in TARGETS}
        del train
        if cache is not None:
            cache.put(job.key, fitted)
    mets, preds = [], []
    if not score:
        return fitted, mets, preds, reused
    scored = pl.concat([matrices[e] for e in job.scored], how="diagonal_relaxed")
    for m in (d for t in TARGETS for d in fitted.get(t, [])):  # one model at a time: 1 row per step, not 16
        p = predict(scored, [m], job.scope)
        if p.height:
            mets.append(metrics_from_predictions(p))
            preds.append(p.filter(pl.col("split") == "test"))
    return fitted, mets, preds, reused


def _collect_set(name: str, jobs: list[_FoldJob], done: dict, caches, score: bool) -> dict:
    """One pooled set's result, assembled in fold order: {models, predictions, metrics, folds}."""
    models, preds, mets, reused, total = {}, [], [], 0, 0
    for i, job in enumerate(jobs):
        if job.set != name:
            continue
        fitted, m, p, r = done[i]
        models.setdefault(job.scope, {})[job.group] = fitted
        mets += m
        preds += p
        reused, total = reused + r, total + 1
    if score and caches and caches.get(name) is not None:
        caches[name].keep_only([j.key for j in jobs if j.set == name])
    pred = pl.concat(preds, how="diagonal_relaxed") if preds else pl.DataFrame()
    met = (
        pl.concat(mets, how="diagonal_relaxed").sort(["experiment_id", "source", "target", "model", "scope", "split"])
        if mets
        else pl.DataFrame(schema={c: pl.Utf8 for c in METRIC_COLUMNS})
    )
    return {"models": models, "predictions": pred, "metrics": met, "folds": {"total": total, "reused": reused}}


def matrix_fingerprint(fm: pl.DataFrame) -> str:
    """Content digest of a feature matrix with splits (column names + every row), for the fold cache."""
    import hashlib

    fm = fm.sort("step.id") if "step.id" in fm.columns else fm
    h = hashlib.sha256(",".join(fm.columns).encode())
    h.update(fm.hash_rows(seed=0).to_numpy().tobytes())
    return h.hexdigest()


FIT_CODE = ("study", "stepmodels", "features")  # the packages whose source decides a pooled fit


def fold_key(scope: str, group: str, train_prints: list[str], names, seed: int) -> str:
    from stepml_core.fit_cache import content_key

    return content_key(FIT_CODE, [scope, group, ",".join(names or MODELS), str(seed), *sorted(train_prints)])


class FoldCache:
    """Fitted pooled folds as JSON files in a folder, keyed by fold_key (stepml_core.fit_cache)."""

    def __init__(self, folder):
        from stepml_core.fit_cache import FitCache

        self._cache = FitCache(folder, default=json_default)
        self.folder = self._cache.folder

    def has(self, key: str) -> bool:
        return self._cache.has(key)

    def get(self, key: str):
        return self._cache.get_json(key)

    def put(self, key: str, fitted: dict) -> None:
        self._cache.put_json(key, fitted)

    def keep_only(self, keys: list[str]) -> None:
        self._cache.keep_only(keys)


def json_default(o):
    """json.dumps default for fitted models: numpy scalars and arrays, sets and tuples; anything else is an error."""
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON: {type(o)}")


POOLED_SETS = {  # study asset: (scopes, the recipes' role that picks the models; None = every registered model)
    "global_models": (("global", "per_model"), None),
    "generalization": (("leave_one_model_out", "leave_one_workload_out"), "generalization"),
}


def pooled_sets() -> dict[str, tuple[tuple[str, ...], tuple[str, ...] | None]]:
    """POOLED_SETS with each role read from the registry: {set: (scopes, model names; None = every registered)}."""
    return {k: (scopes, names_with(role) if role else None) for k, (scopes, role) in POOLED_SETS.items()}


def fit_study_pooled(
    matrices: dict[str, pl.DataFrame],
    seed: int = 0,
    threads: int = 1,
    caches: dict[str, FoldCache] | None = None,
    score: bool = True,
) -> dict[str, dict]:
    """{"global_models": global and per-model fits, "generalization": leave-one-model/workload-out folds}, one pool of folds.
    No matrices (a study of request logs only): empty results with the usual columns."""
    if not matrices:
        return {
            name: {
                "models": {},
                "predictions": pl.DataFrame(schema=PREDICTION_SCHEMA),
                "metrics": pl.DataFrame(schema={c: pl.Utf8 for c in METRIC_COLUMNS}),
                "folds": {"total": 0, "reused": 0},
            }
            for name in POOLED_SETS
        }
    return fit_pooled_sets(matrices, pooled_sets(), seed, threads, caches, score)


def feature_group_ablation(
    fm_split: pl.DataFrame, model: str = "ridge_30f", *, reps: int = 400, seed: int = 0
) -> pl.DataFrame:
    """Test MAPE of `model` with all 30 features, without each group, and with only that group.

    change_se_pct: circular block bootstrap standard error of the change (without − all) over the
    test rows, so that the report calls a group's effect only where it exceeds that noise.
    """
    from stepml_core.study.stats import bootstrap_means

    all_cols = feature_columns()
    rows = []
    exp = fm_split["experiment_id"][0] if fm_split.height else ""
    for target in TARGETS:
        train, valid, test = (_target_rows(fm_split, target, (s,)) for s in ("train", "valid", "test"))

        def test_ape(cols):
            X_tr, y_tr = _xy_of(train, cols, target)
            X_va, y_va = _xy_of(valid, cols, target)
            X_te, y_te = _xy_of(test, cols, target)
            ok = y_te != 0
            if len(y_tr) < 2 or not ok.any():
                return None
            m = fit_ridge_validated(model, target, cols, X_tr, y_tr, X_va, y_va)
            yhat = m.predict(np.nan_to_num(X_te, nan=0.0, posinf=0.0, neginf=0.0))  # floored at m.floor_us
            return 100 * np.abs(yhat[ok] - y_te[ok]) / np.abs(y_te[ok])

        full = test_ape(all_cols)
        for i, group in enumerate(FEATURE_GROUPS):
            gcols = feature_group_columns(group)
            without, only = test_ape([c for c in all_cols if c not in gcols]), test_ape(gcols)
            se = None
            if full is not None and without is not None and len(full) >= 2:
                se = float(np.std(bootstrap_means(without - full, reps, seed + i), ddof=1))
            rows.append(
                {
                    "experiment_id": exp,
                    "target": target,
                    "model": model,
                    "group": group,
                    "mape_all_pct": float(full.mean()) if full is not None else None,
                    "mape_without_pct": float(without.mean()) if without is not None else None,
                    "mape_only_pct": float(only.mean()) if only is not None else None,
                    "change_se_pct": se,
                }
            )
    return pl.DataFrame(
        rows,
        schema={
            "experiment_id": pl.Utf8,
            "target": pl.Utf8,
            "model": pl.Utf8,
            "group": pl.Utf8,
            "mape_all_pct": pl.Float64,
            "mape_without_pct": pl.Float64,
            "mape_only_pct": pl.Float64,
            "change_se_pct": pl.Float64,
        },
    )


# ------------------------------------------------------------- per-request context ---


def request_context(
    steps: pl.DataFrame, journey: pl.DataFrame, snaps: pl.DataFrame, max_num_batched_tokens: int = 2048
) -> dict:
    """Every step's batch reconstructed from journey events, its per-step inputs and the agreement checks.

    Returns {"batches", "step_inputs", "agreement"}; empty tables when the run has no journey events.
    """
    from stepml_core.study.e2e import compare_step_table, step_inputs
    from stepml_core.tables.batch_checks import batch_summary_counts, compare_with_batch_summary, compare_with_snapshots
    from stepml_core.tables.reconstruct import reconstruct

    if journey.height == 0:
        return {
            "batches": pl.DataFrame(),
            "step_inputs": pl.DataFrame(),
            "agreement": {"available": False, "why": "no journey events in this run (BATCH_SUMMARY-only traces)"},
        }
    steps_ok = steps.filter(pl.col("parse_issue").is_null()) if "parse_issue" in steps.columns else steps
    rec = reconstruct(journey, steps=steps_ok, snapshots=snaps, max_num_batched_tokens=max_num_batched_tokens)
    counts = batch_summary_counts(rec.batches)  # once: the step table and the BATCH_SUMMARY check both read it
    table = step_inputs(rec.batches, journey, steps=steps_ok, counts=counts)
    agreement = {
        "available": True,
        "pairs": rec.batches.height,
        "steps": table.height,
        "snapshots": compare_with_snapshots(rec.batches, snaps, steps=steps_ok) if snaps.height else None,
        "batch_summary": compare_with_batch_summary(rec.batches, steps_ok, counts=counts) if steps_ok.height else None,
        "step_table": compare_step_table(table, steps_ok) if steps_ok.height else None,
        "diagnostics": rec.diagnostics,
    }
    return {"batches": rec.batches, "step_inputs": table, "agreement": agreement}


def journey_aggregates(step_inputs: pl.DataFrame) -> pl.DataFrame | None:
    """The request-aggregate columns of request_context()'s step_inputs (for step_table_features)."""
    if step_inputs is None or step_inputs.height == 0:
        return None
    cols = [
        "step.id",
        "snap_prefill_tokens",
        "snap_decode_tokens",
        "snap_num_prefill_reqs",
        "snap_num_decode_reqs",
        "kv_mean",
        "kv_max",
        "kv_min",
        "kv_std",
        "kv_sum",
        "prefill_attn_pairs",
        "decode_attn_pairs",
        "prefill_context_tokens",
        "decode_context_tokens",
        "num_logit_seqs",
    ]
    return step_inputs.select(cols)


def e2e_fidelity_for_models(
    journey: pl.DataFrame,
    context: dict,
    fitted: dict,
    *,
    model: str,
    tp: int,
    experiment_id: str,
    names: tuple[str, ...] | None = None,
) -> dict:
    """Teacher-forced E2E: each cycle_us model predicts every step; sums per request vs observed TTFT/decode/E2E.
    names: the models checked (default: the recipes with the teacher_forced_e2e role)."""
    from stepml_core.study.e2e import e2e_fidelity, scheduled_counts_of
    from stepml_core.tables.journeys import journey_episodes

    table = context["step_inputs"]
    if table.height == 0:
        return {"summary": pl.DataFrame(), "per_request": pl.DataFrame()}
    spec, gpu = model_spec(model), gpu_spec()
    feats = step_table_features(
        table, spec, gpu, tp, request_aggregates=journey_aggregates(table), request_source="journey"
    )
    rows, per_req = [], []
    episodes, counts = (
        journey_episodes(journey, output_lag=1)[1],
        scheduled_counts_of(context["batches"]),
    )  # once, not per model
    names = names_with("teacher_forced_e2e") if names is None else names
    for m in fitted.get("cycle_us", []):
        if m["name"] not in names:
            continue
        X = feats.select(m["features"]).to_numpy() if m["features"] else np.zeros((feats.height, 0))
        cyc = predict_model(m, X)
        res = e2e_fidelity(
            context["batches"],
            journey,
            cyc,
            table=table,
            experiment_id=experiment_id,
            episodes=episodes,
            scheduled_counts=counts,
        )
        for metric, s in res.summary.items():
            if isinstance(s, dict) and "n" in s:
                rows.append({"experiment_id": experiment_id, "model": m["name"], "metric": metric, **s})
        keep = [c for c in res.per_request.columns if c.startswith(("obs_", "pred_"))]
        per_req.append(
            res.per_request.select(keep).with_columns(experiment_id=pl.lit(experiment_id), model=pl.lit(m["name"]))
        )
    return {
        "summary": pl.DataFrame(rows) if rows else pl.DataFrame(),
        "per_request": pl.concat(per_req, how="diagonal_relaxed") if per_req else pl.DataFrame(),
    }
