"""The step-time models StepML fits: one recipe class per model, registered by name (like Vidur's predictor registry).

A recipe states the recipe family it follows, the feature columns it reads (docs/features.md §4),
how it fits one target on a run's train and valid rows, and the roles the study gives it (which
runs' fits are replayed and in which form, the generalization folds, the H1 trio, the teacher-forced
E2E check, the simplicity rank of the recommendation, the report's colour and marker). The fit is a
plain JSON dict (no pickle) whose ``kind`` names the fitted form (stepml_core.stepmodels.fitted.KINDS).
Adding a model is one class with ``@register``; `study.h1.fit_models` fits every registered model, in
registration order, and every list of model names below is read from the registry.

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
    """A step-time model recipe: ``fit`` returns the fitted model as a JSON-able dict with at least
    name, target, kind, features, recipe and floor_us (None for the original recipes); the roles are
    those of :class:`Recipe`."""

    name: ClassVar[str]
    recipe: ClassVar[str]
    replayed_on: ClassVar[tuple[str, ...]]
    replay_in_blis_form: ClassVar[bool]
    generalization: ClassVar[bool]
    h1_trio: ClassVar[bool]
    teacher_forced_e2e: ClassVar[bool]
    simplicity: ClassVar[int | None]
    style: ClassVar[tuple[str, str] | None]

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


class Recipe:
    """A recipe's defaults: no features, no role."""

    features: ClassVar[tuple[str, ...] | None] = ()
    replayed_on: ClassVar[tuple[str, ...]] = ()  # run sources ("real", "synthetic") whose per-experiment fits replay
    replay_in_blis_form: ClassVar[bool] = False  # replayed as BLIS evaluates its fitted blis_form()
    generalization: ClassVar[bool] = False  # fitted in the leave-one-model-out and leave-one-workload-out folds
    h1_trio: ClassVar[bool] = False  # H1's like-for-like comparison (refitted per split scheme by the method checks)
    teacher_forced_e2e: ClassVar[bool] = False  # its per-step predictions summed per request (study.e2e)
    simplicity: ClassVar[int | None] = None  # the recommendation's tie-break, simplest first; None: not ranked
    style: ClassVar[tuple[str, str] | None] = None  # the report's (colour, marker); None: one of SPARE_STYLES
    log_target: ClassVar[str | None] = None  # fitted on log(step time): the model in words, for the report

    def feature_columns(self) -> list[str]:
        return feature_columns() if self.features is SEED30 else list(self.features)


SPARE_STYLES = (("#8c564b", "h"), ("#e377c2", "p"), ("#17becf", "<"), ("#bcbd22", ">"), ("#000000", "d"))
ROLES = ("generalization", "h1_trio", "teacher_forced_e2e")


def names_with(role: str) -> tuple[str, ...]:
    """The registered models (registration order) with a true boolean role (one of ROLES)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; one of {ROLES}")
    return tuple(n for n, r in REGISTRY.items() if getattr(r, role))


def replayed_names(source: str) -> tuple[str, ...]:
    """The models whose per-experiment cycle_us fits of runs of `source` ("real", "synthetic") are replayed."""
    return tuple(n for n, r in REGISTRY.items() if source in r.replayed_on)


def simplicity_order() -> list[str]:
    """The ranked models, simplest first (the recommendation picks the simplest tied with the best)."""
    return [n for _, n in sorted((r.simplicity, n) for n, r in REGISTRY.items() if r.simplicity is not None)]


def log_target_models() -> dict[str, str]:
    """{model: the model in words} of the models fitted on log(step time) (they extrapolate exponentially)."""
    return {n: r.log_target for n, r in REGISTRY.items() if r.log_target}


def plot_order() -> list[str]:
    """Every registered model, registration order: the report's legend order."""
    return list(REGISTRY)


def plot_styles() -> dict[str, tuple[str, str]]:
    """{model: (colour, marker)}: a recipe's own style, else the next unused of SPARE_STYLES."""
    own = {n: r.style for n, r in REGISTRY.items() if r.style}
    spare = iter(s for s in SPARE_STYLES if s not in own.values())
    return {n: own.get(n) or next(spare, ("k", "o")) for n in REGISTRY}


