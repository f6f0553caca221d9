"""The what-if checked against recorded runs, out of sample (docs/whatif.md, *Checked against the real runs*).

For each run of a study: its latencies predicted from its **profile alone** — load stages, shared-prefix shape,
serving limits (its configuration), no request log and no ground truth of its own — with the model calibrated
**without its workload** (``requests_lowo``: the same LLM model's runs of the other workloads,
stepml_core.calibration.protocols) and the template tokens of those same calibration runs; scored against what its
clients saw, over the whole run and per load stage. And per run the predicted saturation rate of its profile's shape
(constant rate, its longest stage's duration): the rate found by bisection in log-rate between
SATURATION_SEARCH_RPS at which the replay turns saturated (:func:`stepml_core.runs.rules.is_saturated`); the run is
predicted overloaded when its highest stage rate is at or above it.

Nothing of a scored run's outcome reaches its prediction: the model's ``fitted_on`` never holds the run (asserted),
the template tokens come from those runs, the search range and the seed are fixed in advance.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import polars as pl

from stepml_core.replay.simulate import REPLAY_METRICS
from stepml_core.whatif.study import StudyRun, template_tokens
from stepml_core.whatif.workload import whatif_workload

SATURATION_SEARCH_RPS = (0.5, 40.0)
SATURATION_STEPS = 8  # bisection steps in log-rate: the rate to a factor (40/0.5)^(1/2^8) ≈ 1.02
CHECK_METRICS = REPLAY_METRICS  # the metrics of replay.csv
CHECK_COLUMNS = {
    "experiment_id": pl.Utf8,
    "llm_model": pl.Utf8,
    "workload": pl.Utf8,
    "stage": pl.Utf8,  # "all" or the stage's index
    "rate_rps": pl.Float64,
    "step_model": pl.Utf8,
    "fitted_on": pl.Utf8,
    "metric": pl.Utf8,
    "predicted": pl.Float64,
    "lo": pl.Float64,  # the range of the central and the two bound models' replays
    "hi": pl.Float64,
    "observed": pl.Float64,
    "rel_err_pct": pl.Float64,
}


def lowo_spec(specs: list[dict], run: StudyRun) -> dict | None:
    """The leave-one-workload-out calibration that predicts this run (its ``for_runs`` holds it)."""
    for s in specs:
        if s.get("name") == "requests_lowo" and run.experiment_id in (s.get("for_runs") or ()):
            if run.experiment_id in (s.get("fitted_on") or ()):
                raise AssertionError(f"{run.experiment_id}: its lowo model was fitted on it")
            return s
    return None


def stage_index(arrival_s: np.ndarray, stages) -> np.ndarray:
    """Per request, the load stage its arrival (s from the first) falls in (the last stage takes the tail)."""
    ends = np.cumsum([d for _, d in stages])
    return np.minimum(np.searchsorted(ends, arrival_s, side="right"), len(ends) - 1)


def _summaries(arrival, ttft, e2e, success, tokens, stages) -> dict[str, dict]:
    from stepml_core.replay.simulate import latency_summary

    out = {"all": latency_summary(arrival, ttft, e2e, success, tokens)}
    if len(stages) > 1:
        k = stage_index(arrival, stages)
        for i in range(len(stages)):
            m = k == i
            out[str(i)] = latency_summary(arrival[m], ttft[m], e2e[m], success[m], tokens[m])
    return out


def observed_summaries(requests: pl.DataFrame, run: StudyRun) -> dict[str, dict] | None:
    """What the run's clients saw (requests with ground truth), whole run and per stage; None without truth."""
    t = requests.filter(pl.col("observed_has_error").is_not_null()).sort("arrival_time_us")
    if t.height == 0:
        return None
    a = (t["arrival_time_us"].to_numpy() - requests["arrival_time_us"].min()) * 1e-6
    ok = ~t["observed_has_error"].to_numpy().astype(bool) & t["observed_e2e_s"].is_not_null().to_numpy()
    tokens = np.full(t.height, run.description.output_tokens, dtype=np.int64)
    ttft = t["observed_ttft_s"].fill_null(np.nan).to_numpy()
    e2e = t["observed_e2e_s"].fill_null(np.nan).to_numpy()
    return _summaries(a, ttft, e2e, ok, tokens, run.description.stages)


