"""Stage 2 of a calibration, the simulator in the loop (docs/calibration.md): scipy's ``least_squares`` adjusts a
scale on every step coefficient and a shift of α0 so that replaying the non-saturated calibration runs through
StepML's vLLM simulator reproduces their TTFT and E2E distributions (mean, p50, p90, p99 relative errors), on a few
windows of scored arrivals per run after a warm-up (:func:`window_workloads`):

    θ = (log s, Δα0 / 10 ms),  β·s for every step coefficient,  α0 + Δα0
    minimize Σ_runs Σ_metrics ρ((predicted − observed) / observed)      (ρ: soft_l1, scale REFINE_F_SCALE)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import polars as pl

from stepml_core.calibration.params import StepParams, serving_model
from stepml_core.calibration.timelines import CalibrationRun
from stepml_core.replay.simulate import ReplayWorkload, latency_summary, replay, replay_workload

REFINE_METRICS = ("ttft_mean", "ttft_p50", "ttft_p90", "e2e_mean", "e2e_p50", "e2e_p90", "e2e_p99")
REFINE_LOSS, REFINE_F_SCALE = (
    "soft_l1",
    0.03,
)  # residuals beyond ~3 % count linearly (a TTFT tail near capacity must not rule)
REFINE_WINDOWS = (4, 60.0, 20.0)  # stage 2 replays 4 windows per run: 60 s of scored arrivals after 20 s of warm-up


@dataclass(frozen=True)
class RefineReport:
    """What stage 2 did: the step scale and α0 shift found, its cost before and after, the runs it replayed."""

    step_scale: float
    q_shift_us: float
    evaluations: int
    seconds: float
    cost_start: float  # robust (soft_l1) cost of the relative residuals at the closed form
    cost_end: float
    runs: list  # calibration runs replayed
    residual_pct: dict = field(default_factory=dict)  # run → metric → relative error % at the optimum
    status: str = ""


class _Objective:
    """Replays the non-saturated calibration runs for a parameter vector θ = (log step scale, α0 shift / 10 ms);
    memoized (the simulator is deterministic for a step-time model)."""

    def __init__(self, base: StepParams, runs: list[CalibrationRun], seed: int, windows: tuple | None):
        self.base, self.runs, self.seed = base, runs, seed
        self.work, self.observed = [], []
        for r in runs:
            w = replay_workload(r.table, r.ctx, seed=seed)
            parts = window_workloads(w, *windows) if windows else [(w, np.ones(w.index.size, dtype=bool))]
            truth = r.table.filter(pl.col("observed_has_error").is_not_null())["index"].to_numpy()
            parts = [(sub, keep & np.isin(sub.index, truth)) for sub, keep in parts]  # score what has ground truth
            scored = np.concatenate([sub.index[keep] for sub, keep in parts])
            self.work.append((r, parts))
            self.observed.append(_observed_summary(r.table.filter(pl.col("index").is_in(scored))))
        self.memo: dict[tuple, tuple[np.ndarray, list[dict]]] = {}
        self.seconds = 0.0

    def params(self, x) -> StepParams:
        return self.base.scaled(math.exp(float(x[0])), float(x[1]) * 1e4)

    def evaluate(self, x) -> tuple[np.ndarray, list[dict]]:
        key = tuple(np.round(np.asarray(x, dtype=np.float64), 12))
        if key not in self.memo:
            t0 = time.perf_counter()
            model = serving_model(self.params(x))
            preds, res = [], []
            for (run, parts), obs in zip(self.work, self.observed):
                per = [
                    replay(sub, model, run.ctx, seed=self.seed).per_request.filter(pl.Series(keep))
                    for sub, keep in parts
                ]
                pr = _predicted_summary(pl.concat(per))
                preds.append(pr)
                res += [(pr[m] - obs[m]) / obs[m] if obs[m] else 0.0 for m in REFINE_METRICS]
            self.memo[key] = (np.nan_to_num(np.asarray(res), nan=10.0, posinf=10.0, neginf=-10.0), preds)
            self.seconds += time.perf_counter() - t0
        return self.memo[key]

    def residuals(self, x) -> np.ndarray:
        return self.evaluate(x)[0]

    def jacobian(self, x) -> np.ndarray:
        """Model-based sensitivities at x (no extra replays): a latency L = queueing + step time, so
        ∂L/∂log s = L − α0 and ∂L/∂shift = 10 ms; relative to the observed value."""
        _, preds = self.evaluate(x)
        q_s = self.params(x).q0_us * 1e-6
        rows = []
        for pr, obs in zip(preds, self.observed):
            for m in REFINE_METRICS:
                o = obs[m] or 1.0
                rows.append([(max(pr[m] - q_s, 0.0) if np.isfinite(pr[m]) else 0.0) / o, 1e-2 / o])
        return np.asarray(rows)


def _observed_summary(table: pl.DataFrame) -> dict:
    t = table.sort("index")
    ok = (~t["observed_has_error"].fill_null(True)).to_numpy() & t["observed_e2e_s"].is_not_null().to_numpy()
    return latency_summary(
        t["arrival_time_us"].to_numpy() * 1e-6,
        t["observed_ttft_s"].fill_null(np.nan).to_numpy(),
        t["observed_e2e_s"].fill_null(np.nan).to_numpy(),
        ok,
        t["output_tokens"].to_numpy(),
    )


def _predicted_summary(p: pl.DataFrame) -> dict:
    p = p.sort("index")
    return latency_summary(
        p["arrival_time_us"].to_numpy() * 1e-6,
        p["ttft_s"].fill_null(np.nan).to_numpy(),
        p["e2e_s"].to_numpy(),
        p["success"].to_numpy(),
        p["output_tokens"].to_numpy(),
    )


def window_workloads(
    w: ReplayWorkload, n_windows: int, window_s: float, warm_s: float
) -> list[tuple[ReplayWorkload, np.ndarray]]:
    """``n_windows`` evenly spaced windows of the run: each a sub-workload of the requests arriving in
    [start − warm_s, start + window_s) and the mask of those scored (arriving in [start, start + window_s)).
    Non-saturated runs forget their state within seconds (E2E ≤ ~5 s), so windows replay like the whole run."""
    a = w.arrival_s
    span = float(a.max() - a.min()) if a.size else 0.0
    if span <= n_windows * (window_s + warm_s):
        return [(w, np.ones(a.size, dtype=bool))]
    out = []
    for k in range(n_windows):
        start = float(a.min()) + warm_s + (span - window_s - warm_s) * k / max(n_windows - 1, 1)
        sel = (a >= start - warm_s) & (a < start + window_s)
        idx = np.flatnonzero(sel)
        sub = replace(
            w,
            arrival_s=a[idx],
            prompt_tokens=w.prompt_tokens[idx],
            max_tokens=w.max_tokens[idx],
            prompt_id=w.prompt_id[idx],
            group=w.group[idx],
            index=w.index[idx],
            timeout_s=np.broadcast_to(w.timeout_s, a.shape)[idx],
        )
        out.append((sub, a[idx] >= start))
    return out


def _robust_cost(res: np.ndarray) -> float:
    """least_squares' soft_l1 cost: Σ 2·f²·(sqrt(1 + (r/f)²) − 1)."""
    z = (np.asarray(res) / REFINE_F_SCALE) ** 2
    return float(np.sum(2 * REFINE_F_SCALE**2 * (np.sqrt(1 + z) - 1)))


