"""Stage 1's inputs: a calibration run (its request log with the observed latencies, and its serving context) and
its observed request timelines (docs/calibration.md).

Request i decodes from arrival + TTFT to arrival + E2E (client clock); an errored request from its first token
(logged, else modelled: admitted first come, first served at max_num_seqs by :func:`fcfs_admissions`, plus the
successes' median delay from admission to first token) until its client's abort. Integrals of these windows over a
time grid give each request's decode cycle c_i = (E2E − TTFT)/(G − 1) and the window-averaged batch composition
that the closed form (stepml_core.calibration.fit.fit_closed_form) regresses c_i on (:func:`request_timelines`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from stepml_core.errors import StepMLError
from stepml_core.replay.simulate import RunContext
from stepml_core.runs import rules

KV_OVER_CAPACITY = 0.95  # stage 1 skips decode windows where the timeline's KV demand exceeds this share of the pool
GRID_S = 0.005  # time grid of the timeline integrals


class CalibrationError(StepMLError, ValueError):
    """Calibration runs that cannot calibrate a model (no ground truth, mixed LLM models, ...)."""


@dataclass(frozen=True)
class CalibrationRun:
    """One calibration run: its request log table (with the observed latencies) and serving context."""

    experiment_id: str
    llm_model: str
    workload: str
    role: str | None
    table: pl.DataFrame  # request_log columns, observed_* required
    ctx: RunContext

    @property
    def saturated(self) -> bool:
        return is_saturated(self.table)


def is_saturated(table: pl.DataFrame) -> bool:
    """The run's observed failures and mean TTFT of its successes, judged by stepml_core.runs.rules.is_saturated."""
    err = table["observed_has_error"].fill_null(False)
    ttft = table.filter(~err)["observed_ttft_s"].drop_nulls()
    return rules.is_saturated(int(err.sum()), float(ttft.mean()) if ttft.len() else None)


@dataclass(frozen=True, eq=False)  # eq=False: arrays
class Timelines:
    """Per request of one run (arrays in index order) and what stage 1 regresses on."""

    experiment_id: str
    saturated: bool
    arrival_s: np.ndarray
    ttft_s: np.ndarray  # observed (nan where no first token)
    e2e_s: np.ndarray
    success: np.ndarray
    generated: np.ndarray  # tokens the server generated
    input_tokens: np.ndarray
    cycle_us: np.ndarray  # (E2E − TTFT)/(G − 1), nan where not a usable decode window
    dec_mean: np.ndarray  # time-average over the decode window: decoding requests
    kv_mean: np.ndarray  # … Σ context of the decoding requests (tokens)
    prefills_per_step: np.ndarray  # first tokens of other requests in the window / (G − 1)
    kv_over: np.ndarray  # share of the window where the timeline's KV demand exceeds the pool
    dec_at_arrival: np.ndarray
    kv_at_arrival: np.ndarray
    dec_grid: np.ndarray | None = None  # decoding requests on the time grid (grid_s apart)
    window_grid: np.ndarray | None = None  # per request: [first, end) grid indices of its decode window, -1 where none

    def hinge_mean(self, break_decoders: float) -> np.ndarray:
        """Per request: the time-average of max(0, n(t) − k) over its decode window (k = ``break_decoders``; n(t)
        the decoding requests of the timeline), NaN where it has none: what a hinge at k adds to stage 1's rows."""
        out = np.full(self.arrival_s.size, np.nan)
        if self.dec_grid is None or self.window_grid is None:
            return out
        h = np.concatenate([[0.0], np.cumsum(np.maximum(self.dec_grid - float(break_decoders), 0.0))])
        lo, hi = self.window_grid[:, 0], self.window_grid[:, 1]
        m = lo >= 0
        out[m] = (h[hi[m]] - h[lo[m]]) / (hi[m] - lo[m])
        return out

    def time_share_above(self, break_decoders: float) -> float:
        """Share of the run's decoding time (n(t) > 0) with more than ``break_decoders`` requests decoding."""
        if self.dec_grid is None:
            return float("nan")
        busy = self.dec_grid > 0
        return float(np.mean(self.dec_grid[busy] > break_decoders)) if busy.any() else float("nan")


