"""The rankings section (models ranked per target with ties, the recommendation with its figure), the ablation and the generalization across runs (leave one model / workload out)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from stepml_core.report.format import _fmt, _md_table, _pct
from stepml_core.report.plots import (
    plot_residuals,
)
from stepml_core.study.verdict import ABSURD_MAPE_PCT, CLEAR_MARGIN_REL


def _ranking_intro_lines(findings: dict) -> list[str]:
    """The section's heading and how models are ranked, tied and recommended."""
    return [
        "## Which step-time model a simulator should use",
        "",
        "Models ranked by mean test MAPE over runs. 'Difference vs best' is the gap to the best model of that scope with a 95 % "
        "interval from resampling every run's test rows (one circular block bootstrap shared by all models); models whose interval "
        f"contains 0 are **tied** with the best, unless a run of theirs is absurd (> {ABSURD_MAPE_PCT:,.0f} %: that widens the interval "
        "without making the model as good). The recommendation is the simplest tied model (order: "
        "naive_mean, blackbox_2f, nnls_physics, ridge_30f, ridge_log_30f, hgb_30f). Scope `per_model` = one fit per LLM over its "
        "workloads, what a simulator would ship"
        + (
            " (every model here has one run, so `per_model` and `per_experiment` are the same fits)."
            if findings.get("one_run_per_model")
            else "."
        ),
        "",
    ]


def _ranking_row(scope: str, x: dict) -> list:
    """One model's ranking row; the best model has difference 0 and interval [0, 0]."""
    is_best = x["diff_vs_best_pct"] == 0 and x["diff_lo_pct"] == 0 and x["diff_hi_pct"] == 0
    absurd = x["worst_run_mape_pct"] > ABSURD_MAPE_PCT
    return [
        scope,
        x["model"],
        _pct(x["mean_mape_pct"]),
        _pct(x["median_mape_pct"]),
        _pct(x["worst_run_mape_pct"]),
        "best" if is_best else _fmt(x["diff_vs_best_pct"]),
        "–" if is_best else f"[{_fmt(x['diff_lo_pct'])}, {_fmt(x['diff_hi_pct'])}]",
        "best" if is_best else "**tied**" if x["tied_with_best"] else ("worse (absurd run)" if absurd else "worse"),
        x["n_experiments"],
        x["test_rows"],
    ]


def _ranking_table_lines(target: str, by_scope: dict) -> list[str]:
    """One target's ranking table over the scopes per_model, per_experiment, global (in that order)."""
    rows = []
    for scope in ("per_model", "per_experiment", "global"):
        r = by_scope.get(scope)
        if r is None:
            continue
        rows += [_ranking_row(scope, x) for x in r.iter_rows(named=True)]
    return [
        f"### `{target}`",
        "",
        _md_table(
            [
                "scope",
                "model",
                "mean MAPE",
                "median",
                "worst run",
                "difference vs best (pt)",
                "95 % interval",
                "vs best",
                "runs",
                "test rows",
            ],
            rows,
        ),
        "",
    ]


def _recommendation_lines(target: str, rec: dict, predictions: pl.DataFrame, out_dir: Path) -> list[str]:
    """The recommended model for one target, and its residual plot (written to out_dir) when one can be drawn."""
    lines = [
        f"**Recommendation for `{target}`: `{rec['model']}` fitted {rec['scope'].replace('_', ' ')}** "
        f"({_pct(rec['mean_mape_pct'])}; the best and the models within noise of it: {', '.join(f'`{m}`' for m in rec['tied'])}). "
        + (
            "This is the target a simulator advances its clock by."
            if target == "cycle_us"
            else "This target is scheduler CPU time, not the step a simulator needs; use it only to model scheduler overhead."
        ),
        "",
    ]
    png = plot_residuals(predictions, target, rec["model"], rec["scope"], Path(out_dir) / f"residuals_{target}.png")
    if png:
        lines += [f"![{png.stem}]({png.name})", ""]
    return lines


def ranking_section(findings: dict, predictions: pl.DataFrame, out_dir: Path) -> list[str]:
    """The models ranked per target and scope, and the recommendation for each target."""
    ranks, recs = findings.get("rankings") or {}, findings.get("recommendations") or {}
    if not ranks:
        return []
    lines = _ranking_intro_lines(findings)
    for target in ("cycle_us", "schedule_us"):
        by_scope = ranks.get(target)
        if not by_scope:
            continue
        lines += _ranking_table_lines(target, by_scope)
        rec = recs.get(target)
        if rec:
            lines += _recommendation_lines(target, rec, predictions, out_dir)
    return lines


def ablation_section(findings: dict) -> list[str]:
    a = findings.get("ablation")
    if a is None or a.height == 0:
        return []
    rows = [
        [
            f"`{r['target']}`",
            r["group"],
            _fmt(r["all"]),
            _fmt(r["without"]),
            _fmt(r["change"]),
            f"[{_fmt(r['change_lo'])}, {_fmt(r['change_hi'])}]",
            r["effect"],
            _fmt(r["only"]),
            r["n"],
        ]
        for r in a.iter_rows(named=True)
    ]
    return [
        "## Feature-group ablation (ridge_30f, per run, mean test MAPE %)",
        "",
        "'without' drops the group from the 30 features; 'only' keeps just that group. The change (without − all) carries a 95 % "
        "interval from the per-run bootstrap errors of the test rows; a group 'carried the fit' only when the whole interval is "
        "above 0, 'dropping it helps' when it is below 0, 'no change' below 0.01 point.",
        "",
        _md_table(
            ["target", "group", "all 30", "without group", "change", "95 % interval", "effect", "only group", "runs"],
            rows,
        ),
        "",
    ]


def generalization_section(findings: dict) -> list[str]:
    g = findings.get("generalization")
    if g is None or g.height == 0:
        return []
    rows = [
        [
            f"`{r['target']}`",
            r["scope"],
            r["model"],
            _pct(r["median_mape_pct"]),
            _pct(r["mean_mape_pct"]),
            _pct(r["max_mape_pct"]),
            r["n"],
            ("**absurd**: " + r["why"]) if r["absurd"] else "",
        ]
        for r in g.iter_rows(named=True)
    ]
    out = [
        "## Generalization (held-out models and workloads)",
        "",
        "Each held-out run's test block scored by a model fitted on the other models' (workloads') runs; ranked on the median over "
        f"held-out runs (robust to one exploding run), mean and worst beside it. Values above {ABSURD_MAPE_PCT:,.0f} % are flagged and explained.",
        "",
    ]
    for target in ("cycle_us", "schedule_us"):
        t = (findings.get("transfer") or {}).get(target)
        if t:
            out.append(
                f"* `{target}` leave-one-model-out: "
                + (
                    f"no model beats the naive mean ({_pct(t['naive_median_pct'])}) by ≥ {100 * CLEAR_MARGIN_REL:g} %: nothing transfers to an unseen model."
                    if not t["transfers"]
                    else f"`{t['best_model']}` {_pct(t['best_median_pct'])} vs naive mean {_pct(t['naive_median_pct'])}."
                )
            )
    if findings.get("lomo_equals_lowo"):
        out.append("* Every held-out model here is also a held-out workload: the two scopes are the same folds.")
    return out + [
        "",
        _md_table(["target", "scope", "model", "median MAPE", "mean MAPE", "worst run", "held-out runs", "flag"], rows),
        "",
    ]
