"""Step-time estimators, fitted with scikit-learn and stored as plain JSON (no pickle).

StepML recipe: StandardScaler + Ridge, alpha chosen on the validation block by MAPE
over a log grid 1e-6…1e8 (29 values, half-decade steps; the choices sitting at either end
are counted in the report), then refit on train + valid. Original-study recipe (for
reproducing published numbers): blackbox OLS on train; Ridge alpha = 1 on train.
A fitted model predicts ŷ = intercept + Σ coef_k (x_k − mean_k) / scale_k.

Positive floor (every StepML model, the same rule in `fitted.predict_model` and in the exported
reference predictor): ŷ = max(ŷ, floor_us), floor_us = the smallest positive target value the
model was fitted on, stored in the model. A step time is never predicted ≤ 0 µs nor faster
than the fastest step seen in training. The `*_orig` recipes carry floor_us = None: they exist
to reproduce the published numbers, which were scored on unclamped predictions.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
from sklearn.linear_model import LinearRegression, Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import ThreadpoolController

ALPHA_GRID = tuple(float(a) for a in np.logspace(-6, 8, 29))

_THREADPOOLS: list[ThreadpoolController] = []  # the process's one controller, made on first use


def single_threaded():
    """A context in which BLAS and OpenMP run one thread: threadpoolctl's ``threadpool_limits(1)`` from one
    ThreadpoolController per process. ``threadpool_limits(1)`` builds a new controller, which scans every loaded
    shared library, on each call (2.2 CPU-ms against 0.015; ~90 calls per experiment); the controller is made once, after
    the libraries the fits use (numpy's and scipy's OpenBLAS, scikit-learn's OpenMP) are loaded."""
    if not _THREADPOOLS:
        import scipy.linalg  # noqa: F401 - load the libraries the controller must see before it scans
        import sklearn.ensemble  # noqa: F401

        _THREADPOOLS.append(ThreadpoolController())
    return _THREADPOOLS[0].limit(limits=1)


@dataclass
class LinearStepModel:
    """A fitted linear step-time model in plain numbers."""

    name: str
    target: str
    features: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    alpha: float | None = None
    fitted_on: list[str] = field(default_factory=list)  # split names used for the final fit
    n_fit: int = 0
    recipe: str = "stepml"
    floor_us: float | None = None  # predictions are max(ŷ, floor_us); None: unclamped (original recipes)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """max(ŷ, floor_us), ŷ = linear_score (X as given: callers clean it)."""
        return apply_floor(linear_score(self.to_dict(), np.asarray(X, float)), self.floor_us)

    def to_dict(self) -> dict:
        """The fields as a plain dict, lists copied: dataclasses.asdict's value without its deep copy of every
        number (predict calls it on each prediction)."""
        return {f.name: (list(v) if isinstance(v, list) else v) for f in fields(self) for v in (getattr(self, f.name),)}

    @classmethod
    def from_dict(cls, d: dict) -> "LinearStepModel":
        return cls(**d)


def linear_score(model: dict, X: np.ndarray) -> np.ndarray:
    """ŷ = intercept + Σ_k coef_k (x_k − mean_k) / scale_k (the intercept alone without features)."""
    if not model["features"]:
        return np.full(X.shape[0], model["intercept"])
    return model["intercept"] + ((X - np.asarray(model["mean"])) / np.asarray(model["scale"])) @ np.asarray(
        model["coef"]
    )


def fit_floor_us(y) -> float:
    """The positive floor of a model fitted on targets y (µs): the smallest positive y (1 µs if none)."""
    y = np.asarray(y, float)
    pos = y[np.isfinite(y) & (y > 0)]
    return float(pos.min()) if len(pos) else 1.0


def apply_floor(yhat: np.ndarray, floor_us: float | None) -> np.ndarray:
    """ŷ = max(ŷ, floor_us) (no-op when floor_us is None)."""
    return yhat if floor_us is None else np.maximum(yhat, floor_us)


def clean_matrix(X) -> np.ndarray:
    """inf → NaN → 0, as float64."""
    X = np.asarray(X, dtype=float)
    return np.nan_to_num(X, nan=0.0, posinf=0.0, neginf=0.0)


def mape_pct(y: np.ndarray, yhat: np.ndarray) -> float:
    """100 · mean(|ŷ − y| / y) over rows with y ≠ 0 (the seed's definition)."""
    y, yhat = np.asarray(y, float), np.asarray(yhat, float)
    m = y != 0
    return float(100 * np.mean(np.abs(yhat[m] - y[m]) / np.abs(y[m]))) if m.any() else float("nan")


def _from_pipeline(pipe: Pipeline, name, target, features, alpha, fitted_on, n, recipe) -> LinearStepModel:
    sc, reg = pipe.named_steps["scale"], pipe.named_steps["reg"]
    scale = np.where(sc.scale_ == 0, 1.0, sc.scale_)
    return LinearStepModel(
        name=name,
        target=target,
        features=list(features),
        mean=sc.mean_.tolist(),
        scale=scale.tolist(),
        coef=np.asarray(reg.coef_, float).ravel().tolist(),
        intercept=float(np.asarray(reg.intercept_).ravel()[0]) if np.ndim(reg.intercept_) else float(reg.intercept_),
        alpha=alpha,
        fitted_on=fitted_on,
        n_fit=n,
        recipe=recipe,
    )


def _pipe(reg) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("reg", reg)])


