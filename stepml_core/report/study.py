"""Study report: report.md + PNG plots from metrics, predictions, the verdict and the findings.

Layout (one function per section, each returning markdown lines):
  summary_section      one screen: data, the H1 verdict per target with its deciding numbers,
                       what a simulator builder should use, what does not work, what to read with care
  data_section         the runs and the targets
  verdict_section      the rule, per-baseline outcomes and per-run intervals
  method_section       like for like, positive floor, stage mix and split schemes, cycle rule,
                       batch N / N−1 alignment, alpha grid
  published_section    the original study's published numbers beside ours
  ranking_section      models ranked per target with ties within noise, the recommendation
  ablation_section     feature groups, effects only where they exceed the noise
  generalization_section  held-out models / workloads, ranked on the median, absurd values flagged
  … extra sections (provenance, reconstruction, E2E, calibration, replay) passed in by the caller …
  appendix_section     full per-experiment × model × scope tables and the plots (also in metrics.csv)

Every figure is computed from the tables passed in; published numbers (data/reference/original_study.csv)
are labelled as such.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import polars as pl

from stepml_core.paths import REFERENCE_DIR
from stepml_core.report.plots import (  # noqa: F401
    model_order,
    plot_e2e,
    plot_mape_by_experiment,
    plot_pred_vs_actual,
    plot_residuals,
    short_run_name,
)
from stepml_core.stepmodels.recipes import log_target_models
from stepml_core.study.stats import WILCOXON_MIN_N, wilcoxon_min_p
from stepml_core.study.verdict import ABSURD_MAPE_PCT, CLEAR_MARGIN_REL, H1_MODEL, REFUTE_ABOVE_PCT, SUPPORT_BELOW_PCT

OUTCOME_WORDS = {
    "clearly_beats": "clearly better",
    "does_not_clearly_beat": "not clearly better",
    "undecided": "undecided",
    "better": "better",
    "not_better": "not clearly better",
}


def published_results() -> dict[str, dict]:
    with open(REFERENCE_DIR / "original_study.csv", newline="") as f:
        return {r["experiment_id"]: r for r in csv.DictReader(f)}


def _fmt(x, nd=2) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return f"{x:,.{nd}f}"


def _pct(x, nd=2) -> str:
    s = _fmt(x, nd)
    return s if s == "–" else f"{s} %"


def _md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _source_words(runs: list[dict]) -> str:
    sources = sorted({r["source"] for r in runs})
    return " and ".join(sources) if sources else "no"


# ------------------------------------------------------------------------ summary ---


def summary_section(*, runs: list[dict], metrics: pl.DataFrame, verdict: dict, findings: dict) -> list[str]:
    """One screen: data, verdict per target with the deciding numbers, what to use, what does not work."""
    kinds = _source_words(runs)
    lines = ["## Summary", ""]
    test = metrics.filter(
        (pl.col("split") == "test") & (pl.col("scope") == "per_experiment") & (pl.col("model") == H1_MODEL)
    )
    n_rows = {t: int(test.filter(pl.col("target") == t)["n"].sum()) for t in ("schedule_us", "cycle_us")}
    models = sorted({r["model"] for r in runs})
    lines += [
        f"**Data: {len(runs)} {kinds} run(s)** ({len(models)} model(s): {', '.join(models) or '–'}); test = the last 20 % "
        f"of each run: {n_rows['schedule_us']:,} scheduler steps (`schedule_us`), {n_rows['cycle_us']:,} engine cycles (`cycle_us`)."
        + (
            " **Synthetic runs** come from StepML's synthesizer: their numbers test the pipeline and the models, not real vLLM."
            if "synthetic" in kinds
            else ""
        ),
        "",
    ]
    rows = []
    for target, v in verdict.get("targets", {}).items():
        if v.get("verdict") == "no data":
            rows.append([f"`{target}`", "no data", "–", "–", "–", "–", "–"])
            continue
        b, n = v["baselines"].get("blackbox_2f", {}), v["baselines"].get("naive_mean", {})
        med = (
            (lambda x: f" (median {_pct(x)})") if v["n_experiments"] > 2 else (lambda x: "")
        )  # with 1–2 runs the median is the mean
        rows.append(
            [
                f"`{target}`",
                f"**{v['verdict']}**",
                f"{_pct(v['mean_test_mape_pct'])}{med(v['median_test_mape_pct'])}; {v['n_below_threshold']}/{v['n_experiments']} runs < {SUPPORT_BELOW_PCT:g} %",
                f"{_pct(b.get('mean_test_mape_pct'))}{med(b.get('median_test_mape_pct'))}",
                f"{_pct(n.get('mean_test_mape_pct'))}{med(n.get('median_test_mape_pct'))}",
                _comparison_cell(b) + " / " + _comparison_cell(n),
                _fmt(v.get("skill_vs_naive_mean"), 2),
            ]
        )
    lines += [
        _md_table(
            [
                "target",
                "H1",
                f"{H1_MODEL} test MAPE, mean over runs",
                "blackbox_2f",
                "naive_mean",
                f"{H1_MODEL} vs blackbox_2f / naive_mean",
                "skill vs naive mean (1 − ratio)",
            ],
            rows,
        ),
        "",
    ]
    for target, v in verdict.get("targets", {}).items():
        if v.get("reasons"):
            lines.append(f"* `{target}` **{v.get('verdict')}**: {H1_MODEL} " + "; ".join(v["reasons"]) + ".")
    decided = next((v.get("decided_by") for v in verdict.get("targets", {}).values() if v.get("decided_by")), "")
    lines += [
        "",
        f"Comparisons decided {decided}. Rule: < {SUPPORT_BELOW_PCT:g} % **and** clearly better than both baselines (by ≥ {100 * CLEAR_MARGIN_REL:g} % of their "
        f"MAPE, beyond the 95 % interval) → supported; > {REFUTE_ABOVE_PCT:g} % or a baseline not clearly beaten → refuted; "
        "all three models fitted on the same rows (like for like). Details: *H1 verdict in detail*.",
        "",
    ]
    lines += _use_lines(findings)
    lines += _does_not_work_lines(verdict, findings)
    lines += _care_lines(runs, verdict)
    return lines


def _comparison_cell(b: dict) -> str:
    """'clearly better (2/2 runs)': the across-run outcome and in how many runs the H1 model was clearly better."""
    runs = b.get("per_experiment_bootstrap") or {}
    better = sum(r.get("outcome") == "better" for r in runs.values())
    return (
        f"{OUTCOME_WORDS.get(b.get('outcome'), '–')} (better in {better}/{len(runs)} runs)"
        if runs
        else OUTCOME_WORDS.get(b.get("outcome"), "–")
    )


def _use_lines(findings: dict) -> list[str]:
    recs = findings.get("recommendations", {})
    if not recs:
        return []
    out = ["**What a simulator builder should use**", ""]
    for target in ("cycle_us", "schedule_us"):
        r = recs.get(target)
        if not r:
            continue
        others = [m for m in r["tied"] if m != r["model"]]
        if others:
            tie = (
                f"; the simplest of the models within noise of the best ({', '.join(f'`{m}`' for m in others)}; best "
                f"`{r['best']}` {_pct(r['best_mean_mape_pct'])})"
            )
        else:
            tie = "; every other model is worse beyond noise"
        what = (
            "the engine cycle a simulator advances its clock by"
            if target == "cycle_us"
            else "scheduler CPU time only, not the step a simulator needs"
        )
        line = f"* `{target}` ({what}): `{r['model']}` fitted {r['scope'].replace('_', ' ')}, mean test MAPE {_pct(r['mean_mape_pct'])}{tie}."
        if target == "cycle_us":
            line += " " + _alignment_sentence(findings.get("alignment"))
        out.append(line)
    return out + [""]


def _alignment_sentence(al: pl.DataFrame | None) -> str:
    if al is None or al.height == 0:
        return "It uses the features of batch N (batch N−1 could not be tested: too few rows with steps N−1, N, N+1 sampled)."
    alt = al.filter(pl.col("alignment") != "N")
    better = alt.filter(~pl.col("within_noise") & (pl.col("diff_vs_N_pct") < 0))
    rows = int(alt["n_rows"].max() or 0)
    iv = lambda r: f"{_fmt(r['diff_vs_N_pct'])} pt [{_fmt(r['diff_lo_pct'])}, {_fmt(r['diff_hi_pct'])}]"
    if better.height == 0:
        return (
            f"It uses the features of batch N: batch N−1 (or both) was not better beyond noise for any model tested "
            f"({rows} rows with steps N−1, N, N+1 sampled; *Method checks*)."
        )
    found = "; ".join(
        f"{r['model']} on {r['alignment'].replace('N-1', 'N−1')}: {iv(r)}, {r['n_test']} test rows"
        for r in better.iter_rows(named=True)
    )
    return (
        f"It uses the features of batch N, available on every cycle row; batch N−1 needs steps N−1, N, N+1 all sampled "
        f"({rows} rows here), and on those rows it helped beyond noise only for {found} (*Method checks*)."
    )


def _does_not_work_lines(verdict: dict, findings: dict) -> list[str]:
    out = []
    for target in ("cycle_us", "schedule_us"):
        t = (findings.get("transfer") or {}).get(target)
        if not t:
            continue
        own = _per_model_median(findings, target, t["best_model"])
        if not t["transfers"]:
            out.append(
                f"* **Nothing transfers to an unseen model** (`{target}`, leave-one-model-out, {t['n_held_out']} held-out run(s)): "
                f"median test MAPE {_fmt(t['range_pct'][0])}–{_fmt(t['range_pct'][1])} % across models; the naive mean of the "
                f"other models' steps scores {_pct(t['naive_median_pct'])} and no model beats it by ≥ {100 * CLEAR_MARGIN_REL:g} %."
            )
        else:
            out.append(
                f"* `{target}` leave-one-model-out: `{t['best_model']}` transfers best (median {_pct(t['best_median_pct'])} vs the naive "
                f"mean's {_pct(t['naive_median_pct'])}"
                + (f"; fitted on the model's own runs it scores a median {_pct(own)}" if own is not None else "")
                + ")."
            )
    gen = findings.get("generalization")
    if gen is not None and gen.height and gen["absurd"].any():
        bad = gen.filter(pl.col("absurd")).sort("max_mape_pct", descending=True)
        worst = bad.row(0, named=True)
        models = sorted(set(bad["model"].to_list()))
        logs = [m for m in models if m in log_target_models()]
        out.append(
            f"* **Absurd generalization values** (a held-out run above {ABSURD_MAPE_PCT:,.0f} % per-step MAPE) in {bad.height} "
            f"(target, scope, model) cells, models {', '.join(f'`{m}`' for m in models)}; worst `{worst['model']}` "
            f"({worst['target']}, {worst['scope'].replace('_', ' ')}) {_pct(worst['max_mape_pct'], 0)} with median {_pct(worst['median_mape_pct'])}"
            + (
                f". {', '.join(f'`{m}`' for m in logs)} predict on a log scale and extrapolate exponentially"
                if logs
                else ""
            )
            + ("; the others keep the training runs' level on runs of another scale" if set(models) - set(logs) else "")
            + ". *Generalization* ranks on the median and explains each."
        )
    for target, v in verdict.get("targets", {}).items():
        if v.get("threshold") == "above":
            rec = (findings.get("recommendations") or {}).get(target)
            out.append(
                f"* `{target}`: {H1_MODEL} is above the threshold ({_pct(v['mean_test_mape_pct'])})"
                + (f"; the best model reaches {_pct(rec['best_mean_mape_pct'])} (`{rec['best']}`)" if rec else "")
                + (": the scheduler's CPU time is poorly explained by the batch." if target == "schedule_us" else ".")
            )
    se = findings.get("split_effect") or {}
    share = se.get("last_stage_share") or {}
    mape = se.get("mape")
    if share and mape is not None and mape.height:
        tr, te = share.get(("temporal", "train")), share.get(("temporal", "test"))
        k, n_runs = se.get("multi_stage_runs", 0), se.get("runs", 0)
        parts = []
        for target in ("cycle_us", "schedule_us"):
            g = {
                r["scheme"]: r["mean_mape_pct"]
                for r in mape.filter((pl.col("target") == target) & (pl.col("model") == H1_MODEL)).iter_rows(named=True)
            }
            if g:
                parts.append(
                    f"`{target}` {_pct(g.get('temporal'))} temporal vs {_pct(g.get('stage_matched'))} stage-matched"
                )
        if tr is not None and te is not None:
            out.append(
                f"* **Train and test come from different load** ({k} of {n_runs} runs have more than one load stage): there the last "
                f"(highest-rate) stage is {100 * tr:.0f} % of the train blocks and {100 * te:.0f} % of the test blocks on average; "
                f"{H1_MODEL} over all runs: " + ", ".join(parts) + " (*Method checks*)."
            )
    return (["**What does not work, or needs care**", "", *out, ""]) if out else []


def _per_model_median(findings: dict, target: str, model: str) -> float | None:
    r = ((findings.get("rankings") or {}).get(target) or {}).get("per_model")
    if r is None or r.filter(pl.col("model") == model).height == 0:
        return None
    return float(r.filter(pl.col("model") == model)["median_mape_pct"][0])


def _care_lines(runs: list[dict], verdict: dict) -> list[str]:
    out = []
    n = max((v.get("n_experiments") or 0 for v in verdict.get("targets", {}).values()), default=0)
    if 0 < n < WILCOXON_MIN_N:
        out.append(
            f"* {n} run(s): a one-sided signed-rank test across runs cannot reach p < 0.05 below {WILCOXON_MIN_N} runs "
            f"(smallest p = 0.5^{n} = {wilcoxon_min_p(n):.3g}), so no p-value is given as evidence; H1 is checked run by run."
        )
    totals: dict[str, int] = {}
    for r in runs:
        for k, c in (r.get("kv_source_counts") or {}).items():
            totals[k] = totals.get(k, 0) + int(c)
    tot = sum(totals.values())
    if tot and totals.get("proxy_blocks", 0) / tot > 0.5:
        out.append(
            f"* KV features come from BATCH_SUMMARY proxies for {100 * totals['proxy_blocks'] / tot:.0f} % of rows "
            "(no per-request events in these traces)."
        )
    return (["**Read with care**", "", *out, ""]) if out else []


# ------------------------------------------------------------------------ sections ---


def data_section(runs: list[dict]) -> list[str]:
    rows = []
    for r in sorted(runs, key=lambda r: r["experiment_id"]):
        rows.append(
            [
                f"`{r['experiment_id']}`",
                r["source"],
                r.get("stands_for") or "–",
                r["model"],
                r["tp"],
                r["workload"],
                r.get("steps_kept", "–"),
                r.get("steps_quarantined", "–"),
                r.get("kv_source", "–"),
            ]
        )
    return [
        "## Data",
        "",
        f"{len(runs)} {_source_words(runs)} run(s). "
        + (
            "Synthetic runs come from StepML's synthesizer (modelled on the real runs named below); their numbers say nothing "
            "about real vLLM, only that the pipeline and models behave as designed."
            if any(r["source"] == "synthetic" for r in runs)
            else "Every number in this report comes from these runs' traces as processed by this pipeline."
        ),
        "",
        _md_table(
            [
                "experiment (partition)",
                "source",
                "stands for (real run)",
                "model",
                "TP",
                "workload",
                "steps kept",
                "quarantined",
                "KV features from",
            ],
            rows,
        ),
        "",
        "Targets: `schedule_us` = `step.duration_us`, the CPU time of the scheduler's `schedule()` call (the original study's target); "
        "`cycle_us` = gap between `step.ts_start_ns` of step id and id+1 where both were sampled (the engine cycle a simulator needs; "
        "about 10 % of sampled steps have it), without the gaps the cycle rule removes (*Method checks*).",
        "",
    ]


def _verdict_baseline_cell(b: dict) -> str:
    """One baseline's cell: its mean test MAPE, the outcome, and the one-sided Wilcoxon p when enough runs allow one."""
    p = b.get("wilcoxon_p_one_sided")
    return f"{_pct(b.get('mean_test_mape_pct'))}: {OUTCOME_WORDS.get(b.get('outcome'), '–')}" + (
        f" (Wilcoxon p = {p:.3g})" if p is not None and b.get("n_experiments", 0) >= WILCOXON_MIN_N else ""
    )