def _replay(spec: dict, desc, limits, seed: int, *, params=None, record: bool = False):
    """(workload, per-request table, feature sums or None): the spec's model, or ``params`` (a bound model)."""
    from stepml_core.calibration.params import serving_model as params_model
    from stepml_core.replay.intervals import FeatureSums
    from stepml_core.replay.simulate import replay
    from stepml_core.replay.specs import serving_model

    w, ctx = whatif_workload(desc, limits, seed=seed)
    model = serving_model(spec) if params is None else params_model(params, spec["name"], spec.get("load_delay"))
    sums = FeatureSums(model.step_model) if record else None
    if sums is not None:  # same step times, and the Σ features the bound models are chosen by
        model.step_model = sums
    return w, replay(w, model, ctx, seed=seed).per_request, sums


def _replay_summaries(w, p, stages) -> dict[str, dict]:
    ok = p["success"].to_numpy()
    return _summaries(
        w.arrival_s, p["ttft_s"].fill_null(np.nan).to_numpy(), p["e2e_s"].to_numpy(), ok, w.max_tokens, stages
    )


def predicted_summaries(
    spec: dict, run: StudyRun, template: float, seed: int
) -> tuple[dict[str, dict], list[dict[str, dict]], bool]:
    """The run's profile replayed with the model: summaries (whole run, per stage), the same of its two bound models
    (stepml_core.whatif.sweep.bound_models; none without parameter draws) and whether the central replay is
    saturated."""
    from stepml_core.runs.rules import is_saturated
    from stepml_core.whatif.sweep import bound_models

    desc = replace(run.description, template_tokens=template)
    draws = bool((spec.get("bootstrap") or {}).get("rows"))
    w, p, sums = _replay(spec, desc, run.limits, seed, record=draws)
    central = _replay_summaries(w, p, desc.stages)
    bounds = []
    for params in bound_models(spec, sums, w) if draws else []:
        wb, pb, _ = _replay(spec, desc, run.limits, seed, params=params)
        bounds.append(_replay_summaries(wb, pb, desc.stages))
    return central, bounds, is_saturated(int((~p["success"].to_numpy()).sum()), central["all"]["ttft_mean"])


def saturation_rate(spec: dict, run: StudyRun, template: float, seed: int) -> float:
    """The constant rate (req/s) from which the run's shape is saturated (bisection, see the module docstring);
    the upper end of the search range when it never is."""
    from stepml_core.runs.rules import is_saturated

    desc = replace(run.description, template_tokens=template)
    dur = max(d for _, d in desc.stages)

    def saturated(rate: float) -> bool:
        _, p, _ = _replay(spec, desc.at_rate(rate, dur), run.limits, seed)
        ok = p["success"].to_numpy()
        t = p.filter(pl.col("success"))["ttft_s"].mean()
        return is_saturated(int((~ok).sum()), float(t) if t is not None else None)

    lo, hi = (math.log(x) for x in SATURATION_SEARCH_RPS)
    if not saturated(math.exp(hi)):
        return math.exp(hi)
    if saturated(math.exp(lo)):
        return math.exp(lo)
    for _ in range(SATURATION_STEPS):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if saturated(math.exp(mid)) else (mid, hi)
    return math.exp(hi)


