"""Report section: what the piecewise decode form changes, run by run (issue 25, point 3; docs/calibration.md).

Per run, leave one workload out: the observed TTFT and E2E, the linear calibrated model's errors (``requests_lowo``),
the piecewise one's (``requests_pw_lowo``: a hinge in the decoders, BLIS's ``step_time_regimes``), the runs that
calibrated it, the break its calibration placed and what placed it (stepml_core.calibration.fit.choose_break, on the
calibration runs alone); then the means over the scored non-saturated runs against the issue's goals.
"""

from __future__ import annotations

import math

import polars as pl

from stepml_core.calibration.protocols import PIECEWISE_STEP_MODEL_OF, STEP_MODEL_OF

METRICS = ("ttft_mean", "e2e_mean", "e2e_p99")
GOALS_PCT = {"ttft_mean": 10.0, "e2e_mean": 2.5, "e2e_p99": 6.0}  # issue 25: mean |error| over non-saturated runs
GENERAL_TTFT_GOAL_PCT = 15.0  # issue 25: every `general` run


def piecewise_table(specs: list[dict], rows: pl.DataFrame, runs: pl.DataFrame, protocol: str = "lowo") -> pl.DataFrame:
    """One row per run replayed by both forms under ``protocol``: observed, errors of each form, the piecewise
    fold's calibration runs, break and slopes (stage 2's scale applied), what chose the break."""
    lin, pw = STEP_MODEL_OF[protocol], PIECEWISE_STEP_MODEL_OF.get(protocol)
    if rows.height == 0 or pw is None:
        return pl.DataFrame()
    st = {r["experiment_id"]: r for r in runs.iter_rows(named=True)} if runs.height else {}
    err = {
        (r["experiment_id"], r["step_model"], r["metric"]): r
        for r in rows.filter(pl.col("step_model").is_in([lin, pw]) & pl.col("metric").is_in(list(METRICS))).iter_rows(
            named=True
        )
    }
    out = []
    for s in specs:
        if s["name"] != pw:
            continue
        br = (s.get("calibration") or {}).get("break_choice") or {}
        p = s["params"]
        for e in s.get("for_runs") or []:
            if (e, pw, "e2e_mean") not in err:
                continue
            row = {
                "experiment_id": e,
                "llm_model": s["llm_model"],
                "scored": bool(st.get(e, {}).get("scored")),
                "saturated": bool(st.get(e, {}).get("saturated")),
                "fitted_on": ";".join(s["fitted_on"]),
                "break_decoders": p.get("hinge_decoders") if p.get("b_hinge_us") else None,
                "slope_below_us": p["b_dec_us"],
                "slope_above_us": p["b_dec_us"] + p.get("b_hinge_us", 0.0),
                "chosen_by": br.get("chosen_by", ""),
                "ttft_obs_ms": _ms(err[(e, pw, "ttft_mean")]["observed"]) if (e, pw, "ttft_mean") in err else None,
                "e2e_obs_s": err[(e, pw, "e2e_mean")]["observed"],
            }
            for m in METRICS:
                row[f"{m}_linear"] = (err.get((e, lin, m)) or {}).get("rel_err_pct")
                row[f"{m}_piecewise"] = (err.get((e, pw, m)) or {}).get("rel_err_pct")
            out.append(row)
    return pl.DataFrame(out, infer_schema_length=None).sort("experiment_id") if out else pl.DataFrame()


def _ms(x):
    return None if x is None else x * 1e3


def mean_abs(t: pl.DataFrame, column: str) -> tuple[float, int]:
    """Mean |column| over the scored non-saturated rows, and how many."""
    if t.height == 0:
        return float("nan"), 0
    v = [abs(x) for x in t.filter(pl.col("scored") & ~pl.col("saturated"))[column].to_list() if x is not None]
    return (sum(v) / len(v), len(v)) if v else (float("nan"), 0)


def _f(x, nd=1, sign=False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def piecewise_section(t: pl.DataFrame) -> list[str]:
    """Markdown lines of the section (empty without a piecewise replay)."""
    if t is None or t.height == 0:
        return []
    head = [
        "run",
        "",
        "obs TTFT ms / E2E s",
        "linear TTFT / E2E / p99 %",
        "piecewise TTFT / E2E / p99 %",
        "break (decoders)",
        "β_dec µs per decoder below / above",
        "calibrated on",
    ]
    body = []
    for r in t.iter_rows(named=True):
        body.append(
            [
                r["experiment_id"],
                "sat" if r["saturated"] else ("–" if not r["scored"] else ""),
                f"{_f(r['ttft_obs_ms'], 1)} / {_f(r['e2e_obs_s'], 2)}",
                " / ".join(_f(r[f"{m}_linear"], 1, True) for m in METRICS),
                " / ".join(_f(r[f"{m}_piecewise"], 1, True) for m in METRICS),
                _f(r["break_decoders"], 0) if r["break_decoders"] is not None else "none (linear)",
                f"{_f(r['slope_below_us'], 1)} / {_f(r['slope_above_us'], 1)}",
                ", ".join(x.split("-", 2)[-1] for x in r["fitted_on"].split(";")),
            ]
        )
    lines = [
        "### The piecewise decode form (leave one workload out)",
        "",
        "The same calibration with a hinge in the decoders: per-decoder slope β_dec below a break k, β_dec + β_h from "
        "k, continuous at k, written as BLIS `step_time_regimes` (`num_decode_reqs < k`, else). k is placed on each "
        "fold's calibration runs alone: among 40, 50, …, 100 decoders (fixed in advance), those with ≥ 10 % of the "
        "non-saturated calibration runs' decoding time on each side; the least stage-1 cost wins; none: the form stays "
        "linear. Stage 2 (simulator in the loop) as for the linear form. No interval (no bootstrap).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(str(c) for c in row) + " |" for row in body),
        "",
    ]
    for m, goal in GOALS_PCT.items():
        a, n = mean_abs(t, f"{m}_linear")
        b, k = mean_abs(t, f"{m}_piecewise")
        lines.append(
            f"* mean |{m}| over the {n} scored non-saturated runs: linear {_f(a, 1)} %, piecewise {_f(b, 1)} % "
            f"({k} runs; goal < {goal:g} %: {'met' if b < goal else 'missed'})"
        )
    gen = t.filter(pl.col("experiment_id").str.contains("-general") & pl.col("scored"))
    for r in gen.iter_rows(named=True):
        v = r["ttft_mean_piecewise"]
        ok = v is not None and abs(v) < GENERAL_TTFT_GOAL_PCT
        lines.append(
            f"* `general` {r['experiment_id']}: TTFT linear {_f(r['ttft_mean_linear'], 1, True)} %, piecewise "
            f"{_f(v, 1, True)} % (goal |TTFT| < {GENERAL_TTFT_GOAL_PCT:g} %: {'met' if ok else 'missed'})"
        )
    return lines + [""]