def _verdict_summary_lines(verdict: dict) -> list[str]:
    """The table of one row per target: verdict, H1 model MAPE, the two baselines, skill vs naive mean."""
    rows = []
    for target, v in verdict.get("targets", {}).items():
        if v.get("verdict") == "no data":
            continue
        cells = [
            f"`{target}`",
            f"**{v['verdict']}**",
            v["threshold"],
            _pct(v["mean_test_mape_pct"]),
            _pct(v["median_test_mape_pct"]),
            f"{v['n_below_threshold']}/{v['n_experiments']}",
            v["n_test_rows"],
        ]
        for base in ("blackbox_2f", "naive_mean"):
            cells.append(_verdict_baseline_cell(v["baselines"].get(base, {})))
        cells.append(_fmt(v.get("skill_vs_naive_mean")))
        rows.append(cells)
    return [
        _md_table(
            [
                "target",
                "verdict",
                "threshold",
                f"{H1_MODEL} mean MAPE",
                "median",
                "runs < 25 %",
                "test rows",
                "blackbox_2f",
                "naive_mean",
                "skill vs naive mean",
            ],
            rows,
        ),
        "",
    ]


def _verdict_caveat_lines(verdict: dict) -> list[str]:
    """Why no p-value is shown with fewer than WILCOXON_MIN_N runs (smallest one-sided p = 0.5^n), and the targets
    where the naive mean is itself below the threshold."""
    lines = []
    n = max((v.get("n_experiments") or 0 for v in verdict.get("targets", {}).values()), default=0)
    if 0 < n < WILCOXON_MIN_N:
        lines += [
            f"With {n} run(s) a one-sided Wilcoxon signed-rank test across runs cannot reach p < 0.05 (its smallest p is "
            f"0.5^{n} = {wilcoxon_min_p(n):.3g}; {WILCOXON_MIN_N} runs are needed), so no p-value is shown: each run is judged by "
            "its own 95 % circular block-bootstrap interval below.",
            "",
        ]
    for target, v in verdict.get("targets", {}).items():
        if not v.get("threshold_separates", True):
            lines += [
                f"On `{target}` the naive mean is itself below {SUPPORT_BELOW_PCT:g} %: the threshold does not separate models; "
                f"read the comparisons and the skill (1 − MAPE({H1_MODEL}) / MAPE(naive_mean)).",
                "",
            ]
    return lines


