"""`step.duration_us`: the CPU time of vLLM's schedule() (docs/trace-format.md §3.3; model: docs/synthesizer.md §4), an empirical model.

No physics gives this number, so it is sampled from a model fitted by
scripts/fit_schedule_time.py and stored in data/synth/schedule_time_model.json:

* two regimes in log space (a fast one of ~0.1–0.5 ms and a slow one of ~1–40 ms that the
  real runs enter under load), each a linear model on batch/queue attributes
      log d = c + δ + k·(x·β_regime − c) + k·σ_regime·ε,   ε ~ empirical standardized residuals
  (β, σ, ε shared; per run and regime: shift δ, spread k and the centre c it scales around)
  (heavy-tailed: the residual quantile function is stored, not assumed normal);
  (the slow regime's running term is clamped to [``slow_running_floor``,
  ``slow_running_ceiling``]: its steep power law was fitted on ~35–110 running requests and
  is not extrapolated outside that range);
* a logistic gate on the running depth, P(slow) = sigmoid((running − r0(run)) / width);
* per-run parameters (r0 and δ, k, c of both regimes) fitted so that the last 20 % of the run's steps
  match the real test-split distribution of step.duration_us of the run it stands for.

Features x = [1, log1p(running), log1p(prefill_tokens), min(prefill_reqs, 8),
min(finished, 8), min(preempted, 8)].
"""

from __future__ import annotations

import math

import numpy as np

from stepml_core.synth.spec import schedule_time_model

FEATURES = ("const", "log1p_running", "log1p_prefill_tokens", "prefill_reqs", "finished", "preempted")

# Used only when data/synth/schedule_time_model.json is absent (first pass of the fit script).
DEFAULT_MODEL = {
    "regimes": {
        "fast": {"beta": [2.6, 0.83, 0.26, -0.035, 0.0, 0.3], "sigma": 0.26},
        "slow": {"beta": [-5.0, 3.1, 0.035, -0.013, 0.05, 0.3], "sigma": 0.38},
    },
    "gate_width": 6.0,
    "residual_quantiles": None,
    "runs": {},
}


class ScheduleTimeModel:
    def __init__(self, real_id: str, model: dict | None = None):
        m = model if model is not None else (schedule_time_model() or DEFAULT_MODEL)
        self.bf = [float(x) for x in m["regimes"]["fast"]["beta"]]
        self.bs = [float(x) for x in m["regimes"]["slow"]["beta"]]
        self.sf = float(m["regimes"]["fast"]["sigma"])
        self.ss = float(m["regimes"]["slow"]["sigma"])
        self.width = float(m.get("gate_width", 6.0))
        self.slow_floor = float(m.get("slow_running_floor", 0.0))
        self.slow_ceiling = float(m.get("slow_running_ceiling", 1e9))
        rq = m.get("residual_quantiles")
        if rq:
            self.res_p = np.asarray(rq["p"], dtype=np.float64)
            self.res_f = np.asarray(rq["fast"], dtype=np.float64)
            self.res_s = np.asarray(rq["slow"], dtype=np.float64)
        else:
            self.res_p = None
        r = m.get("runs", {}).get(real_id, {})
        rf, rs = r.get("fast", {}), r.get("slow", {})
        self.r0 = float(r.get("r0", 1e9))
        # log d = center + δ + k·(x·β − center) + k·σ·ε   (k: the run's spread relative to the fit)
        self.kf = float(rf.get("k", 1.0))
        self.ks = float(rs.get("k", 1.0))
        self.af = float(rf.get("center", 0.0)) * (1.0 - self.kf) + float(rf.get("delta", 0.0))
        self.as_ = float(rs.get("center", 0.0)) * (1.0 - self.ks) + float(rs.get("delta", 0.0))

    def residuals(self, u: np.ndarray, slow: bool) -> np.ndarray:
        """Standardized residuals for uniforms u (inverse of the stored empirical CDF)."""
        if self.res_p is None:
            from scipy.stats import norm

            return norm.ppf(np.clip(u, 1e-6, 1 - 1e-6))
        return np.interp(u, self.res_p, self.res_s if slow else self.res_f)

    def draw_block(self, rng: np.random.Generator, n: int):
        """Pre-drawn randomness for n steps: (gate uniforms, fast residuals, slow residuals)."""
        u_gate = rng.random(n)
        ef = self.residuals(rng.random(n), False) * (self.sf * self.kf)
        es = self.residuals(rng.random(n), True) * (self.ss * self.ks)
        return u_gate.tolist(), ef.tolist(), es.tolist()

    def log_mean(self, running: int, prefill_tokens: int, prefill_reqs: int, finished: int, preempted: int):
        lr = math.log1p(running)
        rs = running if running > self.slow_floor else self.slow_floor
        lrs = math.log1p(rs if rs < self.slow_ceiling else self.slow_ceiling)
        lp = math.log1p(prefill_tokens)
        npf = prefill_reqs if prefill_reqs < 8 else 8
        nf = finished if finished < 8 else 8
        npr = preempted if preempted < 8 else 8
        bf, bs = self.bf, self.bs
        mf = self.af + self.kf * (bf[0] + bf[1] * lr + bf[2] * lp + bf[3] * npf + bf[4] * nf + bf[5] * npr)
        ms = self.as_ + self.ks * (bs[0] + bs[1] * lrs + bs[2] * lp + bs[3] * npf + bs[4] * nf + bs[5] * npr)
        return mf, ms

    def p_slow(self, running: int) -> float:
        z = (running - self.r0) / self.width
        if z > 40:
            return 1.0
        if z < -40:
            return 0.0
        return 1.0 / (1.0 + math.exp(-z))
