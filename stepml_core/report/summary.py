"""The report's first screen: what the study found, in the words a reader needs first — the verdict per target, which model to use, what does not work, what to take care with."""

from __future__ import annotations

import polars as pl

from stepml_core.report.format import OUTCOME_WORDS, _fmt, _md_table, _pct, _source_words
from stepml_core.stepmodels.recipes import log_target_models
from stepml_core.study.stats import WILCOXON_MIN_N, wilcoxon_min_p
from stepml_core.study.verdict import ABSURD_MAPE_PCT, CLEAR_MARGIN_REL, H1_MODEL, REFUTE_ABOVE_PCT, SUPPORT_BELOW_PCT

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