def _verdict_per_run_lines(target: str, v: dict) -> list[str]:
    """One target's table of H1 model minus baseline per run (test APE, percentage points) with its bootstrap interval."""
    rows = []
    for base, b in v.get("baselines", {}).items():
        for e, pe in b.get("per_experiment_bootstrap", {}).items():
            rows.append(
                [
                    f"`{short_run_name(e)}`",
                    base,
                    _pct(pe["model_mape_pct"]),
                    _pct(pe["baseline_mape_pct"]),
                    _fmt(pe["mape_diff_pct"]),
                    f"[{_fmt(pe['ci95'][0])}, {_fmt(pe['ci95'][1])}]",
                    _fmt(-pe["margin_pct"]),
                    OUTCOME_WORDS.get(pe["outcome"], pe["outcome"]),
                    pe["n_test"],
                ]
            )
    if not rows:
        return []
    return [
        f"### `{target}`: {H1_MODEL} minus baseline per run (test APE, percentage points)",
        "",
        f"'clearly better' needs the whole 95 % interval below 0 and the difference at or below −margin "
        f"({100 * CLEAR_MARGIN_REL:g} % of the baseline's MAPE); 'not clearly better' means the interval lies above −margin.",
        "",
        _md_table(
            [
                "run",
                "baseline",
                H1_MODEL,
                "baseline MAPE",
                "difference",
                "95 % interval",
                "−margin",
                "outcome",
                "test rows",
            ],
            rows,
        ),
        "",
    ]


