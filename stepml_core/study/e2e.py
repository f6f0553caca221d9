"""Teacher-forced end-to-end fidelity of a step-time model (TTFT, decode interval, E2E per request).

Given the reconstructed batches of **every** step (:mod:`stepml_core.tables.reconstruct`) and a
predicted engine cycle time for every step, each request's latencies are predicted by summing
predicted cycle times over the steps that elapsed while it was in the engine, and compared
with the latencies observed on the engine's monotonic clock (journey ``ts.monotonic_ns``).
"Teacher-forced": the batches are the observed ones, so errors do not compound through the
scheduler as they would in a free-running simulation; this isolates the step-time model.

Clock model (vLLM v1, async scheduling, docs/trace-format.md §3.3, §4). The cycle of step N is
``ts_start[N+1] − ts_start[N]`` (the ``cycle_us`` target of :mod:`stepml_core.tables.steps`).

* ``journey.QUEUED`` with ``scheduler.step = q`` is emitted between iterations, right before
  ``schedule(q+1)`` starts (or while the engine idles): its time ≈ ``ts_start[q+1]``.
* ``FIRST_TOKEN`` / ``FINISHED`` with ``scheduler.step = X`` are emitted in
  ``update_from_output(X)``, which under async scheduling runs after ``schedule(X+1)``: their
  time ≈ ``ts_start[X+1+lag]`` with ``lag = output_lag`` (1 async, 0 sync).

Hence predicted TTFT = Σ cycle[q+1 … F+lag], predicted E2E = Σ cycle[q+1 … D+lag] (every
step counts — queueing, steps where the request waited after a preemption, steps where it was
skipped — because the clock advances by every step), predicted decode interval =
(E2E − TTFT)/(output tokens − 1). Idle time (no step runs while nothing is queued) is neither
observed inside these windows nor predicted. Observed: TTFT = FIRST_TOKEN − QUEUED, E2E =
FINISHED − QUEUED (natural finishes only), decode interval as above; with the API table the
API-side latency (DEPARTED − ARRIVED, same host clock) is reported beside it.

Entry points: :func:`step_table` (BATCH_SUMMARY-like columns for every step, from the
reconstruction), :func:`step_inputs` (that plus :func:`batch_checks.request_aggregates`),
:func:`e2e_fidelity`, and the observed-cycle helpers :func:`observed_cycle_us` /
:func:`gap_cycle_us`.

Example (a fitted model on the 30 features)::

    rec, tt = reconstruct_run(folder)
    tbl = step_table(rec.batches, tt.journey, steps=tt.steps)
    agg = request_aggregates(rec.batches)
    def predict(t):
        X = step_table_features(t, model, gpu, tp, request_aggregates=agg, request_source="journey")
        return fitted.predict(X.select(cols).to_numpy())
    res = e2e_fidelity(rec.batches, tt.journey, predict, table=tbl, api=tt.api)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

import numpy as np
import polars as pl

from stepml_core.tables.batch_checks import batch_summary_counts, request_aggregates
from stepml_core.tables.journeys import journey_episodes
from stepml_core.tables.prefix_hits import DEFAULT_BLOCK_SIZE

__all__ = [
    "step_table",
    "step_inputs",
    "e2e_fidelity",
    "E2EResult",
    "observed_cycle_us",
    "gap_cycle_us",
    "summarize_errors",
    "compare_step_table",
    "scheduled_counts_of",
]

Predictor = Union[Callable[[pl.DataFrame], "np.ndarray | pl.Series | list"], pl.DataFrame, np.ndarray]
QUANTILES = (0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95)


# ----------------------------------------------------------------------------- per-step table


def _intervals_count(starts: np.ndarray, ends: np.ndarray, size: int) -> np.ndarray:
    """Number of inclusive intervals [start, end] covering each index 0..size-1."""
    ok = (starts >= 0) & (ends >= starts)
    d = np.zeros(size + 2, np.int64)
    np.add.at(d, np.clip(starts[ok], 0, size), 1)
    np.add.at(d, np.clip(ends[ok] + 1, 0, size + 1), -1)
    return np.cumsum(d)[:size]


def _waiting_intervals(journey: pl.DataFrame, last_step: int) -> tuple[np.ndarray, np.ndarray]:
    """Steps at which a request sits in WAITING after scheduling: [q+1, s−1] after QUEUED and
    [P, s'−1] after a preemption (``queue.waiting_depth`` counts requests preempted in the step);
    an abort at counter N ends the wait after step N."""
    j = (
        journey.select(
            pl.col("request.id"),
            pl.col("event.type"),
            pl.col("scheduler.step").cast(pl.Int64),
            (pl.col("ts.monotonic_ns") if "ts.monotonic_ns" in journey.columns else pl.lit(None, dtype=pl.Int64)).alias(
                "ts"
            ),
        )
        .drop_nulls(["request.id", "scheduler.step"])
        .sort(["request.id", "scheduler.step", "ts"], nulls_last=True)
    )
    T, st = pl.col("event.type"), pl.col("scheduler.step")
    j = j.with_columns(
        w_start=pl.when(T == "QUEUED").then(st + 1).when(T == "PREEMPTED").then(st).otherwise(None),
        w_end=pl.when(T == "SCHEDULED").then(st - 1).when(T == "FINISHED").then(st).otherwise(None),
        fin_seen=(T == "FINISHED").cast(pl.Int32).cum_sum().over("request.id"),
    ).with_columns(next_end=pl.col("w_end").shift(-1).backward_fill().over("request.id"))
    w = j.filter(pl.col("w_start").is_not_null() & (pl.col("fin_seen") == 0))
    ends = w["next_end"].fill_null(last_step).to_numpy()
    return w["w_start"].to_numpy(), ends


def step_table(
    batches: pl.DataFrame,
    journey: pl.DataFrame,
    *,
    steps: pl.DataFrame | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    kv_blocks_total: int | None = None,
    output_lag: int = 1,
    last_step: int | None = None,
    counts: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """BATCH_SUMMARY-like columns for every step id 1 … last step, from the reconstruction (``counts``:
    batch_summary_counts(batches) where the caller has it already).

    * ``batch.*``: sums over the reconstructed batch with BATCH_SUMMARY's labels ("prefill"
      while ``num_output_tokens == 0``);
    * ``queue.running_depth``: requests in the running list after scheduling (admission step
      to the last step before leaving; includes running requests that got no tokens);
      ``queue.waiting_depth`` from QUEUED/PREEMPTED → SCHEDULED/FINISHED intervals;
    * ``batch.num_preempted``: PREEMPTED events of the step; ``batch.num_finished``: requests
      finished since the previous ``schedule()`` (natural finish at D → step D+1+lag, abort at
      counter N → N+1);
    * ``kv.blocks_total_gpu``: ``kv_blocks_total`` or the value BATCH_SUMMARY reports;
      ``kv.blocks_free_gpu``: total − used, with used ≈ Σ over scheduled requests of
      ⌈(c + q)/block_size⌉ (blocks held after the step's allocation), scaled by the ratio
      observed/estimated at the sampled steps (linear interpolation in step id; exact at
      sampled steps). Prefix blocks shared between requests are what the ratio absorbs; free
      blocks include evictable cached ones, as in vLLM.
    * ``sampled``: whether a BATCH_SUMMARY exists for the step.
    """
    if last_step is None:
        cand = [
            int(batches["step.id"].max() or 0) if batches.height else 0,
            int(journey["scheduler.step"].max() or 0) + output_lag if journey.height else 0,
        ]
        if steps is not None and steps.height:
            cand.append(int(steps["step.id"].max()))
        last_step = max(cand)
    size = int(last_step) + 1
    ids = np.arange(1, size, dtype=np.int64)
    cnt = batch_summary_counts(batches) if counts is None else counts
    base = pl.DataFrame({"step.id": ids}).join(cnt, on="step.id", how="left").fill_null(0)
    # running and waiting depth
    ep, _ = journey_episodes(journey, last_step=last_step, output_lag=output_lag)
    running = _intervals_count(ep["s"].to_numpy(), ep["E"].to_numpy(), size)
    ws, we = _waiting_intervals(journey, last_step)
    waiting = _intervals_count(ws, we, size)
    n_pre, n_fin = _preempted_finished_counts(journey, size, output_lag)
    total, free, sampled = _kv_blocks_free(batches, steps, size, block_size, kv_blocks_total)
    sl = slice(1, size)
    return base.with_columns(
        pl.Series("queue.running_depth", running[sl]),
        pl.Series("queue.waiting_depth", waiting[sl]),
        pl.Series("batch.num_finished", n_fin[sl].astype(np.int64)),
        pl.Series("batch.num_preempted", n_pre[sl].astype(np.int64)),
        pl.lit(int(total), dtype=pl.Int64).alias("kv.blocks_total_gpu"),
        pl.Series("kv.blocks_free_gpu", free[sl]),
        pl.Series("kv.usage_gpu_ratio", (1.0 - free[sl] / max(int(total), 1)) if total else np.zeros(size - 1)),
        pl.Series("sampled", sampled[sl]),
    )


def _preempted_finished_counts(journey: pl.DataFrame, size: int, output_lag: int) -> tuple[np.ndarray, np.ndarray]:
    """Per step id 0 … size−1: PREEMPTED events of the step, and requests finished since the previous schedule()
    (natural finish at D → step D+1+lag, abort at counter N → N+1)."""
    ev = journey.select(
        pl.col("event.type"),
        pl.col("scheduler.step").cast(pl.Int64),
        (pl.col("finish.status") if "finish.status" in journey.columns else pl.lit(None, dtype=pl.Utf8)).alias("st"),
    )
    pre = ev.filter(pl.col("event.type") == "PREEMPTED")["scheduler.step"].to_numpy()
    fin = ev.filter(pl.col("event.type") == "FINISHED")
    ab = fin["st"].is_in(["aborted", "error", "ignored"]).fill_null(False).to_numpy()
    fstep = fin["scheduler.step"].to_numpy() + np.where(ab, 1, 1 + output_lag)
    n_pre = np.bincount(np.clip(pre, 0, size - 1), minlength=size)[:size] if len(pre) else np.zeros(size, np.int64)
    n_fin = np.bincount(fstep[fstep < size], minlength=size)[:size] if len(fstep) else np.zeros(size, np.int64)
    return n_pre, n_fin


def _kv_blocks_free(
    batches: pl.DataFrame, steps: pl.DataFrame | None, size: int, block_size: int, kv_blocks_total: int | None
) -> tuple[int, np.ndarray, np.ndarray]:
    """(blocks total, free blocks per step id 0 … size−1, sampled per step id): used blocks estimated from the
    reconstructed batches, scaled to the BATCH_SUMMARY values at the sampled steps (see step_table)."""
    blk = batches.group_by("step.id").agg(
        est=((pl.col("progress_index") + pl.col("new_tokens") + block_size - 1) // block_size).sum()
    )
    est = np.zeros(size, np.float64)
    if blk.height:
        est[blk["step.id"].to_numpy()] = blk["est"].to_numpy()
    total = kv_blocks_total
    ratio = np.ones(size)
    sampled = np.zeros(size, bool)
    obs_free = None
    if steps is not None and steps.height:
        s = (
            steps.select(pl.col("step.id").cast(pl.Int64), pl.col("kv.blocks_total_gpu"), pl.col("kv.blocks_free_gpu"))
            .drop_nulls("step.id")
            .unique("step.id", keep="first")
            .sort("step.id")
        )
        s = s.filter(pl.col("step.id") < size)
        sampled[s["step.id"].to_numpy()] = True
        if total is None and s["kv.blocks_total_gpu"].drop_nulls().len():
            total = int(s["kv.blocks_total_gpu"].drop_nulls().mode().sort()[-1])
        sv = s.drop_nulls(["kv.blocks_free_gpu"])
        if total is not None and sv.height:
            sid = sv["step.id"].to_numpy()
            used_obs = total - sv["kv.blocks_free_gpu"].to_numpy().astype(np.float64)
            ok = est[sid] > 0
            if ok.any():
                ratio = np.interp(np.arange(size), sid[ok], used_obs[ok] / est[sid][ok])
            obs_free = (sid, sv["kv.blocks_free_gpu"].to_numpy())
    if total is None:
        total = int(np.ceil(est.max())) if est.size else 0
    used = np.minimum(np.rint(est * ratio), total)
    free = (total - used).astype(np.int64)
    if obs_free is not None:
        free[obs_free[0]] = obs_free[1]
    return total, free, sampled


def step_inputs(batches: pl.DataFrame, journey: pl.DataFrame, **kw) -> pl.DataFrame:
    """:func:`step_table` plus the per-step request aggregates (``snap_prefill_tokens`` …
    ``num_logit_seqs``, zeros for empty steps): everything a predictor needs for every step."""
    tbl = step_table(batches, journey, **kw)
    agg = request_aggregates(batches)
    return tbl.join(agg, on="step.id", how="left").with_columns(
        [pl.col(c).fill_null(0) for c in agg.columns if c != "step.id"]
    )


def compare_step_table(table: pl.DataFrame, steps: pl.DataFrame, *, kv_tolerance: float = 0.05) -> dict:
    """Agreement of a :func:`step_table` with BATCH_SUMMARY on the sampled steps: exact-match rates
    of counts; for ``kv.blocks_free_gpu`` (exact at sampled steps by construction) use a
    leave-out comparison by passing a subsample of ``steps`` to :func:`step_table`."""
    cols = [
        "batch.prefill_tokens",
        "batch.decode_tokens",
        "batch.scheduled_tokens",
        "batch.num_prefill_reqs",
        "batch.num_decode_reqs",
        "queue.running_depth",
        "queue.waiting_depth",
        "batch.num_preempted",
        "batch.num_finished",
    ]
    st = steps.select(
        pl.col("step.id").cast(pl.Int64),
        *[pl.col(c).cast(pl.Int64) for c in cols],
        pl.col("kv.blocks_free_gpu").cast(pl.Int64),
        pl.col("kv.blocks_total_gpu").cast(pl.Int64),
    )
    j = st.join(table, on="step.id", how="inner", suffix="_r")
    out: dict = {"steps": j.height}
    for c in cols:
        out[c] = float((j[c] == j[c + "_r"]).mean()) if j.height else None
    used = (j["kv.blocks_total_gpu"] - j["kv.blocks_free_gpu"]).cast(pl.Float64)
    used_r = (j["kv.blocks_total_gpu_r"] - j["kv.blocks_free_gpu_r"]).cast(pl.Float64)
    rel = (used_r - used).abs() / used.clip(lower_bound=1.0)
    out["kv_used_within_tolerance"] = float((rel <= kv_tolerance).mean()) if j.height else None
    out["kv_used_median_rel_err"] = float(rel.median()) if j.height else None
    return out


# ----------------------------------------------------------------------------- observed cycles


def observed_cycle_us(steps: pl.DataFrame) -> pl.DataFrame:
    """``cycle_us`` = ts_start[N+1] − ts_start[N] where both steps were sampled (µs)."""
    s = (
        steps.select(pl.col("step.id").cast(pl.Int64), pl.col("step.ts_start_ns"))
        .drop_nulls()
        .unique("step.id", keep="first")
        .sort("step.id")
    )
    return (
        s.with_columns(
            cycle_us=pl.when(pl.col("step.id").shift(-1) == pl.col("step.id") + 1).then(
                (pl.col("step.ts_start_ns").shift(-1) - pl.col("step.ts_start_ns")).cast(pl.Float64) / 1000.0
            )
        )
        .drop_nulls("cycle_us")
        .select("step.id", "cycle_us")
    )


def gap_cycle_us(steps: pl.DataFrame, *, last_step: int | None = None) -> pl.DataFrame:
    """A cycle time for every step from the sampled steps' ``step.ts_start_ns``: each step between
    consecutive sampled steps a < b gets (ts[b] − ts[a])/(b − a) (exact where b = a + 1);
    steps outside the sampled range take the nearest gap's value. Idle periods inside a gap
    are spread over its steps."""
    s = (
        steps.select(pl.col("step.id").cast(pl.Int64), pl.col("step.ts_start_ns").cast(pl.Int64))
        .drop_nulls()
        .unique("step.id", keep="first")
        .sort("step.id")
    )
    sid, ts = s["step.id"].to_numpy(), s["step.ts_start_ns"].to_numpy()
    last = int(last_step if last_step is not None else (sid[-1] if len(sid) else 0))
    ids = np.arange(1, last + 1, dtype=np.int64)
    if len(sid) < 2:
        return pl.DataFrame({"step.id": ids, "cycle_us": np.full(len(ids), np.nan)})
    per = np.diff(ts) / np.diff(sid) / 1000.0
    k = np.clip(np.searchsorted(sid, ids, side="right") - 1, 0, len(per) - 1)
    return pl.DataFrame({"step.id": ids, "cycle_us": per[k]})


# ----------------------------------------------------------------------------- fidelity


@dataclass
class E2EResult:
    per_request: pl.DataFrame
    summary: dict
    step_cycles: pl.DataFrame = field(default_factory=pl.DataFrame)


def _cycles(predict: Predictor, table: pl.DataFrame) -> np.ndarray:
    ids = table["step.id"].to_numpy()
    if isinstance(predict, pl.DataFrame):
        col = "cycle_us" if "cycle_us" in predict.columns else [c for c in predict.columns if c != "step.id"][0]
        m = table.select("step.id").join(
            predict.select(pl.col("step.id").cast(pl.Int64), pl.col(col).alias("_c")), on="step.id", how="left"
        )
        return m["_c"].cast(pl.Float64).to_numpy()
    if callable(predict):
        y = predict(table)
    else:
        y = predict
    y = np.asarray(y.to_numpy() if isinstance(y, pl.Series) else y, dtype=np.float64).ravel()
    if len(y) != len(ids):
        raise ValueError(f"predicted cycle times: {len(y)} values for {len(ids)} steps")
    return y


def summarize_errors(obs: np.ndarray, pred: np.ndarray) -> dict:
    """Error of the mean (the original study's E2E metric) and the per-request error distribution (%)."""
    obs, pred = np.asarray(obs, float), np.asarray(pred, float)
    ok = np.isfinite(obs) & np.isfinite(pred) & (obs > 0)
    o, p = obs[ok], pred[ok]
    if not len(o):
        return {"n": 0}
    err = 100.0 * (p - o) / o
    ae = np.abs(err)
    out = {
        "n": int(len(o)),
        "obs_mean_us": float(o.mean()),
        "pred_mean_us": float(p.mean()),
        "mean_error_pct": float(100.0 * (p.mean() - o.mean()) / o.mean()),
        "abs_mean_error_pct": float(abs(100.0 * (p.mean() - o.mean()) / o.mean())),
        "mean_signed_error_pct": float(err.mean()),
        "mape_pct": float(ae.mean()),
        "median_ape_pct": float(np.median(ae)),
        "p90_ape_pct": float(np.quantile(ae, 0.9)),
    }
    for q in QUANTILES:
        out[f"error_p{int(round(q * 100)):02d}_pct"] = float(np.quantile(err, q))
    return out


def _api_latency(api: pl.DataFrame | None) -> pl.DataFrame | None:
    if api is None or not api.height or "event.ts.monotonic" not in api.columns:
        return None
    a = api.group_by("request.id").agg(
        arrived=pl.col("event.ts.monotonic").filter(pl.col("event") == "ARRIVED").first(),
        departed=pl.col("event.ts.monotonic").filter(pl.col("event") == "DEPARTED").first(),
    )
    return a.select(
        pl.col("request.id").alias("api_id"), obs_api_e2e_us=((pl.col("departed") - pl.col("arrived")) * 1e6)
    )


def scheduled_counts_of(batches: pl.DataFrame) -> pl.DataFrame:
    """request.id, n_steps_scheduled: the steps each request took part in."""
    return batches.group_by("request.id").agg(n_steps_scheduled=pl.len())


def e2e_fidelity(
    batches: pl.DataFrame,
    journey: pl.DataFrame,
    predict: Predictor,
    *,
    steps: pl.DataFrame | None = None,
    api: pl.DataFrame | None = None,
    table: pl.DataFrame | None = None,
    output_lag: int = 1,
    experiment_id: str | None = None,
    episodes: pl.DataFrame | None = None,
    scheduled_counts: pl.DataFrame | None = None,
    **table_kw,
) -> E2EResult:
    """Per-request predicted vs observed TTFT / decode interval / E2E, and a summary.

    ``predict``: a function mapping the per-step table (``table``, default
    :func:`step_inputs` of the batches: BATCH_SUMMARY-like columns + request aggregates, one
    row per step id 1 … last) to predicted cycle times in µs; or a DataFrame ``step.id,
    cycle_us``; or an array aligned with the table's rows. Steps without a prediction make the
    requests spanning them NaN (counted in the summary as ``n``).

    ``per_request`` columns: ids, milestones (steps), ``n_steps`` (steps elapsed QUEUED →
    FINISHED+lag), ``n_steps_scheduled`` (steps it took part in), observed and predicted
    ``*_ttft_us``, ``*_e2e_us``, ``*_decode_interval_us``, ``*_queue_us`` (QUEUED → first
    admission: observed to the SCHEDULED time stamp, predicted over steps q+1 … s−1), the
    errors in %, and ``obs_api_e2e_us`` when ``api`` is given. ``summary``: per metric the
    error of the mean and the distribution (:func:`summarize_errors`).

    Scoring several models on one run: pass ``episodes`` (the per-request table of
    :func:`journey_episodes`) and ``scheduled_counts`` (:func:`scheduled_counts`) computed once.
    """
    if table is None:
        table = step_inputs(batches, journey, steps=steps, output_lag=output_lag, **table_kw)
    cyc = _cycles(predict, table)
    ids = table["step.id"].to_numpy()
    span = _cycle_span_sums(ids, cyc, int(ids.max()) + 2 + output_lag if len(ids) else 2)
    req = episodes if episodes is not None else journey_episodes(journey, output_lag=output_lag)[1]
    per, natural, waited = _request_latencies(req, span, output_lag)
    part = scheduled_counts if scheduled_counts is not None else scheduled_counts_of(batches)
    per = per.join(part, on="request.id", how="left")
    lat = _api_latency(api)
    if lat is not None:
        per = (
            per.with_columns(api_id=pl.col("request.id").str.replace(r"-[^-]*-[^-]*$", ""))
            .join(lat, on="api_id", how="left")
            .drop("api_id")
        )
    f = lambda col: per[col].cast(pl.Float64).fill_null(np.nan).to_numpy()
    summary = {
        "experiment_id": experiment_id,
        "requests": per.height,
        "natural_finishes": int(natural.sum()),
        "steps": int(len(ids)),
        "steps_without_prediction": int((~np.isfinite(cyc)).sum()),
        "ttft": summarize_errors(f("obs_ttft_us"), f("pred_ttft_us")),
        "decode_interval": summarize_errors(f("obs_decode_interval_us"), f("pred_decode_interval_us")),
        "e2e": summarize_errors(f("obs_e2e_us"), f("pred_e2e_us")),
        # queueing only where the request waited at least one whole step (s ≥ q + 2): for an
        # immediate admission the observed wait is a fraction of schedule() (predicted 0)
        "queue": summarize_errors(np.where(waited, f("obs_queue_us"), np.nan), f("pred_queue_us")),
    }
    return E2EResult(per, summary, pl.DataFrame({"step.id": ids, "cycle_us": cyc}))


def _cycle_span_sums(ids: np.ndarray, cyc: np.ndarray, size: int):
    """span(a, b) = Σ cycle[a+1 … b] over arrays of step ids (NaN where a step in range has no prediction or the
    range is invalid), from cumulative sums of the predicted cycles."""
    c = np.full(size, np.nan)
    c[ids] = cyc
    c[0] = 0.0
    nan = ~np.isfinite(c)
    C = np.cumsum(np.where(nan, 0.0, c))
    Cn = np.cumsum(nan)

    def span(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        ok = (a >= 0) & (b >= a) & (b < size)
        aa, bb = np.clip(a, 0, size - 1), np.clip(b, 0, size - 1)
        v = C[bb] - C[aa]
        bad = ~ok | (Cn[bb] - Cn[aa] > 0)
        return np.where(bad, np.nan, v)

    return span


def _request_latencies(req: pl.DataFrame, span, output_lag: int) -> tuple[pl.DataFrame, np.ndarray, np.ndarray]:
    """(per-request observed and predicted queue, TTFT, E2E and decode interval with errors in %; natural-finish mask;
    waited ≥ one whole step before admission) from the journey episodes' milestones (clock model: module docstring)."""
    g = lambda col: req[col].fill_null(-1).to_numpy().astype(np.int64)
    q, s1, ft, D = g("queued_step"), g("first_sched_step"), g("first_token_step"), g("finished_step")
    qn = req["queued_ns"].cast(pl.Float64).to_numpy()
    status = req["finish_status"].fill_null("").to_numpy()
    natural = (D >= 0) & ~np.isin(status, ["aborted", "error", "ignored"])
    out_tok = req["output_tokens"].fill_null(0).to_numpy().astype(np.float64)
    ttft_end = np.where(ft >= 0, ft + output_lag, -1)
    e2e_end = np.where(natural, D + output_lag, -1)
    pred_ttft = np.where(ft >= 0, span(q, ttft_end), np.nan)
    pred_e2e = np.where(natural, span(q, e2e_end), np.nan)
    pred_queue = np.where(s1 >= 0, span(q, s1 - 1), np.nan)
    ns = lambda col: req[col].cast(pl.Float64).to_numpy()
    obs_ttft = (ns("first_token_ns") - qn) / 1e3
    obs_e2e = np.where(natural, (ns("finished_ns") - qn) / 1e3, np.nan)
    obs_queue = (ns("first_sched_ns") - qn) / 1e3
    multi = natural & (ft >= 0) & (out_tok > 1)
    pred_di = np.where(multi, (pred_e2e - pred_ttft) / np.maximum(out_tok - 1, 1), np.nan)
    obs_di = np.where(multi, (obs_e2e - obs_ttft) / np.maximum(out_tok - 1, 1), np.nan)
    pct = lambda p, o: np.where(
        np.isfinite(p) & np.isfinite(o) & (o > 0), 100.0 * (p - o) / np.where(o > 0, o, 1), np.nan
    )
    per = (
        req.select(
            "request.id",
            "prompt_len",
            "output_tokens",
            "finish_status",
            "num_preemptions",
            "queued_step",
            "first_sched_step",
            "first_token_step",
            "finished_step",
        )
        .with_columns(
            n_steps=pl.Series(np.where(natural, e2e_end - q, np.where(ft >= 0, ttft_end - q, -1))).replace(-1, None),
            obs_queue_us=pl.Series(obs_queue),
            pred_queue_us=pl.Series(pred_queue),
            obs_ttft_us=pl.Series(obs_ttft),
            pred_ttft_us=pl.Series(pred_ttft),
            obs_e2e_us=pl.Series(obs_e2e),
            pred_e2e_us=pl.Series(pred_e2e),
            obs_decode_interval_us=pl.Series(obs_di),
            pred_decode_interval_us=pl.Series(pred_di),
            ttft_err_pct=pl.Series(pct(pred_ttft, obs_ttft)),
            e2e_err_pct=pl.Series(pct(pred_e2e, obs_e2e)),
            decode_interval_err_pct=pl.Series(pct(pred_di, obs_di)),
        )
        .fill_nan(None)
    )
    return per, natural, s1 - q >= 2