@register
class NaiveMean(Recipe):
    """ŷ = mean of the train + valid targets (the rows every other StepML model is refitted on)."""

    name, recipe, features = "naive_mean", "stepml", ()
    replayed_on, generalization, h1_trio, teacher_forced_e2e, simplicity = ("real",), True, True, True, 0
    style = ("#7f7f7f", "o")

    def fit(self, target, X_tr, y_tr, X_va, y_va, *, seed=0) -> dict:
        return fit_naive_mean(target, np.concatenate([y_tr, y_va])).to_dict()


@register
class Blackbox2f(Recipe):
    """Ridge on (prefill_tokens, decode_tokens), alpha on valid, refit on train + valid."""

    name, recipe, features = "blackbox_2f", "stepml", BLACKBOX_FEATURES
    replayed_on, replay_in_blis_form = ("real", "synthetic"), True  # the BLIS blackbox form
    generalization = h1_trio = teacher_forced_e2e = True
    simplicity, style = 1, ("#1f77b4", "s")

    def fit(self, target, X_tr, y_tr, X_va, y_va, *, seed=0) -> dict:
        return fit_ridge_validated(self.name, target, self.feature_columns(), X_tr, y_tr, X_va, y_va).to_dict()


@register
class Ridge30f(Blackbox2f):
    """Ridge on the seed's 30 features (standardized), alpha on valid, refit on train + valid."""

    name, recipe, features = "ridge_30f", "stepml", SEED30
    replayed_on, replay_in_blis_form = ("real", "synthetic"), False  # the H1 model
    generalization = h1_trio = teacher_forced_e2e = True
    simplicity, style = 3, ("#d62728", "D")


@register
class BlackboxOlsOrig(Recipe):
    """The original blackbox: OLS on (P, D), train only, unclamped (reproduction only)."""

    name, recipe, features = "blackbox_ols_orig", "original", BLACKBOX_FEATURES
    style = ("#aec7e8", "v")

    def fit(self, target, X_tr, y_tr, X_va, y_va, *, seed=0) -> dict:
        return fit_ols_original(self.name, target, self.feature_columns(), X_tr, y_tr).to_dict()


@register
class Ridge30fOrig(Recipe):
    """The original Ridge: the original study's 30 features, alpha = 1, train only, unclamped (reproduction only)."""

    name, recipe, features = "ridge_30f_orig", "original", tuple(ORIGINAL_FEATURES)
    style = ("#ff9896", "^")

    def fit(self, target, X_tr, y_tr, X_va, y_va, *, seed=0) -> dict:
        return fit_ridge_original(self.name, target, self.feature_columns(), X_tr, y_tr).to_dict()


@register
class RidgeLog30f(Recipe):
    """Ridge on log y over the 30 features, alpha by valid MAPE, refit train + valid; ŷ = exp(score)."""

    name, recipe, features = "ridge_log_30f", "stepml", SEED30
    replayed_on, generalization, simplicity, style = ("real",), True, 4, ("#9467bd", "P")
    log_target = "Ridge on log(step time): ŷ = exp(linear score)"

    def fit(self, target, X_tr, y_tr, X_va, y_va, *, seed=0) -> dict:
        return fit_ridge_log_validated(self.name, target, self.feature_columns(), X_tr, y_tr, X_va, y_va)


@register
class NnlsPhysics(Recipe):
    """Non-negative least squares on µs-valued roofline terms and counts, weighted for relative error."""

    name, recipe, features = "nnls_physics", "stepml", PHYSICS_BASIS
    replayed_on, generalization, teacher_forced_e2e, simplicity = ("real",), True, True, 2
    style = ("#2ca02c", "X")

    def fit(self, target, X_tr, y_tr, X_va, y_va, *, seed=0) -> dict:
        return fit_nnls_basis(self.name, target, self.feature_columns(), X_tr, y_tr, X_va, y_va)


@register
class Hgb30f(Recipe):
    """Gradient-boosted trees on log y over the 30 features, iterations chosen on valid, stored as plain nodes."""

    name, recipe, features = "hgb_30f", "stepml", SEED30
    replayed_on, generalization, teacher_forced_e2e, simplicity = ("real",), True, True, 5
    style = ("#ff7f0e", "*")
    log_target = "boosted trees on log(step time)"

    def fit(self, target, X_tr, y_tr, X_va, y_va, *, seed=0) -> dict:
        m = fit_hgb_validated(self.name, target, self.feature_columns(), X_tr, y_tr, X_va, y_va, seed=seed)
        m.pop("_sklearn", None)
        return m
