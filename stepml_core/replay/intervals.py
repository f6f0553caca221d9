"""Intervals honest about extrapolation: the bootstrap interval of a request-calibrated prediction, widened by a
split-conformal term learned from the same protocol's out-of-sample predictions of *other* runs
(docs/calibration.md, *Uncertainty*).

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
