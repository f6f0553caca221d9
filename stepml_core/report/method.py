"""The method section: the checks of the study's own method per run (the floor, the stage mix, the split's effect, the cycle rule, the batch alignment, the ridge α) as report lines."""

from __future__ import annotations

import polars as pl

from stepml_core.report.format import _fmt, _md_table, _pct
from stepml_core.report.plots import (
    short_run_name,
)
from stepml_core.study.verdict import H1_MODEL


def method_section(
    *, runs: list[dict], checks: dict[str, pl.DataFrame], findings: dict, predictions: pl.DataFrame
) -> list[str]:
    """Like for like, the floor, the split's stage mix and its effect, the cycle rule, the alignment, the alpha grid."""
    lines = [
        "## Method checks",
        "",
        f"**Like for like.** `naive_mean`, `blackbox_2f` and `{H1_MODEL}` (and every StepML model) are fitted on train + valid of each run "
        "(the Ridge models choose alpha on valid first) and scored on test. The `*_orig` models keep the original study's recipe "
        "(fitted on train only, predictions not floored) to reproduce its published numbers; they take no part in the verdict.",
        "",
    ]
    lines += _floor_lines(predictions)
    lines += _stage_mix_lines(checks.get("stage_mix"))
    lines += _split_effect_lines((findings.get("split_effect") or {}).get("mape"))
    lines += _cycle_rule_lines(checks.get("cycle_rule"))
    lines += _alignment_lines(findings.get("alignment"), checks.get("alignment"))
    lines += _alpha_lines(findings.get("alpha"))
    return lines


def _floor_lines(predictions: pl.DataFrame) -> list[str]:
    pe = predictions.filter((pl.col("split") == "test") & (pl.col("scope") == "per_experiment"))
    if "at_floor" not in pe.columns or not pe.height:
        return []
    fl = (
        pe.group_by("target", "model")
        .agg(at_floor=pl.col("at_floor").sum(), neg=(pl.col("y_pred") <= 0).sum(), n=pl.len())
        .filter((pl.col("at_floor") > 0) | (pl.col("neg") > 0))
        .sort("target", "model")
    )
    txt = (
        "; ".join(
            f"`{r['model']}` {r['target']}: {r['at_floor']} of {r['n']} raised to the floor"
            + (f", {r['neg']} ≤ 0 µs (unclamped recipe)" if r["neg"] else "")
            for r in fl.iter_rows(named=True)
        )
        or "no test prediction needed it"
    )
    return [
        "**Positive floor.** Every StepML model predicts max(ŷ, floor), floor = the smallest positive step time it was fitted "
        f"on (the same rule in the exported predictor). Test predictions (per-experiment fits): {txt}.",
        "",
    ]


def _stage_mix_lines(mix: pl.DataFrame | None) -> list[str]:
    if mix is None or not mix.height:
        return []
    rows = []
    for e in sorted(set(mix["experiment_id"].to_list())):
        m = mix.filter(pl.col("experiment_id") == e)
        cells = [f"`{short_run_name(e)}`"]
        for scheme in ("temporal", "stage_matched"):
            for block in ("train", "valid", "test"):
                b = m.filter((pl.col("scheme") == scheme) & (pl.col("block") == block)).sort("load_stage")
                cells.append(" / ".join(f"{100 * s:.0f}" for s in b["share"].to_list()) or "–")
        rows.append(cells)
    return [
        "### Load stages in each block",
        "",
        "Share (%) of each load stage (stage 0 / 1 / …, in client order; later stages have higher request rates in these runs) "
        "in each block. The temporal split trains mostly on the first stage and tests on the last; the stage-matched split "
        "applies 60/20/20 within each stage (test is still each stage's future).",
        "",
        _md_table(["run", "temporal train", "valid", "test", "stage-matched train", "valid", "test"], rows),
        "",
    ]


def _split_effect_lines(sm: pl.DataFrame | None) -> list[str]:
    if sm is None or not sm.height:
        return []
    rows = []
    for (target, model), g in sm.group_by(["target", "model"], maintain_order=True):
        d = {r["scheme"]: r["mean_mape_pct"] for r in g.iter_rows(named=True)}
        rows.append(
            [
                f"`{target}`",
                model,
                _pct(d.get("temporal")),
                _pct(d.get("stage_matched")),
                _pct(d.get("random")),
                g["n_experiments"][0],
            ]
        )
    return [
        "### The H1 models under three splits (mean test MAPE over runs)",
        "",
        "Each model refitted per run under each split. Random is optimistic (neighbouring steps in train and test).",
        "",
        _md_table(["target", "model", "temporal (H1)", "stage-matched", "random", "runs"], rows),
        "",
    ]


