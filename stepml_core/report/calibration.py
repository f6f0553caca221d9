"""Report section for the step-time models calibrated from request logs (docs/calibration.md).

``calibration_fidelity`` gathers what the section shows (every figure from stored assets):
the calibrated parameters per LLM model and protocol, what the calibration cost, the per-step MAPE of
the calibrated models on the real ``cycle_us`` steps of traced runs, per-run replay errors per
protocol beside BLIS iteration 4a, interval coverage, and the issue's goals with their measured
figures; ``calibration_section`` renders it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl

from stepml_core.calibration.params import PARAM_UNITS, StepParams
from stepml_core.calibration.protocols import LINEAR_STEP_MODELS, PROTOCOL_OF
from stepml_core.replay.coverage import WIDE_PCT, coverage_table, interval_cell
from stepml_core.replay.intervals import CONFORMAL_LEVEL
from stepml_core.report.piecewise import piecewise_section, piecewise_table

PROTOCOL_TITLE = {
    "roles": "run roles (train calibrates; validate and test scored) — comparable with BLIS 4a",
    "lowo": "leave one workload out (per LLM model: 3 workloads calibrate, the 4th is predicted)",
    "lomo": "leave one model out (the other LLM models' calibrations carried over through the architecture)",
}
GOALS = {"roles_e2e": 3.0, "roles_ttft": 8.0, "saturated": 25.0, "lowo_e2e": 5.0, "step_mape": 10.0}


# ---------------------------------------------------------------------------- per-step check on real steps


def blis_features_from_steps(steps: pl.DataFrame) -> pl.DataFrame:
    """BLIS's features of each BATCH_SUMMARY step (BATCH_SUMMARY-only runs: no per-request data):

    * the trace labels a request's first decode step (one step after its last prompt chunk, async scheduling)
      as a 1-token prefill; BLIS counts it as decode: when prefill_tokens == num_prefill_reqs every prefill
      request is such a step; otherwise one request carries a real prompt chunk and the rest are first decodes;
    * kv_sum (Σ tokens computed before the step) ≈ 16·(KV blocks in use) − 8·running requests (a request's last
      block is half full on average); blocks shared by prefix caching are counted once (an underestimate)."""
    P, n_pf = pl.col("batch.prefill_tokens"), pl.col("batch.num_prefill_reqs")
    real = pl.when(P > n_pf).then(1).otherwise(0)
    first_dec = n_pf - real
    return steps.select(
        "step.id",
        "cycle_us",
        "batch.scheduled_tokens",
        prefill_tokens=(P - first_dec).cast(pl.Float64),
        decode_tokens=(pl.col("batch.decode_tokens") + first_dec).cast(pl.Float64),
        num_prefill_reqs=real.cast(pl.Float64),
        kv_sum=(
            16 * (pl.col("kv.blocks_total_gpu") - pl.col("kv.blocks_free_gpu")) - 8 * pl.col("queue.running_depth")
        ).cast(pl.Float64),
    )


def step_mape(params: StepParams, steps: pl.DataFrame) -> dict:
    """MAPE (%) of the model on the run's cycle_us steps: with each step's own batch, and with the previous step's
    batch (async scheduling: cycle N mostly runs batch N−1) where step N−1 was sampled too."""
    f = blis_features_from_steps(steps).sort("step.id")
    pred = params.step_us(
        f["decode_tokens"].to_numpy(),
        f["kv_sum"].to_numpy(),
        f["prefill_tokens"].to_numpy(),
        f["num_prefill_reqs"].to_numpy(),
    )
    y = f["cycle_us"].to_numpy().astype(np.float64)
    ok = np.isfinite(y) & (y > 0)
    ids = f["step.id"].to_numpy()
    prev = np.concatenate([[False], ids[1:] == ids[:-1] + 1])
    lag_ok = ok & prev
    lag_pred = np.concatenate([[np.nan], pred[:-1]])
    ape = np.abs(pred - y) / y * 100
    lag_ape = np.abs(lag_pred - y) / y * 100
    return {
        "steps": int(ok.sum()),
        "mape_pct": float(np.mean(ape[ok])) if ok.any() else float("nan"),
        "median_ape_pct": float(np.median(ape[ok])) if ok.any() else float("nan"),
        "bias_pct": float(np.mean((pred[ok] - y[ok]) / y[ok]) * 100) if ok.any() else float("nan"),
        "steps_lag": int(lag_ok.sum()),
        "mape_lag_pct": float(np.mean(lag_ape[lag_ok])) if lag_ok.any() else float("nan"),
    }


# ---------------------------------------------------------------------------- gathering


def calibration_fidelity(
    cal: dict, fid: dict, steps: dict[str, pl.DataFrame], llm_of: dict[str, str], out_dir: Path
) -> dict:
    """Tables of the section (all from stored assets): params, costs, step MAPE, per-protocol errors, goals."""
    specs = list(cal.get("specs") or [])
    shipped = dict(cal.get("shipped") or {})
    rows = fid.get("replay") if fid.get("replay") is not None else pl.DataFrame()
    runs = fid.get("runs") if fid.get("runs") is not None else pl.DataFrame()
    ivs = fid.get("intervals") if fid.get("intervals") is not None else pl.DataFrame()
    steps = {
        e: st
        for e, st in steps.items()
        if st.height and "cycle_us" in st.columns and st["cycle_us"].drop_nulls().len() >= 2
    }
    params = _params_table(specs, shipped)
    mape = _mape_table(specs, shipped, steps, llm_of)
    errors = _protocol_errors(rows, runs, ivs, fid.get("blis4a"))
    goals = _goals(errors, mape)
    coverage = _coverage(ivs, runs)
    plot = plot_step_time(out_dir, specs, shipped, steps, llm_of) if steps else None
    return {
        "params": params,
        "mape": mape,
        "errors": errors,
        "piecewise": piecewise_table(specs, rows, runs),
        "goals": goals,
        "coverage": coverage,
        "costs": _costs(cal),
        "plot": str(plot) if plot else None,
        "seconds": cal.get("seconds"),
        "source": sorted(set(rows["source"])) if rows.height else [],
    }


def _params_table(specs: list[dict], shipped: dict[str, dict]) -> pl.DataFrame:
    out = []
    linear = [
        s for s in [*shipped.values(), *specs] if s.get("form", "linear") == "linear"
    ]  # the piecewise form: its own section
    for s in [
        *(s for s in linear if s["protocol"] == "all"),
        *(s for s in linear if s["protocol"] in ("roles", "lomo")),
    ]:
        p = StepParams(**s["params"])
        pr = (s.get("calibration") or {}).get("prior") or {}
        out.append(
            {
                "llm_model": s["llm_model"],
                "step_model": s["name"],
                "fitted_on": len(s["fitted_on"]),
                "params_b": (pr.get("params") or 0) / 1e9,
                "tp": pr.get("tp"),
                "moe": pr.get("moe"),
                **{k: getattr(p, k) for k in PARAM_UNITS},
                "b0_over_weights": p.b0_us / pr["weights_floor_us"] if pr.get("weights_floor_us") else None,
                "kv_over_floor": p.b_kv_us / pr["kv_floor_us"] if pr.get("kv_floor_us") else None,
                "weights_floor_us": pr.get("weights_floor_us"),
                "kv_floor_us": pr.get("kv_floor_us"),
            }
        )
    return pl.DataFrame(out).sort("params_b", "step_model") if out else pl.DataFrame()


def _costs(cal: dict) -> pl.DataFrame:
    out = []
    for c in cal.get("calibrations") or []:
        rep = c.get("refine") or {}
        sec = c.get("seconds") or {}
        out.append(
            {
                "llm_model": c["llm_model"],
                "runs": len(c["calibrate_on"]),
                "requests": int(sum((c.get("requests_used") or {}).values())),
                "closed_form_s": sec.get("closed_form"),
                "refine_evals": rep.get("evaluations"),
                "refine_s": sec.get("refine"),
                "bootstrap_s": sec.get("bootstrap"),
                "cost_start": rep.get("cost_start"),
                "cost_end": rep.get("cost_end"),
                "step_scale": rep.get("step_scale"),
                "q_shift_ms": (rep.get("q_shift_us") or 0.0) / 1e3,
            }
        )
    return pl.DataFrame(out) if out else pl.DataFrame()


def _mape_table(specs, shipped, steps, llm_of) -> pl.DataFrame:
    out = []
    for e, st in sorted(steps.items()):
        llm = llm_of.get(e)
        cands = [
            (s["name"], s)
            for s in specs
            if s.get("llm_model") == llm
            and s["protocol"] in ("roles", "lowo", "lomo")
            and s.get("form", "linear") == "linear"
            and ("for_runs" not in s or e in s["for_runs"])
        ]
        if llm in shipped:
            cands.append(("requests_all", shipped[llm]))
        for name, s in cands:
            m = step_mape(StepParams(**s["params"]), st)
            out.append(
                {
                    "experiment_id": e,
                    "step_model": name,
                    "calibrated_on": ";".join(s["fitted_on"]),
                    "run_requests_used": e in s["fitted_on"],
                    **m,
                }
            )
    return pl.DataFrame(out) if out else pl.DataFrame()


METRICS = ("ttft_mean", "e2e_mean", "e2e_p99", "successes")


def _protocol_errors(rows: pl.DataFrame, runs: pl.DataFrame, ivs: pl.DataFrame, blis) -> pl.DataFrame:
    """One row per run × request-calibrated step model: errors (%), sample, interval of the E2E/TTFT means, BLIS 4a."""
    if rows.height == 0:
        return pl.DataFrame()
    r = rows.filter(pl.col("step_model").is_in(list(LINEAR_STEP_MODELS)))  # the piecewise form: its own section
    if r.height == 0:
        return pl.DataFrame()
    st = {x["experiment_id"]: x for x in runs.iter_rows(named=True)} if runs.height else {}
    bl = {x["experiment_id"]: x for x in blis.iter_rows(named=True)} if blis is not None and blis.height else {}
    iv = (
        {(x["experiment_id"], x["step_model"], x["metric"]): x for x in ivs.iter_rows(named=True)} if ivs.height else {}
    )
    out = []
    for (e, m), g in r.group_by(["experiment_id", "step_model"], maintain_order=True):
        d = {x["metric"]: x for x in g.iter_rows(named=True)}
        s = st.get(e, {})
        b = bl.get(e, {})
        row = {
            "experiment_id": e,
            "step_model": m,
            "protocol": PROTOCOL_OF[m],
            "role": d["e2e_mean"]["role"] or "",
            "sample": d["e2e_mean"]["sample"],
            "fitted_on": d["e2e_mean"]["fitted_on"],
            "llm_model": s.get("llm_model"),
            "scored": bool(s.get("scored")),
            "saturated": bool(s.get("saturated")),
            "blis_ttft_err": b.get("ttft_mean_err_pct"),
            "blis_e2e_err": b.get("e2e_mean_err_pct"),
            "blis_p99_err": b.get("e2e_p99_err_pct"),
        }
        for k in METRICS:
            row[f"{k}_err"] = d.get(k, {}).get("rel_err_pct")
            row[f"{k}_pred"] = d.get(k, {}).get("predicted")
            row[f"{k}_obs"] = d.get(k, {}).get("observed")
            i = iv.get((e, m, k))
            row[f"{k}_lo"], row[f"{k}_hi"], row[f"{k}_inside"] = (
                (i["lo"], i["hi"], i["inside"]) if i else (None, None, None)
            )
        out.append(row)
    return pl.DataFrame(out, infer_schema_length=None).sort("protocol", "experiment_id")


def _mabs(x) -> float | None:
    v = [abs(a) for a in x if a is not None and math.isfinite(a)]
    return float(np.mean(v)) if v else None


def _goals(err: pl.DataFrame, mape: pl.DataFrame) -> list[dict]:
    """The issue's goals, each with its measured figure and the runs it is measured on."""
    out = []
    if err.height:
        oos = err.filter(pl.col("scored") & (pl.col("sample") == "out_of_sample"))
        roles = oos.filter((pl.col("protocol") == "roles") & ~pl.col("saturated"))
        for key, col, what in (
            ("roles_e2e", "e2e_mean_err", "mean |E2E error|"),
            ("roles_ttft", "ttft_mean_err", "mean |TTFT error|"),
        ):
            v = _mabs(roles[col].to_list())
            out.append(
                {
                    "goal": f"run roles: {what} over the non-saturated validate/test runs < {GOALS[key]:.0f} %",
                    "measured": v,
                    "target": GOALS[key],
                    "runs": roles.height,
                    "met": None if v is None else v < GOALS[key],
                }
            )
        sat = oos.filter((pl.col("protocol") == "roles") & pl.col("saturated"))
        for r in sat.iter_rows(named=True):
            worst = max(
                (abs(r[f"{k}_err"]) for k in ("ttft_mean", "e2e_mean", "successes") if r[f"{k}_err"] is not None),
                default=None,
            )
            out.append(
                {
                    "goal": f"run roles: saturated {r['experiment_id']} within 25 % (TTFT, E2E, successes)",
                    "measured": worst,
                    "target": GOALS["saturated"],
                    "runs": 1,
                    "met": None if worst is None else worst < GOALS["saturated"],
                    "detail": {k: r[f"{k}_err"] for k in ("ttft_mean", "e2e_mean", "successes")},
                }
            )
        lowo = oos.filter((pl.col("protocol") == "lowo") & ~pl.col("saturated"))
        v = _mabs(lowo["e2e_mean_err"].to_list())
        out.append(
            {
                "goal": f"leave one workload out: mean |E2E error| over the non-saturated runs < {GOALS['lowo_e2e']:.0f} %",
                "measured": v,
                "target": GOALS["lowo_e2e"],
                "runs": lowo.height,
                "met": None if v is None else v < GOALS["lowo_e2e"],
            }
        )
    if mape.height:
        for r in mape.filter(pl.col("step_model") == "requests_lowo").iter_rows(named=True):
            out.append(
                {
                    "goal": f"per-step MAPE on the real cycle_us steps of {r['experiment_id']} < 10 % (requests_lowo: "
                    "fitted on the other workloads' request logs)",
                    "measured": r["mape_pct"],
                    "target": GOALS["step_mape"],
                    "runs": 1,
                    "met": r["mape_pct"] < GOALS["step_mape"],
                }
            )
    return out


