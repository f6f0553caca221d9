"""Intervals of a request-calibrated model's replayed predictions (docs/calibration.md, *Uncertainty*), in two parts.

**Bootstrap bounds, per replay** (:func:`replay_interval`; replay.specs calls it for a calibrated model that predicts
the run out of sample). :class:`FeatureSums` records Σ of the BLIS features over the replay's steps; the bootstrap
models at the (1 ∓ level)/2 quantiles of the run's latency index (:func:`latency_index_us`, monotone in every
coefficient) are replayed beside the central model, and [lo, hi] is the range of the three. The calibration's
leave-one-run-out errors widen those bound models (:func:`between_run_bounds`) for two more replays (brun_*).

**Honest about extrapolation, over the study**: the bootstrap interval of a request-calibrated prediction, widened by
a split-conformal term learned from the same protocol's out-of-sample predictions of *other* runs.

The bootstrap interval [lo, hi] of a replayed metric carries the noise of the calibration data, not the error of
applying the model to a workload or load it never saw. Per scored prediction j (observed y_j, predicted ŷ_j), the
**excess** of its error beyond its bootstrap interval, in percent of the prediction:

    s_j = 100 · max(0, lo_j − y_j, y_j − hi_j) / |ŷ_j|

For a prediction of run r, the n scores of the same protocol and metric whose model could not have used r's data
(:func:`could_use`: a rule on LLM model, workload and role, never on whether r has ground truth, so deleting r's
ground truth changes neither its prediction nor its interval) give

    q_r = the ⌈(n + 1)·level⌉-th smallest of them (+∞ when that rank exceeds n)
    interval_r = [max(0, lo_r − q_r·|ŷ_r|/100), hi_r + q_r·|ŷ_r|/100]

If the runs are exchangeable, P(y_r inside) ≥ level (split conformal prediction; Lei et al. 2018). When a
protocol alone has fewer than ``min_scores(level)`` such scores (9 at 90 %), the scores of all protocols for that
metric are pooled (each eligible under its own protocol's rule); ``pool`` says which.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from stepml_core.calibration.params import PARAM_NAMES, StepParams, serving_model
from stepml_core.replay.simulate import RunContext, replay
from stepml_core.stepmodels.sim_step_time import LinearStepTime

CONFORMAL_LEVEL = 0.90
WIDENED_COLUMNS = {
    "boot_lo": pl.Float64,
    "boot_hi": pl.Float64,
    "boot_inside": pl.Boolean,
    "excess_pct": pl.Float64,
    "extrap_q_pct": pl.Float64,
    "extrap_n": pl.Int64,
    "extrap_pool": pl.Utf8,
}


def min_scores(level: float = CONFORMAL_LEVEL) -> int:
    """The fewest scores for which the conformal rank ⌈(n + 1)·level⌉ is ≤ n (9 at 90 %)."""
    return int(math.ceil(level / (1.0 - level) - 1e-9))


def could_use(
    protocol: str, llm_j: np.ndarray, wl_j: np.ndarray, llm_r: np.ndarray, wl_r: np.ndarray, role_r: np.ndarray
) -> np.ndarray:
    """Matrix [r, j]: True when run r's request log would be among the calibration runs of j's model, had r ground
    truth (calibration_protocols.plan_folds): roles — r is a train run of j's LLM model; lowo — r is of j's LLM model
    and another workload; lomo — r is of another LLM model (a source). Unknown protocol: any run of j's LLM model."""
    same = llm_r[:, None] == llm_j[None, :]
    if protocol == "roles":
        return same & (role_r == "train")[:, None]
    if protocol == "lowo":
        return same & (wl_r[:, None] != wl_j[None, :])
    if protocol == "lomo":
        return ~same
    return same


def excess_pct(lo, hi, predicted, observed) -> np.ndarray:
    """s = 100·max(0, lo − y, y − hi)/|ŷ| (NaN where y or the interval is missing)."""
    lo, hi, p, y = (np.asarray(a, dtype=np.float64) for a in (lo, hi, predicted, observed))
    with np.errstate(invalid="ignore", divide="ignore"):
        return 100.0 * np.maximum(0.0, np.maximum(lo - y, y - hi)) / np.abs(p)