def verdict_section(verdict: dict) -> list[str]:
    """The H1 verdict per target, the caveats on its statistics, and each target's per-run comparisons."""
    lines = ["## H1 verdict in detail", "", f"Rule: {verdict.get('rule')}.", ""]
    lines += _verdict_summary_lines(verdict)
    lines += _verdict_caveat_lines(verdict)
    for target, v in verdict.get("targets", {}).items():
        lines += _verdict_per_run_lines(target, v)
    return lines


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


def published_section(runs: list[dict], metrics: pl.DataFrame) -> list[str]:
    pub = published_results()
    rows = []
    test_pe = metrics.filter(
        (pl.col("target") == "schedule_us") & (pl.col("split") == "test") & (pl.col("scope") == "per_experiment")
    )
    for r in sorted(runs, key=lambda r: r["experiment_id"]):
        real_id = r["experiment_id"] if r["source"] == "real" else r.get("stands_for")
        if not real_id or real_id not in pub:
            continue
        p = pub[real_id]
        ours = {
            m: test_pe.filter((pl.col("experiment_id") == r["experiment_id"]) & (pl.col("model") == m))[
                "mape_pct"
            ].to_list()
            for m in model_order()
        }
        g = lambda m: _fmt(ours[m][0]) if ours.get(m) else "–"
        rows.append(
            [
                f"`{r['experiment_id']}`",
                r["source"],
                g("blackbox_ols_orig"),
                _fmt(float(p["r1_blackbox2f_per_exp_step_mape_pct"])),
                g("ridge_30f_orig"),
                _fmt(float(p["r1_ridge30f_per_exp_step_mape_pct"])),
                g("ridge_30f"),
                g("hgb_30f"),
                _fmt(float(p["r1_xgb30f_per_exp_step_mape_pct"])),
            ]
        )
    if not rows:
        return []
    return [
        "## Beside the original study's published numbers (target `schedule_us`, test MAPE %)",
        "",
        "Published figures: round 1 of the original study (per experiment, temporal 60/20/20). The `*_orig` columns use the original "
        "recipe (train only, unclamped) and reproduce them; `ridge_30f` is StepML's like-for-like recipe. For synthetic runs the "
        "published figure belongs to the real run it stands for, so only real rows are reproductions.",
        "",
        _md_table(
            [
                "experiment",
                "source",
                "OLS blackbox (ours, original recipe)",
                "published blackbox",
                "Ridge 30f α=1 (ours, original recipe)",
                "published Ridge 30f",
                "Ridge 30f (StepML recipe)",
                "gradient boosting hgb_30f (ours)",
                "published XGBoost",
            ],
            rows,
        ),
        "",
    ]


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


