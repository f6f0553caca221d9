"""The report section for the step-time models calibrated from request logs, rendered (docs/calibration.md):
:func:`calibration_section` turns what ``stepml_core.report.calibration.calibration_fidelity`` gathered into
markdown lines — model and cost, parameters, the per-step check on real steps, one table per protocol beside BLIS
iteration 4a, uncertainty and coverage, the goals with their measured figures.
"""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl

from stepml_core.calibration.params import PARAM_UNITS
from stepml_core.replay.coverage import WIDE_PCT, interval_cell
from stepml_core.report.calibration import PROTOCOL_TITLE, mean_abs_pct
from stepml_core.report.piecewise import piecewise_section


def _f(x, nd=1, sign=False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def _md(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def calibration_section(t: dict) -> list[str]:
    """'Step time calibrated from request logs': model, cost, parameters, per-step check, one table per protocol
    with BLIS 4a beside, interval coverage, goals."""
    if not t or (t["params"].height == 0 and t["errors"].height == 0):
        return []
    src = ", ".join(t["source"]) or "no"
    lines = [
        f"## Step time calibrated from request logs ({src} data)",
        "",
        "Each LLM model's step time is learned from request logs alone (arrival, tokens, client TTFT and E2E per "
        "request; no step traces) and written as a BLIS StepML model file over BLIS's own features — what is "
        "replayed below is that file, evaluated as BLIS documents it:",
        "",
        "`step_us = β0 + β_dec·decode_tokens + β_kv·kv_sum + β_pf·prefill_tokens + β_npf·num_prefill_reqs`, "
        "`queueing_us = α0 + α1·input_len` (stepml_core/calibration/fit.py, docs/calibration.md).",
        "",
        "Stage 1 (closed form): each request's decode window gives its average cycle (E2E − TTFT)/(tokens − 1) and, "
        "from all requests' observed timelines, the window's mean number of decoders, Σ context and prompts started; "
        "bounded least squares (β_kv ≥ KV bytes per token per GPU / HBM bandwidth) gives β0, β_dec, β_kv, β_npf; "
        "β_pf is the compute prior (2·active parameters FLOPs per token at 50 % of peak); α0 from the median of "
        "TTFT − 1.5 cycles. Stage 2: scipy `least_squares` adjusts a scale on every step coefficient and a shift of α0 "
        "with the simulator in the loop (4 windows of 60 s per non-saturated calibration run), matching TTFT and E2E "
        "mean/p50/p90(/p99).",
        "",
    ]
    lines += _cost_lines(t) + _parameter_lines(t) + _real_step_lines(t) + _protocol_lines(t)
    lines += piecewise_section(t.get("piecewise")) + _uncertainty_lines(t)
    lines += _goal_lines(t)
    lines += [
        "What the BLIS file cannot say: BLIS adds `output_token_processing_time_us` to every token and counts one "
        "step more per request in E2E (E2E = TTFT + len(output)·step), StepML's simulator len(output) − 1: in BLIS the "
        "exported model's E2E is one step longer (≈ 0.4 % at 250 output tokens); the whole request overhead therefore "
        "goes into `queueing_time` (no per-token term). The API server's load-dependent delay (TTFT grows with the "
        "number of streams) has no BLIS feature: α0 is its average over the calibration runs.",
        "",
    ]
    return lines + _load_delay_lines(t.get("load_delay") or {})


def _load_delay_lines(per_model: dict) -> list[str]:
    """The opt-in load delay (calibration.load_delay), when this study was calibrated with it."""
    if not per_model:
        return []
    return [
        "**Calibrated with the load delay** (opt-in, `stepml run --load-delay`; docs/calibration.md): a third stage "
        "fits, on each calibration's own non-saturated runs, a delay before a token reaches its client of δα0 + γ·n "
        "(n = the requests in the step that emitted it); every replay of a calibrated model above includes it, the "
        "exported BLIS files do not (BLIS's `queueing_time` reads `input_len` only). As shipped (requests_all): "
        + "; ".join(
            f"{m} γ {_f(d['per_request_us'], 1)} µs per request, δα0 {_f(d['shift_us'] / 1e3, 2, sign=True)} ms"
            for m, d in per_model.items()
        )
        + ".",
        "",
    ]


def _cost_lines(t: dict) -> list[str]:
    """The calibrations' cost: wall time, closed form, simulator refinement, bootstrap."""
    lines: list[str] = []
    c = t["costs"]
    if c.height:
        lines += [
            f"Cost: {c.height} distinct calibrations in {_f(t.get('seconds'), 0)} s wall "
            f"(closed form Σ {_f(c['closed_form_s'].sum(), 1)} s; simulator refinement Σ {_f(c['refine_s'].sum(), 0)} s "
            f"over {int(c['refine_evals'].fill_null(0).sum())} evaluations, at most {int(c['refine_evals'].fill_null(0).max())} "
            f"per calibration; bootstrap Σ {_f(c['bootstrap_s'].sum(), 1)} s).",
            "",
        ]
    return lines


def _parameter_lines(t: dict) -> list[str]:
    """The parameters each LLM model got, and across models (requests_all)."""
    lines: list[str] = []
    p = t["params"]
    if p.height:
        lines += [
            "### Parameters each LLM model got",
            "",
            "Units: " + "; ".join(f"{k.replace('_us', '')}: {u}" for k, u in PARAM_UNITS.items()) + ". "
            "β0 / weights = per-step fixed cost in units of streaming the weights once from HBM; β_kv / floor = KV-read cost "
            "in units of its bandwidth bound.",
            "",
            _md(
                [
                    "LLM model",
                    "params (B)",
                    "TP",
                    "model (runs)",
                    "β0 µs",
                    "β0/weights",
                    "β_dec µs",
                    "β_kv µs",
                    "β_kv/floor",
                    "β_pf µs",
                    "β_npf µs",
                    "α0 ms",
                ],
                [
                    [
                        r["llm_model"],
                        _f(r["params_b"], 1),
                        r["tp"],
                        f"{r['step_model']} ({r['fitted_on']})",
                        _f(r["b0_us"], 0),
                        _f(r["b0_over_weights"], 2),
                        _f(r["b_dec_us"], 1),
                        _f(r["b_kv_us"], 3),
                        _f(r["kv_over_floor"], 2),
                        _f(r["b_pf_us"], 1),
                        _f(r["b_npf_us"], 0),
                        _f(r["q0_us"] / 1e3, 1),
                    ]
                    for r in p.iter_rows(named=True)
                ],
            ),
            "",
        ]
        allp = p.filter(pl.col("step_model") == "requests_all").sort("params_b")
        if allp.height > 1:
            lines += [
                "Across models (requests_all, by parameter count): per-step overhead β0 "
                + ", ".join(
                    f"{r['llm_model']} {_f(r['b0_us'] / 1e3, 1)} ms ({_f(r['b0_over_weights'], 2)}× its weights time)"
                    for r in allp.iter_rows(named=True)
                )
                + "; KV-read cost "
                + ", ".join(f"{_f(r['kv_over_floor'], 1)}×" for r in allp.iter_rows(named=True))
                + " its bandwidth bound.",
                "",
            ]
    return lines


def _real_step_lines(t: dict) -> list[str]:
    """Per-step MAPE of each calibrated model on the real cycle_us steps, and the plot."""
    lines: list[str] = []
    m = t["mape"]
    if m.height:
        lines += [
            "### Against the real steps",
            "",
            "Per-step MAPE of each calibrated model on the real `cycle_us` steps of the traced runs (BLIS features from "
            "BATCH_SUMMARY: first-decode steps counted as decode, Σ context ≈ 16·KV blocks in use − 8·running). "
            "`run's requests used` says whether that run's request log was among the calibration runs (its steps never are). "
            "Lagged: cycle N against batch N−1 (async scheduling), where both steps were sampled.",
            "",
            _md(
                ["run", "model", "run's requests used", "steps", "MAPE %", "median APE %", "bias %", "MAPE lagged %"],
                [
                    [
                        r["experiment_id"],
                        r["step_model"],
                        "yes" if r["run_requests_used"] else "no",
                        r["steps"],
                        _f(r["mape_pct"], 2),
                        _f(r["median_ape_pct"], 2),
                        _f(r["bias_pct"], 2, True),
                        _f(r["mape_lag_pct"], 2),
                    ]
                    for r in m.iter_rows(named=True)
                ],
            ),
            "",
        ]
    if t.get("plot"):
        lines += [
            f"![calibrated step time vs real cycle_us]({Path(t['plot']).name})",
            "",
            "Real `cycle_us` per sampled step (grey) against the calibrated models' step time on the same steps "
            "(binned medians), by the step's scheduled tokens.",
            "",
        ]
    return lines


def _interval_cell(r: dict) -> str:
    """The E2E 90 % interval of a run's row: [lo, hi] ✓/✗, 'wide' where it is at least WIDE_PCT % of the prediction
    (it carries little); unbounded (too few other runs' scores) without a mark."""
    lo, hi, inside = r.get("e2e_mean_lo"), r.get("e2e_mean_hi"), r.get("e2e_mean_inside")
    if lo is None:
        return "–"
    if hi is None or not math.isfinite(hi):
        return "unbounded"
    pred = r.get("e2e_mean_pred")
    wide = pred is not None and hi - lo >= WIDE_PCT / 100.0 * abs(pred)
    return f"[{_f(lo, 2)}, {_f(hi, 2)}] {'✓' if inside else '✗' if inside is False else ''}" + (" wide" if wide else "")


def _protocol_lines(t: dict) -> list[str]:
    """One table per protocol (roles, lowo, lomo) with BLIS 4a beside, and the out-of-sample means."""
    lines: list[str] = []
    e = t["errors"]
    for proto in ("roles", "lowo", "lomo"):
        x = e.filter(pl.col("protocol") == proto) if e.height else e
        if x.height == 0:
            continue
        body = []
        for r in x.iter_rows(named=True):
            iv = _interval_cell(r)
            body.append(
                [
                    r["experiment_id"],
                    r["role"] or "–",
                    "in" if r["sample"] == "in_sample" else "out",
                    "sat" if r["saturated"] else ("–" if not r["scored"] else ""),
                    _f(r["ttft_mean_err"], 1, True),
                    _f(r["e2e_mean_err"], 1, True),
                    _f(r["e2e_p99_err"], 1, True),
                    _f(r["successes_err"], 1, True),
                    f"{_f(r['e2e_mean_pred'], 2)} / {_f(r['e2e_mean_obs'], 2)}",
                    iv,
                    _f(r["blis_ttft_err"], 1, True),
                    _f(r["blis_e2e_err"], 1, True),
                    _f(r["blis_p99_err"], 1, True),
                ]
            )
        lines += [
            f"### Protocol: {PROTOCOL_TITLE[proto]}",
            "",
            _md(
                [
                    "run",
                    "role",
                    "sample",
                    "",
                    "TTFT %",
                    "E2E %",
                    "p99 E2E %",
                    "successes %",
                    "E2E s pred / obs",
                    "E2E 90 % interval (s)",
                    "BLIS4a TTFT %",
                    "BLIS4a E2E %",
                    "BLIS4a p99 %",
                ],
                body,
            ),
            "",
        ]
        oos = x.filter(pl.col("scored") & (pl.col("sample") == "out_of_sample"))
        for sat, label in ((False, "non-saturated"), (True, "saturated")):
            y = oos.filter(pl.col("saturated") == sat)
            if y.height:
                lines.append(
                    f"* out of sample, {label} ({y.height} runs): mean |TTFT| {_f(mean_abs_pct(y['ttft_mean_err'].to_list()))} %, "
                    f"|E2E| {_f(mean_abs_pct(y['e2e_mean_err'].to_list()))} %, |p99 E2E| {_f(mean_abs_pct(y['e2e_p99_err'].to_list()))} %"
                    + (f", |successes| {_f(mean_abs_pct(y['successes_err'].to_list()))} %" if sat else "")
                    + f"; BLIS 4a on the same runs: |TTFT| {_f(mean_abs_pct(y['blis_ttft_err'].to_list()))} %, "
                    f"|E2E| {_f(mean_abs_pct(y['blis_e2e_err'].to_list()))} %"
                )
        lines.append("")
    return lines


def _uncertainty_lines(t: dict) -> list[str]:
    """Coverage of the 90 % intervals of the out-of-sample predictions, bootstrap and widened, per regime, with its
    binomial uncertainty, the widened coverage by construction, and the intervals that carry no evidence."""
    cov = t["coverage"]
    if not cov.height:
        return []
    return [
        "### Uncertainty",
        "",
        "Each out-of-sample prediction gets three 90 % intervals; the report shows the second. **Bootstrap** (fitted on the fold's "
        "calibration runs only): the calibration refitted (closed form, stage 2's correction kept) on two-stage "
        "bootstrap resamples (calibration runs, then requests within them); the resamples at the 5th and 95th "
        "percentile of the scored run's mean request latency in the model's terms are replayed (leave-one-model-out: "
        "the per-source transfers): the noise of the calibration data. **Widened** (split conformal, "
        "`stepml_core.replay.intervals`; fitted on the other runs' out-of-sample errors): each side moves out by q % of the "
        "prediction, q = the ⌈(n + 1)·0.9⌉-th smallest of the n excesses beyond their own bootstrap interval of the "
        "same protocol's predictions of other runs whose model could not have used the scored run (all protocols "
        "pooled where one has fewer than 9). The scored run's ground truth enters neither. Settings: level 90 %, "
        "60 resamples, the pooling threshold (the rank's need) fixed in advance; conditioning q on the predicted "
        "saturation was tried on these real runs and not kept.",
        "",
        "**Bootstrap + between-run term** (fitted on the fold's calibration runs only; `brun_*` in "
        "replay_intervals.csv): each calibration run left out in turn, stage 1 refitted on the others and its error "
        "on the left-out run measured (log of observed / predicted decode cycles on its own windows; its α0 offset); "
        "with k such errors and a new run's error ~ N(0, σ²), z = t_k(0.95)·√(Σe²/k) bounds a new run's step error, "
        "each bootstrap bound model's step part is moved out to exp(±√(h² + z²)) of the central one (h: the "
        "bootstrap's own half-width), α0 by the same quantile of the α0 errors, and the two are replayed. None with "
        "one calibration run (a run-roles fold with one train run) or for a transfer (leave one model out): those "
        "count as "
        "*unbounded*. Settings fixed in advance: level 90 %, Student t on k.",
        "",
        "How far the coverage can be read: k/n with its exact (Clopper–Pearson) 95 % interval, per protocol, metric "
        "and regime (the run observed saturated or not; *all* = both); the predictions share scores and calibration "
        "runs, so the interval is if anything too narrow. Not counted: *point* (every model variant replayed gives "
        "the same value, e.g. `successes` = every request of a run all replays serve in full: known without the "
        "model's uncertainty, widened or not) and *unbounded*; *wide* "
        f"(width ≥ {WIDE_PCT:.0f} % of the prediction: carries little) is counted and shown. *By construction*: the "
        "coverage the widening gives on exchangeable runs whatever the errors, ⌈(n + 1)·0.9⌉/(n + 1) (n/(n + 1) "
        "for n = 9–18: q is the largest other excess) — a widened coverage at that figure is what the method "
        "yields, not a check of it; the protocols, folds and regimes pooled in q are not exchangeable. Width: median "
        "over the counted intervals, % of the prediction.",
        "",
        _md(
            [
                "protocol",
                "metric",
                "regime",
                "predictions",
                "bootstrap: inside / counted = % [95 % CI]",
                "widened (split conformal)",
                "by construction %",
                "median q % (scores)",
                "bootstrap + between-run term",
            ],
            [
                [
                    r["protocol"],
                    r["metric"],
                    r["regime"],
                    r["predictions"],
                    interval_cell(r, "boot_"),
                    interval_cell(r),
                    _f(r["by_construction_pct"], 0),
                    ("∞" if r["median_q_pct"] == math.inf else _f(r["median_q_pct"], 1))
                    + f" ({r['scores_min']}–{r['scores_max']}, {r['pool'] or '–'})",
                    interval_cell(r, "brun_"),
                ]
                for r in cov.iter_rows(named=True)
            ],
        ),
        "",
    ]


def _goal_lines(t: dict) -> list[str]:
    """The issue's goals: measured against target."""
    lines: list[str] = []
    g = t["goals"]
    if g:
        lines += [
            "### Goals",
            "",
            "Fitted on: as each goal says (run roles: the LLM model's `train` runs; leave one workload out: its runs of "
            "the other workloads; never a scored run). No model choice enters (each row is one protocol's model). "
            "Settings: see *What each figure rests on* under *Replaying the runs*.",
            "",
            _md(
                ["goal", "runs", "measured %", "met"],
                [
                    [
                        x["goal"],
                        x["runs"],
                        _f(x["measured"], 1),
                        "–"
                        if x["met"] is None
                        else ("yes" if x["met"] else f"**no** (by {_f(x['measured'] - x['target'], 1)} points)"),
                    ]
                    for x in g
                ],
            ),
            "",
        ]
    return lines