def conformal_quantile(
    scores: np.ndarray, eligible: np.ndarray, level: float = CONFORMAL_LEVEL
) -> tuple[np.ndarray, np.ndarray]:
    """Per row r of ``eligible`` [r, j]: (q_r = ⌈(n_r + 1)·level⌉-th smallest of the finite eligible scores, +∞ when
    that rank exceeds n_r; n_r)."""
    s = np.asarray(scores, dtype=np.float64)
    ok = eligible & np.isfinite(s)[None, :]
    n = ok.sum(axis=1)
    if s.size == 0:
        return np.full(n.shape, np.inf), n
    srt = np.sort(np.where(ok, s[None, :], np.inf), axis=1)
    k = np.ceil((n + 1) * level - 1e-9).astype(np.int64)
    q = np.where((k <= n) & (k >= 1), srt[np.arange(len(n)), np.clip(k - 1, 0, s.size - 1)], np.inf)
    return q, n


def widen_intervals(ivs: pl.DataFrame, runs: dict[str, dict], level: float = CONFORMAL_LEVEL) -> pl.DataFrame:
    """``replay_intervals`` rows (lo, hi, inside from the bootstrap) → the same rows with lo, hi, inside of the widened
    interval and the bootstrap's kept as boot_lo, boot_hi, boot_inside; excess_pct (the row's own score),
    extrap_q_pct, extrap_n (scores behind it), extrap_pool (``protocol`` or ``all protocols``).

    ``runs[experiment_id]`` = {"llm_model", "workload"}; a row's role is its own column. A row's interval never
    reads its own run's observed values (see the module docstring)."""
    out_schema = {**dict(ivs.schema), **WIDENED_COLUMNS}
    if ivs.height == 0:
        return pl.DataFrame(schema=out_schema).select(list(dict(ivs.schema)) + list(WIDENED_COLUMNS))
    eid = ivs["experiment_id"].to_numpy().astype(str)
    llm = np.array([str((runs.get(e) or {}).get("llm_model") or "") for e in eid])
    wl = np.array([str((runs.get(e) or {}).get("workload") or "") for e in eid])
    role = ivs["role"].fill_null("").to_numpy().astype(str)
    proto = ivs["protocol"].fill_null("").to_numpy().astype(str)
    metric = ivs["metric"].to_numpy().astype(str)
    fitted = [set((f or "").split(";")) for f in ivs["fitted_on"].to_list()]
    lo = ivs["lo"].fill_null(np.nan).to_numpy().astype(np.float64)
    hi = ivs["hi"].fill_null(np.nan).to_numpy().astype(np.float64)
    pred = ivs["predicted"].fill_null(np.nan).to_numpy().astype(np.float64)
    obs = ivs["observed"].fill_null(np.nan).to_numpy().astype(np.float64)
    score = excess_pct(lo, hi, pred, obs)
    # eligible[r, j]: j's model could not have used r's data, j is another run (and, belt and braces, r is not in
    # j's fitted_on), j is a prediction of the same metric
    elig_any = np.zeros((eid.size, eid.size), dtype=bool)
    for p in np.unique(proto):
        cols = proto == p
        e = ~could_use(p, llm[cols], wl[cols], llm, wl, role)
        elig_any[:, cols] = e
    elig_any &= eid[:, None] != eid[None, :]
    elig_any &= metric[:, None] == metric[None, :]
    for j, f in enumerate(fitted):
        elig_any[:, j] &= ~np.isin(eid, list(f))
    same_proto = proto[:, None] == proto[None, :]
    q_p, n_p = conformal_quantile(score, elig_any & same_proto, level)
    q_a, n_a = conformal_quantile(score, elig_any, level)
    use_p = n_p >= min_scores(level)
    q = np.where(use_p, q_p, q_a)
    n = np.where(use_p, n_p, n_a)
    half = q * np.abs(pred) / 100.0
    with np.errstate(invalid="ignore"):
        new_lo = np.where(np.isfinite(lo), np.maximum(0.0, lo - np.where(np.isfinite(half), half, np.inf)), np.nan)
        new_hi = np.where(np.isfinite(hi), hi + half, np.nan)
    has = np.isfinite(obs) & np.isfinite(lo) & np.isfinite(hi)
    inside = np.where(has, (new_lo <= obs) & (obs <= new_hi), False)
    return (
        ivs.rename({"lo": "boot_lo", "hi": "boot_hi", "inside": "boot_inside"})
        .with_columns(
            lo=pl.Series(new_lo, dtype=pl.Float64).fill_nan(None),
            hi=pl.Series(new_hi, dtype=pl.Float64).fill_nan(None),
            inside=pl.when(pl.Series(has)).then(pl.Series(inside)).otherwise(None),
            excess_pct=pl.Series(score, dtype=pl.Float64).fill_nan(None),
            extrap_q_pct=pl.Series(q, dtype=pl.Float64),
            extrap_n=pl.Series(n, dtype=pl.Int64),
            extrap_pool=pl.Series(np.where(use_p, "protocol", "all protocols")),
        )
        .select(list(dict(ivs.schema)) + list(WIDENED_COLUMNS))
    )


