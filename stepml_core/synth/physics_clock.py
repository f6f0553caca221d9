"""The synthesizer's clock: GPU time from roofline physics × noise, schedule() time from the empirical scheduler
model, host work around the GPU, so the engine cycle = max(GPU path, CPU path) emerges (docs/synthesizer.md §3–4;
the clock protocol the engine asks is in :mod:`stepml_core.sim.timing`). The physics replay uses it too.
"""

from __future__ import annotations

import math

import numpy as np

from stepml_core.synth.cycle_time import EnginePhysics
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
