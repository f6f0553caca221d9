"""Clocks: how a formed batch turns into time in the engine loop (docs/simulator.md).

The engine asks its clock, per step N (times in s on the engine's monotonic clock):

* ``schedule_ns(batch)``: length of the schedule() CPU window (``step.duration_us`` · 1000);
* ``gpu_s(batch, ts0_ns)``: the step's time on the GPU path;
* ``launch_ready_s(ts1_ns, n)``: when the step can be launched after schedule() (ts1 = window end);
  the GPU starts it at max(launch ready, previous step's GPU end);
* ``after_update(w, g_end, n_prev, nfin)``: when schedule(N+1) starts, given that step N−1's
  output was processed at w (= max(GPU end of N−1, launch ready of N));
* ``first_launch(L, g_end)`` / ``idle_after_update(w)``: the same after an idle engine.

Two clocks:

* :class:`PhysicsClock` — the synthesizer's engine: GPU time from roofline physics × noise,
  schedule() time from the empirical scheduler model, host work around the GPU, so the engine
  cycle = max(GPU path, CPU path) emerges (async scheduling: cycle N mostly reflects batch N−1);
* :class:`CycleClock` — a step-time model gives the engine cycle directly:
  ts_start(N+1) = ts_start(N) + step_time(batch N), the output of step N is processed at
  ts_start(N+1) (end of its cycle). This is how BLIS and Vidur advance their clocks and what a
  model fitted on ``cycle_us`` (gap between consecutive steps' ts_start) predicts.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the physics lives with the synthesizer's data (imported lazily: synth builds on sim)
    from stepml_core.synth.schedtime import ScheduleTimeModel

RNG_BLOCK = 8192  # steps of pre-drawn randomness per refill


class StepRandomness:
    """Pre-drawn per-step random numbers of the synthesizer (GPU noise, trace sampling, schedule() time).

    Drawn in blocks of RNG_BLOCK steps in a fixed order, so the same seed gives the same run."""

    def __init__(self, rng: np.random.Generator, noise: dict, sched_model: "ScheduleTimeModel"):
        self.rng = rng
        self.noise = noise
        self.sched_model = sched_model
        self.i = RNG_BLOCK  # index of the current step in the block
        self.ph1, self.ph2 = rng.uniform(0, 2 * np.pi, 2)

    def begin_step(self, N: int) -> int:
        if self.i >= RNG_BLOCK:
            self._refill(N)
        bi = self.i
        self.i = bi + 1
        return bi

    def _refill(self, step0: int) -> None:
        n = RNG_BLOCK
        rng = self.rng
        nz = self.noise
        k = np.arange(step0, step0 + n, dtype=np.float64)
        drift = (
            nz["drift_sigma"]
            * (
                np.sin(2 * np.pi * k / nz["drift_period_steps"] + self.ph1)
                + 0.5 * np.sin(2 * np.pi * k / (nz["drift_period_steps"] * 3.7) + self.ph2)
            )
            / 1.118
        )
        mult = np.exp(nz["lognormal_sigma"] * rng.standard_normal(n) + drift)
        add = rng.gamma(nz["gamma_shape"], nz["gamma_mean_us"] * 1e-6 / nz["gamma_shape"], n)
        u = rng.random(n)
        lo, hi = nz["straggler_ms"]
        add += np.where(u < nz["straggler_p"], rng.uniform(lo, hi, n) * 1e-3, 0.0)
        blo, bhi = nz["big_straggler_ms"]
        add += np.where(rng.random(n) < nz["big_straggler_p"], rng.uniform(blo, bhi, n) * 1e-3, 0.0)
        w = int(nz["warmup_steps"])
        if step0 < w:
            j = np.arange(n) + step0
            mult = mult * np.where(j < w, 1.0 + (nz["warmup_factor"] - 1.0) * np.exp(-j / max(1.0, w / 3.0)), 1.0)
        self.mult = mult.tolist()
        self.add = add.tolist()
        self.u_samp = rng.random(n).tolist()
        self.u_rich = rng.random(n).tolist()
        self.u_sub = rng.integers(0, 1000, n).tolist()
        self.u_gate, self.e_fast, self.e_slow = self.sched_model.draw_block(rng, n)
        self.i = 0


class PhysicsClock:
    """The synthesizer's engine timing: roofline GPU time with noise and warm-up stalls, empirical
    schedule() time, host work per step and per request (parameters: data/synth/engine_params.json)."""

    def __init__(self, model: str, tp: int, params: dict, rng: np.random.Generator, sched_model: "ScheduleTimeModel"):
        from stepml_core.synth.cycle_time import EnginePhysics

        P = params
        self.phys = EnginePhysics(model, tp, P)
        self.sched_model = sched_model
        h = P["host"]
        self.post_fixed_s = h["post_schedule_fixed_us"] * 1e-6
        self.post_per_req_s = h["post_schedule_per_req_us"] * 1e-6
        self.upd_fixed_s = h["update_fixed_us"] * 1e-6
        self.upd_per_req_s = h["update_per_req_us"] * 1e-6
        self.upd_per_fin_s = h["update_per_finished_us"] * 1e-6
        noise = P["noise"]
        # warm-up: the first eager batch of each token-count bucket early in the run stalls
        # (kernel JIT / autotuning of a new shape); magnitudes per model
        slo, shi = P["models"][model].get("warmup_stall_ms", [0.0, 0.0])
        self._stalls_s = (rng.uniform(slo, shi, 64) * 1e-3).tolist()
        self._warm_window_s = float(noise.get("warmup_window_s", 0.0))
        self._warm_bucket = int(noise.get("warmup_bucket_tokens", 256))
        self._warm_seen: set[int] = set()
        self.rand = StepRandomness(rng, noise, sched_model)
        self.bi = 0
        self.t_first_s = 0.0

    def start(self, now_s: float) -> None:
        self.t_first_s = now_s

    def begin_step(self, N: int) -> None:
        self.bi = self.rand.begin_step(N)

    def schedule_ns(self, b) -> int:
        """schedule() CPU time: two-regime log-linear model with a logistic gate on the running depth."""
        sm, r, bi = self.sched_model, self.rand, self.bi
        mf, ms = sm.log_mean(b.num_running, b.prefill_tokens, b.num_prefill_reqs, b.num_finished, b.num_preempted)
        if r.u_gate[bi] < sm.p_slow(b.num_running):
            d_us = math.exp(ms + r.e_slow[bi])
        else:
            d_us = math.exp(mf + r.e_fast[bi])
        d_us = int(d_us)
        if d_us < 5:
            d_us = 5
        elif d_us > 400000:
            d_us = 400000
        return d_us * 1000 + r.u_sub[bi]

    def gpu_s(self, b, ts0_ns: int) -> float:
        phys = self.phys
        pf_attn = 0.0
        for q, c, _p in b.chunks:
            pf_attn += phys.prefill_attn(q, c)
        T = b.scheduled_tokens
        gpu = phys.step_time(T, b.num_scheduled, b.pure_decode, b.decode_context_tokens, pf_attn)
        gpu = gpu * self.rand.mult[self.bi] + self.rand.add[self.bi]
        if T > phys.max_graph and ts0_ns * 1e-9 - self.t_first_s < self._warm_window_s:
            k = T // self._warm_bucket
            if k not in self._warm_seen and len(self._warm_seen) < len(self._stalls_s):
                gpu += self._stalls_s[len(self._warm_seen)]
                self._warm_seen.add(k)
        return gpu

    def launch_ready_s(self, ts1_ns: int, n_sched: int) -> float:
        return ts1_ns * 1e-9 + self.post_fixed_s + self.post_per_req_s * n_sched

    def after_update(self, w: float, g_end: float, n_prev: int, nfin: int) -> float:
        return w + self.upd_fixed_s + self.upd_per_req_s * n_prev + self.upd_per_fin_s * nfin

    def first_launch(self, L: float, g_end: float) -> float:
        return L + self.upd_fixed_s

    def idle_after_update(self, w: float) -> float:
        return w + self.upd_fixed_s


class CycleClock:
    """Engine cycle from a step-time model: ts_start(N+1) = ts_start(N) + clamp(step_time_us(batch N)).

    ``model`` has ``step_time_us(batch) -> float`` (µs). Predictions are clamped to
    [``floor_us``, ``ceiling_us``] (1 µs … 10 s: a model extrapolating far outside its data can
    predict ≤ 0 or astronomically large steps); non-finite predictions count as the ceiling.
    ``clamped`` counts both. schedule() has no separate window here (the cycle includes it); the
    output of step N is processed at the end of its cycle."""

    def __init__(self, model, floor_us: float = 1.0, ceiling_us: float = 1e7):
        self.model = model
        self.floor_us = float(floor_us)
        self.ceiling_us = float(ceiling_us)
        self.clamped = {"below_floor": 0, "above_ceiling": 0, "not_finite": 0}

    def start(self, now_s: float) -> None:
        pass

    def begin_step(self, N: int) -> None:
        pass

    def schedule_ns(self, b) -> int:
        return 0

    def gpu_s(self, b, ts0_ns: int) -> float:
        t = self.model.step_time_us(b)
        if t < self.floor_us:
            self.clamped["below_floor"] += 1
            t = self.floor_us
        elif t > self.ceiling_us:
            self.clamped["above_ceiling"] += 1
            t = self.ceiling_us
        elif t != t:
            self.clamped["not_finite"] += 1
            t = self.ceiling_us
        return t * 1e-6

    def launch_ready_s(self, ts1_ns: int, n_sched: int) -> float:
        return ts1_ns * 1e-9

    def after_update(self, w: float, g_end: float, n_prev: int, nfin: int) -> float:
        return g_end

    def first_launch(self, L: float, g_end: float) -> float:
        return g_end

    def idle_after_update(self, w: float) -> float:
        return w