def appendix_section(metrics: pl.DataFrame, predictions: pl.DataFrame, out_dir: Path, source: str = "") -> list[str]:
    """Full test metrics per experiment × model × scope, and the per-run plots (the same rows are in metrics.csv)."""
    lines = [
        "## Appendix: full tables and plots",
        "",
        "Every experiment × model × scope on the test split (all splits, and the generalization scopes, are in `metrics.csv`).",
        "",
    ]
    for target in ("schedule_us", "cycle_us"):
        t = metrics.filter((pl.col("target") == target) & (pl.col("split") == "test"))
        if t.height == 0:
            continue
        mrows = [
            [
                f"`{r['experiment_id']}`",
                r["source"],
                r["scope"],
                r["model"],
                r["n"],
                _fmt(r["mape_pct"]),
                _fmt(r["median_ape_pct"]),
                _fmt(r["p90_ape_pct"]),
                _fmt(r["pearson_r"], 3),
                _fmt(r["mspe_pct"]),
            ]
            for r in t.sort(["experiment_id", "scope", "model"]).iter_rows(named=True)
        ]
        lines += [
            f"### Test-split metrics — `{target}`",
            "",
            _md_table(
                [
                    "experiment",
                    "source",
                    "scope",
                    "model",
                    "n",
                    "MAPE %",
                    "median APE %",
                    "p90 APE %",
                    "Pearson r",
                    "MSPE %",
                ],
                mrows,
            ),
            "",
        ]
        for png in (
            plot_mape_by_experiment(metrics, target, out_dir / f"mape_by_experiment_{target}.png", source),
            plot_pred_vs_actual(predictions, target, out_dir / f"pred_vs_actual_{target}.png", source=source),
        ):
            if png is not None:
                lines += [f"![{png.stem}]({png.name})", ""]
    return lines