# ---------------------------------------------------------------------------- bootstrap bounds of one replay

INTERVAL_LEVEL = 0.90  # two-sided: the bootstrap models at the 5th and 95th percentile of the run's latency index


class FeatureSums:
    """Wraps a LinearStepTime: same prediction, and Σ over the replay's steps of the BLIS features a calibrated
    model uses — enough to evaluate any calibrated model's total step time over the same batches exactly."""

    KEYS = ("decode_tokens", "kv_sum", "prefill_tokens", "num_prefill_reqs")

    def __init__(self, inner: LinearStepTime):
        from stepml_core.stepmodels.sim_step_time import BLIS_STEP_FEATURES, blis_feature_values, blis_features

        self.inner, self.name, self._feat = inner, inner.name, blis_features
        self._values = blis_feature_values if inner.reads_values else None  # the same sums without the dict
        self._at = tuple(BLIS_STEP_FEATURES.index(k) for k in self.KEYS)
        self.steps = 0
        self.sums = dict.fromkeys(self.KEYS, 0.0)

    def step_time_us(self, b) -> float:
        if self._values is not None:
            v = self._values(b)
            self.steps += 1
            s = self.sums
            for k, i in zip(self.KEYS, self._at):
                s[k] += v[i]
            return self.inner.predict_values_us(v)
        f = self._feat(b, self.inner.needs_requests)
        self.steps += 1
        s = self.sums
        for k in self.KEYS:
            s[k] += f[k]
        return self.inner.predict_features_us(f)


def latency_index_us(rows: np.ndarray, steps: int, sums: dict, mean_generated: float, mean_input: float) -> np.ndarray:
    """Per parameter row: mean step time over the replay's batches × mean generated tokens + queueing at the mean
    prompt — a request's E2E in the model's terms, monotone in every coefficient."""
    P = {k: rows[:, i] for i, k in enumerate(PARAM_NAMES)}
    n = max(int(steps), 1)
    mean_step = (
        P["b0_us"] * n
        + P["b_dec_us"] * sums["decode_tokens"]
        + P["b_kv_us"] * sums["kv_sum"]
        + P["b_pf_us"] * sums["prefill_tokens"]
        + P["b_npf_us"] * sums["num_prefill_reqs"]
    ) / n
    return mean_step * mean_generated + P["q0_us"] + P["q1_us"] * mean_input


def interval_bounds(
    boot: dict, steps: int, sums: dict, mean_generated: float, mean_input: float, level: float = INTERVAL_LEVEL
) -> tuple[StepParams, StepParams] | None:
    """The bootstrap (or per-source) models at the (1 − level)/2 and (1 + level)/2 quantiles of the latency index."""
    rows = np.asarray((boot or {}).get("rows") or [], dtype=np.float64)
    if rows.ndim != 2 or rows.shape[0] < 2:
        return None
    idx = latency_index_us(rows, steps, sums, mean_generated, mean_input)
    order = np.argsort(idx, kind="stable")
    k_lo = int(np.floor((1 - level) / 2 * (len(order) - 1)))
    k_hi = int(np.ceil((1 + level) / 2 * (len(order) - 1)))
    return StepParams.from_vector(rows[order[k_lo]]), StepParams.from_vector(rows[order[k_hi]])


def _step_part(p: StepParams, steps: int, sums: dict, mean_generated: float) -> float:
    return float(latency_index_us(p.as_vector()[None, :], steps, sums, mean_generated, 0.0)[0] - p.q0_us)


