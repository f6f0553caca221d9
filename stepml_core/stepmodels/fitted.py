"""Fitted step-time models: one class per stored form (``kind``), registered once by kind in :data:`KINDS`.

A fitted model is what a recipe's ``fit`` returns (stepml_core.stepmodels.recipes), kept as the plain JSON
dict it is stored as (fits, caches, exports: ``to_json`` gives it back unchanged; no pickle). Its kind says
how it predicts:

* ``linear``     ŷ = intercept + Σ_k coef_k (x_k − mean_k) / scale_k;
* ``log_linear`` ŷ = exp(min(s, 50)), s the linear score (exp(50) µs ≈ 160 years: a cap, not a value);
* ``trees``      ŷ = baseline + Σ tree values, exp(·) when ``log_target``;

then, every kind, ŷ = max(ŷ, floor_us) (estimators.apply_floor; no floor when floor_us is None). Besides
``predict`` a fitted model gives the simulator its step time (``step_time_model``: features of the
simulated batch → µs, through the stdlib reference predictor for the kinds it knows) and BLIS's model
file where BLIS can express it (``blis_form``; else :class:`NoBlisForm` says why).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from stepml_core.stepmodels.estimators import apply_floor, clean_matrix, linear_score, predict_trees

# StepML features whose definition is BLIS's own step feature of the same name (token counts of the batch, from
# the trace's BATCH_SUMMARY labels); StepML's KV and per-request features are computed from other inputs
BLIS_SHARED_FEATURES = ("prefill_tokens", "decode_tokens")


class NoBlisForm(ValueError):
    """A fitted model BLIS's StepML model file cannot express; the message says why."""


class FittedStepModel:
    """A fitted step-time model of one kind around its stored JSON dict (name, target, kind, features,
    floor_us, recipe, fitted_on, n_fit, ... and the kind's own numbers)."""

    kind: ClassVar[str]

    def __init__(self, doc: dict):
        self.doc = doc

    # -- the JSON boundary
    @staticmethod
    def from_json(doc: dict) -> FittedStepModel:
        """The fitted model of a stored dict, by its ``kind`` (``linear`` when absent, as stored before kinds)."""
        kind = doc.get("kind", "linear")
        if kind not in KINDS:
            raise ValueError(f"unknown fitted step-model kind {kind!r}; registered kinds: {sorted(KINDS)}")
        return KINDS[kind](doc)

    def to_json(self) -> dict:
        return dict(self.doc)

    # -- what every fitted model has
    @property
    def name(self) -> str:
        return self.doc["name"]

    @property
    def features(self) -> list[str]:
        return list(self.doc["features"])

    @property
    def floor_us(self) -> float | None:
        return self.doc.get("floor_us")

    def score(self, X: np.ndarray) -> np.ndarray:
        """ŷ before the floor, on a cleaned matrix (columns in ``features`` order)."""
        raise NotImplementedError

    def predict(self, X) -> np.ndarray:
        """max(ŷ, floor_us) per row of X (inf/NaN read as 0, estimators.clean_matrix)."""
        return apply_floor(self.score(clean_matrix(X)), self.floor_us)

    def predict_features(self, feats: dict) -> float:
        """One step's prediction from a {feature: value} dict (the simulator's path)."""
        return float(self.predict(np.array([[feats[f] for f in self.features]], dtype=float))[0])

    def step_time_model(self, *, kv_source: str, name: str):
        """The simulator's step-time model (stepmodels.sim_step_time.ExportedStepTime) of an exported model
        (stepmodels.json_export: the doc carries model_spec, gpu_spec, tp and model_names)."""
        from stepml_core.stepmodels.sim_step_time import ExportedStepTime

        return ExportedStepTime(self.doc, kv_source=kv_source, name=name, predict_features=self.predict_features)

    def blis_form(self) -> dict:
        """BLIS's StepML model file of this model; NoBlisForm (why not) where BLIS cannot express it."""
        raise NoBlisForm(f"{self.kind} models have no BLIS form")


KINDS: dict[str, type[FittedStepModel]] = {}


def register_kind(cls: type[FittedStepModel]) -> type[FittedStepModel]:
    """Class decorator: the class that reads stored dicts of ``cls.kind``."""
    if cls.kind in KINDS:
        raise ValueError(f"fitted step-model kind {cls.kind!r} registered twice")
    KINDS[cls.kind] = cls
    return cls


def predict_model(model: dict, X) -> np.ndarray:
    """Predictions of a stored model dict of any registered kind, floored at model["floor_us"]."""
    return FittedStepModel.from_json(model).predict(X)


class _ReferencePredicted(FittedStepModel):
    """A kind the stdlib reference predictor knows: the simulator's path is the exported predictor's own."""

    def predict_features(self, feats: dict) -> float:
        from stepml_core.stepmodels.reference_predictor import predict_from_features

        return predict_from_features(feats, self.doc)

    def step_time_model(self, *, kv_source: str, name: str):
        """FittedStepModel.step_time_model with the reference predictor's per-step function of this model
        (reference_predictor.feature_predictor: the same floats)."""
        from stepml_core.stepmodels.reference_predictor import feature_predictor
        from stepml_core.stepmodels.sim_step_time import ExportedStepTime

        return ExportedStepTime(self.doc, kv_source=kv_source, name=name, predict_features=feature_predictor(self.doc))


@register_kind
class LinearFit(_ReferencePredicted):
    kind = "linear"

    def score(self, X):
        return linear_score(self.doc, X)

    def blis_form(self) -> dict:
        """β0 + Σ β_k x_k over BLIS's features: β_k = coef_k / scale_k, β0 = intercept − Σ coef_k mean_k / scale_k.
        BLIS clamps ŷ at 1 µs, not at the model's floor_us."""
        m = self.doc
        other = [f for f in m["features"] if f not in BLIS_SHARED_FEATURES]
        if other:
            raise NoBlisForm(f"linear over StepML features BLIS does not compute the same way: {other}")
        b0 = m["intercept"] - sum(c * mu / s for c, mu, s in zip(m["coef"], m["mean"], m["scale"]))
        coef = {f: c / s for f, c, s in zip(m["features"], m["coef"], m["scale"])}
        return {"version": 1, "step_time": {"model_type": "linear", "intercept": b0, "feature_coefficients": coef}}


@register_kind
class LogLinearFit(_ReferencePredicted):
    kind = "log_linear"

    def score(self, X):
        return np.exp(np.minimum(linear_score(self.doc, X), 50.0))

    def blis_form(self) -> dict:
        raise NoBlisForm("log-linear (ŷ = exp(s)); BLIS's only transform is expm1 (exp(s) − 1)")


@register_kind
class TreesFit(_ReferencePredicted):
    kind = "trees"

    def score(self, X):
        s = predict_trees(self.doc, X)
        return np.exp(s) if self.doc.get("log_target") else s

    def blis_form(self) -> dict:
        raise NoBlisForm("boosted trees; BLIS reads linear models only")
