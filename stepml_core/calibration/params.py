"""The request-calibrated step-time model in BLIS's terms (all µs; docs/calibration.md):

    step_us  = β0 + β_dec·decode_tokens + β_kv·kv_sum + β_pf·prefill_tokens + β_npf·num_prefill_reqs
    queue_us = α0 + α1·input_len                                      (arrival → the engine's queue)

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
PARAM_UNITS = {
    "b0_us": "µs per step",
    "b_dec_us": "µs per decode token",
    "b_kv_us": "µs per KV token (Σ context)",
    "b_pf_us": "µs per cache-miss prompt token",
    "b_npf_us": "µs per prompt chunk",
    "q0_us": "µs per request",
    "q1_us": "µs per prompt token",
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
        )

    def as_vector(self) -> np.ndarray:
        return np.array([getattr(self, k) for k in PARAM_NAMES], dtype=np.float64)

    @classmethod
    def from_vector(cls, v) -> "StepParams":
        return cls(**{k: float(x) for k, x in zip(PARAM_NAMES, v)})

    def step_us(self, decode_tokens, kv_sum, prefill_tokens=0.0, num_prefill_reqs=0.0):
        """The step time on BLIS features (vectorized; same formula as the exported file)."""
        return (
            self.b0_us
            + self.b_dec_us * decode_tokens
            + self.b_kv_us * kv_sum
            + self.b_pf_us * prefill_tokens
            + self.b_npf_us * num_prefill_reqs
        )

    def blis_doc(self) -> dict:
        """BLIS StepML model file: linear step_time over BLIS features, queueing_time on input_len; no clamp
        (step_overhead_us 0), no per-token output time (the request overhead is all in queueing_time)."""
        coef = {BLIS_FEATURE_OF[k]: float(getattr(self, k)) for k in ("b_dec_us", "b_kv_us", "b_pf_us", "b_npf_us")}
        return {
            "version": 1,
            "step_time": {"model_type": "linear", "intercept": float(self.b0_us), "feature_coefficients": coef},
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
        st = doc["step_time"]
        c = st.get("feature_coefficients") or {}
        q = doc.get("queueing_time") or {}
        return cls(
            b0_us=float(st.get("intercept", 0.0)),
            b_dec_us=float(c.get("decode_tokens", 0.0)),
            b_kv_us=float(c.get("kv_sum", 0.0)),
            b_pf_us=float(c.get("prefill_tokens", 0.0)),
            b_npf_us=float(c.get("num_prefill_reqs", 0.0)),
            q0_us=float(q.get("intercept", 0.0)),
            q1_us=float((q.get("feature_coefficients") or {}).get("input_len", 0.0)),
        )


def serving_model(params: StepParams, name: str = "calibrated") -> StepServingModel:
    lin = LinearStepTime(params.blis_doc(), name=name)
    return StepServingModel(name, lin, queueing_us=lin.queueing_us, token_delay_us=lin.otpt_us, kind="blis_linear")
