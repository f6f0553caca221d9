"""Step-time models calibrated from request logs alone (docs/calibration.md).

Most people who want a step-time model have a load generator's request log (arrival, tokens,
client-side TTFT and E2E per request), not an instrumented engine. :func:`calibrate` turns the
request logs of some *calibration runs* of one LLM model into a BLIS StepML model file (BLIS's own
feature names, evaluated by :class:`~stepml_core.stepmodels.sim_step_time.LinearStepTime`, so what StepML
replays is exactly what BLIS would read):

    step_us  = β0 + β_dec·decode_tokens + β_kv·kv_sum + β_pf·prefill_tokens + β_npf·num_prefill_reqs
    queue_us = α0 + α1·input_len                                      (arrival → the engine's queue)

Physics of the form: β0 is the per-step fixed cost (streaming the weights once per step, kernel
launches, host work hidden behind it), β_dec the per-sequence cost of a decode step (compute and
per-request host work), β_kv the cost of reading a KV-cache token in decode attention (bounded
below by KV bytes per token per GPU / HBM bandwidth: it cannot be read faster), β_pf the cost of a
cache-miss prompt token (compute, 2·active parameters FLOPs per token), β_npf the extra cost of a
step that carries a prompt chunk (a mixed batch runs outside the full CUDA graph), α the API
server's tokenization, queueing and egress. vLLM's async scheduling overlaps the CPU path with
the GPU, so a real cycle is max(GPU path, CPU path); the real traced runs never show the CPU path
binding (schedule() stays below the cycle in every traced step), so the GPU path alone is kept and
the export needs no max() (docs/calibration.md). A saturated run (a queue of minutes, 128 running
requests) can be CPU-bound — the real Mixtral and CodeLlama reasoning runs are (schedule() median
32.0 / 26.1 ms against mean cycles of 35.5 / 26.6 ms) — so its cycles may only bound the GPU path from
above (cycle ≥ GPU path): whether they enter stage 1 one-sided or two-sided, and at what weight, is chosen per
calibration by inner validation on its own runs (:func:`choose_saturated_setting`).

Two stages:

1. **closed form, no simulator** (:func:`fit_closed_form`). From the observed timelines
   (stepml_core.calibration.timelines)
   (request i decodes from arrival + TTFT to arrival + E2E; an errored request from its modelled admission, first
   come first served at max_num_seqs, until its client's abort) the number of decoding requests and
   their total context are known at any time; each request's average cycle over its decode window is
   c_i = (E2E − TTFT)/(G − 1) with G the tokens the server generated. A bounded least-squares fit of
   c_i on the window averages of the batch composition gives β0, β_dec, β_kv, β_npf; the median of
   TTFT − 1.5·ĉ(arrival) gives α0 (the request waits half a cycle for the next step, then its
   prefill step).
2. **simulator in the loop** (stepml_core.calibration.refine). scipy's ``least_squares`` adjusts a scale on every
   step coefficient and a shift of α0 so that replaying the calibration runs through StepML's vLLM
   simulator reproduces their TTFT and E2E distributions (mean, p50, p90, p99 relative errors).

``calibrate`` receives the calibration runs' logs and nothing else: the runs a model is scored on
are never passed to it (:mod:`stepml_core.calibration.protocols` builds the folds). The model's form is
stepml_core.calibration.params; the intervals of a calibrated model's replay are stepml_core.replay.intervals.
"""

# long module: its stages (closed form, saturated-run setting, break, bootstrap, between-run errors, calibrate) all
# refit stage 1's closed form; apart, each would import it back (a cycle)

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from stepml_core.calibration.load_delay import LoadDelay, fit_load_delay
from stepml_core.calibration.params import PARAM_NAMES, StepParams
from stepml_core.calibration.refine import RefineReport, refine
from stepml_core.calibration.timelines import CalibrationError, CalibrationRun, Timelines, request_timelines
from stepml_core.catalog import gpu_spec, model_spec