def render_report(
    *,
    runs: list[dict],
    metrics: pl.DataFrame,
    predictions: pl.DataFrame,
    verdict: dict,
    out_dir: Path,
    findings: dict | None = None,
    checks: dict | None = None,
    extra_sections: list[str] | None = None,
    summary_extra: list[str] | None = None,
) -> str:
    """Write report.md + PNGs into out_dir and return the markdown (sections in the order of the module docstring;
    `summary_extra` ends the summary (e.g. the request-level answer); `extra_sections` go after the main sections,
    before the appendix)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    findings = findings or {}
    source = _source_words(runs)
    lines = ["# StepML study report: H1 (30 physics-informed features + Ridge)", ""]
    lines += summary_section(runs=runs, metrics=metrics, verdict=verdict, findings=findings)
    lines += list(summary_extra or [])
    lines += data_section(runs)
    lines += verdict_section(verdict)
    lines += method_section(runs=runs, checks=checks or {}, findings=findings, predictions=predictions)
    lines += published_section(runs, metrics)
    lines += ranking_section(findings, predictions, out_dir)
    lines += ablation_section(findings)
    lines += generalization_section(findings)
    lines += list(extra_sections or [])
    lines += appendix_section(metrics, predictions, out_dir, source)
    md = "\n".join(lines) + "\n"
    (out_dir / "report.md").write_text(md)
    return md


def write_outputs(out_dir: Path, metrics: pl.DataFrame, verdict: dict) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics.write_csv(out_dir / "metrics.csv")
    (out_dir / "verdict.json").write_text(json.dumps(verdict, indent=2, sort_keys=True, default=float))


def synthetic_vs_real_sections(public: pl.DataFrame | None, step_quantiles: pl.DataFrame | None) -> list[str]:
    """Calibration of synthetic runs against the real runs they stand for (figures computed by the synthetic_vs_real asset)."""
    if (public is None or public.height == 0) and (step_quantiles is None or step_quantiles.height == 0):
        return []
    lines = ["## Calibration: synthetic runs against the real runs they stand for", ""]
    if public is not None and public.height:
        metrics = [
            "ttft_mean_s",
            "e2e_mean_s",
            "decode_interval_ms",
            "throughput_requests_per_s",
            "successes",
            "sampled_steps",
        ]
        rows = []
        for run in sorted(set(public["experiment_id"].to_list())):
            r = public.filter(pl.col("experiment_id") == run)
            cells = []
            for m in metrics:
                x = r.filter(pl.col("metric") == m)
                if x.height == 0 or x["ratio"][0] is None:
                    cells.append("–")
                    continue
                flag = "" if x["within"][0] is None else (" ✓" if x["within"][0] else " ✗")
                cells.append(f"{x['synthetic'][0]:.4g} / {x['real'][0]:.4g} ({x['ratio'][0]:.2f}){flag}")
            rows.append([f"`{run}`", "yes" if r["saturated"][0] else "no", *cells])
        judged = public.filter(pl.col("within").is_not_null())
        n_ok = int(judged["within"].sum()) if judged.height else 0
        lines += [
            "Each cell: synthetic / real (ratio). Counts are compared per unit of synthesis scale. ✓/✗: within the aim "
            "(15 % on mean TTFT, mean E2E and per-token decode interval for non-saturated runs; 25 % on successes for "
            f"saturated ones). Within aim: {n_ok} of {judged.height} judged figures. Real figures: the public "
            "inference-perf summaries of the original runs (data/reference/runs.csv).",
            "",
            _md_table(
                [
                    "synthetic run",
                    "saturated",
                    "mean TTFT (s)",
                    "mean E2E (s)",
                    "decode interval (ms/token)",
                    "throughput (req/s)",
                    "successes",
                    "sampled steps",
                ],
                rows,
            ),
            "",
        ]
    if step_quantiles is not None and step_quantiles.height:
        rows = [
            [
                f"`{r['experiment_id']}`",
                r["metric"],
                _fmt(r["quantile"], 2),
                _fmt(r["synthetic"]),
                _fmt(r["real"]),
                _fmt(r["ratio"], 2),
            ]
            for r in step_quantiles.filter(pl.col("quantile").is_in([0.05, 0.5, 0.95])).iter_rows(named=True)
        ]
        lines += [
            "### Step-level quantiles against the real BATCH_SUMMARY rows",
            "",
            "For synthetic runs whose real run's step table is available (the two real runs in `shared/real`).",
            "",
            _md_table(["synthetic run", "quantity", "quantile", "synthetic", "real", "ratio"], rows),
            "",
        ]
    return lines


GROUP_SOURCES = {
    "batch_tokens": "BATCH_SUMMARY counts of the step (`batch.*`)",
    "kv_statistics": "per-request context lengths of the step's decode requests: {kv}",
    "phase": "BATCH_SUMMARY counts of the step",
    "physics": "roofline formulas on the model/GPU catalogue; linear terms from BATCH_SUMMARY token counts, attention and KV terms from per-request contexts ({kv})",
    "architecture": "model/GPU catalogue (data/catalog), constant within a run",
    "interactions": "products of the above (so partly {kv})",
}


def feature_provenance_section(runs: list[dict], ablation: pl.DataFrame | None) -> list[str]:
    """Per feature group: where its values came from (over all runs' rows) and how much it carried the fit."""
    totals: dict[str, int] = {}
    for r in runs:
        for k, v in (r.get("kv_source_counts") or {}).items():
            totals[k] = totals.get(k, 0) + int(v)
    n = sum(totals.values()) or 1
    kv = ", ".join(f"{k} {100 * v / n:.1f} % of rows" for k, v in sorted(totals.items(), key=lambda kv: -kv[1])) or "–"
    carried = {}
    from stepml_core.study.findings import ablation_summary

    a = ablation_summary(ablation)
    for r in a.iter_rows(named=True) if a.height else []:
        carried.setdefault(r["group"], {})[r["target"]] = f"{_fmt(r['change'])} ({r['effect']})"
    rows = [
        [g, src.format(kv=kv), carried.get(g, {}).get("cycle_us", "–"), carried.get(g, {}).get("schedule_us", "–")]
        for g, src in GROUP_SOURCES.items()
    ]
    return [
        "## Where each feature group's values came from",
        "",
        "KV sources: `snapshot` = the step's own REQUEST_SNAPSHOT events; `journey` = the step's batch reconstructed from "
        "journey events; `proxy_blocks` = BATCH_SUMMARY proxies (documented in stepml_core/features/step_features.py). Last columns: "
        "mean rise of ridge_30f test MAPE (points) when the group is dropped, and whether it exceeds the noise (*Feature-group ablation*).",
        "",
        _md_table(["group", "values from", "dropping it: cycle_us", "dropping it: schedule_us"], rows),
        "",
    ]


def reconstruction_section(agreements: dict[str, dict]) -> list[str]:
    """Agreement of the journey-based batch reconstruction with REQUEST_SNAPSHOT and BATCH_SUMMARY, per run."""
    rows, tot_pairs, tot_ok = [], 0, 0.0
    for e, a in sorted(agreements.items()):
        if not a or not a.get("available"):
            rows.append([f"`{e}`", "–", "–", "–", "–", "–", (a or {}).get("why", "no journey events")])
            continue
        s = a.get("snapshots") or {}
        b = a.get("batch_summary") or {}
        pairs = s.get("pairs_scheduled_both") or 0
        if s.get("all_fields") is not None:
            tot_pairs += pairs
            tot_ok += pairs * s["all_fields"]
        bs_rate = b.get("all") if b else None
        rows.append(
            [
                f"`{e}`",
                a.get("steps", "–"),
                a.get("pairs", "–"),
                pairs,
                _fmt(100 * s["all_fields"], 3) if s.get("all_fields") is not None else "–",
                _fmt(100 * bs_rate, 2) if isinstance(bs_rate, (int, float)) else "–",
                " · ".join(
                    f"{k} {_fmt(100 * v, 2)}"
                    for k, v in s.items()
                    if k in ("membership", "new_tokens", "progress_index", "prompt_len") and v is not None
                ),
            ]
        )
    if not rows:
        return []
    overall = (
        f"{100 * tot_ok / tot_pairs:.3f} % of {tot_pairs:,} (step, request) pairs"
        if tot_pairs
        else "no pairs to compare"
    )
    return [
        "## Per-request context for every step (journey reconstruction)",
        "",
        "Each step's batch (requests, new tokens, context length before the step) is rebuilt from journey events for every "
        "step, sampled or not, and checked against REQUEST_SNAPSHOT wherever both exist (exact match of all fields) and "
        f"against BATCH_SUMMARY token and request counts. Overall agreement with snapshots: **{overall}**.",
        "",
        _md_table(
            [
                "experiment",
                "steps rebuilt",
                "(step, request) pairs",
                "pairs also in snapshots",
                "all fields match %",
                "BATCH_SUMMARY steps fully matching %",
                "per field %",
            ],
            rows,
        ),
        "",
    ]


def e2e_section(summary: pl.DataFrame, per_request: pl.DataFrame, out_dir: Path) -> list[str]:
    """Teacher-forced end-to-end fidelity per experiment and model (error of the mean, and MAPE over requests)."""
    if summary is None or summary.height == 0:
        return []
    s = summary.filter(pl.col("metric").is_in(["ttft", "decode_interval", "e2e"]) & (pl.col("n") > 0))
    agg = (
        s.group_by("model", "metric")
        .agg(
            mean_abs_err_of_mean=pl.col("abs_mean_error_pct").mean(),
            mean_mape=pl.col("mape_pct").mean(),
            experiments=pl.len(),
        )
        .sort("metric", "mean_abs_err_of_mean")
    )
    rows = [
        [r["metric"], r["model"], _fmt(r["mean_abs_err_of_mean"]), _fmt(r["mean_mape"]), r["experiments"]]
        for r in agg.iter_rows(named=True)
    ]
    detail = [
        [
            f"`{r['experiment_id']}`",
            r["model"],
            r["metric"],
            r["n"],
            _fmt(r["mean_error_pct"]),
            _fmt(r["mape_pct"]),
            _fmt(r.get("error_p05_pct")),
            _fmt(r.get("error_p50_pct")),
            _fmt(r.get("error_p95_pct")),
        ]
        for r in s.filter(pl.col("model") == "hgb_30f").sort("experiment_id", "metric").iter_rows(named=True)
    ]
    lines = [
        "## End-to-end fidelity (teacher-forced)",
        "",
        "Each per-experiment `cycle_us` model predicts the cycle of **every** step from its reconstructed batch; a request's "
        "predicted TTFT and E2E are the sums of the predicted cycles from its arrival to its first token / last token, "
        "compared with the journey time stamps. 'Error of the mean' is the original study's E2E metric "
        "(|mean predicted − mean observed| / mean observed); MAPE is over requests.",
        "",
        _md_table(["metric", "model", "mean |error of the mean| %", "mean MAPE over requests %", "experiments"], rows),
        "",
    ]
    if detail:
        lines += [
            "Per experiment (hgb_30f): signed error of the mean and the distribution of per-request errors.",
            "",
            _md_table(
                [
                    "experiment",
                    "model",
                    "metric",
                    "requests",
                    "error of the mean %",
                    "MAPE %",
                    "p5 %",
                    "median %",
                    "p95 %",
                ],
                detail,
            ),
            "",
        ]
    png = plot_e2e(per_request, "hgb_30f", Path(out_dir) / "e2e_pred_vs_obs.png")
    if png:
        lines += [f"![{png.stem}]({png.name})", ""]
    return lines