def _cycle_rule_lines(cr: pl.DataFrame | None) -> list[str]:
    if cr is None or not cr.height:
        return []
    rows = []
    for e in sorted(set(cr["experiment_id"].to_list())):
        g = cr.filter(pl.col("experiment_id") == e)
        r = g.filter(pl.col("model") == H1_MODEL)
        r = (r if r.height else g).row(0, named=True)
        rows.append(
            [
                f"`{short_run_name(e)}`",
                r["pairs"],
                r["removed_idle"],
                r["removed_stall"],
                r["n_test_rule"],
                _pct(r["mape_rule_pct"]),
                r["n_test_all"],
                _pct(r["mape_all_gaps_pct"]),
            ]
        )
    from stepml_core.tables.steps import STALL_FACTOR, STALL_WINDOW

    return [
        "### Cycle rule (`cycle_us`)",
        "",
        "A gap between consecutive sampled steps is an engine cycle unless (idle) nothing was left to run after step N "
        "(running − finished ≤ 0, nothing waiting) and the gap exceeds its local median, or (stall) it exceeds "
        f"{STALL_FACTOR:g}× the median of the {STALL_WINDOW} nearest gaps: a pause the batch does not show. "
        f"Removed gaps are counted; {H1_MODEL} is scored with the rule and on every gap.",
        "",
        _md_table(
            [
                "run",
                "consecutive pairs",
                "removed: idle",
                "removed: stall",
                "test rows (rule)",
                f"{H1_MODEL} MAPE (rule)",
                "test rows (all gaps)",
                f"{H1_MODEL} MAPE (all gaps)",
            ],
            rows,
        ),
        "",
    ]


def _alignment_lines(al: pl.DataFrame | None, raw: pl.DataFrame | None) -> list[str]:
    if al is None or not al.height:
        if raw is not None and raw.height and "note" in raw.columns:
            return [
                "### Batch N or batch N−1 for `cycle_us`",
                "",
                "Not tested: " + "; ".join(sorted(set(n for n in raw["note"].to_list() if n))) + ".",
                "",
            ]
        return []
    rows = [
        [
            r["model"],
            r["alignment"],
            _pct(r["mean_mape_pct"]),
            _fmt(r["diff_vs_N_pct"]) if r["alignment"] != "N" else "–",
            f"[{_fmt(r['diff_lo_pct'])}, {_fmt(r['diff_hi_pct'])}]" if r["alignment"] != "N" else "–",
            ("within noise" if r["within_noise"] else "better" if r["diff_vs_N_pct"] < 0 else "worse")
            if r["alignment"] != "N"
            else "–",
            r["n_experiments"],
            r["n_rows"],
            r["n_test"],
        ]
        for r in al.iter_rows(named=True)
    ]
    return [
        "### Batch N or batch N−1 for `cycle_us`",
        "",
        "Under async scheduling cycle(N) = ts_start[N+1] − ts_start[N] can end when batch N−1's GPU work does. Fitted per run "
        "on the rows where steps N−1, N and N+1 were all sampled (about 1 % of steps at 10 % sampling), temporal split.",
        "",
        _md_table(
            [
                "model",
                "features of batch",
                "mean test MAPE",
                "difference vs N (pt)",
                "95 % interval",
                "",
                "runs",
                "rows",
                "test rows",
            ],
            rows,
        ),
        "",
    ]


def _alpha_lines(a: pl.DataFrame | None) -> list[str]:
    if a is None or not a.height:
        return []
    from stepml_core.stepmodels.estimators import ALPHA_GRID

    rows = [
        [
            r["scope"],
            f"`{r['target']}`",
            r["model"],
            r["fits"],
            r["at_low_edge"],
            r["at_high_edge"],
            f"{r['alpha_min']:.0e} – {r['alpha_max']:.0e}",
        ]
        for r in a.iter_rows(named=True)
    ]
    edge = int(a["at_low_edge"].sum() + a["at_high_edge"].sum())
    return [
        "### Ridge alpha",
        "",
        f"Alpha is chosen on the validation block from {len(ALPHA_GRID)} values, {ALPHA_GRID[0]:.0e} … {ALPHA_GRID[-1]:.0e} "
        f"(half-decade steps; the grid was 1e-04 … 1e+04 before). Fits at an end of the grid: {edge} of {int(a['fits'].sum())}. "
        f"On standardized features the Gram matrix's diagonal is the number of fit rows (≥ 100 here), so alpha = {ALPHA_GRID[0]:.0e} "
        f"is ordinary least squares for practical purposes and alpha = {ALPHA_GRID[-1]:.0e} shrinks to the mean: a choice at "
        "either end is the limit itself, not a search cut short.",
        "",
        _md_table(
            ["scope", "target", "model", "fits", f"at {ALPHA_GRID[0]:.0e}", f"at {ALPHA_GRID[-1]:.0e}", "range chosen"],
            rows,
        ),
        "",
    ]
