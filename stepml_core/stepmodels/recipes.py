"""The step-time models StepML fits: one class per model, registered by name (like Vidur's predictor registry).

A model states the recipe it follows, the feature columns it reads (docs/features.md §4) and
how it fits one target on a run's train and valid rows; the fit is a plain JSON dict (no
pickle) with a ``kind`` — the form `estimators.predict_model` predicts it with (``linear``,
``log_linear``, ``trees``: `estimators.PREDICTORS`). Adding a model is one class here with
``@register``; `study.fit_models` fits every registered model, in registration order.

Recipes: ``stepml`` models are fitted on train + valid (hyper-parameters chosen on valid) and
predict max(ŷ, floor_us); ``original`` models reproduce the original study (train only,
unclamped) and exist only to reproduce its published numbers.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import numpy as np

from stepml_core.features.step_features import ORIGINAL_FEATURES, feature_columns
from stepml_core.stepmodels.estimators import (
    fit_hgb_validated,
    fit_naive_mean,
    fit_nnls_basis,
    fit_ols_original,
    fit_ridge_log_validated,
    fit_ridge_original,
    fit_ridge_validated,
)

BLACKBOX_FEATURES = ("prefill_tokens", "decode_tokens")
PHYSICS_BASIS = (
    "t_compute_us",
    "t_memory_us",
    "num_prefill_reqs",
    "num_decode_reqs",
    "prefill_tokens",
    "decode_tokens",
)
SEED30 = None  # `features = SEED30`: the seed's 30 features (model_id one-hot), features.feature_columns()


class StepModel(Protocol):
    """A step-time model: ``fit`` returns the fitted model as a JSON-able dict with at least
    name, target, kind, features, recipe and floor_us (None for the original recipes)."""

    name: ClassVar[str]
    recipe: ClassVar[str]

    def feature_columns(self) -> list[str]: ...

    def fit(
        self, target: str, X_tr: np.ndarray, y_tr: np.ndarray, X_va: np.ndarray, y_va: np.ndarray, *, seed: int = 0
    ) -> dict: ...


REGISTRY: dict[str, StepModel] = {}


def register(cls):
    """Class decorator: one instance of the model under its name."""
    if cls.name in REGISTRY:
        raise ValueError(f"step model {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls()
    return cls


class _Columns:
    features: ClassVar[tuple[str, ...] | None] = ()

    def feature_columns(self) -> list[str]:
        return feature_columns() if self.features is SEED30 else list(self.features)


@register
class NaiveMean(_Columns):
    """ŷ = mean of the train + valid targets (the rows every other StepML model is refitted on)."""

    name, recipe, features = "naive_mean", "stepml", ()

    def fit(self, target, X_tr, y_tr, X_va, y_va, *, seed=0) -> dict:
        return fit_naive_mean(target, np.concatenate([y_tr, y_va])).to_dict()


@register
class Blackbox2f(_Columns):
    """Ridge on (prefill_tokens, decode_tokens), alpha on valid, refit on train + valid."""

    name, recipe, features = "blackbox_2f", "stepml", BLACKBOX_FEATURES

    def fit(self, target, X_tr, y_tr, X_va, y_va, *, seed=0) -> dict:
        return fit_ridge_validated(self.name, target, self.feature_columns(), X_tr, y_tr, X_va, y_va).to_dict()


@register
class Ridge30f(Blackbox2f):
    """Ridge on the seed's 30 features (standardized), alpha on valid, refit on train + valid."""

    name, recipe, features = "ridge_30f", "stepml", SEED30


@register
class BlackboxOlsOrig(_Columns):
    """The original blackbox: OLS on (P, D), train only, unclamped (reproduction only)."""

    name, recipe, features = "blackbox_ols_orig", "original", BLACKBOX_FEATURES

    def fit(self, target, X_tr, y_tr, X_va, y_va, *, seed=0) -> dict:
        return fit_ols_original(self.name, target, self.feature_columns(), X_tr, y_tr).to_dict()


@register
class Ridge30fOrig(_Columns):
    """The original Ridge: the original study's 30 features, alpha = 1, train only, unclamped (reproduction only)."""

    name, recipe, features = "ridge_30f_orig", "original", tuple(ORIGINAL_FEATURES)

    def fit(self, target, X_tr, y_tr, X_va, y_va, *, seed=0) -> dict:
        return fit_ridge_original(self.name, target, self.feature_columns(), X_tr, y_tr).to_dict()


@register
class RidgeLog30f(_Columns):
    """Ridge on log y over the 30 features, alpha by valid MAPE, refit train + valid; ŷ = exp(score)."""

    name, recipe, features = "ridge_log_30f", "stepml", SEED30

    def fit(self, target, X_tr, y_tr, X_va, y_va, *, seed=0) -> dict:
        return fit_ridge_log_validated(self.name, target, self.feature_columns(), X_tr, y_tr, X_va, y_va)


@register
class NnlsPhysics(_Columns):
    """Non-negative least squares on µs-valued roofline terms and counts, weighted for relative error."""

    name, recipe, features = "nnls_physics", "stepml", PHYSICS_BASIS

    def fit(self, target, X_tr, y_tr, X_va, y_va, *, seed=0) -> dict:
        return fit_nnls_basis(self.name, target, self.feature_columns(), X_tr, y_tr, X_va, y_va)


@register
class Hgb30f(_Columns):
    """Gradient-boosted trees on log y over the 30 features, iterations chosen on valid, stored as plain nodes."""

    name, recipe, features = "hgb_30f", "stepml", SEED30

    def fit(self, target, X_tr, y_tr, X_va, y_va, *, seed=0) -> dict:
        m = fit_hgb_validated(self.name, target, self.feature_columns(), X_tr, y_tr, X_va, y_va, seed=seed)
        m.pop("_sklearn", None)
        return m
