"""Step-time models calibrated from request logs alone (docs/calibration.md).

Most people who want a step-time model have a load generator's request log (arrival, tokens,
client-side TTFT and E2E per request), not an instrumented engine. :func:`calibrate` turns the
request logs of some *calibration runs* of one LLM model into a BLIS StepML model file (BLIS's own
feature names, evaluated by :class:`~stepml_core.sim.step_models.LinearStepTime`, so what StepML
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
   (request i decodes from arrival + TTFT to arrival + E2E; an errored request from its modelled admission, first
   come first served at max_num_seqs, until its client's abort) the number of decoding requests and
   their total context are known at any time; each request's average cycle over its decode window is
   c_i = (E2E − TTFT)/(G − 1) with G the tokens the server generated. A bounded least-squares fit of
   c_i on the window averages of the batch composition gives β0, β_dec, β_kv, β_npf; the median of
   TTFT − 1.5·ĉ(arrival) gives α0 (the request waits half a cycle for the next step, then its
   prefill step).
2. **simulator in the loop** (:func:`refine`). scipy's ``least_squares`` adjusts a scale on every
   step coefficient and a shift of α0 so that replaying the calibration runs through StepML's vLLM
   simulator reproduces their TTFT and E2E distributions (mean, p50, p90, p99 relative errors).

``calibrate`` receives the calibration runs' logs and nothing else: the runs a model is scored on
are never passed to it (:mod:`stepml_core.calibration.protocols` builds the folds).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import polars as pl

from stepml_core.catalog import gpu_spec, model_spec
from stepml_core.errors import StepMLError
from stepml_core.replay.simulate import (
    ReplayWorkload,
    RunContext,
    StepServingModel,
    latency_summary,
    replay,
    replay_workload,
)
from stepml_core.runs import rules
from stepml_core.sim.step_models import LinearStepTime

PREFILL_COMPUTE_EFFICIENCY = 0.5  # assumed fraction of dense bf16 peak a prompt chunk's GEMMs reach (β_pf prior)
SATURATED_RUN_WEIGHT = 0.1  # stage 1: a saturated calibration run's weight relative to a non-saturated one (default)
# stage 1's treatment of saturated calibration runs beside non-saturated ones, (one-sided, weight) candidates: chosen per
# calibration by inner validation on its own runs (choose_saturated_setting), never on a run it predicts
SATURATED_SETTINGS = ((True, SATURATED_RUN_WEIGHT), (True, 1.0), (False, 1.0), (False, SATURATED_RUN_WEIGHT))
ONE_SIDED_MAX_ITER = 25  # stage 1: active-set iterations of the one-sided (cycle ≥ GPU path) saturated rows
KV_OVER_CAPACITY = 0.95  # stage 1 skips decode windows where the timeline's KV demand exceeds this share of the pool
GRID_S = 0.005  # time grid of the timeline integrals
REFINE_METRICS = ("ttft_mean", "ttft_p50", "ttft_p90", "e2e_mean", "e2e_p50", "e2e_p90", "e2e_p99")
REFINE_LOSS, REFINE_F_SCALE = (
    "soft_l1",
    0.03,
)  # residuals beyond ~3 % count linearly (a TTFT tail near capacity must not rule)
REFINE_WINDOWS = (4, 60.0, 20.0)  # stage 2 replays 4 windows per run: 60 s of scored arrivals after 20 s of warm-up
PARAM_NAMES = ("b0_us", "b_dec_us", "b_kv_us", "b_pf_us", "b_npf_us", "q0_us", "q1_us")
PARAM_UNITS = {
    "b0_us": "µs per step",
    "b_dec_us": "µs per decode token",
    "b_kv_us": "µs per KV token (Σ context)",
    "b_pf_us": "µs per cache-miss prompt token",
    "b_npf_us": "µs per prompt chunk",
    "q0_us": "µs per request",
    "q1_us": "µs per prompt token",
}
BLIS_FEATURE_OF = {
    "b_dec_us": "decode_tokens",
    "b_kv_us": "kv_sum",
    "b_pf_us": "prefill_tokens",
    "b_npf_us": "num_prefill_reqs",
}


class CalibrationError(StepMLError, ValueError):
    """Calibration runs that cannot calibrate a model (no ground truth, mixed LLM models, ...)."""


# ---------------------------------------------------------------------------- inputs


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


# ---------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class StepParams:
    """The calibrated model in BLIS's terms (all µs)."""

    b0_us: float
    b_dec_us: float
    b_kv_us: float
    b_pf_us: float
    b_npf_us: float
    q0_us: float
    q1_us: float = 0.0

    def scaled(self, step_scale: float = 1.0, q_shift_us: float = 0.0) -> "StepParams":
        """Every step coefficient × step_scale; α0 + q_shift_us (≥ 0)."""
        s = step_scale
        return replace(
            self,
            b0_us=self.b0_us * s,
            b_dec_us=self.b_dec_us * s,
            b_kv_us=self.b_kv_us * s,
            b_pf_us=self.b_pf_us * s,
            b_npf_us=self.b_npf_us * s,
            q0_us=max(0.0, self.q0_us + q_shift_us),
        )

    def as_vector(self) -> np.ndarray:
        return np.array([getattr(self, k) for k in PARAM_NAMES], dtype=np.float64)

    @classmethod
    def from_vector(cls, v) -> "StepParams":
        return cls(**{k: float(x) for k, x in zip(PARAM_NAMES, v)})

    def step_us(self, decode_tokens, kv_sum, prefill_tokens=0.0, num_prefill_reqs=0.0):
        """The step time on BLIS features (vectorized; same formula as the exported file)."""
        return (
            self.b0_us
            + self.b_dec_us * decode_tokens
            + self.b_kv_us * kv_sum
            + self.b_pf_us * prefill_tokens
            + self.b_npf_us * num_prefill_reqs
        )

    def blis_doc(self) -> dict:
        """BLIS StepML model file: linear step_time over BLIS features, queueing_time on input_len; no clamp
        (step_overhead_us 0), no per-token output time (the request overhead is all in queueing_time)."""
        coef = {BLIS_FEATURE_OF[k]: float(getattr(self, k)) for k in ("b_dec_us", "b_kv_us", "b_pf_us", "b_npf_us")}
        return {
            "version": 1,
            "step_time": {"model_type": "linear", "intercept": float(self.b0_us), "feature_coefficients": coef},
            "queueing_time": {
                "model_type": "linear",
                "intercept": float(self.q0_us),
                "feature_coefficients": {"input_len": float(self.q1_us)},
            },
            "step_overhead_us": 0.0,
            "step_overhead_per_req_us": 0.0,
            "output_token_processing_time_us": 0.0,
            "scheduling_processing_time_us": 0.0,
            "preemption_processing_time_us": 0.0,
        }

    @classmethod
    def from_blis_doc(cls, doc: dict) -> "StepParams":
        st = doc["step_time"]
        c = st.get("feature_coefficients") or {}
        q = doc.get("queueing_time") or {}
        return cls(
            b0_us=float(st.get("intercept", 0.0)),
            b_dec_us=float(c.get("decode_tokens", 0.0)),
            b_kv_us=float(c.get("kv_sum", 0.0)),
            b_pf_us=float(c.get("prefill_tokens", 0.0)),
            b_npf_us=float(c.get("num_prefill_reqs", 0.0)),
            q0_us=float(q.get("intercept", 0.0)),
            q1_us=float((q.get("feature_coefficients") or {}).get("input_len", 0.0)),
        )