def refine(
    params: StepParams,
    runs: list[CalibrationRun],
    *,
    seed: int = 0,
    max_evals: int = 6,
    windows: tuple | None = REFINE_WINDOWS,
) -> tuple[StepParams, RefineReport]:
    """Stage 2: scipy ``least_squares`` (trust region) over θ = (log step scale, α0 shift) so that replaying the
    non-saturated calibration runs matches their TTFT and E2E mean/p50/p90(/p99); the Jacobian comes from the
    latency decomposition (no finite-difference replays), so each evaluation is one replay of each run."""
    from scipy.optimize import least_squares

    calm = [r for r in runs if not r.saturated]
    if not calm:
        return params, RefineReport(
            1.0, 0.0, 0, 0.0, float("nan"), float("nan"), [], status="no non-saturated calibration run"
        )
    obj = _Objective(params, calm, seed, windows)
    x0 = np.zeros(2)
    r0 = obj.residuals(x0)
    sol = least_squares(
        obj.residuals,
        x0,
        jac=obj.jacobian,
        bounds=([-0.7, -10.0], [0.7, 10.0]),
        method="trf",
        loss=REFINE_LOSS,
        f_scale=REFINE_F_SCALE,
        max_nfev=max_evals,
        xtol=1e-3,
        ftol=1e-3,
        x_scale=[0.05, 0.5],
    )
    best_x = min(obj.memo, key=lambda k: _robust_cost(obj.memo[k][0]))
    x = np.asarray(best_x)
    res, preds = obj.evaluate(x)
    per_run = {}
    for k, r in enumerate(calm):
        per_run[r.experiment_id] = {
            m: round(float(res[k * len(REFINE_METRICS) + j]) * 100, 3) for j, m in enumerate(REFINE_METRICS)
        }
    rep = RefineReport(
        step_scale=math.exp(float(x[0])),
        q_shift_us=float(x[1]) * 1e4,
        evaluations=len(obj.memo),
        seconds=obj.seconds,
        cost_start=_robust_cost(r0),
        cost_end=_robust_cost(res),
        runs=[r.experiment_id for r in calm],
        residual_pct=per_run,
        status=str(sol.message),
    )
    return obj.params(x), rep