PREFILL_COMPUTE_EFFICIENCY = 0.5  # assumed fraction of dense bf16 peak a prompt chunk's GEMMs reach (β_pf prior)
SATURATED_RUN_WEIGHT = 0.1  # stage 1: a saturated calibration run's weight relative to a non-saturated one (default)
# stage 1's treatment of saturated calibration runs beside non-saturated ones, (one-sided, weight) candidates: chosen per
# calibration by inner validation on its own runs (choose_saturated_setting), never on a run it predicts
SATURATED_SETTINGS = ((True, SATURATED_RUN_WEIGHT), (True, 1.0), (False, 1.0), (False, SATURATED_RUN_WEIGHT))
ONE_SIDED_MAX_ITER = 25  # stage 1: active-set iterations of the one-sided (cycle ≥ GPU path) saturated rows
# the piecewise form (FORMS): candidate breaks (decode requests), fixed in advance; a break is a candidate for a
# calibration only where its non-saturated runs spend at least BREAK_MIN_SIDE_SHARE of their decoding time on each side
FORMS = ("linear", "piecewise")
BREAK_CANDIDATES = (40, 50, 60, 70, 80, 90, 100)
BREAK_MIN_SIDE_SHARE = 0.1


@dataclass(frozen=True)
class ArchPrior:
    """What the catalogue says a step must cost at least, per GPU (TP shards weights and KV heads)."""

    llm_model: str
    tp: int
    params: float  # all weights
    active_params: float  # per token (MoE: experts_per_token of num_experts)
    layers: int
    kv_bytes_per_token: float  # per GPU: 2 (K,V) · layers · kv_heads · head_dim · 2 bytes / TP
    weights_bytes: float  # per GPU
    moe: bool
    weights_floor_us: float  # weights_bytes / HBM bandwidth
    kv_floor_us: float  # µs per KV token: kv_bytes_per_token / HBM bandwidth
    compute_floor_us: float  # µs per token: 2·active_params/TP / peak FLOP/s

    @property
    def prefill_prior_us(self) -> float:
        return self.compute_floor_us / PREFILL_COMPUTE_EFFICIENCY


def arch_prior(llm_model: str, tp: int, gpu: str = "h100-sxm") -> ArchPrior:
    m, g = model_spec(llm_model), gpu_spec(gpu)
    kv = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 2 / tp
    params = float(m.total_params)
    active = params * m.active_param_ratio
    w = params * 2 / tp
    bw, pk = g.hbm_bandwidth_bytes_per_s, g.peak_flops
    return ArchPrior(
        llm_model=m.name,
        tp=int(tp),
        params=params,
        active_params=active,
        layers=m.num_layers,
        kv_bytes_per_token=kv,
        weights_bytes=w,
        moe=m.is_moe,
        weights_floor_us=w / bw * 1e6,
        kv_floor_us=kv / bw * 1e6,
        compute_floor_us=2 * active / tp / pk * 1e6,
    )


# ---------------------------------------------------------------------------- stage 1: the closed form


@dataclass(frozen=True)
class ClosedForm:
    params: StepParams
    requests_used: int
    requests_by_run: dict
    r2: float  # of the cycle regression (weighted)
    bounds_active: tuple  # parameters that sit on a physics bound


def _cycle_rows(
    timelines: list[Timelines],
    weights: list[np.ndarray] | None,
    sw: float,
    one_sided: bool = True,
    break_decoders: float | None = None,
) -> tuple[list[tuple], dict[str, int]]:
    """Per run, the decode windows the cycle regression uses: (X = [1, n̄, kv̄, p], c = cycle_us, row weight, one-sided)
    with row weight √(w_i / Σw · run weight) / c_i (relative residuals, each run weighing the same, a saturated run
    ``sw`` of one and one-sided when non-saturated runs are there); and the windows used per run. With a break k
    (the piecewise form) X = [1, n̄ − h̄, kv̄, p, h̄], h̄ the window mean of max(0, n(t) − k): the slopes below and
    above k."""
    rows, used = [], {}
    mixed = any(tl.saturated for tl in timelines) and not all(tl.saturated for tl in timelines)
    for k, tl in enumerate(timelines):
        m = np.isfinite(tl.cycle_us) & (tl.kv_over <= 0.05) & np.isfinite(tl.dec_mean)
        cw = weights[k][m] if weights is not None else np.ones(int(m.sum()))
        m_idx = np.flatnonzero(m)
        keep = cw > 0
        m_idx, cw = m_idx[keep], cw[keep]
        used[tl.experiment_id] = int(m_idx.size)
        if m_idx.size == 0:
            continue
        c = tl.cycle_us[m_idx]
        Xk = np.column_stack([np.ones(m_idx.size), tl.dec_mean[m_idx], tl.kv_mean[m_idx], tl.prefills_per_step[m_idx]])
        if break_decoders is not None:
            h = np.nan_to_num(tl.hinge_mean(break_decoders)[m_idx])
            Xk = np.column_stack([Xk[:, 0], Xk[:, 1] - h, Xk[:, 2], Xk[:, 3], h])
        sat = mixed and tl.saturated
        upper = sat and one_sided  # cycle = max(GPU, CPU) ≥ GPU path: a bound from above only
        rows.append((Xk, c, np.sqrt(cw / cw.sum() * (sw if sat else 1.0)) / c, upper))
    if not rows:
        raise CalibrationError("no usable decode windows in the calibration runs (successful requests with ≥ 2 tokens)")
    if all(r[3] for r in rows):  # no non-saturated window to stand on: the saturated ones count both ways
        rows = [(a, b, c, False) for a, b, c, _ in rows]
    return rows, used