def serving_model(params: StepParams, name: str = "calibrated") -> StepServingModel:
    lin = LinearStepTime(params.blis_doc(), name=name)
    return StepServingModel(name, lin, queueing_us=lin.queueing_us, token_delay_us=lin.otpt_us, kind="blis_linear")


# ---------------------------------------------------------------------------- stage 1: observed timelines


@dataclass
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
    )


@dataclass(frozen=True)
class ClosedForm:
    params: StepParams
    requests_used: int
    requests_by_run: dict
    r2: float  # of the cycle regression (weighted)
    bounds_active: tuple  # parameters that sit on a physics bound


def _cycle_rows(
    timelines: list[Timelines], weights: list[np.ndarray] | None, sw: float, one_sided: bool = True
) -> tuple[list[tuple], dict[str, int]]:
    """Per run, the decode windows the cycle regression uses: (X = [1, n̄, kv̄, p], c = cycle_us, row weight, one-sided)
    with row weight √(w_i / Σw · run weight) / c_i (relative residuals, each run weighing the same, a saturated run
    ``sw`` of one and one-sided when non-saturated runs are there); and the windows used per run."""
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
    Returns (X, y, row weights, lsq_linear result) of that iterate."""
    from scipy.optimize import lsq_linear

    def solve(masks):
        X = np.vstack([r[0][mk] for r, mk in zip(rows, masks)])
        y = np.concatenate([r[1][mk] for r, mk in zip(rows, masks)])
        wt = np.concatenate([r[2][mk] for r, mk in zip(rows, masks)])
        return X, y, wt, lsq_linear(X * wt[:, None], y * wt, bounds=(lo, np.full(4, np.inf)), method="bvls")

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
    return best[1]


def _queue_offset_us(
    timelines: list[Timelines], weights: list[np.ndarray] | None, b0: float, bd: float, bkv: float, bnpf: float
) -> float:
    """α0 = max(0, mean over the non-saturated runs of median(TTFT − 1.5·ĉ(arrival) − β_npf)), µs."""
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
        q_meds.append(float(np.median(tl.ttft_s[m] * 1e6 - 1.5 * c_hat - bnpf)))
    return max(0.0, float(np.mean(q_meds))) if q_meds else 0.0


def fit_closed_form(
    timelines: list[Timelines],
    prior: ArchPrior,
    *,
    weights: list[np.ndarray] | None = None,
    saturated_weight: float | None = None,
    one_sided: bool = True,
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
    non-saturated runs of the median of TTFT − 1.5·ĉ(arrival) − β_npf (half a cycle's wait, the prompt's step)."""
    sw = SATURATED_RUN_WEIGHT if saturated_weight is None else saturated_weight
    rows, used = _cycle_rows(timelines, weights, sw, one_sided)
    lo = np.array([0.0, 0.0, prior.kv_floor_us, 0.0])
    X, y, wt, res = _fit_one_sided(rows, lo)
    b0, bd, bkv, bnpf = (float(x) for x in res.x)
    pred = X @ res.x
    r2 = 1.0 - float(
        np.sum((wt * (y - pred)) ** 2) / max(np.sum((wt * (y - np.average(y, weights=wt**2))) ** 2), 1e-12)
    )
    active = tuple(
        n
        for n, x, b in zip(("b0_us", "b_dec_us", "b_kv_us", "b_npf_us"), res.x, lo)
        if abs(x - b) <= 1e-9 * max(1.0, abs(b))
    )
    q0 = _queue_offset_us(timelines, weights, b0, bd, bkv, bnpf)
    params = StepParams(b0_us=b0, b_dec_us=bd, b_kv_us=bkv, b_pf_us=prior.prefill_prior_us, b_npf_us=bnpf, q0_us=q0)
    return ClosedForm(
        params=params, requests_used=int(sum(used.values())), requests_by_run=used, r2=r2, bounds_active=active
    )