def check_run(spec: dict, run: StudyRun, template: float, requests: pl.DataFrame, seed: int = 0) -> dict:
    """One run: {"rows": CHECK_COLUMNS rows, "saturation": {...}} (see the module docstring)."""
    pred, bounds, pred_sat = predicted_summaries(spec, run, template, seed)
    obs = observed_summaries(requests, run)
    rows = []
    for stage, pv in pred.items():
        ov = (obs or {}).get(stage) or {}
        rate = run.description.stages[int(stage)][0] if stage != "all" else None
        for m in CHECK_METRICS:
            p, o = pv.get(m), ov.get(m)
            vals = [v for v in (p, *(b[stage].get(m) for b in bounds)) if v is not None and math.isfinite(v)]
            ok = o is not None and math.isfinite(o) and o != 0 and p is not None and math.isfinite(p)
            rows.append(
                {
                    "experiment_id": run.experiment_id,
                    "llm_model": run.limits.model,
                    "workload": run.workload,
                    "stage": stage,
                    "rate_rps": rate,
                    "step_model": spec["name"],
                    "fitted_on": ";".join(spec.get("fitted_on") or ()),
                    "metric": m,
                    "predicted": p,
                    "lo": min(vals) if vals else None,
                    "hi": max(vals) if vals else None,
                    "observed": o,
                    "rel_err_pct": (p - o) / o * 100 if ok else None,
                }
            )
    sat_rate = saturation_rate(spec, run, template, seed)
    top = max(r for r, _ in run.description.stages)
    return {
        "rows": rows,
        "saturation": {
            "experiment_id": run.experiment_id,
            "llm_model": run.limits.model,
            "workload": run.workload,
            "max_stage_rate_rps": top,
            "predicted_saturation_rate_rps": sat_rate,
            "predicted_overloaded": bool(top >= sat_rate),
            "profile_replay_saturated": bool(pred_sat),
            "fitted_on": ";".join(spec.get("fitted_on") or ()),
            "template_tokens": template,
        },
    }


def _job(args):
    return check_run(*args)


