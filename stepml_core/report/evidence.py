"""Sections on where the data comes from and how far to trust it: the synthetic runs against the real runs, the provenance of the features, the batch reconstruction's agreement with snapshots, the teacher-forced end-to-end fidelity."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from stepml_core.report.format import _fmt, _md_table
from stepml_core.report.plots import (
    plot_e2e,
)


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