@dataclass(frozen=True)
class SaturatedSetting:
    """How stage 1 treats saturated calibration runs beside non-saturated ones, and what chose it."""

    one_sided: bool
    weight: float
    chosen_by: str
    inner_error_pct: dict = field(default_factory=dict)  # "one-sided, weight 0.1" → mean |cycle error| % held out


def setting_label(one_sided: bool, weight: float) -> str:
    return f"{'one-sided' if one_sided else 'two-sided'}, weight {weight:g}"


def cycle_error_pct(tl: Timelines, p: StepParams) -> float:
    """Mean |predicted − observed| / observed decode cycle (%) over a run's usable decode windows (stage 1's rows)."""
    m = np.isfinite(tl.cycle_us) & (tl.kv_over <= 0.05) & np.isfinite(tl.dec_mean)
    if not m.any():
        return float("nan")
    pred = p.b0_us + p.b_dec_us * tl.dec_mean[m] + p.b_kv_us * tl.kv_mean[m] + p.b_npf_us * tl.prefills_per_step[m]
    return float(np.mean(np.abs(pred - tl.cycle_us[m]) / tl.cycle_us[m]) * 100.0)


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


# ---------------------------------------------------------------------------- stage 2: simulator in the loop


@dataclass
class RefineReport:
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
    pred = p.step_us(tl.dec_mean[m], tl.kv_mean[m], 0.0, tl.prefills_per_step[m])
    tot = float(np.sum(pred))
    return math.log(float(np.sum(tl.cycle_us[m])) / tot) if tot > 0 else math.nan


