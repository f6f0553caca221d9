"""Sweeps of a what-if: each point (rate, max_num_seqs, max_num_batched_tokens) replayed with a calibrated model and
its uncertainty; the table, the largest rate meeting an SLO and where the engine saturates.

    rows = run_sweep(spec, desc, limits, sweep_points(rates, seqs, tokens, limits), seed=0, workers=2)
    table = whatif_table(rows)                                            # WHATIF_COLUMNS
    summary = summarize(table, parse_slo("ttft_p99<2s,e2e_p99<30s"))

**A point** replays the description at that point's constant rate (one stage of ``duration_s``) and limits with the
model (central), then with the two bound models of its parameter draws (:func:`bound_models`: the bootstrap draws at
the 5th/95th percentile of the replay's latency index, widened by the calibration's between-run term where it has
one, as replay_intervals.csv's ``brun_*``): ``lo``/``hi`` = the range of the three replays (a model without draws:
lo = hi = predicted). Metrics: replay.csv's (seconds; ``throughput_rps`` 1/s, ``successes`` a count) and
``saturated`` (1/0: :func:`stepml_core.runs.rules.is_saturated` of each replay's failures and mean TTFT).

**Saturation rate** of a (max_num_seqs, max_num_batched_tokens) pair: the smallest swept rate whose central
prediction is saturated (a failed request, or mean TTFT above SATURATED_TTFT_S over the point's duration), with
the smallest rates at which the slowest / fastest bound model saturates as its range. **Largest rate meeting an SLO**:
the largest swept rate at which every term holds and holds at every smaller swept rate (central values; the
``_at_bounds`` figure holds each term at its unfavourable bound: hi for ``<``, lo for ``>``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import polars as pl

from stepml_core.replay.simulate import ITL_METRICS, REPLAY_METRICS
from stepml_core.whatif.slo import SLOTerm, meets
from stepml_core.whatif.workload import ServingLimits, WorkloadDescription, whatif_workload

WHATIF_METRICS = (*REPLAY_METRICS, *ITL_METRICS, "saturated")
WHATIF_COLUMNS = {
    "model": pl.Utf8,
    "rate_rps": pl.Float64,
    "max_num_seqs": pl.Int64,
    "max_num_batched_tokens": pl.Int64,
    "metric": pl.Utf8,
    "predicted": pl.Float64,
    "lo": pl.Float64,
    "hi": pl.Float64,
    "tp": pl.Int64,  # last: the columns before it are the form `stepml whatif` has written from the start
}


@dataclass(frozen=True)
class SweepPoint:
    rate_rps: float  # constant offered rate (req/s)
    max_num_seqs: int
    max_num_batched_tokens: int
    tp: int = 0  # 0: the TP of the engine the sweep is given; else one of its ``engines`` (run_sweep)


def sweep_points(rates, max_num_seqs, max_num_batched_tokens, limits: ServingLimits, tp: int = 0) -> list[SweepPoint]:
    """The grid rates × max_num_seqs × max_num_batched_tokens (an empty list: the engine's own limit) at ``tp``."""
    seqs = [int(x) for x in (max_num_seqs or [limits.max_num_seqs])]
    toks = [int(x) for x in (max_num_batched_tokens or [limits.max_num_batched_tokens])]
    return [SweepPoint(float(r), s, t, int(tp)) for s, t, r in itertools.product(seqs, toks, [float(x) for x in rates])]


def _truthless(index: np.ndarray) -> pl.DataFrame:
    """The observed columns score_replay reads, all null: a what-if has no ground truth."""
    return pl.DataFrame(
        {
            "index": index,
            "observed_has_error": pl.Series([None] * index.size, dtype=pl.Boolean),
            "observed_ttft_s": pl.Series([None] * index.size, dtype=pl.Float64),
            "observed_e2e_s": pl.Series([None] * index.size, dtype=pl.Float64),
        }
    )


def bound_models(spec: dict, sums, w) -> list:
    """The two parameter sets that bound a point (stepml_core.replay.intervals): the bootstrap draws at the 5th/95th
    percentile of the replay's latency index, widened by the calibration's between-run term where it has one
    (between_run_bounds), else as drawn; [] without draws."""
    from stepml_core.replay.intervals import INTERVAL_LEVEL, between_run_bounds, interval_bounds

    mean_generated = float(np.mean(w.max_tokens))
    b = interval_bounds(spec.get("bootstrap"), sums.steps, sums.sums, mean_generated, float(np.mean(w.prompt_tokens)))
    if b is None:
        return []
    wb = between_run_bounds(spec, b, sums.steps, sums.sums, mean_generated, INTERVAL_LEVEL)
    return list(wb[:2]) if wb else list(b)


def predict_point(
    spec: dict, desc: WorkloadDescription, limits: ServingLimits, point: SweepPoint, *, seed: int, duration_s: float
) -> list[dict]:
    """WHATIF_COLUMNS rows of one point (see the module docstring): the central replay and one per bound model."""
    from stepml_core.calibration.params import serving_model as params_model
    from stepml_core.replay.intervals import FeatureSums
    from stepml_core.replay.simulate import replay, score_replay, weighted_percentile
    from stepml_core.replay.specs import serving_model
    from stepml_core.runs.rules import is_saturated

    w, ctx = whatif_workload(
        desc.at_rate(point.rate_rps, duration_s),
        limits.with_limits(point.max_num_seqs, point.max_num_batched_tokens),
        seed=seed,
    )
    model = serving_model(spec)
    sums = FeatureSums(model.step_model) if (spec.get("bootstrap") or {}).get("rows") else None
    if sums is not None:  # same step times, and the Σ features the bound models are chosen by
        model.step_model = sums
    table = _truthless(w.index)

    def scores(m) -> dict[str, float]:
        r = replay(w, m, ctx, seed=seed, itl=True)
        out = {x["metric"]: x["predicted"] for x in score_replay(r.per_request, table)[0]}
        return out | {f"itl_p{q}": weighted_percentile(*r.itl_s, q) for q in (50, 90, 99)}

    central = scores(model)
    bounds = [
        scores(params_model(p, spec["name"], spec.get("load_delay")))
        for p in (bound_models(spec, sums, w) if sums else [])
    ]
    n = int(w.index.size)
    runs = [central, *bounds]
    sat = [float(is_saturated(n - int(r["successes"]), r["ttft_mean"])) for r in runs]
    head = {
        "model": limits.model,
        "tp": int(limits.tp),
        "rate_rps": point.rate_rps,
        "max_num_seqs": point.max_num_seqs,
        "max_num_batched_tokens": point.max_num_batched_tokens,
    }
    out = []
    for m in WHATIF_METRICS:
        vals = sat if m == "saturated" else [r[m] for r in runs]
        finite = [v for v in vals if v is not None and np.isfinite(v)]
        lo, hi = (min(finite), max(finite)) if finite else (None, None)
        out.append({**head, "metric": m, "predicted": vals[0], "lo": lo, "hi": hi})
    return out


def _point_job(args) -> tuple[SweepPoint, list[dict]]:
    spec, limits, desc, point, seed, duration_s = args
    return point, predict_point(spec, desc, limits, point, seed=seed, duration_s=duration_s)


def run_sweep(
    spec: dict,
    desc: WorkloadDescription,
    limits: ServingLimits,
    points: list[SweepPoint],
    *,
    seed: int = 0,
    duration_s: float | None = None,
    workers: int = 1,
    progress=None,
    engines: dict | None = None,
) -> list[dict]:
    """Every point's rows (in the order of ``points``), points in parallel over ``workers`` processes (where a
    process may start them: stepml_core.parallel); ``progress.advance(label)`` per finished point. Each point's
    requests are drawn with the same ``seed``: the points differ by their load and limits only. A point with
    ``tp`` ≠ 0 is replayed with ``engines[tp]`` = (its spec, its serving limits: stepml_core.whatif.tp)."""
    from stepml_core.parallel import process_workers

    dur = float(duration_s or max(d for _, d in desc.stages))
    for p in points:  # each point's load is refused here (UsageError), before any process starts
        desc.at_rate(p.rate_rps, dur)
    at = {0: (spec, limits), **(engines or {})}
    jobs = [(*at[p.tp], desc, p, int(seed), dur) for p in points]
    results: dict[SweepPoint, list[dict]] = {}

    def done(point: SweepPoint, rows: list[dict]) -> None:
        results[point] = rows
        if progress is not None:
            progress.advance(
                f"{point.rate_rps:g} req/s, {'' if not point.tp else f'TP {point.tp}, '}max_num_seqs {point.max_num_seqs}, "
                f"max_num_batched_tokens {point.max_num_batched_tokens}"
            )

    n = min(process_workers(workers), len(jobs))
    if n <= 1:
        for j in jobs:
            done(*_point_job(j))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn, not fork: a forked child of a process with polars' threads can deadlock on their locks
        with ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn")) as ex:
            # the heaviest points (highest rates: the longest replays) first, so no worker idles at the end
            order = sorted(jobs, key=lambda j: -j[3].rate_rps)
            for f in as_completed([ex.submit(_point_job, j) for j in order]):
                done(*f.result())
    return [r for p in points for r in results[p]]


def whatif_table(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=WHATIF_COLUMNS) if rows else pl.DataFrame(schema=WHATIF_COLUMNS)


def _first_rate(rates: list[float], flags: list[bool]) -> float | None:
    return next((r for r, f in zip(rates, flags) if f), None)


def _largest_meeting(rates: list[float], ok: list[bool]) -> float | None:
    best = None
    for r, f in zip(rates, ok):
        if not f:
            break
        best = r
    return best


def summarize(table: pl.DataFrame, slo: tuple[SLOTerm, ...] = ()) -> list[dict]:
    """Per (tp, max_num_seqs, max_num_batched_tokens): the saturation rate and its range, and with an SLO the largest rate
    meeting it (central, and at the unfavourable bounds); see the module docstring."""
    out = []
    for (tp, seqs, toks), g in table.group_by(["tp", "max_num_seqs", "max_num_batched_tokens"], maintain_order=True):
        wide = {
            m: {r["rate_rps"]: r for r in g.filter(pl.col("metric") == m).iter_rows(named=True)} for m in WHATIF_METRICS
        }
        rates = sorted(wide["saturated"])
        sat = wide["saturated"]
        row = {
            "tp": int(tp),
            "max_num_seqs": int(seqs),
            "max_num_batched_tokens": int(toks),
            "rates_rps": rates,
            "saturation_rate_rps": _first_rate(rates, [sat[r]["predicted"] >= 0.5 for r in rates]),
            "saturation_rate_lo_rps": _first_rate(rates, [sat[r]["hi"] >= 0.5 for r in rates]),
            "saturation_rate_hi_rps": _first_rate(rates, [sat[r]["lo"] >= 0.5 for r in rates]),
            "max_throughput_rps": max(
                (v for v in (wide["throughput_rps"][r]["predicted"] for r in rates) if math.isfinite(v)), default=None
            ),
        }
        if slo:
            central = [meets(slo, {m: wide[m][r]["predicted"] for m in wide}) for r in rates]
            at_bounds = [
                meets(slo, {t.metric: wide[t.metric][r]["hi" if t.op.startswith("<") else "lo"] for t in slo})
                for r in rates
            ]
            row.update(
                slo=",".join(str(t) for t in slo),
                largest_rate_meeting_slo_rps=_largest_meeting(rates, central),
                largest_rate_meeting_slo_at_bounds_rps=_largest_meeting(rates, at_bounds),
            )
        out.append(row)
    return out