def _fit_one_sided(rows: list[tuple], lo: np.ndarray) -> tuple:
    """Bounded (β ≥ lo) weighted least squares where one-sided rows count only where the model reaches their cycle;
    the active set is iterated (≤ ONE_SIDED_MAX_ITER) and the iterate of least one-sided cost kept.
    Returns (X, y, row weights, lsq_linear result, its one-sided cost) of that iterate."""
    from scipy.optimize import lsq_linear

    def solve(masks):
        X = np.vstack([r[0][mk] for r, mk in zip(rows, masks)])
        y = np.concatenate([r[1][mk] for r, mk in zip(rows, masks)])
        wt = np.concatenate([r[2][mk] for r, mk in zip(rows, masks)])
        return X, y, wt, lsq_linear(X * wt[:, None], y * wt, bounds=(lo, np.full(lo.size, np.inf)), method="bvls")

    def one_sided_cost(x):  # Σ (w·r)² over two-sided rows + Σ (w·max(0, model − cycle))² over one-sided rows
        return sum(
            float(np.sum((r[2] * (np.maximum(r[0] @ x - r[1], 0.0) if r[3] else r[0] @ x - r[1])) ** 2)) for r in rows
        )

    # one-sided rows by active set: a saturated window counts only where the GPU-path model reaches its cycle
    # (relative tolerance: a window the model meets exactly stays in); the best iterate by the one-sided cost
    masks = [np.full(r[1].size, not r[3]) for r in rows]
    best = None
    for _ in range(ONE_SIDED_MAX_ITER):
        fit = solve(masks)
        cost = one_sided_cost(fit[3].x)
        if best is None or cost < best[0]:
            best = (cost, fit)
        new = [mk if not r[3] else (r[0] @ fit[3].x >= r[1] * (1 - 1e-9)) for r, mk in zip(rows, masks)]
        if all(np.array_equal(a, b) for a, b in zip(new, masks)):
            break
        masks = new
    return (*best[1], best[0])


def _queue_offset_us(
    timelines: list[Timelines],
    weights: list[np.ndarray] | None,
    b0: float,
    bd: float,
    bkv: float,
    bnpf: float,
    hinge: tuple[float, float] = (0.0, 0.0),
) -> float:
    """α0 = max(0, mean over the non-saturated runs of median(TTFT − 1.5·ĉ(arrival) − β_npf)), µs; ``hinge`` = (β_h, k)
    of the piecewise form (ĉ gains β_h·max(0, n − k))."""
    q_meds = []
    for k, tl in enumerate(timelines):
        if tl.saturated:
            continue
        m = tl.success & np.isfinite(tl.ttft_s)
        if weights is not None:
            m &= weights[k] > 0
        if not m.any():
            continue
        c_hat = b0 + bd * tl.dec_at_arrival[m] + bkv * tl.kv_at_arrival[m]
        if hinge[0]:
            c_hat = c_hat + hinge[0] * np.maximum(tl.dec_at_arrival[m] - hinge[1], 0.0)
        q_meds.append(float(np.median(tl.ttft_s[m] * 1e6 - 1.5 * c_hat - bnpf)))
    return max(0.0, float(np.mean(q_meds))) if q_meds else 0.0


