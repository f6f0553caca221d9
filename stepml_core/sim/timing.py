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

* ``PhysicsClock`` (:mod:`stepml_core.synth.physics_clock`) — the synthesizer's engine: GPU time from roofline physics × noise,
  schedule() time from the empirical scheduler model, host work around the GPU, so the engine
  cycle = max(GPU path, CPU path) emerges (async scheduling: cycle N mostly reflects batch N−1);
* :class:`CycleClock` — a step-time model gives the engine cycle directly:
  ts_start(N+1) = ts_start(N) + step_time(batch N), the output of step N is processed at
  ts_start(N+1) (end of its cycle). This is how BLIS and Vidur advance their clocks and what a
  model fitted on ``cycle_us`` (gap between consecutive steps' ts_start) predicts.
"""

from __future__ import annotations


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