def between_run_bounds(
    spec: dict, bounds: tuple[StepParams, StepParams], steps: int, sums: dict, mean_generated: float, level: float
) -> tuple[StepParams, StepParams, dict] | None:
    """The bootstrap's bound models widened by the between-run term of the calibration (``between_runs``: leave one
    calibration run out, stage 1's terms). With the k runs' log step errors e_c and a new run's error ~ N(0, σ²),
    z = t_k((1 + level)/2)·√(Σe_c²/k) bounds a new run's log step error; each side's log half-width of the step part
    of the latency index becomes √(h_boot² + z²) (independent parts), the bound model's step coefficients scaled to
    it; α0 moves by ∓ the same quantile of the non-saturated runs' α0 errors. None without between-run errors (one
    calibration run, a leave-one-model-out transfer)."""
    from scipy.stats import t as student_t

    br = ((spec.get("calibration") or {}).get("between_runs")) or {}
    e = np.asarray([x for x in br.get("step_log_err") or [] if x is not None], dtype=np.float64)
    e = e[np.isfinite(e)]
    if e.size == 0:
        return None
    tq = (1.0 + level) / 2.0
    z = float(student_t.ppf(tq, e.size)) * math.sqrt(float(np.mean(e**2)))
    qe = np.asarray([x for x in br.get("q_err_us") or [] if x is not None], dtype=np.float64)
    qe = qe[np.isfinite(qe)]
    zq = float(student_t.ppf(tq, qe.size)) * math.sqrt(float(np.mean(qe**2))) if qe.size else 0.0
    s_c = _step_part(StepParams(**spec["params"]), steps, sums, mean_generated)
    out = []
    for p, sign in zip(bounds, (-1.0, 1.0)):
        s_b = _step_part(p, steps, sums, mean_generated)
        if not (s_b > 0 and s_c > 0):
            return None
        h = abs(math.log(s_b / s_c))
        out.append(p.scaled(s_c * math.exp(sign * math.hypot(h, z)) / s_b, sign * zq))
    return out[0], out[1], {"step_pct": 100.0 * math.expm1(z), "q_ms": zq / 1e3, "runs": int(e.size)}


def _bound_replays(models: list[StepParams], spec: dict, workload, ctx: RunContext, table, seed: int) -> list[dict]:
    from stepml_core.replay.simulate import score_replay

    out = []
    for p in models:
        r = replay(workload, serving_model(p, spec["name"], spec.get("load_delay")), ctx, seed=seed)
        out.append({x["metric"]: x["predicted"] for x in score_replay(r.per_request, table)[0]})
    return out


def _range(c: dict, bound_rows: list[dict]) -> tuple[float | None, float | None, bool | None]:
    vals = [v for v in (c["predicted"], *(b.get(c["metric"]) for b in bound_rows)) if v is not None and np.isfinite(v)]
    lo, hi = (min(vals), max(vals)) if vals else (None, None)
    ob = c.get("observed")
    return lo, hi, (None if ob is None or lo is None else bool(lo <= ob <= hi))


def replay_interval(
    spec: dict, workload, ctx: RunContext, table: pl.DataFrame, central: list[dict], sums: FeatureSums, *, seed: int = 0
) -> list[dict]:
    """Interval per replay metric of an out-of-sample calibrated prediction: replays with the two bound models;
    [lo, hi] = the range of the bound replays and the central one; ``inside`` says whether the observed value is in it.
    brun_lo, brun_hi, brun_inside: the range of those and two more replays, with the bound models widened by the
    calibration's between-run term (between_run_bounds; null without one: a replayed metric need not be monotone in the
    step scale, so the range keeps the bootstrap's); brun_step_pct and brun_runs its size and the runs behind it."""
    mean_generated = float(np.mean(workload.max_tokens))
    b = interval_bounds(
        spec.get("bootstrap"), sums.steps, sums.sums, mean_generated, float(np.mean(workload.prompt_tokens))
    )
    if b is None:
        return []
    boot_rows = _bound_replays(list(b), spec, workload, ctx, table, seed)
    wb = between_run_bounds(spec, b, sums.steps, sums.sums, mean_generated, INTERVAL_LEVEL)
    brun_rows = _bound_replays(list(wb[:2]), spec, workload, ctx, table, seed) if wb else None
    out = []
    for c in central:
        lo, hi, inside = _range(c, boot_rows)
        blo, bhi, binside = _range(c, boot_rows + brun_rows) if brun_rows else (None, None, None)
        out.append(
            {
                "metric": c["metric"],
                "predicted": c["predicted"],
                "lo": lo,
                "hi": hi,
                "observed": c.get("observed"),
                "inside": inside,
                "brun_lo": blo,
                "brun_hi": bhi,
                "brun_inside": binside,
                "brun_step_pct": wb[2]["step_pct"] if wb else None,
                "brun_runs": wb[2]["runs"] if wb else None,
            }
        )
    return out