def fit_closed_form(
    timelines: list[Timelines],
    prior: ArchPrior,
    *,
    weights: list[np.ndarray] | None = None,
    saturated_weight: float | None = None,
    one_sided: bool = True,
    break_decoders: float | None = None,
) -> ClosedForm:
    """Stage 1: bounded least squares of the observed decode cycles on the window-averaged batch composition.

    c_i = β0 + β_dec·n̄_i + β_kv·kv̄_i + (β_npf + β_pf·m)·p_i with p_i = prompts started per step in the
    window; β_pf = the compute prior (cache-miss tokens m are few: the runs' prompts repeat), β_kv ≥ the
    KV-read floor, all ≥ 0. Residuals are relative (÷ c_i) and each non-saturated run weighs the same; a
    saturated run weighs ``saturated_weight`` (SATURATED_RUN_WEIGHT) of one when non-saturated runs are there,
    and one-sided: its cycle is max(GPU path, CPU path) and with 128 running requests and a queue of minutes
    the CPU path can bind, so a window counts only where the model's GPU path exceeds its cycle (active set,
    ≤ ONE_SIDED_MAX_ITER refits). At ~700 tokens of context per sequence the non-saturated runs cannot tell a
    per-sequence cost from a per-context-token cost (they move together); a long-context saturated run caps
    the split's extrapolation without bending what the non-saturated runs determine (``one_sided`` False: the
    saturated windows count both ways, at the same weight). ``weights`` (per run, per
    request; bootstrap counts) multiply the request weights. Then α0 = mean over the
    non-saturated runs of the median of TTFT − 1.5·ĉ(arrival) − β_npf (half a cycle's wait, the prompt's step).
    ``break_decoders`` k: the piecewise form, a hinge at k decoders (the slopes below and above k, each ≥ 0;
    β_h = the slope above − the slope below)."""
    fit = _fit_closed_form(timelines, prior, weights, saturated_weight, one_sided, break_decoders)
    return fit[0]


def _fit_closed_form(
    timelines: list[Timelines],
    prior: ArchPrior,
    weights: list[np.ndarray] | None,
    saturated_weight: float | None,
    one_sided: bool,
    break_decoders: float | None,
) -> tuple[ClosedForm, float]:
    """fit_closed_form and the stage-1 cost of its fit (what choose_break compares)."""
    sw = SATURATED_RUN_WEIGHT if saturated_weight is None else saturated_weight
    rows, used = _cycle_rows(timelines, weights, sw, one_sided, break_decoders)
    lo = np.array([0.0, 0.0, prior.kv_floor_us, 0.0] + ([0.0] if break_decoders is not None else []))
    X, y, wt, res, cost = _fit_one_sided(rows, lo)
    b0, bd, bkv, bnpf = (float(x) for x in res.x[:4])
    hinge = (float(res.x[4]) - bd, float(break_decoders)) if break_decoders is not None else (0.0, 0.0)
    pred = X @ res.x
    r2 = 1.0 - float(
        np.sum((wt * (y - pred)) ** 2) / max(np.sum((wt * (y - np.average(y, weights=wt**2))) ** 2), 1e-12)
    )
    active = tuple(
        n
        for n, x, b in zip(("b0_us", "b_dec_us", "b_kv_us", "b_npf_us", "b_dec_above_us"), res.x, lo)
        if abs(x - b) <= 1e-9 * max(1.0, abs(b))
    )
    q0 = _queue_offset_us(timelines, weights, b0, bd, bkv, bnpf, hinge)
    params = StepParams(
        b0_us=b0,
        b_dec_us=bd,
        b_kv_us=bkv,
        b_pf_us=prior.prefill_prior_us,
        b_npf_us=bnpf,
        q0_us=q0,
        b_hinge_us=hinge[0],
        hinge_decoders=hinge[1] if hinge[0] else 0.0,
    )
    cf = ClosedForm(
        params=params, requests_used=int(sum(used.values())), requests_by_run=used, r2=r2, bounds_active=active
    )
    return cf, cost


@dataclass(frozen=True)
class SaturatedSetting:
    """How stage 1 treats saturated calibration runs beside non-saturated ones, and what chose it."""

    one_sided: bool
    weight: float
    chosen_by: str
    inner_error_pct: dict = field(default_factory=dict)  # "one-sided, weight 0.1" → mean |cycle error| % held out

    def summary(self) -> dict:
        """As JSON: {one_sided, weight, chosen_by, inner_error_pct} (a calibration's ``saturated_setting``)."""
        return asdict(self)

    @classmethod
    def from_summary(cls, d: Mapping) -> SaturatedSetting:
        return cls(d["one_sided"], d["weight"], d["chosen_by"], dict(d.get("inner_error_pct") or {}))


