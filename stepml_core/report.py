"""Study report: markdown + PNG plots from metrics, predictions and the verdict.

Every figure in the report is computed from the tables passed in; the published numbers
of the original study (data/reference/original_study.csv) are shown beside them, labelled.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import polars as pl

from .paths import REFERENCE_DIR

MODEL_ORDER = ["naive_mean", "blackbox_2f", "ridge_30f", "blackbox_ols_orig", "ridge_30f_orig", "ridge_log_30f", "nnls_physics", "hgb_30f"]
PUBLISHED_COLUMNS = {
    "blackbox_ols_orig": "r1_blackbox2f_per_exp_step_mape_pct",
    "ridge_30f_orig": "r1_ridge30f_per_exp_step_mape_pct",
    "xgboost (published)": "r1_xgb30f_per_exp_step_mape_pct",
}


def published_results() -> dict[str, dict]:
    with open(REFERENCE_DIR / "original_study.csv", newline="") as f:
        return {r["experiment_id"]: r for r in csv.DictReader(f)}


def _fmt(x, nd=2) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return f"{x:,.{nd}f}"


def _md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _margins(fig, *, left: float = 0.85, right: float = 0.2, bottom: float = 0.6, top: float = 0.4, wspace: float | None = None) -> None:
    """Fixed margins in inches (tight_layout measured every text box: 1.2 s of the report's 2.3 s)."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h, wspace=wspace)


def plot_mape_by_experiment(metrics: pl.DataFrame, target: str, path: Path) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = metrics.filter((pl.col("target") == target) & (pl.col("split") == "test") & (pl.col("scope") == "per_experiment"))
    if t.height == 0:
        return None
    exps = sorted(set(t["experiment_id"].to_list()))
    models = [m for m in MODEL_ORDER if m in set(t["model"].to_list())]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(exps) + 3), 4.5))
    w = 0.8 / len(models)
    for i, m in enumerate(models):
        vals = [t.filter((pl.col("experiment_id") == e) & (pl.col("model") == m))["mape_pct"].to_list() for e in exps]
        ax.bar(np.arange(len(exps)) + i * w, [v[0] if v else np.nan for v in vals], w, label=m)
    ax.set_xticks(np.arange(len(exps)) + 0.4 - w / 2)
    ax.set_xticklabels([e.split("-", 2)[-1] for e in exps], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("test MAPE (%)")
    ax.set_yscale("log")
    ax.axhline(25, color="k", ls="--", lw=0.8)
    ax.set_title(f"Per-step test MAPE by experiment and model — target {target}")
    ax.legend(fontsize=7)
    _margins(fig, bottom=1.75)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pred_vs_actual(predictions: pl.DataFrame, target: str, path: Path, model: str = "ridge_30f") -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = predictions.filter((pl.col("target") == target) & (pl.col("split") == "test") & (pl.col("model") == model)
                           & (pl.col("scope") == "per_experiment") & (pl.col("y") > 0))
    if p.height == 0:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for e in sorted(set(p["experiment_id"].to_list())):
        s = p.filter(pl.col("experiment_id") == e)
        ax.scatter(s["y"], np.clip(s["y_pred"].to_numpy(), 1e-3, None), s=3, alpha=0.4, label=e.split("-", 2)[-1])
    lo, hi = float(p["y"].min()), float(p["y"].max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xscale("log"); ax.set_yscale("log")
    ax.set_xlabel(f"actual {target} (µs)"); ax.set_ylabel(f"predicted {target} (µs)")
    ax.set_title(f"{model}, test split — {target}")
    if len(set(p["experiment_id"].to_list())) <= 8:
        ax.legend(fontsize=6, markerscale=3)
    _margins(fig)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_report(*, runs: list[dict], metrics: pl.DataFrame, predictions: pl.DataFrame, verdict: dict,
                  out_dir: Path, extra_sections: list[str] | None = None) -> str:
    """Write report.md + PNGs into out_dir and return the markdown."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = sorted({r["source"] for r in runs})
    pub = published_results()
    lines = ["# StepML study report: H1 (30 physics-informed features + Ridge)", ""]
    data_kind = " and ".join(sources) if sources else "no"
    lines += [f"**Data: {len(runs)} {data_kind} run(s).** " + (
        "Synthetic runs come from StepML's synthesizer (modelled on the real runs named below); their numbers say nothing "
        "about real vLLM, only that the pipeline and models behave as designed." if "synthetic" in sources else
        "Every number below comes from these runs' traces as processed by this pipeline."), ""]
    rows = []
    for r in sorted(runs, key=lambda r: r["experiment_id"]):
        rows.append([f"`{r['experiment_id']}`", r["source"], r.get("stands_for") or "–", r["model"], r["tp"], r["workload"],
                     r.get("steps_kept", "–"), r.get("steps_quarantined", "–"), r.get("kv_source", "–")])
    lines += ["## Data", "", _md_table(["experiment (partition)", "source", "stands for (real run)", "model", "TP", "workload",
                                         "steps kept", "quarantined", "KV features from"], rows), ""]
    lines += ["Targets: `schedule_us` = `step.duration_us`, the CPU time of the scheduler's `schedule()` call (the original "
              "study's target); `cycle_us` = gap between `step.ts_start_ns` of step id and id+1 where both were sampled "
              "(the engine cycle a simulator needs; about 10 % of sampled steps have it).", ""]
    lines += ["## H1 verdict", "", f"Rule: {verdict.get('rule')}.", ""]
    vrows = []
    for target, v in verdict.get("targets", {}).items():
        bb = v.get("baselines", {}).get("blackbox_2f", {})
        nv = v.get("baselines", {}).get("naive_mean", {})
        vrows.append([target, f"**{v.get('verdict')}**", _fmt(v.get("mean_test_mape_pct")), _fmt(v.get("median_test_mape_pct")),
                      v.get("n_experiments"), v.get("n_test_rows", "–"),
                      f"{_fmt(bb.get('mean_test_mape_pct'))} (p={_fmt(bb.get('wilcoxon_p_one_sided'), 3)}, lower in {bb.get('ridge_lower_in', '–')}/{bb.get('n_experiments', '–')})",
                      f"{_fmt(nv.get('mean_test_mape_pct'))} (p={_fmt(nv.get('wilcoxon_p_one_sided'), 3)}, lower in {nv.get('ridge_lower_in', '–')}/{nv.get('n_experiments', '–')})",
                      "yes" if v.get("clearly_beats_baselines") else "no"])
    lines += [_md_table(["target", "verdict", "mean test MAPE % (ridge_30f)", "median", "experiments", "test rows (n)",
                         "blackbox_2f mean % (Wilcoxon p)", "naive_mean mean % (Wilcoxon p)", "significantly beats both"], vrows), ""]
    n_exp = max((v.get("n_experiments") or 0 for v in verdict.get("targets", {}).values()), default=0)
    if n_exp < 5:
        lines += [f"With {n_exp} experiment(s) a Wilcoxon signed-rank test across experiments cannot reach p < 0.05; the "
                  "per-experiment 95 % moving-block bootstrap intervals below are then the evidence.", ""]
    for target, v in verdict.get("targets", {}).items():
        brow = []
        for base, b in v.get("baselines", {}).items():
            for e, pe in b.get("per_experiment_bootstrap", {}).items():
                brow.append([f"`{e}`", base, _fmt(pe["mape_diff_pct"]), f"[{_fmt(pe['ci95'][0])}, {_fmt(pe['ci95'][1])}]",
                             "yes" if pe["ridge_better"] else "no"])
        if brow:
            lines += [f"### {target}: ridge_30f minus baseline, test APE (percentage points)", "",
                      _md_table(["experiment", "baseline", "mean difference", "95 % CI", "ridge significantly better"], brow), ""]
    for target in ("schedule_us", "cycle_us"):
        t = metrics.filter((pl.col("target") == target) & (pl.col("split") == "test"))
        if t.height == 0:
            continue
        lines += [f"## Test-split metrics — {target}", ""]
        mrows = []
        for r in t.sort(["experiment_id", "scope", "model"]).iter_rows(named=True):
            mrows.append([f"`{r['experiment_id']}`", r["source"], r["scope"], r["model"], r["n"], _fmt(r["mape_pct"]),
                          _fmt(r["median_ape_pct"]), _fmt(r["p90_ape_pct"]), _fmt(r["pearson_r"], 3), _fmt(r["mspe_pct"])])
        lines += [_md_table(["experiment", "source", "scope", "model", "n", "MAPE %", "median APE %", "p90 APE %", "Pearson r", "MSPE %"], mrows), ""]
        for png in (plot_mape_by_experiment(metrics, target, out_dir / f"mape_by_experiment_{target}.png"),
                    plot_pred_vs_actual(predictions, target, out_dir / f"pred_vs_actual_{target}.png")):
            if png is not None:
                lines += [f"![{png.stem}]({png.name})", ""]
    # beside the published numbers
    prow = []
    test_pe = metrics.filter((pl.col("target") == "schedule_us") & (pl.col("split") == "test") & (pl.col("scope") == "per_experiment"))
    for r in sorted(runs, key=lambda r: r["experiment_id"]):
        real_id = r["experiment_id"] if r["source"] == "real" else r.get("stands_for")
        if not real_id or real_id not in pub:
            continue
        p = pub[real_id]
        ours = {m: test_pe.filter((pl.col("experiment_id") == r["experiment_id"]) & (pl.col("model") == m))["mape_pct"].to_list() for m in MODEL_ORDER}
        g = lambda m: _fmt(ours[m][0]) if ours.get(m) else "–"
        prow.append([f"`{r['experiment_id']}`", r["source"], g("blackbox_ols_orig"), _fmt(float(p["r1_blackbox2f_per_exp_step_mape_pct"])),
                     g("ridge_30f_orig"), _fmt(float(p["r1_ridge30f_per_exp_step_mape_pct"])), g("ridge_30f"),
                     g("hgb_30f"), _fmt(float(p["r1_xgb30f_per_exp_step_mape_pct"]))])
    if prow:
        lines += ["## Beside the original study's published numbers (target `schedule_us`, test MAPE %)", "",
                  "Published figures: round 1 of the original study (per experiment, temporal 60/20/20). For synthetic runs "
                  "the published figure belongs to the real run it stands for, so only real rows are reproductions.", "",
                  _md_table(["experiment", "source", "OLS blackbox (ours, original recipe)", "published blackbox",
                             "Ridge 30f α=1 (ours, original recipe)", "published Ridge 30f", "Ridge 30f (StepML recipe)",
                             "gradient boosting hgb_30f (ours)", "published XGBoost"], prow), ""]
    lines += list(extra_sections or [])
    md = "\n".join(lines) + "\n"
    (out_dir / "report.md").write_text(md)
    return md


def write_outputs(out_dir: Path, metrics: pl.DataFrame, verdict: dict) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics.write_csv(out_dir / "metrics.csv")
    (out_dir / "verdict.json").write_text(json.dumps(verdict, indent=2, sort_keys=True, default=float))


BEYOND_MODELS = ["naive_mean", "blackbox_2f", "ridge_30f", "ridge_log_30f", "nnls_physics", "hgb_30f", "blackbox_ols_orig", "ridge_30f_orig"]


def _real_id(experiment_id: str) -> str:
    return experiment_id[: -len("-synth")] if experiment_id.endswith("-synth") else experiment_id


def model_ranking(metrics: pl.DataFrame, target: str) -> pl.DataFrame:
    """Mean / median test MAPE over experiments per model and scope (per_experiment, per_model, global)."""
    t = metrics.filter((pl.col("target") == target) & (pl.col("split") == "test") & pl.col("scope").is_in(["per_experiment", "per_model", "global"]))
    return (t.group_by("model", "scope").agg(mean_mape_pct=pl.col("mape_pct").mean(), median_mape_pct=pl.col("mape_pct").median(),
                                             n_experiments=pl.len(), test_rows=pl.col("n").sum())
            .sort("mean_mape_pct"))


def plot_residuals(predictions: pl.DataFrame, target: str, model: str, scope: str, path: Path) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = predictions.filter((pl.col("target") == target) & (pl.col("split") == "test") & (pl.col("model") == model)
                           & (pl.col("scope") == scope) & (pl.col("y") > 0))
    if p.height == 0 or "batch_size" not in p.columns:
        return None
    r = (100 * (p["y_pred"] - p["y"]) / p["y"]).to_numpy()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, col, label in ((axes[0], "batch_size", "batch size (requests)"), (axes[1], "kv_mean", "mean decode context (tokens)")):
        ax.scatter(p[col].to_numpy(), r, s=2, alpha=0.3)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel(label)
    axes[0].set_ylabel("signed error (%)")
    fig.suptitle(f"Residuals of {model} ({scope}), test split — {target}")
    _margins(fig, top=0.55, wspace=0.06)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def beyond_h1_sections(metrics: pl.DataFrame, predictions: pl.DataFrame, generalization: pl.DataFrame | None,
                       ablation: pl.DataFrame | None, out_dir: Path) -> list[str]:
    """Report sections past H1: ranking with a recommendation, ablation, generalization, residual plots."""
    out_dir = Path(out_dir)
    pub = published_results()
    lines = ["## Beyond H1: which step-time model a simulator should use", ""]
    for target in ("cycle_us", "schedule_us"):
        rank = model_ranking(metrics, target)
        if rank.height == 0:
            continue
        exps = sorted(set(metrics.filter(pl.col("target") == target)["experiment_id"].to_list()))
        xgb = [float(pub[_real_id(e)]["r1_xgb30f_per_exp_step_mape_pct"]) for e in exps if _real_id(e) in pub]
        rows = [[r["model"], r["scope"], _fmt(r["mean_mape_pct"]), _fmt(r["median_mape_pct"]), r["n_experiments"], r["test_rows"]]
                for r in rank.iter_rows(named=True)]
        if target == "schedule_us" and xgb:
            rows.append(["XGBoost (original study, published, real runs these stand for)", "per_experiment", _fmt(float(np.mean(xgb))),
                         _fmt(float(np.median(xgb))), len(xgb), "–"])
        lines += [f"### Ranking — {target} (test MAPE over experiments)", "",
                  _md_table(["model", "scope", "mean MAPE %", "median MAPE %", "experiments", "test rows"], rows), ""]
        deploy = rank.filter(pl.col("scope") == "per_model")
        best_pe = rank.filter(pl.col("scope") == "per_experiment").row(0, named=True)
        if deploy.height:
            best = deploy.row(0, named=True)
            lines += [f"**Recommendation for `{target}`: `{best['model']}` fitted per model over its workloads** "
                      f"(mean test MAPE {_fmt(best['mean_mape_pct'])} %; the best per-experiment fit is `{best_pe['model']}` at "
                      f"{_fmt(best_pe['mean_mape_pct'])} %). " + (
                          "This is the target a simulator advances its clock by." if target == "cycle_us" else
                          "This target is scheduler CPU time, not the step a simulator needs; use it only to model scheduler overhead."), ""]
        png = plot_residuals(predictions, target, deploy.row(0, named=True)["model"] if deploy.height else best_pe["model"],
                             "per_model" if deploy.height else "per_experiment", out_dir / f"residuals_{target}.png")
        if png:
            lines += [f"![{png.stem}]({png.name})", ""]
    if ablation is not None and ablation.height:
        a = ablation.group_by("target", "group").agg(all=pl.col("mape_all_pct").mean(), without=pl.col("mape_without_pct").mean(),
                                                     only=pl.col("mape_only_pct").mean(), n=pl.len()).sort("target", "group")
        rows = [[r["target"], r["group"], _fmt(r["all"]), _fmt(r["without"]), _fmt(r["without"] - r["all"]) if r["without"] is not None else "–",
                 _fmt(r["only"]), r["n"]] for r in a.iter_rows(named=True)]
        lines += ["### Feature-group ablation (ridge_30f, per experiment, mean test MAPE %)", "",
                  "'without' drops the group from the 30 features; 'only' keeps just that group. A positive change means the group carried the fit.", "",
                  _md_table(["target", "group", "all 30", "without group", "change", "only group", "experiments"], rows), ""]
    if generalization is not None and generalization.height:
        g = (generalization.filter(pl.col("split") == "test").group_by("target", "scope", "model")
             .agg(mean=pl.col("mape_pct").mean(), median=pl.col("mape_pct").median(), n=pl.len()).sort("target", "scope", "mean"))
        rows = [[r["target"], r["scope"], r["model"], _fmt(r["mean"]), _fmt(r["median"]), r["n"]] for r in g.iter_rows(named=True)]
        lines += ["### Generalization (held-out experiments' test blocks, mean over held-out experiments)", "",
                  _md_table(["target", "scope", "model", "mean MAPE %", "median MAPE %", "held-out experiments"], rows), ""]
    return lines


def calibration_sections(public: pl.DataFrame | None, step_quantiles: pl.DataFrame | None) -> list[str]:
    """Calibration of synthetic runs against the real runs they stand for (figures computed by the calibration asset)."""
    if (public is None or public.height == 0) and (step_quantiles is None or step_quantiles.height == 0):
        return []
    lines = ["## Calibration: synthetic runs against the real runs they stand for", ""]
    if public is not None and public.height:
        metrics = ["ttft_mean_s", "e2e_mean_s", "decode_interval_ms", "throughput_requests_per_s", "successes", "sampled_steps"]
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
        lines += ["Each cell: synthetic / real (ratio). Counts are compared per unit of synthesis scale. ✓/✗: within the aim "
                  "(15 % on mean TTFT, mean E2E and per-token decode interval for non-saturated runs; 25 % on successes for "
                  f"saturated ones). Within aim: {n_ok} of {judged.height} judged figures. Real figures: the public "
                  "inference-perf summaries of the original runs (data/reference/runs.csv).", "",
                  _md_table(["synthetic run", "saturated", "mean TTFT (s)", "mean E2E (s)", "decode interval (ms/token)",
                             "throughput (req/s)", "successes", "sampled steps"], rows), ""]
    if step_quantiles is not None and step_quantiles.height:
        rows = [[f"`{r['experiment_id']}`", r["metric"], _fmt(r["quantile"], 2), _fmt(r["synthetic"]), _fmt(r["real"]), _fmt(r["ratio"], 2)]
                for r in step_quantiles.filter(pl.col("quantile").is_in([0.05, 0.5, 0.95])).iter_rows(named=True)]
        lines += ["### Step-level quantiles against the real BATCH_SUMMARY rows", "",
                  "For synthetic runs whose real run's step table is available (the two real runs in `shared/real`).", "",
                  _md_table(["synthetic run", "quantity", "quantile", "synthetic", "real", "ratio"], rows), ""]
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
    if ablation is not None and ablation.height:
        a = ablation.group_by("target", "group").agg(d=(pl.col("mape_without_pct") - pl.col("mape_all_pct")).mean())
        for t, g, d in a.iter_rows():
            carried.setdefault(g, {})[t] = d
    rows = [[g, src.format(kv=kv), _fmt(carried.get(g, {}).get("cycle_us")), _fmt(carried.get(g, {}).get("schedule_us"))]
            for g, src in GROUP_SOURCES.items()]
    return ["## Where each feature group's values came from", "",
            "KV sources: `snapshot` = the step's own REQUEST_SNAPSHOT events; `journey` = the step's batch reconstructed from "
            "journey events; `proxy_blocks` = BATCH_SUMMARY proxies (documented in stepml_core/features.py). 'Carried the fit' = "
            "mean rise of ridge_30f test MAPE (percentage points) when the group is dropped.", "",
            _md_table(["group", "values from", "carried the fit: cycle_us", "carried the fit: schedule_us"], rows), ""]


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
        rows.append([f"`{e}`", a.get("steps", "–"), a.get("pairs", "–"), pairs, _fmt(100 * s["all_fields"], 3) if s.get("all_fields") is not None else "–",
                     _fmt(100 * bs_rate, 2) if isinstance(bs_rate, (int, float)) else "–",
                     " · ".join(f"{k} {_fmt(100 * v, 2)}" for k, v in s.items() if k in ("membership", "new_tokens", "progress_index", "prompt_len") and v is not None)])
    if not rows:
        return []
    overall = f"{100 * tot_ok / tot_pairs:.3f} % of {tot_pairs:,} (step, request) pairs" if tot_pairs else "no pairs to compare"
    return ["## Per-request context for every step (journey reconstruction)", "",
            "Each step's batch (requests, new tokens, context length before the step) is rebuilt from journey events for every "
            "step, sampled or not, and checked against REQUEST_SNAPSHOT wherever both exist (exact match of all fields) and "
            f"against BATCH_SUMMARY token and request counts. Overall agreement with snapshots: **{overall}**.", "",
            _md_table(["experiment", "steps rebuilt", "(step, request) pairs", "pairs also in snapshots", "all fields match %",
                       "BATCH_SUMMARY steps fully matching %", "per field %"], rows), ""]


def plot_e2e(per_request: pl.DataFrame, model: str, path: Path) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = per_request.filter(pl.col("model") == model) if per_request.height else per_request
    if p.height == 0:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, m in zip(axes, ("ttft", "e2e")):
        o, q = p[f"obs_{m}_us"].to_numpy() / 1e3, p[f"pred_{m}_us"].to_numpy() / 1e3
        ok = np.isfinite(o) & np.isfinite(q) & (o > 0) & (q > 0)
        ax.scatter(o[ok], q[ok], s=2, alpha=0.3)
        if ok.any():
            lo, hi = min(o[ok].min(), q[ok].min()), max(o[ok].max(), q[ok].max())
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set_xscale("log"); ax.set_yscale("log")
        ax.set_xlabel(f"observed {m.upper()} (ms)"); ax.set_ylabel(f"predicted {m.upper()} (ms)")
    fig.suptitle(f"Teacher-forced E2E fidelity: {model} cycle-time predictions summed per request")
    _margins(fig, top=0.55, wspace=0.25)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def e2e_section(summary: pl.DataFrame, per_request: pl.DataFrame, out_dir: Path) -> list[str]:
    """Teacher-forced end-to-end fidelity per experiment and model (error of the mean, and MAPE over requests)."""
    if summary is None or summary.height == 0:
        return []
    s = summary.filter(pl.col("metric").is_in(["ttft", "decode_interval", "e2e"]) & (pl.col("n") > 0))
    agg = (s.group_by("model", "metric").agg(mean_abs_err_of_mean=pl.col("abs_mean_error_pct").mean(),
                                             mean_mape=pl.col("mape_pct").mean(), experiments=pl.len())
           .sort("metric", "mean_abs_err_of_mean"))
    rows = [[r["metric"], r["model"], _fmt(r["mean_abs_err_of_mean"]), _fmt(r["mean_mape"]), r["experiments"]] for r in agg.iter_rows(named=True)]
    detail = [[f"`{r['experiment_id']}`", r["model"], r["metric"], r["n"], _fmt(r["mean_error_pct"]), _fmt(r["mape_pct"]),
               _fmt(r.get("error_p05_pct")), _fmt(r.get("error_p50_pct")), _fmt(r.get("error_p95_pct"))]
              for r in s.filter(pl.col("model") == "hgb_30f").sort("experiment_id", "metric").iter_rows(named=True)]
    lines = ["## End-to-end fidelity (teacher-forced)", "",
             "Each per-experiment `cycle_us` model predicts the cycle of **every** step from its reconstructed batch; a request's "
             "predicted TTFT and E2E are the sums of the predicted cycles from its arrival to its first token / last token, "
             "compared with the journey time stamps. 'Error of the mean' is the original study's E2E metric "
             "(|mean predicted − mean observed| / mean observed); MAPE is over requests.", "",
             _md_table(["metric", "model", "mean |error of the mean| %", "mean MAPE over requests %", "experiments"], rows), ""]
    if detail:
        lines += ["Per experiment (hgb_30f): signed error of the mean and the distribution of per-request errors.", "",
                  _md_table(["experiment", "model", "metric", "requests", "error of the mean %", "MAPE %", "p5 %", "median %", "p95 %"], detail), ""]
    png = plot_e2e(per_request, "hgb_30f", Path(out_dir) / "e2e_pred_vs_obs.png")
    if png:
        lines += [f"![{png.stem}]({png.name})", ""]
    return lines
