"""The step-model registry: every model is one class; fitting and predicting go through it."""

import numpy as np
import polars as pl
import pytest

from stepml_core.stepmodels import recipes as models
from stepml_core.stepmodels.estimators import LinearStepModel
from stepml_core.stepmodels.fitted import KINDS, predict_model
from stepml_core.study import h1 as study


def _matrix(n=60, seed=0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    P, D = rng.integers(0, 2048, n).astype(float), rng.integers(1, 128, n).astype(float)
    y = 2000 + 3 * P + 40 * D + rng.normal(0, 50, n)
    split = np.array(["train"] * (n * 3 // 5) + ["valid"] * (n // 5) + ["test"] * (n - n * 3 // 5 - n // 5))
    return pl.DataFrame(
        {
            "experiment_id": ["e"] * n,
            "source": ["synthetic"] * n,
            "step.id": np.arange(n),
            "split": split,
            "load_stage": [0] * n,
            "kv_mean": [0.0] * n,
            "num_prefill_reqs": [1.0] * n,
            "num_decode_reqs": D,
            "prefill_tokens": P,
            "decode_tokens": D,
            "cycle_us": y,
        }
    )


def test_the_registry_holds_the_studys_models_in_fitting_order():
    assert list(models.REGISTRY) == [
        "naive_mean",
        "blackbox_2f",
        "ridge_30f",
        "blackbox_ols_orig",
        "ridge_30f_orig",
        "ridge_log_30f",
        "nnls_physics",
        "hgb_30f",
    ]
    assert study.MODELS is models.REGISTRY
    for name, m in models.REGISTRY.items():
        assert m.name == name and m.recipe in ("stepml", "original")
    assert models.REGISTRY["blackbox_2f"].feature_columns() == ["prefill_tokens", "decode_tokens"]
    assert len(models.REGISTRY["ridge_30f"].feature_columns()) == 33  # 30 features, model_id one-hot over 4 models


def test_a_new_model_is_one_class(monkeypatch):
    class Median(models.Recipe):
        """ŷ = median of the train + valid targets."""

        name, recipe, features = "median", "stepml", ()

        def fit(self, target, X_tr, y_tr, X_va, y_va, *, seed=0):
            y = np.concatenate([y_tr, y_va])
            return {
                "target": target,
                "kind": "linear",
                "features": [],
                "intercept": float(np.median(y)),
                "floor_us": float(y.min()),
                "recipe": self.recipe,
            }

    monkeypatch.setitem(models.REGISTRY, "median", Median())
    fm = _matrix()
    assert list(study.MODELS)[-1] == "median"  # fit_models fits every registered model by default
    fitted = {m["name"]: m for m in study.fit_models(fm, "cycle_us", "per_experiment", ("blackbox_2f", "median"))}
    assert "median" in fitted and fitted["median"]["scope"] == "per_experiment"
    pred = study.predict(fm, [fitted["median"]], "per_experiment")
    assert pred["y_pred"].n_unique() == 1 and pred["model"].unique().to_list() == ["median"]


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="registered twice"):

        @models.register
        class Again(models.NaiveMean):
            pass


def test_one_linear_rule_for_the_dataclass_and_the_stored_dict():
    fm = _matrix(seed=3)
    m = [d for d in study.fit_models(fm, "cycle_us", "per_experiment", ("blackbox_2f",))][0]
    X = fm.select(m["features"]).to_numpy()
    obj = LinearStepModel(**{k: v for k, v in m.items() if k not in ("kind", "scope")})
    assert np.array_equal(obj.predict(X), predict_model(m, X))
    assert set(KINDS) == {"linear", "log_linear", "trees"}
    with pytest.raises(ValueError, match="unknown fitted step-model kind"):
        predict_model({**m, "kind": "unknown"}, X)


def test_the_roles_give_the_lists_the_study_used_to_keep_by_hand():
    """Each list of model names is read from the recipes' roles; these are the lists the study kept before."""
    assert models.replayed_names("real") == GENERALIZATION
    assert models.replayed_names("synthetic") == ("blackbox_2f", "ridge_30f")
    assert [n for n, r in models.REGISTRY.items() if r.replay_in_blis_form] == ["blackbox_2f"]
    assert models.names_with("generalization") == GENERALIZATION
    assert models.names_with("h1_trio") == ("naive_mean", "blackbox_2f", "ridge_30f")
    assert models.names_with("teacher_forced_e2e") == (
        "naive_mean",
        "blackbox_2f",
        "ridge_30f",
        "nnls_physics",
        "hgb_30f",
    )
    assert models.simplicity_order() == [
        "naive_mean",
        "blackbox_2f",
        "nnls_physics",
        "ridge_30f",
        "ridge_log_30f",
        "hgb_30f",
    ]
    assert set(models.log_target_models()) == {"ridge_log_30f", "hgb_30f"}
    styles = models.plot_styles()
    assert list(styles) == models.plot_order() == list(models.REGISTRY) and len(set(styles.values())) == len(styles)


GENERALIZATION = ("naive_mean", "blackbox_2f", "ridge_30f", "ridge_log_30f", "nnls_physics", "hgb_30f")