def setting_label(one_sided: bool, weight: float) -> str:
    return f"{'one-sided' if one_sided else 'two-sided'}, weight {weight:g}"


def cycle_error_pct(tl: Timelines, p: StepParams) -> float:
    """Mean |predicted − observed| / observed decode cycle (%) over a run's usable decode windows (stage 1's rows)."""
    m = np.isfinite(tl.cycle_us) & (tl.kv_over <= 0.05) & np.isfinite(tl.dec_mean)
    if not m.any():
        return float("nan")
    pred = p.step_us(tl.dec_mean[m], tl.kv_mean[m], 0.0, tl.prefills_per_step[m], _hinge_of(tl, p)[m])
    return float(np.mean(np.abs(pred - tl.cycle_us[m]) / tl.cycle_us[m]) * 100.0)


def _hinge_of(tl: Timelines, p: StepParams) -> np.ndarray | float:
    """The window means of max(0, n − k) the piecewise form reads (0 for the linear form)."""
    return np.nan_to_num(tl.hinge_mean(p.hinge_decoders)) if p.piecewise else np.zeros(tl.arrival_s.size)


def choose_saturated_setting(timelines: list[Timelines], prior: ArchPrior) -> SaturatedSetting:
    """Inner validation on the calibration runs alone: for each (one-sided, weight) of SATURATED_SETTINGS, hold out
    each non-saturated calibration run in turn, fit stage 1 on the others (saturated ones included) and score the
    held-out run's decode cycles (cycle_error_pct); the setting of least mean error wins (ties: the order of
    SATURATED_SETTINGS). Needs saturated runs and ≥ 2 non-saturated ones; otherwise the setting cannot matter or
    cannot be validated, and the first of SATURATED_SETTINGS is used (fixed in advance)."""
    calm = [k for k, tl in enumerate(timelines) if not tl.saturated]
    if not calm or len(calm) == len(timelines):
        return SaturatedSetting(*SATURATED_SETTINGS[0], "not needed (no saturated beside non-saturated runs)")
    if len(calm) < 2:
        return SaturatedSetting(*SATURATED_SETTINGS[0], "fixed in advance (one non-saturated run: none to hold out)")
    errs = {}
    for one_sided, w in SATURATED_SETTINGS:
        e = []
        for k in calm:
            rest = [tl for j, tl in enumerate(timelines) if j != k]
            try:
                p = fit_closed_form(rest, prior, saturated_weight=w, one_sided=one_sided).params
            except CalibrationError:
                continue
            e.append(cycle_error_pct(timelines[k], p))
        errs[(one_sided, w)] = float(np.nanmean(e)) if e and np.isfinite(e).any() else float("inf")
    best = min(SATURATED_SETTINGS, key=lambda s: (errs[s], SATURATED_SETTINGS.index(s)))
    return SaturatedSetting(
        *best,
        f"inner validation: leave one of {len(calm)} non-saturated calibration runs out",
        {setting_label(*k): round(v, 4) for k, v in errs.items()},
    )


# ---------------------------------------------------------------------------- the piecewise form's break


@dataclass(frozen=True)
class BreakChoice:
    """Where the piecewise form's hinge sits, and what chose it (on the calibration runs alone)."""

    break_decoders: float | None  # None: no candidate break the calibration runs can place (the linear form)
    chosen_by: str
    stage1_cost: dict = field(default_factory=dict)  # "k=60" → stage-1 cost of the fit with that break
    share_above: dict = field(default_factory=dict)  # "k=60" → the non-saturated runs' decoding time above k

    def summary(self) -> dict:
        return asdict(self)

    @classmethod
    def from_summary(cls, d: Mapping) -> BreakChoice:
        return cls(
            d["break_decoders"], d["chosen_by"], dict(d.get("stage1_cost") or {}), dict(d.get("share_above") or {})
        )


