"""Faster estimators give the same models: one-Gram ridge alpha search = sklearn per-alpha fits; grouped tree walk = sklearn HGB."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from stepml_core.stepmodels.estimators import (
    ALPHA_GRID,
    _ridge_path,
    fit_ridge_log_validated,
    fit_ridge_validated,
    mape_pct,
)


def _data(seed, n=3000, p=12):
    rng = np.random.default_rng(seed)
    X = rng.lognormal(2, 1, (n, p))
    X[:, 3] = 7.0  # a constant column (scale 1 in StandardScaler)
    X[:, 5] = X[:, 4] * 2 + rng.normal(0, 1e-6, n)  # nearly collinear
    y = 500 + X[:, :6] @ rng.uniform(1, 20, 6) + rng.normal(0, 20, n)
    return X, np.abs(y)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ridge_path_matches_sklearn_per_alpha(seed):
    X, y = _data(seed)
    Xv, yv = _data(seed + 10, 500)
    for a, yhat in _ridge_path(X, y, ALPHA_GRID, Xv):
        ref = Pipeline([("s", StandardScaler()), ("r", Ridge(alpha=a))]).fit(X, y).predict(Xv)
        np.testing.assert_allclose(yhat, ref, rtol=1e-8, atol=1e-8 * np.abs(ref).max())


def _old_alpha(X_tr, y_tr, X_va, y_va, log=False):
    best, best_a = np.inf, ALPHA_GRID[0]
    for a in ALPHA_GRID:
        p = Pipeline([("s", StandardScaler()), ("r", Ridge(alpha=a))]).fit(X_tr, np.log(y_tr) if log else y_tr)
        yhat = p.predict(X_va)
        s = mape_pct(y_va, np.exp(yhat) if log else yhat)
        if s < best:
            best, best_a = s, a
    return best_a


@pytest.mark.parametrize("seed", [0, 3])
def test_validated_fits_choose_the_same_alpha_as_before(seed):
    X, y = _data(seed)
    Xv, yv = _data(seed + 20, 800)
    cols = [f"f{i}" for i in range(X.shape[1])]
    m = fit_ridge_validated("r", "t", cols, X, y, Xv, yv)
    assert m.alpha == _old_alpha(X, y, Xv, yv)
    ml = fit_ridge_log_validated("rl", "t", cols, X, y, Xv, yv)
    assert ml["alpha"] == _old_alpha(X, y, Xv, yv, log=True)


@pytest.mark.parametrize("n_rows", [1, 300, 70000])  # all trees at once / groups of trees / one tree at a time
def test_predict_trees_matches_sklearn(n_rows):
    from stepml_core.stepmodels.estimators import fit_hgb_validated, predict_trees

    X, y = _data(5, 4000)
    Xv, yv = _data(6, 1000)
    m = fit_hgb_validated("h", "t", [f"f{i}" for i in range(X.shape[1])], X, y, Xv, yv)
    est = m.pop("_sklearn")
    Xe = _data(7, n_rows)[0]
    Xe[::7, 2] = np.nan  # missing values follow missing_go_to_left
    np.testing.assert_allclose(predict_trees(m, Xe), est.predict(Xe), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n_rows", [32769, 70000])  # the sizes predict_trees sends to the compiled walk
def test_compiled_tree_walk_is_bit_identical_to_the_numpy_walk(n_rows):
    """From 32 k rows predict_trees walks each tree with scikit-learn's compiled predictor: the same sums in the
    same order as the numpy walk's one-tree groups, so every prediction is the same float (stored outputs unchanged)."""
    from stepml_core.stepmodels.estimators import (
        _predict_trees_compiled,
        _predict_trees_walk,
        fit_hgb_validated,
        predict_trees,
    )

    X, y = _data(5, 4000)
    Xv, yv = _data(6, 1000)
    m = fit_hgb_validated("h", "t", [f"f{i}" for i in range(X.shape[1])], X, y, Xv, yv)
    m.pop("_sklearn")
    Xe = _data(8, n_rows)[0]
    Xe[::5, 4] = np.nan
    Xe[1::9, 0] = np.nan
    walk = _predict_trees_walk(m["trees"], Xe, np.full(n_rows, m["baseline"]))
    compiled = _predict_trees_compiled(m["trees"], Xe, np.full(n_rows, m["baseline"]))
    assert np.array_equal(walk, compiled)
    assert np.array_equal(predict_trees(m, Xe), walk)


def test_single_threaded_limits_blas_and_openmp_and_restores_them():
    """estimators.single_threaded (one ThreadpoolController per process) sets every library to one thread inside
    the block and restores the settings after it, as threadpool_limits(1) did."""
    from threadpoolctl import threadpool_info

    from stepml_core.stepmodels.estimators import single_threaded

    before = {d["filepath"]: d["num_threads"] for d in threadpool_info()}
    with single_threaded():
        inside = {d["filepath"]: d["num_threads"] for d in threadpool_info()}
    assert inside and set(inside.values()) == {1}
    assert {d["filepath"]: d["num_threads"] for d in threadpool_info()} == before
    assert {d["internal_api"] for d in threadpool_info()} >= {"openblas", "openmp"}


def test_linear_model_to_dict_equals_asdict():
    """LinearStepModel.to_dict (lists copied, numbers shared) gives dataclasses.asdict's value, in field order."""
    from dataclasses import asdict

    X, y = _data(0)
    Xv, yv = _data(1, 500)
    m = fit_ridge_validated("r", "t", [f"f{i}" for i in range(X.shape[1])], X, y, Xv, yv)
    d = m.to_dict()
    assert d == asdict(m) and list(d) == list(asdict(m))
    assert d["coef"] is not m.coef and d["features"] is not m.features  # a copy: editing it leaves the model alone