def between_run_errors(timelines: list[Timelines], prior: ArchPrior, setting: SaturatedSetting | None = None) -> dict:
    """Leave one calibration run out, in stage 1's terms: per calibration run c, the closed form refitted on the
    other calibration runs and its error on c — ``step_log_err`` = log(Σ observed decode cycles of c / Σ the refit's
    cycles on c's own decode windows), ``q_err_us`` = c's own α0 (median TTFT − 1.5·ĉ − β_npf with the refit's ĉ)
    minus the refit's α0 (NaN for a saturated c: its TTFT is its queue). Only calibration runs enter: the error a
    model makes on a run it never saw, measured among the runs it may see (docs/calibration.md, *Uncertainty*). Each
    refit treats saturated runs as the calibration does (``setting``, chosen on the calibration runs)."""
    out = {"runs": [], "step_log_err": [], "q_err_us": []}
    for k, tl in enumerate(timelines):
        rest = timelines[:k] + timelines[k + 1 :]
        try:
            p = fit_closed_form(rest, prior, **_setting_kw(setting)).params
        except CalibrationError:
            continue
        q, m = math.nan, tl.success & np.isfinite(tl.ttft_s)
        if not tl.saturated and m.any():
            c_hat = p.b0_us + p.b_dec_us * tl.dec_at_arrival[m] + p.b_kv_us * tl.kv_at_arrival[m]
            q = float(np.median(tl.ttft_s[m] * 1e6 - 1.5 * c_hat - p.b_npf_us)) - p.q0_us
        out["runs"].append(tl.experiment_id)
        out["step_log_err"].append(round(_run_step_error(tl, p), 9))
        out["q_err_us"].append(round(q, 3))
    return out


# ---------------------------------------------------------------------------- the whole calibration


@dataclass
class Calibration:
    """A calibrated model: parameters, its BLIS file, what it was fitted on and what the fit cost."""

    llm_model: str
    fitted_on: list
    params: StepParams
    closed_form: StepParams
    prior: ArchPrior
    refine: RefineReport | None
    bootstrap: np.ndarray  # rows of PARAM_NAMES (for intervals)
    seconds: dict
    requests_used: dict
    r2: float
    bounds_active: tuple
    saturated_setting: dict = field(default_factory=dict)  # SaturatedSetting as a dict: what stage 1 did, what chose it
    between_runs: dict | None = None  # between_run_errors: leave one calibration run out (for intervals)

    def doc(self) -> dict:
        return self.params.blis_doc()

    def summary(self) -> dict:
        return {
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
            "saturated_setting": self.saturated_setting,
            "bootstrap_params": {"names": list(PARAM_NAMES), "rows": self.bootstrap.round(6).tolist()},
            "between_runs": self.between_runs,
        }

    @classmethod
    def from_summary(cls, d: dict) -> "Calibration":
        rep = d.get("refine")
        return cls(
            llm_model=d["llm_model"],
            fitted_on=list(d["fitted_on"]),
            params=StepParams(**d["params"]),
            closed_form=StepParams(**d["closed_form"]),
            prior=ArchPrior(**d["prior"]),
            refine=RefineReport(**rep) if rep else None,
            bootstrap=np.asarray(d["bootstrap_params"]["rows"], dtype=np.float64).reshape(-1, len(PARAM_NAMES)),
            seconds=d["seconds"],
            requests_used=d["requests_used"],
            r2=d["closed_form_r2"],
            bounds_active=tuple(d["bounds_active"]),
            saturated_setting=d.get("saturated_setting") or {},
            between_runs=d.get("between_runs"),
        )


def calibrate(
    runs: list[CalibrationRun], *, seed: int = 0, refine_evals: int = 6, n_boot: int = 60, with_refine: bool = True
) -> Calibration:
    """Calibrate one LLM model's step-time model on these runs' request logs (and nothing else).

    ``runs`` must be of one LLM model and TP, each with ground truth."""
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
    cf = fit_closed_form(tls, prior, **_setting_kw(setting))
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
    return Calibration(
        llm_model=llm,
        fitted_on=[r.experiment_id for r in runs],
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
        },
        requests_used=cf.requests_by_run,
        r2=cf.r2,
        bounds_active=cf.bounds_active,
        saturated_setting=asdict(setting),
        between_runs=between,
    )


# ---------------------------------------------------------------------------- intervals of a replay

INTERVAL_LEVEL = 0.90  # two-sided: the bootstrap models at the 5th and 95th percentile of the run's latency index


class FeatureSums:
    """Wraps a LinearStepTime: same prediction, and Σ over the replay's steps of the BLIS features a calibrated
    model uses — enough to evaluate any calibrated model's total step time over the same batches exactly."""

    KEYS = ("decode_tokens", "kv_sum", "prefill_tokens", "num_prefill_reqs")

    def __init__(self, inner: LinearStepTime):
        from stepml_core.sim.step_models import BLIS_STEP_FEATURES, blis_feature_values, blis_features

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
        r = replay(workload, serving_model(p, spec["name"]), ctx, seed=seed)
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