def choose_break(timelines: list[Timelines], prior: ArchPrior, setting: SaturatedSetting | None = None) -> BreakChoice:
    """The piecewise form's break k on the calibration runs alone: among BREAK_CANDIDATES, those where the non-saturated
    calibration runs spend ≥ BREAK_MIN_SIDE_SHARE of their decoding time (n(t) > 0) at or below k and above k (a
    saturated run's cycle is max(GPU path, CPU path): it cannot show the GPU path's bend); stage 1 is fitted with a
    hinge at each and the least stage-1 cost wins (a profile fit: ties to the smaller k). None where no candidate has
    both sides: the calibration runs cannot place a bend, and the form stays linear."""
    calm = [tl for tl in timelines if not tl.saturated and tl.dec_grid is not None]
    if not calm:
        return BreakChoice(None, "no non-saturated calibration run: linear form")
    busy = np.concatenate([tl.dec_grid[tl.dec_grid > 0] for tl in calm])
    shares = {f"k={k}": round(float(np.mean(busy > k)), 4) if busy.size else 0.0 for k in BREAK_CANDIDATES}
    ok = [k for k in BREAK_CANDIDATES if BREAK_MIN_SIDE_SHARE <= shares[f"k={k}"] <= 1 - BREAK_MIN_SIDE_SHARE]
    if not ok:
        return BreakChoice(
            None,
            f"no candidate break with ≥ {BREAK_MIN_SIDE_SHARE:.0%} of the non-saturated calibration runs' decoding time "
            "on each side: linear form",
            {},
            shares,
        )
    costs = {}
    for k in ok:
        try:
            costs[k] = _fit_closed_form(timelines, prior, None, *_setting_args(setting), float(k))[1]
        except CalibrationError:
            continue
    if not costs:
        return BreakChoice(None, "no candidate break could be fitted: linear form", {}, shares)
    best = min(costs, key=lambda k: (costs[k], k))
    return BreakChoice(
        float(best),
        f"least stage-1 cost among {len(costs)} candidate break(s) with both sides in the non-saturated calibration runs",
        {f"k={k}": round(v, 9) for k, v in costs.items()},
        shares,
    )


def _setting_args(setting: SaturatedSetting | None) -> tuple:
    return (None, True) if setting is None else (setting.weight, setting.one_sided)


# ---------------------------------------------------------------------------- bootstrap (uncertainty)