def _generated_tokens(table: pl.DataFrame, ctx: RunContext) -> np.ndarray:
    """What the server generated: output_len for every request under ignore_eos (the client re-counts), else the log's."""
    if ctx.ignore_eos and ctx.output_len:
        return np.full(table.height, float(ctx.output_len))
    out = table["output_tokens"].to_numpy().astype(np.float64)
    return np.maximum(out, 1.0)


def fcfs_admissions(arrival_s: np.ndarray, depart_s: np.ndarray, cap: int) -> np.ndarray:
    """When each request (in arrival order) got a slot in an engine that admits first come, first served, up to
    ``cap`` running requests: max(arrival, the cap-th latest departure of the requests that arrived before it) —
    a request waits while ``cap`` earlier ones are still in the system (running, or waiting ahead of it).
    ``depart_s``: when each left (its last token, or the client's abort). One heap pass (O(n log cap))."""
    import heapq

    h: list[float] = []
    out = np.empty(arrival_s.size)
    for i, (ai, di) in enumerate(zip(arrival_s.tolist(), depart_s.tolist())):
        out[i] = max(ai, h[0]) if len(h) >= cap else ai
        if len(h) < cap:
            heapq.heappush(h, di)
        elif di > h[0]:
            heapq.heapreplace(h, di)
    return out


