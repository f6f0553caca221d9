"""Step-time estimators, fitted with scikit-learn and stored as plain JSON (no pickle).

StepML recipe: StandardScaler + Ridge, alpha chosen on the validation block by MAPE
over a log grid 1e-4…1e4, then refit on train + valid. Original-study recipe (for
reproducing published numbers): blackbox OLS on train; Ridge alpha = 1 on train.
A fitted model predicts ŷ = intercept + Σ coef_k (x_k − mean_k) / scale_k.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from sklearn.linear_model import LinearRegression, Ridge
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

ALPHA_GRID = tuple(float(a) for a in np.logspace(-4, 4, 17))


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

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, float)
        if not self.features:
            return np.full(X.shape[0], self.intercept)
        z = (X - np.asarray(self.mean)) / np.asarray(self.scale)
        return self.intercept + z @ np.asarray(self.coef)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LinearStepModel":
        return cls(**d)


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
        name=name, target=target, features=list(features), mean=sc.mean_.tolist(), scale=scale.tolist(),
        coef=np.asarray(reg.coef_, float).ravel().tolist(), intercept=float(np.asarray(reg.intercept_).ravel()[0]) if np.ndim(reg.intercept_) else float(reg.intercept_),
        alpha=alpha, fitted_on=fitted_on, n_fit=n, recipe=recipe,
    )


def _pipe(reg) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("reg", reg)])


def fit_naive_mean(target: str, y_train: np.ndarray, name: str = "naive_mean") -> LinearStepModel:
    return LinearStepModel(name=name, target=target, features=[], mean=[], scale=[], coef=[],
                           intercept=float(np.mean(y_train)), fitted_on=["train"], n_fit=len(y_train), recipe="stepml")


def fit_ridge_validated(name, target, features, X_tr, y_tr, X_va, y_va, alphas=ALPHA_GRID) -> LinearStepModel:
    """Pick alpha by validation MAPE, refit on train + valid."""
    X_tr, X_va = clean_matrix(X_tr), clean_matrix(X_va)
    best_alpha, best = alphas[0], np.inf
    if len(y_va):
        for a in alphas:
            p = _pipe(Ridge(alpha=a)).fit(X_tr, y_tr)
            score = mape_pct(y_va, p.predict(X_va))
            if score < best:
                best, best_alpha = score, a
    X = np.vstack([X_tr, X_va])
    y = np.concatenate([y_tr, y_va])
    pipe = _pipe(Ridge(alpha=best_alpha)).fit(X, y)
    return _from_pipeline(pipe, name, target, features, best_alpha, ["train", "valid"], len(y), "stepml")


def fit_ols_original(name, target, features, X_tr, y_tr) -> LinearStepModel:
    """Original recipe blackbox: ordinary least squares with intercept on train only."""
    X_tr = clean_matrix(X_tr)
    reg = LinearRegression().fit(X_tr, y_tr)
    # express as the same scaled form with mean 0, scale 1
    return LinearStepModel(name=name, target=target, features=list(features), mean=[0.0] * len(features),
                           scale=[1.0] * len(features), coef=reg.coef_.tolist(), intercept=float(reg.intercept_),
                           fitted_on=["train"], n_fit=len(y_tr), recipe="original")


def fit_ridge_original(name, target, features, X_tr, y_tr) -> LinearStepModel:
    """Original recipe Ridge: StandardScaler on train, Ridge(alpha=1), train only, no validation."""
    pipe = _pipe(Ridge(alpha=1.0)).fit(clean_matrix(X_tr), y_tr)
    return _from_pipeline(pipe, name, target, features, 1.0, ["train"], len(y_tr), "original")
