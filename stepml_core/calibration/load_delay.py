"""Stage 3 of the request calibration, opt-in: the load delay (docs/calibration.md, *What the TTFT goals ask of the
cycle*, point 5: pre-registered 2026-12-07 before any replay with it).

    TTFT += δα0 + γ·n_first        E2E += δα0 + γ·n_last

n = the requests scheduled in the step whose output carried the token, as the replay ran it (never the observed
decoders). A token reaches its client later the more requests its step carried; the engine's run is unchanged.
γ (µs per request, ≥ 0) and δα0 (µs): least absolute deviations of the per-request TTFT residual (observed − replayed
by the stage-2 model) on [1, n_first] over the successes of the non-saturated calibration runs, each run weighted
equally. BLIS's file cannot carry it (its ``queueing_time`` reads ``input_len`` only): a spec keeps it beside its
``doc`` (``load_delay``), and the exported file is the stage-2 model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import polars as pl

from stepml_core.calibration.params import StepParams, serving_model
from stepml_core.calibration.timelines import CalibrationRun
from stepml_core.replay.simulate import replay, replay_workload, weighted_percentile


@dataclass(frozen=True)
class LoadDelay:
    shift_us: float  # δα0: added to every token's delay (µs)
    per_request_us: float  # γ: µs per request scheduled in the token's step
    requests_used: int  # successes of the non-saturated calibration runs that fitted it
    runs: tuple[str, ...] = ()

    def spec(self) -> dict:
        """What a replay spec carries (``load_delay``): the two numbers StepServingModel reads."""
        return {"shift_us": self.shift_us, "per_request_us": self.per_request_us}

    def summary(self) -> dict:
        return asdict(self) | {"runs": list(self.runs)}

    @classmethod
    def from_summary(cls, d: dict) -> LoadDelay:
        return cls(float(d["shift_us"]), float(d["per_request_us"]), int(d["requests_used"]), tuple(d.get("runs", ())))


def lad_line(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """(a, b ≥ 0) minimising Σ w·|y − a − b·x|. For a given b the best a is the weighted median of y − b·x, and the
    cost of that pair is convex in b (a partial minimum of a convex function): b by golden-section search on
    [0, range of y / range of x] to 1e-6 of the range, then a.

    >>> a, b = lad_line(np.array([0.0, 1, 2, 3, 4]), np.array([1.0, 3, 5, 7, 100]), np.ones(5))
    >>> round(a, 4), round(b, 4)
    (1.0, 2.0)
    >>> lad_line(np.array([0.0, 1, 2]), np.array([5.0, 4, 3]), np.ones(3))  # a falling line: b = 0, a the median
    (4.0, 0.0)
    """
    x, y, w = (np.asarray(v, dtype=np.float64) for v in (x, y, w))

    def cost(b: float) -> float:
        r = y - b * x
        return float(np.sum(w * np.abs(r - weighted_percentile(r, w, 50))))

    dx = float(x.max() - x.min()) if x.size else 0.0
    lo, hi = 0.0, (float(y.max() - y.min()) / dx if dx > 0 else 0.0)
    g = (math.sqrt(5) - 1) / 2
    c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    fc, fd = cost(c), cost(d)
    while hi - lo > 1e-6 * max(hi, 1e-12):
        if fc <= fd:
            hi, d, fd = d, c, fc
            c = hi - g * (hi - lo)
            fc = cost(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + g * (hi - lo)
            fd = cost(d)
    b_best = min((lo, hi, 0.0), key=cost)
    return round(weighted_percentile(y - b_best * x, w, 50), 6), round(b_best, 6)


def ttft_residuals(params: StepParams, run: CalibrationRun, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n_first, observed − replayed TTFT µs) over the requests that succeeded in the replay and in the log."""
    w = replay_workload(run.table, run.ctx, seed=seed)
    res = replay(w, serving_model(params), run.ctx, seed=seed)
    pred = res.per_request.with_columns(pl.Series("n_first", res.first_step_requests))
    obs = run.table.select("index", "observed_ttft_s", "observed_has_error")
    t = pred.join(obs, on="index").filter(
        pl.col("success") & (pl.col("observed_has_error") == False)  # noqa: E712 (null: no ground truth)
    )
    t = t.drop_nulls(["ttft_s", "observed_ttft_s"])
    return t["n_first"].to_numpy(), (t["observed_ttft_s"] - t["ttft_s"]).to_numpy() * 1e6


def fit_load_delay(params: StepParams, runs: list[CalibrationRun], *, seed: int = 0) -> LoadDelay | None:
    """γ and δα0 on the non-saturated calibration runs (module docstring); None when none has a scored success."""
    xs, ys, ws, used = [], [], [], []
    for r in runs:
        if r.saturated:
            continue
        n, resid = ttft_residuals(params, r, seed=seed)
        if n.size == 0:
            continue
        xs.append(n), ys.append(resid), ws.append(np.full(n.size, 1.0 / n.size)), used.append(r.experiment_id)
    if not xs:
        return None
    a, b = lad_line(np.concatenate(xs), np.concatenate(ys), np.concatenate(ws))
    return LoadDelay(a, b, int(sum(x.size for x in xs)), tuple(used))