def _errored_windows(
    a: np.ndarray, ttft: np.ndarray, e2e: np.ndarray, ok: np.ndarray, err: np.ndarray, gen: np.ndarray, cap
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode windows of the errored requests (the client's log has their arrival and abort, not their first token):
    (first token, end, tokens/s) per request, nan where none. The first token is modelled where it is not logged:
    admission by :func:`fcfs_admissions` at the run's ``max_num_seqs`` (departures = successes' last tokens and
    errored requests' aborts, both in the ground truth), plus the successes' median delay from that modelled admission
    to their observed first token (prefill and token delay); a request admitted after its abort never decoded. Until its abort it decodes
    at the run's median rate of the successes (tokens/s), never reaching its G tokens (else it had succeeded)."""
    f, e, rate = (np.full(a.size, np.nan) for _ in range(3))
    err = err & np.isfinite(e2e)
    if not err.any() or not ok.any():
        return f, e, rate
    adm = np.full(a.size, np.nan)  # without max_num_seqs only logged first tokens count
    if cap:
        order = np.argsort(a, kind="stable")
        adm[order] = fcfs_admissions(a[order], a[order] + np.where(np.isfinite(e2e), e2e, 0.0)[order], int(cap))
    seen = ok & np.isfinite(adm)  # the successes' first token after the modelled admission: prefill, token delay
    delay = float(np.median(a[seen] + ttft[seen] - adm[seen])) if seen.any() else 0.0
    f[err] = np.where(np.isfinite(ttft[err]), a[err] + ttft[err], adm[err] + delay)
    e[err] = a[err] + e2e[err]
    f[err & ~(f < e)] = np.nan
    med = float(np.median(gen[ok] / np.maximum(e2e[ok] - ttft[ok], 1e-3)))
    m = np.isfinite(f)
    rate[m] = np.minimum(med, (gen[m] - 1) / np.maximum(e[m] - f[m], 1e-3))
    return f, e, rate


def request_timelines(run: CalibrationRun, grid_s: float = GRID_S) -> Timelines:
    """The run's observed request timelines → per-request decode cycles and window-averaged batch composition.

    Request i decodes on [a_i + TTFT_i, a_i + E2E_i] (client clock); an errored request decodes from its first
    token (logged, else modelled: :func:`_errored_windows`) until its abort; its context grows linearly from its
    prompt to prompt + G. Integrals over a ``grid_s`` grid give each window's time-averaged number of decoders and
    Σ context."""
    t = run.table.sort("index")
    if t["observed_e2e_s"].null_count() == t.height:
        raise CalibrationError(f"{run.experiment_id}: no observed latencies (ground truth) to calibrate on")
    a = t["arrival_time_us"].to_numpy().astype(np.float64) * 1e-6
    ttft = t["observed_ttft_s"].fill_null(np.nan).to_numpy().astype(np.float64)
    e2e = t["observed_e2e_s"].fill_null(np.nan).to_numpy().astype(np.float64)
    ok = (~t["observed_has_error"].fill_null(True)).to_numpy() & np.isfinite(e2e) & np.isfinite(ttft)
    gen = _generated_tokens(t, run.ctx)
    inp = t["input_tokens"].to_numpy().astype(np.float64)
    if (inp > 0).any():
        inp = np.where(inp <= 0, np.median(inp[inp > 0]), inp)
    ok &= e2e >= ttft
    ef, ee, er = _errored_windows(
        a, ttft, e2e, ok, t["observed_has_error"].fill_null(False).to_numpy(), gen, run.ctx.max_num_seqs
    )
    has = ok | np.isfinite(ef)
    f = np.where(ok, a + np.where(ok, ttft, 0.0), np.where(has, ef, a))
    e = np.where(ok, a + np.where(ok, e2e, 0.0), np.where(has, ee, a))
    span = float(np.max(np.where(has, e, a))) + 1.0 if a.size else 1.0
    ng = int(span / grid_s) + 2
    idx = np.flatnonzero(has)
    fi = np.clip(np.rint(f[idx] / grid_s).astype(np.int64), 0, ng - 2)
    ei = np.clip(np.rint(e[idx] / grid_s).astype(np.int64), 0, ng - 1)
    ei = np.maximum(ei, fi + 1)
    dn = np.bincount(fi, minlength=ng) - np.bincount(ei, minlength=ng)
    n_dec = np.cumsum(dn).astype(np.float64)
    rate = np.where(ok, gen, 0.0)[idx] / np.maximum(e[idx] - f[idx], 1e-3)  # tokens/s while decoding
    rate = np.where(ok[idx], rate, er[idx])
    c0 = inp[idx] - rate * f[idx]
    k0 = np.cumsum(np.bincount(fi, c0, ng) - np.bincount(ei, c0, ng))
    k1 = np.cumsum(np.bincount(fi, rate, ng) - np.bincount(ei, rate, ng))
    kv = k0 + k1 * (np.arange(ng) * grid_s)
    cap = float(run.ctx.kv_blocks_total or 0) * 16
    over = (kv > KV_OVER_CAPACITY * cap).astype(np.float64) if cap > 0 else np.zeros(ng)
    Cn, Ck, Co = (np.concatenate([[0.0], np.cumsum(x)]) for x in (n_dec, kv, over))
    w = (ei - fi).astype(np.float64)
    n = a.size
    dec_mean, kv_mean, kv_over, pps = (np.full(n, np.nan) for _ in range(4))
    dec_mean[idx] = (Cn[ei] - Cn[fi]) / w
    kv_mean[idx] = (Ck[ei] - Ck[fi]) / w
    kv_over[idx] = (Co[ei] - Co[fi]) / w
    fs = np.sort(f[idx])
    starts = np.searchsorted(fs, f[idx], side="right")  # other requests' first tokens inside the window
    ends = np.searchsorted(fs, e[idx], side="left")
    pps[idx] = np.maximum(ends - starts, 0) / np.maximum(gen[idx] - 1, 1)
    cyc = np.full(n, np.nan)
    usable = ok & (gen >= 2) & has
    cyc[usable] = (e2e[usable] - ttft[usable]) / (gen[usable] - 1) * 1e6
    ai = np.clip(np.rint(a / grid_s).astype(np.int64), 0, ng - 1)
    window = np.full((n, 2), -1, dtype=np.int64)
    window[idx, 0], window[idx, 1] = fi, ei
    return Timelines(
        experiment_id=run.experiment_id,
        saturated=run.saturated,
        arrival_s=a,
        ttft_s=ttft,
        e2e_s=e2e,
        success=ok,
        generated=gen,
        input_tokens=inp,
        cycle_us=cyc,
        dec_mean=dec_mean,
        kv_mean=kv_mean,
        prefills_per_step=pps,
        kv_over=kv_over,
        dec_at_arrival=n_dec[ai],
        kv_at_arrival=kv[ai],
        dec_grid=n_dec,
        window_grid=window,
    )
