"""Exported JSON models predict what the fitted scikit-learn objects predict (to 1e-9 relative)."""

import json

import numpy as np
import pytest

from stepml_core.catalog import gpu_spec, model_spec
from stepml_core.features.step_features import RequestInBatch, batch_features, feature_columns
from stepml_core.stepmodels.estimators import (
    fit_hgb_validated,
    fit_ridge_log_validated,
    fit_ridge_validated,
)
from stepml_core.stepmodels.fitted import predict_model
from stepml_core.stepmodels.json_export import export_model
from stepml_core.stepmodels.reference_predictor import predict_step_time


def _batches(rng, n):
    out = []
    for _ in range(n):
        reqs = []
        for _ in range(int(rng.integers(1, 128))):
            p = int(rng.integers(100, 1200))
            if rng.random() < 0.1:
                c = int(rng.integers(0, p))
                reqs.append(RequestInBatch(c, min(p - c, 400), p))
            else:
                reqs.append(RequestInBatch(int(rng.integers(p, p + 250)), 1, p))
        out.append(reqs)
    return out


@pytest.fixture(scope="module")
def training():
    rng = np.random.default_rng(3)
    m, g = model_spec("llama-2-70b"), gpu_spec()
    batches = _batches(rng, 400)
    feats = [batch_features(b, m, g, 4) for b in batches]
    X = np.array([[f[c] for c in feature_columns()] for f in feats])
    y = (
        9000
        + 0.002 * X[:, feature_columns().index("total_flops_estimate")] / 1e6
        + 3 * X[:, feature_columns().index("kv_sum")] / 100
    )
    y = y * rng.lognormal(0, 0.03, len(y))
    return batches, feats, X, y


@pytest.mark.parametrize("kind", ["ridge", "ridge_log", "hgb"])
def test_export_matches_sklearn(training, kind):
    batches, feats, X, y = training
    cols = feature_columns()
    args = ("m", "cycle_us", cols, X[:250], y[:250], X[250:320], y[250:320])
    if kind == "ridge":
        fitted = fit_ridge_validated(*args)
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        ref = make_pipeline(StandardScaler(), Ridge(alpha=fitted.alpha)).fit(
            np.vstack([X[:250], X[250:320]]), np.concatenate([y[:250], y[250:320]])
        )
        sk = ref.predict(X[320:])
        fitted = {**fitted.to_dict(), "kind": "linear"}
    elif kind == "ridge_log":
        fitted = fit_ridge_log_validated(*args)
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        ref = make_pipeline(StandardScaler(), Ridge(alpha=fitted["alpha"])).fit(
            np.vstack([X[:250], X[250:320]]), np.log(np.concatenate([y[:250], y[250:320]]))
        )
        sk = np.exp(ref.predict(X[320:]))
    else:
        fitted = fit_hgb_validated(*args)
        sk = np.exp(fitted.pop("_sklearn").predict(X[320:]))
    exported = json.loads(
        json.dumps(export_model(fitted, model="llama-2-70b", tp=4, data_versions={"r": "abc"}, floor_us=0.0))
    )
    via_json = [
        predict_step_time(
            [(r.progress_index, r.new_tokens, r.prompt_len) for r in b],
            exported,
            exported["model_spec"],
            exported["gpu_spec"],
            4,
        )
        for b in batches[320:]
    ]
    np.testing.assert_allclose(via_json, sk, rtol=1e-9)
    np.testing.assert_allclose(predict_model(fitted, X[320:]), sk, rtol=1e-9)
    assert exported["training_data"]["fingerprint"] and exported["feature_units"]["kv_mean"] == "tokens"


def test_compiled_tree_walk_equals_the_format_rule():
    """_trees_sum (compiled walk) = Σ _tree_value over random trees and rows, NaN features included."""
    import math
    import random

    from stepml_core.stepmodels.reference_predictor import _tree_value, _trees_sum

    rnd = random.Random(5)

    def tree(depth=0):  # nodes in pre-order: [feat, thr, left, right, missing_left] / [-1, value]
        nodes = []

        def grow(d):
            i = len(nodes)
            if d >= 4 or rnd.random() < 0.2:
                nodes.append([-1, rnd.uniform(-1, 1)])
                return i
            nodes.append(None)
            left = grow(d + 1)
            right = grow(d + 1)
            nodes[i] = [rnd.randrange(3), rnd.uniform(-1, 1), left, right, rnd.random() < 0.5]
            return i

        grow(depth)
        return nodes

    trees = [tree() for _ in range(30)]
    for _ in range(200):
        x = [math.nan if rnd.random() < 0.2 else rnd.uniform(-1.5, 1.5) for _ in range(3)]
        s = 0.25
        for t in trees:
            s += _tree_value(t, x)
        assert _trees_sum(trees, x, 0.25) == s


def test_the_simulators_per_step_predictor_gives_the_reference_predictors_floats():
    """reference_predictor.feature_predictor (the model's numbers read once; what a replay calls per step) returns
    exactly predict_from_features' float for the linear kinds, with and without a floor, and for trees."""
    import random

    from stepml_core.stepmodels.reference_predictor import feature_predictor, predict_from_features

    rng = random.Random(7)
    names = ["a", "b", "c"]
    for kind, floor in (("linear", None), ("linear", 50.0), ("log_linear", 1.0), ("log_linear", None)):
        exp = {
            "kind": kind,
            "features": names,
            "intercept": rng.uniform(-5, 5),
            "mean": [rng.uniform(-3, 3) for _ in names],
            "scale": [rng.uniform(0.1, 3) for _ in names],
            "coef": [rng.uniform(-2, 2) / (10 if kind == "log_linear" else 1) for _ in names],
            "smearing": 1.07,
            "floor_us": floor,
        }
        fast = feature_predictor(exp)
        for _ in range(200):
            f = {k: rng.uniform(0, 4000) for k in names}
            assert fast(f) == predict_from_features(f, exp)
    trees = {
        "kind": "trees",
        "features": names,
        "baseline": 3.0,
        "trees": [[[0, 1.5, 1, 2, True], [-1, 1.0], [-1, 2.0]]],
    }
    assert feature_predictor(trees)({"a": 1.0, "b": 0, "c": 0}) == predict_from_features(
        {"a": 1.0, "b": 0, "c": 0}, trees
    )