def fit_naive_mean(
    target: str, y_fit: np.ndarray, name: str = "naive_mean", fitted_on=("train", "valid")
) -> LinearStepModel:
    """ŷ = mean of the fit rows (train + valid in the StepML recipe: the rows every other StepML model is refitted on)."""
    return LinearStepModel(
        name=name,
        target=target,
        features=[],
        mean=[],
        scale=[],
        coef=[],
        intercept=float(np.mean(y_fit)),
        fitted_on=list(fitted_on),
        n_fit=len(y_fit),
        recipe="stepml",
        floor_us=fit_floor_us(y_fit),
    )


def fit_ridge_validated(name, target, features, X_tr, y_tr, X_va, y_va, alphas=ALPHA_GRID) -> LinearStepModel:
    """Pick alpha by validation MAPE, refit on train + valid."""
    X_tr, X_va = clean_matrix(X_tr), clean_matrix(X_va)
    best_alpha, best = alphas[0], np.inf
    if len(y_va):
        floor_tr = fit_floor_us(y_tr)
        for a, yhat_va in _ridge_path(X_tr, y_tr, alphas, X_va):
            score = mape_pct(y_va, apply_floor(yhat_va, floor_tr))
            if score < best:
                best, best_alpha = score, a
    X = np.vstack([X_tr, X_va])
    y = np.concatenate([y_tr, y_va])
    with single_threaded():
        pipe = _pipe(Ridge(alpha=best_alpha)).fit(X, y)
    m = _from_pipeline(pipe, name, target, features, best_alpha, ["train", "valid"], len(y), "stepml")
    m.floor_us = fit_floor_us(y)
    return m


def _ridge_path(X, y, alphas, X_eval):
    """(alpha, predictions on X_eval) of StandardScaler + Ridge(alpha) fitted on (X, y), every alpha from one Gram matrix.

    The same arithmetic as sklearn's Ridge cholesky solver (centre the scaled X and y, solve
    (ZᵀZ + αI) c = Zᵀy), but ZᵀZ is formed once instead of once per alpha: the alpha search
    was most of an experiment's fitting time. Single-threaded BLAS (shared cores, small matrices).
    """
    from scipy import linalg

    sc = StandardScaler().fit(X)
    Z = sc.transform(X)
    z_off, y_off = Z.mean(axis=0), float(np.mean(y))
    Zc = Z - z_off
    with single_threaded():
        A, b = Zc.T @ Zc, Zc.T @ (y - y_off)
    Z_eval = sc.transform(X_eval)
    for a in alphas:
        G = A.copy()
        G.flat[:: G.shape[0] + 1] += a
        coef = linalg.solve(G, b, assume_a="pos") if G.size else np.zeros(0)
        intercept = y_off - float(z_off @ coef)
        yield a, Z_eval @ coef + intercept


def fit_ols_original(name, target, features, X_tr, y_tr) -> LinearStepModel:
    """Original recipe blackbox: ordinary least squares with intercept on train only."""
    X_tr = clean_matrix(X_tr)
    reg = LinearRegression().fit(X_tr, y_tr)
    # express as the same scaled form with mean 0, scale 1
    return LinearStepModel(
        name=name,
        target=target,
        features=list(features),
        mean=[0.0] * len(features),
        scale=[1.0] * len(features),
        coef=reg.coef_.tolist(),
        intercept=float(reg.intercept_),
        fitted_on=["train"],
        n_fit=len(y_tr),
        recipe="original",
    )