def check_runs(
    runs: list[StudyRun],
    specs: list[dict],
    requests: dict[str, pl.DataFrame],
    *,
    seed: int = 0,
    workers: int = 1,
    progress=None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Every run with a lowo model: (CHECK_COLUMNS table, saturation table); runs in parallel (spawn pool)."""
    from stepml_core.parallel import process_workers

    by_id = {r.experiment_id: r for r in runs}
    jobs = []
    for r in runs:
        spec = lowo_spec(specs, r)
        if spec is None:
            continue
        template = template_tokens([by_id[e] for e in spec.get("fitted_on") or () if e in by_id])
        jobs.append((spec, r, template, requests[r.experiment_id], seed))
    results = []
    n = min(process_workers(workers), len(jobs))
    if n <= 1:
        for j in jobs:
            results.append(_job(j))
            if progress is not None:
                progress.advance(j[1].experiment_id)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("spawn")) as ex:
            futs = {ex.submit(_job, j): j[1].experiment_id for j in jobs}
            for f in as_completed(futs):
                results.append(f.result())
                if progress is not None:
                    progress.advance(futs[f])
    results.sort(key=lambda r: r["saturation"]["experiment_id"])
    rows = [x for r in results for x in r["rows"]]
    table = pl.DataFrame(rows, schema=CHECK_COLUMNS) if rows else pl.DataFrame(schema=CHECK_COLUMNS)
    return table, pl.DataFrame([r["saturation"] for r in results])


# ---------------------------------------------------------------------------- the report's section


def goal_lines(table: pl.DataFrame, sat: pl.DataFrame, saturated: set, truth: dict) -> list[str]:
    """The issue's goal figures: mean |E2E|, |TTFT| over the non-saturated runs with ground truth; each `general`
    stage's mean E2E; the observed means inside [lo, hi]; the saturation classification."""
    whole = table.filter(pl.col("stage") == "all")
    ok_runs = [e for e in whole["experiment_id"].unique().sort().to_list() if truth.get(e) and e not in saturated]
    lines = []
    for m in ("e2e_mean", "ttft_mean"):
        v = whole.filter(pl.col("experiment_id").is_in(ok_runs) & (pl.col("metric") == m))["rel_err_pct"].abs()
        mean = f"{v.mean():.1f} %" if v.len() else "–"
        lines.append(f"mean |{m}| error over the {v.len()} non-saturated run(s) with ground truth: {mean}")
    gen = table.filter(
        (pl.col("workload") == "general") & (pl.col("stage") != "all") & (pl.col("metric") == "e2e_mean")
    )
    for r in gen.sort("experiment_id", "stage").iter_rows(named=True):
        err = "–" if r["rel_err_pct"] is None else f"{r['rel_err_pct']:+.1f} %"
        lines.append(
            f"`general` {r['experiment_id']} stage {r['stage']} ({r['rate_rps']:g} req/s): mean E2E predicted "
            f"{r['predicted']:.3f} s, observed {_num(r['observed'], '.3f')} s, {err}"
        )
    iv = whole.filter(pl.col("experiment_id").is_in(ok_runs) & pl.col("metric").is_in(["e2e_mean", "ttft_mean"]))
    inside = iv.filter((pl.col("lo") <= pl.col("observed")) & (pl.col("observed") <= pl.col("hi")))
    lines.append(f"observed mean E2E / TTFT inside [lo, hi] over the same runs: {inside.height}/{iv.height}")
    right = sum(bool(r["predicted_overloaded"]) == (r["experiment_id"] in saturated) for r in sat.iter_rows(named=True))
    lines.append(f"saturation classified right (overloaded or not at the run's rate): {right}/{sat.height} run(s)")
    return lines


def _num(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def check_section(
    table: pl.DataFrame | None, sat: pl.DataFrame | None, saturated: set, truth: dict, note: str = ""
) -> list[str]:
    """'What if, checked against the recorded runs': per run its profile-alone prediction against what it observed
    (out of sample: each run's leave-one-workload-out model), the goal figures, the saturation rates."""
    lines = ["## What if, checked against the recorded runs", ""]
    if table is None:
        return lines + [f"**{note}**", ""]
    if not sat.height:
        return lines + ["No run has a leave-one-workload-out model to predict it with.", ""]
    lines += [
        "Each run predicted from its profile and serving limits alone (no request log, no ground truth): a workload "
        "drawn from the profile (stepml_core.whatif.workload, seeded) replayed with the run's leave-one-workload-out "
        "calibration (fitted on the same LLM model's other workloads only; template tokens from those runs); scored "
        "against the run's clients. Errors (predicted − observed) / observed × 100; [lo, hi] from the model's bound "
        "models (bootstrap and between-run). Saturation rate: the lowest arrival rate of the run's shape at which "
        "the model predicts overload (a failed request or mean TTFT > 5 s), against whether the run saturated.",
        "",
        "| run | TTFT mean err % | E2E mean err % | predicted saturation rate (req/s) | run's highest rate | "
        "predicted overloaded | observed saturated |",
        "|---|---|---|---|---|---|---|",
    ]
    whole = table.filter(pl.col("stage") == "all")
    err = {(r["experiment_id"], r["metric"]): r["rel_err_pct"] for r in whole.iter_rows(named=True)}
    for r in sat.sort("experiment_id").iter_rows(named=True):
        e = r["experiment_id"]
        t, e2 = err.get((e, "ttft_mean")), err.get((e, "e2e_mean"))
        lines.append(
            f"| {e} | {_num(t, '+.1f')} | {_num(e2, '+.1f')} | {_num(r['predicted_saturation_rate_rps'], '.1f')} | "
            f"{_num(r['max_stage_rate_rps'], 'g')} | {bool(r['predicted_overloaded'])} | {e in saturated} |"
        )
    return lines + [""] + [f"* {x}" for x in goal_lines(table, sat, saturated, truth)] + [""]
