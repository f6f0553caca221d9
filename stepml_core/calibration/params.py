"""The request-calibrated step-time model in BLIS's terms (all µs; docs/calibration.md):

    step_us  = β0 + β_dec·decode_tokens + β_kv·kv_sum + β_pf·prefill_tokens + β_npf·num_prefill_reqs
               + β_h·max(0, num_decode_reqs − k)                     (piecewise form only: β_h ≠ 0)
    queue_us = α0 + α1·input_len                                      (arrival → the engine's queue)

The piecewise form (a hinge at k decoders, continuous there: the per-decoder slope is β_dec below k, β_dec + β_h from
k) is written as BLIS's ``step_time_regimes``: ``num_decode_reqs < k`` → the linear model, else the same model with
β_h on num_decode_reqs and β0 − β_h·k; the linear form (β_h = 0) as one ``step_time``, as before.

:class:`StepParams` holds the coefficients, writes and reads BLIS's StepML model file (``blis_doc`` /
``from_blis_doc``); :func:`serving_model` gives the simulator that same file (LinearStepTime), so what StepML replays
is what BLIS would read. Fitted by stepml_core.calibration.fit; replayed, and bounded for intervals, by
stepml_core.replay (specs, intervals).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from stepml_core.replay.simulate import StepServingModel
from stepml_core.stepmodels.sim_step_time import LinearStepTime

PARAM_NAMES = ("b0_us", "b_dec_us", "b_kv_us", "b_pf_us", "b_npf_us", "q0_us", "q1_us")
HINGE_NAMES = ("b_hinge_us", "hinge_decoders")  # the piecewise form's two more numbers (vectors of 9)
PARAM_UNITS = {
    "b0_us": "µs per step",
    "b_dec_us": "µs per decode token",
    "b_kv_us": "µs per KV token (Σ context)",
    "b_pf_us": "µs per cache-miss prompt token",
    "b_npf_us": "µs per prompt chunk",
    "q0_us": "µs per request",
    "q1_us": "µs per prompt token",
}
HINGE_UNITS = {
    "b_hinge_us": "µs per decode request above the break (added to β_dec)",
    "hinge_decoders": "decode requests at the break",
}
BLIS_FEATURE_OF = {
    "b_dec_us": "decode_tokens",
    "b_kv_us": "kv_sum",
    "b_pf_us": "prefill_tokens",
    "b_npf_us": "num_prefill_reqs",
}


@dataclass(frozen=True)
class StepParams:
    """The calibrated model in BLIS's terms (all µs)."""

    b0_us: float
    b_dec_us: float
    b_kv_us: float
    b_pf_us: float
    b_npf_us: float
    q0_us: float
    q1_us: float = 0.0
    b_hinge_us: float = 0.0  # piecewise form: slope above the break − slope below, µs per decode request
    hinge_decoders: float = 0.0  # piecewise form: the break k (decode requests)

    @property
    def piecewise(self) -> bool:
        return self.b_hinge_us != 0.0

    def scaled(self, step_scale: float = 1.0, q_shift_us: float = 0.0) -> "StepParams":
        """Every step coefficient × step_scale; α0 + q_shift_us (≥ 0)."""
        s = step_scale
        return replace(
            self,
            b0_us=self.b0_us * s,
            b_dec_us=self.b_dec_us * s,
            b_kv_us=self.b_kv_us * s,
            b_pf_us=self.b_pf_us * s,
            b_npf_us=self.b_npf_us * s,
            q0_us=max(0.0, self.q0_us + q_shift_us),
            b_hinge_us=self.b_hinge_us * s,
        )

    def as_vector(self) -> np.ndarray:
        """PARAM_NAMES' values, and HINGE_NAMES' after them for the piecewise form."""
        names = PARAM_NAMES + (HINGE_NAMES if self.piecewise else ())
        return np.array([getattr(self, k) for k in names], dtype=np.float64)

    @classmethod
    def from_vector(cls, v) -> "StepParams":
        """as_vector's inverse (7 values: linear; 9: piecewise)."""
        names = PARAM_NAMES + HINGE_NAMES
        if len(v) not in (len(PARAM_NAMES), len(names)):
            raise ValueError(f"a parameter vector has {len(PARAM_NAMES)} or {len(names)} values, not {len(v)}")
        return cls(**{k: float(x) for k, x in zip(names, v)})

    def step_us(self, decode_tokens, kv_sum, prefill_tokens=0.0, num_prefill_reqs=0.0, hinge=0.0):
        """The step time on BLIS features (vectorized; same formula as the exported file). ``hinge``: max(0,
        num_decode_reqs − k) (or its window average), read only by the piecewise form."""
        out = (
            self.b0_us
            + self.b_dec_us * decode_tokens
            + self.b_kv_us * kv_sum
            + self.b_pf_us * prefill_tokens
            + self.b_npf_us * num_prefill_reqs
        )
        return out + self.b_hinge_us * hinge if self.piecewise else out

    def blis_doc(self) -> dict:
        """BLIS StepML model file: linear step_time over BLIS features (the piecewise form: two step_time_regimes split
        at num_decode_reqs = k, continuous there), queueing_time on input_len; no clamp (step_overhead_us 0), no
        per-token output time (the request overhead is all in queueing_time)."""
        coef = {BLIS_FEATURE_OF[k]: float(getattr(self, k)) for k in ("b_dec_us", "b_kv_us", "b_pf_us", "b_npf_us")}
        linear = {"model_type": "linear", "intercept": float(self.b0_us), "feature_coefficients": coef}
        if self.piecewise:
            k, h = float(self.hinge_decoders), float(self.b_hinge_us)
            above = {
                "model_type": "linear",
                "intercept": float(self.b0_us) - h * k,
                "feature_coefficients": {**coef, "num_decode_reqs": h},
            }
            step = {
                "step_time_regimes": [
                    {
                        "name": "below_break",
                        "condition": {"feature": "num_decode_reqs", "op": "<", "value": k},
                        "model": linear,
                    },
                    {"name": "from_break", "condition": None, "model": above},
                ]
            }
        else:
            step = {"step_time": linear}
        return {
            "version": 1,
            **step,
            "queueing_time": {
                "model_type": "linear",
                "intercept": float(self.q0_us),
                "feature_coefficients": {"input_len": float(self.q1_us)},
            },
            "step_overhead_us": 0.0,
            "step_overhead_per_req_us": 0.0,
            "output_token_processing_time_us": 0.0,
            "scheduling_processing_time_us": 0.0,
            "preemption_processing_time_us": 0.0,
        }

    @classmethod
    def from_blis_doc(cls, doc: dict) -> "StepParams":
        """blis_doc's inverse (either form)."""
        regimes = doc.get("step_time_regimes") or []
        st = regimes[0]["model"] if regimes else doc["step_time"]
        c = st.get("feature_coefficients") or {}
        q = doc.get("queueing_time") or {}
        hinge = {}
        if regimes:
            hinge = {
                "b_hinge_us": float(regimes[-1]["model"]["feature_coefficients"].get("num_decode_reqs", 0.0)),
                "hinge_decoders": float(regimes[0]["condition"]["value"]),
            }
        return cls(
            **hinge,
            b0_us=float(st.get("intercept", 0.0)),
            b_dec_us=float(c.get("decode_tokens", 0.0)),
            b_kv_us=float(c.get("kv_sum", 0.0)),
            b_pf_us=float(c.get("prefill_tokens", 0.0)),
            b_npf_us=float(c.get("num_prefill_reqs", 0.0)),
            q0_us=float(q.get("intercept", 0.0)),
            q1_us=float((q.get("feature_coefficients") or {}).get("input_len", 0.0)),
        )


def serving_model(params: StepParams, name: str = "calibrated", load_delay: dict | None = None) -> StepServingModel:
    """The simulator's model of this file; ``load_delay``: a spec's load delay (calibration.load_delay), else none."""
    lin = LinearStepTime(params.blis_doc(), name=name)
    return StepServingModel(
        name, lin, queueing_us=lin.queueing_us, token_delay_us=lin.otpt_us, kind="blis_linear", load_delay=load_delay
    )