def bootstrap_params(
    timelines: list[Timelines],
    prior: ArchPrior,
    *,
    step_scale: float,
    q_shift_us: float,
    n_boot: int,
    seed: int,
    setting: SaturatedSetting | None = None,
) -> np.ndarray:
    """Closed-form refits on two-stage resamples (calibration runs with replacement, then requests within each
    drawn run with replacement), each with stage 2's correction applied: rows of PARAM_NAMES values."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0xB0075])
    out = []
    k = len(timelines)
    for _ in range(n_boot):
        draws = np.bincount(rng.integers(0, k, k), minlength=k)
        ws = []
        for j, tl in enumerate(timelines):
            n = tl.arrival_s.size
            ws.append(
                rng.multinomial(n * int(draws[j]), np.full(n, 1.0 / n)).astype(np.float64) if draws[j] else np.zeros(n)
            )
        try:
            cf = fit_closed_form(timelines, prior, weights=ws, **_setting_kw(setting))
        except CalibrationError:
            continue
        out.append(cf.params.scaled(step_scale, q_shift_us).as_vector())
    return np.asarray(out) if out else np.zeros((0, len(PARAM_NAMES)))


def _setting_kw(setting: SaturatedSetting | None) -> dict:
    return {} if setting is None else {"saturated_weight": setting.weight, "one_sided": setting.one_sided}


def _run_step_error(tl: Timelines, p: StepParams) -> float:
    """log(Σ observed decode cycles / Σ the model's cycles) over the run's usable decode windows (those stage 1
    regresses on); NaN without any."""
    m = np.isfinite(tl.cycle_us) & (tl.kv_over <= 0.05) & np.isfinite(tl.dec_mean)
    if not m.any():
        return math.nan
    pred = p.step_us(tl.dec_mean[m], tl.kv_mean[m], 0.0, tl.prefills_per_step[m], _hinge_of(tl, p)[m])
    tot = float(np.sum(pred))
    return math.log(float(np.sum(tl.cycle_us[m])) / tot) if tot > 0 else math.nan


@dataclass(frozen=True)
class BetweenRunErrors:
    """Leave one calibration run out (between_run_errors): per run, the log step error and the α0 error (µs, NaN for
    a saturated run) of the closed form refitted on the other calibration runs."""

    runs: tuple[str, ...] = ()
    step_log_err: tuple[float, ...] = ()
    q_err_us: tuple[float, ...] = ()

    def summary(self) -> dict:
        """As JSON: {runs, step_log_err, q_err_us} lists (a calibration's ``between_runs``; what between_run_bounds
        reads from a spec)."""
        return {"runs": list(self.runs), "step_log_err": list(self.step_log_err), "q_err_us": list(self.q_err_us)}

    @classmethod
    def from_summary(cls, d: Mapping) -> BetweenRunErrors:
        return cls(tuple(d.get("runs") or ()), tuple(d.get("step_log_err") or ()), tuple(d.get("q_err_us") or ()))


def between_run_errors(
    timelines: list[Timelines], prior: ArchPrior, setting: SaturatedSetting | None = None
) -> BetweenRunErrors:
    """Leave one calibration run out, in stage 1's terms: per calibration run c, the closed form refitted on the
    other calibration runs and its error on c — ``step_log_err`` = log(Σ observed decode cycles of c / Σ the refit's
    cycles on c's own decode windows), ``q_err_us`` = c's own α0 (median TTFT − 1.5·ĉ − β_npf with the refit's ĉ)
    minus the refit's α0 (NaN for a saturated c: its TTFT is its queue). Only calibration runs enter: the error a
    model makes on a run it never saw, measured among the runs it may see (docs/calibration.md, *Uncertainty*). Each
    refit treats saturated runs as the calibration does (``setting``, chosen on the calibration runs)."""
    runs, step_err, q_err = [], [], []
    for k, tl in enumerate(timelines):
        rest = timelines[:k] + timelines[k + 1 :]
        try:
            p = fit_closed_form(rest, prior, **_setting_kw(setting)).params
        except CalibrationError:
            continue
        q, m = math.nan, tl.success & np.isfinite(tl.ttft_s)
        if not tl.saturated and m.any():
            c_hat = p.step_us(
                tl.dec_at_arrival[m],
                tl.kv_at_arrival[m],
                0.0,
                0.0,
                np.maximum(tl.dec_at_arrival[m] - p.hinge_decoders, 0),
            )
            q = float(np.median(tl.ttft_s[m] * 1e6 - 1.5 * c_hat - p.b_npf_us)) - p.q0_us
        runs.append(tl.experiment_id)
        step_err.append(round(_run_step_error(tl, p), 9))
        q_err.append(round(q, 3))
    return BetweenRunErrors(tuple(runs), tuple(step_err), tuple(q_err))


# ---------------------------------------------------------------------------- the whole calibration


@dataclass(frozen=True, eq=False)  # eq=False: the bootstrap is an array (compare summaries instead)
class Calibration:
    """A calibrated model: parameters, its BLIS file, what it was fitted on and what the fit cost. ``summary()`` is
    its JSON (what the calibration cache and the request_calibration asset store), ``from_summary`` reads it back."""

    llm_model: str
    fitted_on: tuple[str, ...]
    params: StepParams
    closed_form: StepParams
    prior: ArchPrior
    refine: RefineReport | None
    bootstrap: np.ndarray  # rows of PARAM_NAMES (for intervals)
    seconds: dict
    requests_used: dict
    r2: float
    bounds_active: tuple
    saturated_setting: SaturatedSetting | None = None  # what stage 1 did with saturated runs, what chose it
    between_runs: BetweenRunErrors | None = None  # leave one calibration run out (for intervals)
    form: str = "linear"  # FORMS
    break_choice: BreakChoice | None = None  # the piecewise form: where its break sits, what chose it
    load_delay: LoadDelay | None = None  # the opt-in stage 3 (calibration.load_delay)

    def doc(self) -> dict:
        return self.params.blis_doc()

    def summary(self) -> dict:
        return (
            {
                "llm_model": self.llm_model,
                "fitted_on": list(self.fitted_on),
                "params": asdict(self.params),
                "closed_form": asdict(self.closed_form),
                "prior": asdict(self.prior),
                "refine": asdict(self.refine) if self.refine else None,
                "seconds": self.seconds,
                "requests_used": self.requests_used,
                "closed_form_r2": self.r2,
                "bounds_active": list(self.bounds_active),
                "saturated_setting": self.saturated_setting.summary() if self.saturated_setting else {},
                "bootstrap_params": {"names": list(PARAM_NAMES), "rows": self.bootstrap.round(6).tolist()},
                "between_runs": self.between_runs.summary() if self.between_runs else None,
            }
            | (
                {"form": self.form, "break_choice": self.break_choice.summary() if self.break_choice else None}
                if self.form != "linear"
                else {}
            )
            | ({"load_delay": self.load_delay.summary()} if self.load_delay is not None else {})
        )

    @classmethod
    def from_summary(cls, d: Mapping) -> Calibration:
        rep, setting, between = d.get("refine"), d.get("saturated_setting"), d.get("between_runs")
        return cls(
            llm_model=d["llm_model"],
            fitted_on=tuple(d["fitted_on"]),
            params=StepParams(**d["params"]),
            closed_form=StepParams(**d["closed_form"]),
            prior=ArchPrior(**d["prior"]),
            refine=RefineReport(**rep) if rep else None,
            bootstrap=np.asarray(d["bootstrap_params"]["rows"], dtype=np.float64).reshape(
                -1, len(d["bootstrap_params"]["names"])
            ),
            seconds=d["seconds"],
            requests_used=d["requests_used"],
            r2=d["closed_form_r2"],
            bounds_active=tuple(d["bounds_active"]),
            saturated_setting=SaturatedSetting.from_summary(setting) if setting else None,
            between_runs=BetweenRunErrors.from_summary(between) if between is not None else None,
            form=d.get("form", "linear"),
            break_choice=BreakChoice.from_summary(d["break_choice"]) if d.get("break_choice") else None,
            load_delay=LoadDelay.from_summary(d["load_delay"]) if d.get("load_delay") else None,
        )


def calibrate(
    runs: list[CalibrationRun],
    *,
    seed: int = 0,
    refine_evals: int = 6,
    n_boot: int = 60,
    with_refine: bool = True,
    form: str = "linear",
    load_delay: bool = False,
) -> Calibration:
    """Calibrate one LLM model's step-time model on these runs' request logs (and nothing else).

    ``runs`` must be of one LLM model and TP, each with ground truth. ``form``: ``linear``, or ``piecewise`` (a hinge
    in the decoders at the break choose_break places on these runs; stage 2 as for the linear form; no bootstrap and
    no between-run errors, so its replays carry no interval). ``load_delay``: stage 3 after stage 2, the load delay
    (calibration.load_delay; opt-in)."""
    if form not in FORMS:
        raise ValueError(f"form {form!r}: one of {FORMS}")
    if not runs:
        raise CalibrationError("no calibration runs")
    models = {(r.llm_model, int(r.ctx.tp)) for r in runs}
    if len(models) != 1:
        raise CalibrationError(f"calibration runs of more than one LLM model / TP: {sorted(models)}")
    llm, tp = models.pop()
    runs = sorted(runs, key=lambda r: r.experiment_id)
    t0 = time.perf_counter()
    prior = arch_prior(llm, tp)
    tls = [request_timelines(r) for r in runs]
    setting = choose_saturated_setting(tls, prior)
    brk = choose_break(tls, prior, setting) if form == "piecewise" else None
    if brk is not None:
        n_boot = 0
    cf = fit_closed_form(tls, prior, **_setting_kw(setting), break_decoders=brk.break_decoders if brk else None)
    t1 = time.perf_counter()
    params, rep = cf.params, None
    if with_refine:
        params, rep = refine(cf.params, runs, seed=seed, max_evals=refine_evals)
    t2 = time.perf_counter()
    scale, shift = (rep.step_scale, rep.q_shift_us) if rep else (1.0, 0.0)
    boot = (
        bootstrap_params(tls, prior, step_scale=scale, q_shift_us=shift, n_boot=n_boot, seed=seed, setting=setting)
        if n_boot
        else np.zeros((0, len(PARAM_NAMES)))
    )
    t3 = time.perf_counter()
    between = between_run_errors(tls, prior, setting) if n_boot and len(tls) >= 2 else None
    t4 = time.perf_counter()
    ld = fit_load_delay(params, runs, seed=seed) if load_delay else None
    extra_seconds = {"load_delay": round(time.perf_counter() - t4, 3)} if load_delay else {}
    return Calibration(
        llm_model=llm,
        fitted_on=tuple(r.experiment_id for r in runs),
        params=params,
        closed_form=cf.params,
        prior=prior,
        refine=rep,
        bootstrap=boot,
        seconds={
            "closed_form": round(t1 - t0, 3),
            "refine": round(t2 - t1, 3),
            "bootstrap": round(t3 - t2, 3),
            "between_runs": round(t4 - t3, 3),
        }
        | extra_seconds,
        requests_used=cf.requests_by_run,
        r2=cf.r2,
        bounds_active=cf.bounds_active,
        saturated_setting=setting,
        between_runs=between,
        form=form,
        break_choice=brk,
        load_delay=ld,
    )