def _coverage(ivs: pl.DataFrame, runs: pl.DataFrame, metrics=METRICS) -> pl.DataFrame:
    """Per protocol, metric and regime (the run observed saturated or not): coverage k/n of the bootstrap and of the
    widened intervals with a 95 % binomial interval, the intervals that carry no evidence counted apart, the widened
    coverage the method gives by construction (stepml_core.replay.coverage)."""
    sat = (
        {r["experiment_id"]: bool(r["saturated"]) for r in runs.iter_rows(named=True) if r.get("saturated") is not None}
        if runs.height and "saturated" in runs.columns
        else {}
    )
    return coverage_table(ivs, sat, metrics, level=CONFORMAL_LEVEL)


# ---------------------------------------------------------------------------- plot


def plot_step_time(out_dir: Path, specs, shipped, steps: dict[str, pl.DataFrame], llm_of) -> Path | None:
    """Per traced run: real cycle_us vs scheduled tokens (points) and the calibrated models' step time on the same
    steps (binned medians), with the BLIS features of each step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exps = sorted(steps)
    if not exps:
        return None
    fig, axes = plt.subplots(1, len(exps), figsize=(4.6 * len(exps), 3.4), squeeze=False)
    colors = {
        "requests_all": "tab:blue",
        "requests_roles": "tab:green",
        "requests_lowo": "tab:orange",
        "requests_lomo": "tab:red",
    }
    for ax, e in zip(axes.flat, exps):
        f = blis_features_from_steps(steps[e]).filter(pl.col("cycle_us").is_not_null())
        x = f["batch.scheduled_tokens"].to_numpy()
        ax.scatter(x, f["cycle_us"].to_numpy() / 1e3, s=4, color="0.6", alpha=0.5, label="real cycle_us")
        llm = llm_of.get(e)
        cands = {
            s["name"]: s
            for s in specs
            if s.get("llm_model") == llm and ("for_runs" not in s or e in s["for_runs"]) and s["name"] in colors
        }
        if llm in shipped:
            cands["requests_all"] = shipped[llm]
        bins = np.unique(np.quantile(x, np.linspace(0, 1, 13)))
        for name, s in sorted(cands.items()):
            p = StepParams(**s["params"]).step_us(
                f["decode_tokens"].to_numpy(),
                f["kv_sum"].to_numpy(),
                f["prefill_tokens"].to_numpy(),
                f["num_prefill_reqs"].to_numpy(),
            )
            k = np.clip(np.digitize(x, bins) - 1, 0, max(len(bins) - 2, 0))
            xs = [np.median(x[k == j]) for j in range(len(bins) - 1) if (k == j).any()]
            ys = [np.median(p[k == j]) / 1e3 for j in range(len(bins) - 1) if (k == j).any()]
            ax.plot(xs, ys, marker="o", ms=3, lw=1.3, color=colors[name], label=name)
        ax.set_title(e.split("-", 2)[-1][:40], fontsize=8)
        ax.set_xlabel("batch tokens (scheduled)", fontsize=7)
        ax.set_ylabel("step time (ms)", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.15, top=0.9, wspace=0.25)
    path = Path(out_dir) / "calibration_step_time.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- rendering


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
    return lines


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
                    f"* out of sample, {label} ({y.height} runs): mean |TTFT| {_f(_mabs(y['ttft_mean_err'].to_list()))} %, "
                    f"|E2E| {_f(_mabs(y['e2e_mean_err'].to_list()))} %, |p99 E2E| {_f(_mabs(y['e2e_p99_err'].to_list()))} %"
                    + (f", |successes| {_f(_mabs(y['successes_err'].to_list()))} %" if sat else "")
                    + f"; BLIS 4a on the same runs: |TTFT| {_f(_mabs(y['blis_ttft_err'].to_list()))} %, "
                    f"|E2E| {_f(_mabs(y['blis_e2e_err'].to_list()))} %"
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