def fit_ridge_original(name, target, features, X_tr, y_tr) -> LinearStepModel:
    """Original recipe Ridge: StandardScaler on train, Ridge(alpha=1), train only, no validation."""
    pipe = _pipe(Ridge(alpha=1.0)).fit(clean_matrix(X_tr), y_tr)
    return _from_pipeline(pipe, name, target, features, 1.0, ["train"], len(y_tr), "original")


# ------------------------------------------------------------ stronger models ---


def fit_ridge_log_validated(name, target, features, X_tr, y_tr, X_va, y_va, alphas=ALPHA_GRID) -> dict:
    """Ridge on log y (y > 0), alpha by validation MAPE, refit train+valid; ŷ = exp(·) (median back-transform)."""
    X_tr, X_va = clean_matrix(X_tr), clean_matrix(X_va)
    ok_tr, ok_va = y_tr > 0, y_va > 0
    best_alpha, best = alphas[0], np.inf
    if ok_va.any():
        for a, yhat_va in _ridge_path(X_tr[ok_tr], np.log(y_tr[ok_tr]), alphas, X_va[ok_va]):
            s = mape_pct(y_va[ok_va], np.exp(yhat_va))
            if s < best:
                best, best_alpha = s, a
    X, y = np.vstack([X_tr[ok_tr], X_va[ok_va]]), np.concatenate([y_tr[ok_tr], y_va[ok_va]])
    with single_threaded():
        pipe = _pipe(Ridge(alpha=best_alpha)).fit(X, np.log(y))
    m = _from_pipeline(pipe, name, target, features, best_alpha, ["train", "valid"], len(y), "stepml")
    m.floor_us = fit_floor_us(y)
    return {**m.to_dict(), "kind": "log_linear"}


def fit_nnls_basis(name, target, features, X_tr, y_tr, X_va, y_va) -> dict:
    """Non-negative least squares on µs-valued basis terms + intercept, weighted by 1/y (relative error), train+valid."""
    from scipy.optimize import nnls

    X, y = clean_matrix(np.vstack([X_tr, X_va])), np.concatenate([y_tr, y_va])
    ok = y > 0
    X, y = X[ok], y[ok]
    A = np.hstack([X, np.ones((len(y), 1))]) / y[:, None]
    coef, _ = nnls(A, np.ones(len(y)), maxiter=50 * A.shape[1])
    return {
        "name": name,
        "target": target,
        "kind": "linear",
        "features": list(features),
        "mean": [0.0] * len(features),
        "scale": [1.0] * len(features),
        "coef": coef[:-1].tolist(),
        "intercept": float(coef[-1]),
        "alpha": None,
        "fitted_on": ["train", "valid"],
        "n_fit": int(len(y)),
        "recipe": "stepml",
        "floor_us": fit_floor_us(y),
    }


def hgb_to_trees(est) -> dict:
    """A fitted HistGradientBoostingRegressor as plain nodes: leaf [-1, value], split [feature, threshold, left, right, missing_left]."""
    trees = []
    for (pred,) in est._predictors:
        nodes = []
        for nd in pred.nodes:
            if nd["is_leaf"]:
                nodes.append([-1, float(nd["value"])])
            else:
                nodes.append(
                    [
                        int(nd["feature_idx"]),
                        float(nd["num_threshold"]),
                        int(nd["left"]),
                        int(nd["right"]),
                        bool(nd["missing_go_to_left"]),
                    ]
                )
        trees.append(nodes)
    return {"baseline": float(np.ravel(est._baseline_prediction)[0]), "trees": trees}


