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

import json
from pathlib import Path

import polars as pl

from stepml_core.report.format import OUTCOME_WORDS, _fmt, _md_table, _pct, _source_words, published_results
from stepml_core.report.method import method_section
from stepml_core.report.plots import (
    model_order,
    plot_mape_by_experiment,
    plot_pred_vs_actual,
    short_run_name,
)
from stepml_core.report.rankings import ablation_section, generalization_section, ranking_section
from stepml_core.report.summary import summary_section
from stepml_core.study.stats import WILCOXON_MIN_N, wilcoxon_min_p
from stepml_core.study.verdict import CLEAR_MARGIN_REL, H1_MODEL, SUPPORT_BELOW_PCT

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