def predict_trees(model: dict, X: np.ndarray) -> np.ndarray:
    """Vectorized evaluation of exported trees (same rule as the reference predictor), several trees walked at once
    (from 32 k rows one tree at a time, by scikit-learn's compiled walk: the same sums in the same order)."""
    X = np.asarray(X, float)
    out = np.full(X.shape[0], float(model["baseline"]))
    if max(1, PAIRS_PER_WALK // max(X.shape[0], 1)) == 1:
        return _predict_trees_compiled(model["trees"], X, out)
    return _predict_trees_walk(model["trees"], X, out)


def _predict_trees_walk(trees: list, X: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out + the trees' leaf values per row, walked in numpy, trees in groups of about PAIRS_PER_WALK (row, tree)
    pairs (one tree at a time from 32 k rows: then the additions are in tree order)."""
    sizes = np.array([len(t) for t in trees])
    offset = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    flat = [(n, off) for t, off in zip(trees, offset) for n in t]
    feat = np.array([n[0] for n, _ in flat], dtype=np.int64)
    inner = feat >= 0
    thr = np.array([n[1] if n[0] >= 0 else 0.0 for n, _ in flat])
    left = np.array([n[2] + off if n[0] >= 0 else 0 for n, off in flat], dtype=np.int64)
    right = np.array([n[3] + off if n[0] >= 0 else 0 for n, off in flat], dtype=np.int64)
    mleft = np.array([bool(n[4]) if n[0] >= 0 else False for n, _ in flat])
    val = np.array([n[1] if n[0] < 0 else 0.0 for n, _ in flat])
    # walk (row, tree) pairs, dropping pairs as they reach a leaf; trees in groups of about PAIRS_PER_WALK
    # pairs (all trees at once for a few rows; one tree at a time from 32 k rows, which keeps the
    # arrays in cache: 2-3x faster there than all pairs at once)
    n = X.shape[0]
    group = max(1, PAIRS_PER_WALK // max(n, 1))
    for g in range(0, len(trees), group):
        offs = offset[g : g + group]
        row = np.repeat(np.arange(n), len(offs))
        node = np.tile(offs, n)
        while row.size:
            leaf = ~inner[node]
            if leaf.any():
                if len(offs) == 1:  # one tree: each row at most once, plain fancy-index add
                    out[row[leaf]] += val[node[leaf]]
                else:
                    np.add.at(out, row[leaf], val[node[leaf]])
                row, node = row[~leaf], node[~leaf]
                if not row.size:
                    break
            x = X[row, feat[node]]
            go_left = np.where(np.isnan(x), mleft[node], x <= thr[node])
            node = np.where(go_left, left[node], right[node])
    return out


PAIRS_PER_WALK = 1 << 16


def _predict_trees_compiled(trees: list, X: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out + Σ_t leaf value of tree t (t in order), each tree walked by scikit-learn's compiled predictor
    (``_predict_from_raw_data``, one thread) from the plain nodes: the same rule as predict_trees's walk (NaN
    goes to the ``missing_left`` side, else x ≤ threshold goes left) and the same additions in the same order
    as its one-tree-at-a-time groups, so the result is bit-identical to them, 3x faster on 100 k rows
    (tests/test_fast_estimators.py)."""
    try:  # private to scikit-learn (pinned: pyproject.toml); where it moved, the numpy walk gives the same floats
        from sklearn.ensemble._hist_gradient_boosting._predictor import _predict_from_raw_data
        from sklearn.ensemble._hist_gradient_boosting.common import PREDICTOR_RECORD_DTYPE
    except ImportError:
        return _predict_trees_walk(trees, X, out)

    X = np.ascontiguousarray(X, dtype=np.float64)
    no_bitsets = np.zeros((0, 8), np.uint32)  # no categorical splits
    f_idx_map = np.zeros(X.shape[1], np.uint32)
    leaf_values = np.empty(X.shape[0])
    for tree in trees:
        nodes = np.zeros(len(tree), PREDICTOR_RECORD_DTYPE)
        for i, nd in enumerate(tree):
            if nd[0] < 0:
                nodes[i]["is_leaf"], nodes[i]["value"] = 1, nd[1]
            else:
                rec = nodes[i]
                rec["feature_idx"], rec["num_threshold"], rec["left"], rec["right"] = nd[0], nd[1], nd[2], nd[3]
                rec["missing_go_to_left"] = bool(nd[4])
        _predict_from_raw_data(nodes, X, no_bitsets, no_bitsets, f_idx_map, 1, leaf_values)
        out += leaf_values
    return out


def fit_hgb_validated(
    name, target, features, X_tr, y_tr, X_va, y_va, seed: int = 0, max_grid_rows: int = 10000
) -> dict:
    """HistGradientBoosting on log y (31 leaves, learning rate 0.1): the number of iterations is chosen by
    validation MAPE over the stages of one fit on at most max_grid_rows train rows (a seeded subsample; 10,000
    rather than 20,000 moved the choice on the 1× study's pooled folds by ≤ 8 of ~45 iterations and their mean
    test MAPE by < 1 point, for a third less time); then refit on train+valid (a seeded subsample of at most
    30,000 rows for pooled fits).

    Runs single-threaded: OpenMP threads spin-wait and slow down 40× when the cores are
    shared (Dagster's multiprocess executor, other jobs); one thread is also faster on small data.
    """
    with single_threaded():
        return _fit_hgb(name, target, features, X_tr, y_tr, X_va, y_va, seed, max_grid_rows)


HGB_CHUNK, HGB_PATIENCE = 25, 50


def _staged_best_iter(
    est, X, log_y, X_va, y_va, max_iter: int, chunk: int = HGB_CHUNK, patience: int = HGB_PATIENCE
) -> int:
    """The stage (1…max_iter) with the lowest validation MAPE, growing the warm-started ensemble to
    2·patience trees first, then `chunk` trees at a time, and stopping once the best stage is
    `patience` trees behind (the chosen iterations are mostly < 60 of 300: the trees past that were
    grown only to be scanned; one first fit of 2·patience trees saves the warm-start refits, which
    re-bin the data and re-predict every stage). Warm-started trees are the trees of one long fit,
    so the choice equals the full scan's unless the curve improves again after `patience` trees
    without improvement."""
    scores: list[float] = []
    n = 0
    while n < max_iter:
        n = min(max_iter, n + (2 * patience if n == 0 else chunk))
        est.set_params(max_iter=n).fit(X, log_y)
        for k, p in enumerate(est.staged_predict(X_va)):
            if k >= len(scores):
                scores.append(mape_pct(y_va, np.exp(p)))
        if n - (int(np.argmin(scores)) + 1) >= patience:
            break
    return int(np.argmin(scores)) + 1


def _fit_hgb(name, target, features, X_tr, y_tr, X_va, y_va, seed, max_grid_rows, max_fit_rows=30000) -> dict:
    from sklearn.ensemble import HistGradientBoostingRegressor

    X_tr, X_va = clean_matrix(X_tr), clean_matrix(X_va)
    ok_tr, ok_va = y_tr > 0, y_va > 0
    lr, leaves, max_iter = 0.1, 31, 300
    best_iter = 150
    make = lambda it: HistGradientBoostingRegressor(
        max_iter=it, max_leaf_nodes=leaves, learning_rate=lr, early_stopping=False, random_state=seed
    )
    if ok_va.sum() >= 5:
        # one fit (on at most max_grid_rows train rows); choose the number of iterations by validation MAPE over its stages
        Xs, ys = X_tr[ok_tr], y_tr[ok_tr]
        if len(ys) > max_grid_rows:
            keep = np.sort(np.random.default_rng(seed).choice(len(ys), max_grid_rows, replace=False))
            Xs, ys = Xs[keep], ys[keep]
        best_iter = _staged_best_iter(
            make(HGB_CHUNK).set_params(warm_start=True), Xs, np.log(ys), X_va[ok_va], y_va[ok_va], max_iter
        )
    X, y = np.vstack([X_tr[ok_tr], X_va[ok_va]]), np.concatenate([y_tr[ok_tr], y_va[ok_va]])
    n_all = len(y)
    if n_all > max_fit_rows:  # pooled fits: a seeded random subsample keeps the cost bounded
        keep = np.sort(np.random.default_rng(seed).choice(n_all, max_fit_rows, replace=False))
        X, y = X[keep], y[keep]
    est = make(best_iter).fit(X, np.log(y))
    return {
        "name": name,
        "target": target,
        "kind": "trees",
        "rows_available": int(n_all),
        "log_target": True,
        "features": list(features),
        **hgb_to_trees(est),
        "config": {"max_iter": best_iter, "max_leaf_nodes": leaves, "learning_rate": lr},
        "fitted_on": ["train", "valid"],
        "n_fit": int(len(y)),
        "recipe": "stepml",
        "floor_us": fit_floor_us(y),
        "_sklearn": est,
    }
