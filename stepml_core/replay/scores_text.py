"""The replay's report, rendered from ``stepml_core.replay.scores.replay_fidelity_tables``: the section *Replay of
real request logs* (per run, per step model, the recommended model beside BLIS 4a, the per-request errors and the
CDF figures), the short summary at the report's top, and the report of a study with request logs only.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import polars as pl

from stepml_core.replay.scores import wide_rows


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:+.1f}"


def _mean_abs(vals) -> float | None:
    v = [abs(x) for x in vals if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else None


def _left_out_lines(left: dict[str, dict]) -> list[str]:
    """The runs whose stored replays are not current ({run: {status, reason}}), named and unused."""
    if not left:
        return []
    return [
        "**Left out of the replay scores** (their stored replays are not current; nothing here uses them):",
        "",
        _md(["run", "status", "reason"], [[e, r["status"], r["reason"]] for e, r in sorted(left.items())]),
        "",
    ]


def _replay_intro_lines(src: list[str]) -> list[str]:
    """The section's heading (which data) and how runs are replayed and scored."""
    return [
        "## Replaying the real runs" if src == ["real"] else f"## Replaying the runs ({', '.join(src)} data)",
        "",
        "Every request of each run replayed at its recorded arrival time through StepML's vLLM v1 simulator "
        "(`stepml_core/sim`, the synthesizer's scheduler: chunked prefill, KV blocks with prefix caching, "
        "preemption, async scheduling), once per step-time model; predicted vs observed client-side latencies. "
        "Error = (predicted − observed) / observed × 100. **in** = in-sample (the scored run's data — its steps, "
        "requests or aggregates, or its synthetic twin's — built the model), **out** = out-of-sample. `physics` is the "
        "synthesizer's engine, in sample on each of the 16 reference runs: its efficiencies were tuned on their "
        "per-stage TPOT and its API terms on their per-stage TTFT (inference-perf's stage summaries of the latencies "
        "scored here), and its schedule() model has per-run parameters fitted to the run's own test-split schedule() "
        "times. The recommended model per run X is chosen by a nested rule: among X's out-of-sample candidates, the "
        "lowest mean error on the other non-saturated runs, counting only replays whose model could not have used "
        "X's request log had X ground truth (so no score that X's ground truth reached). BLIS 4a: the "
        "best-calibrated BLIS simulator (`train` rows in-sample).",
        "",
    ]


def _truth_cell(r: dict) -> str:
    """'yes', 'partial: N of M requests (the rest replayed, not scored)' or '**no** (predicted only)'."""
    if not r["ground_truth"]:
        return "**no** (predicted only)"
    scored = r.get("scored_requests")
    if scored is None or scored >= r["requests"]:
        return "yes"
    return f"**partial**: {scored} of {r['requests']} requests (the rest replayed, not scored)"


def provenance_lines(st: dict[str, dict]) -> list[str]:
    """What fitted each figure of this section, what chose the model and what chose the calibration's settings; on
    the 16 reference runs, that those settings were chosen with their ground truth in view (docs/calibration.md)."""
    from stepml_core.synth.spec import reference_runs

    seen = sorted(e for e, r in st.items() if r.get("scored") and e in set(reference_runs()))
    lines = [
        "**What each figure rests on.** Fit: `fitted_on` of each row of `replay.csv` (runs whose steps or request "
        "logs built the model). Model choice: the nested rule above. Calibration settings (stage-1 weights and the "
        "one-sided fit of saturated runs, the stage-2 loss and windows, the physics priors): constants in "
        "`stepml_core/calibration/` (`fit`, `refine`), the same for every fold and run (docs/calibration.md, *Settings and what chose "
        "them*).",
        "",
    ]
    if seen:
        lines[0] += (
            f" On the {len(seen)} scored reference run(s) here the design constants were written by StepML's "
            "developers with these runs' ground truth in view (not tuned on held-out errors); the two that once were "
            "(how saturated calibration runs count in stage 1) are chosen per calibration by inner validation on its "
            "own runs."
        )
    return lines


def _replay_runs_lines(st: dict[str, dict]) -> list[str]:
    """The runs with request logs: LLM model, role, requests, whether there is ground truth."""
    data_rows = [
        [
            e,
            st[e]["llm_model"],
            st[e]["role"] or "–",
            st[e]["requests"],
            _truth_cell(st[e]),
        ]
        for e in sorted(st)
    ]
    return [
        "Runs with request logs (role = the run's role in BLIS 4a's calibration):",
        "",
        _md(["run", "LLM model", "role", "requests", "ground truth"], data_rows),
        "",
    ]


def _run_sets_lines(st: dict[str, dict], w: pl.DataFrame, rec_of: dict, blis: dict) -> list[str]:
    """The scored runs' tables, non-saturated then saturated, and the mean absolute errors (%) per run set."""
    lines, summary = [], []
    for title, sat in (("non-saturated runs", False), ("saturated runs (reasoning: a queue of minutes)", True)):
        exps = [e for e in sorted(st) if st[e].get("scored") and bool(st[e].get("saturated")) == sat]
        if exps:
            table, means = _run_set(title, exps, st, w, rec_of, blis)
            lines += table
            summary += means
    return lines + [
        "### Mean absolute errors (%)",
        "",
        _md(["run set", "model", "runs", "TTFT", "E2E", "p99 E2E"], summary),
        "",
    ]


def _replay_cdf_lines(out_dir: Path, rows: pl.DataFrame, rec_of: dict) -> list[str]:
    """The E2E and TTFT CDF plots (written to out_dir) with their captions."""
    lines = []
    for metric in ("e2e", "ttft"):
        plot = plot_replay_cdfs(out_dir, rows, rec_of, metric)
        if plot:
            lines += [
                f"![replay {metric} CDFs]({plot.name})",
                "",
                f"Distributions of {metric.upper()} per run: observed (black), the recommended model (blue) and the "
                "physics (grey, dashed).",
                "",
            ]
    return lines


_REPLAY_ASSUMPTION_LINES = [
    "Assumptions of every replay: each request generates the run's `output_len` tokens (ignore_eos; the "
    "client's token count is a re-count of the text), prompts are drawn from the run's shared-prefix shape "
    "(10 groups × 10 prompts; requests of equal length may share a prompt), clients time out 300 s after sending, "
    "rounded up to their next whole second (inference-perf's aiohttp timeout; the observed side takes the client's "
    "verdict), "
    "serving limits and KV blocks from the run's own files.",
    "",
]


def replay_section(fid: dict, out_dir: Path) -> list[str]:
    """'Replaying the real runs': per run set, the recommended out-of-sample model and the physics beside BLIS 4a."""
    rows, runs = fid.get("replay"), fid.get("runs")
    left = fid.get("left_out") or {}
    left_lines = _left_out_lines(left)
    if rows is None or rows.height == 0:
        return ["## Replaying the runs", "", "No current replay.", "", *left_lines] if left else []
    w = wide_rows(rows)
    rec = rows.filter(pl.col("recommended")).select("experiment_id", "step_model").unique()
    rec_of = dict(rec.iter_rows())
    blis = {r["experiment_id"]: r for r in fid["blis4a"].iter_rows(named=True)} if fid["blis4a"].height else {}
    lines = _replay_intro_lines(sorted(set(rows["source"])))
    st = {r["experiment_id"]: r for r in runs.iter_rows(named=True)} if runs is not None and runs.height else {}
    lines += provenance_lines(st)
    lines += _replay_runs_lines(st)
    lines += left_lines
    lines += _run_sets_lines(st, w, rec_of, blis)
    lines += _simulator_builder_lines(fid.get("recommended_per_llm"))
    lines += _per_request_lines(fid.get("details"))
    lines += _replay_cdf_lines(out_dir, rows, rec_of)
    lines += list(_REPLAY_ASSUMPTION_LINES)
    return lines


def _run_set(
    title: str, exps: list[str], st: dict, w: pl.DataFrame, rec_of: dict, blis: dict
) -> tuple[list[str], list[list]]:
    """A run set's table (the recommended model, the physics and BLIS 4a per run) and its mean-absolute-error rows."""
    hdr = [
        "run",
        "role",
        "model (sample)",
        "TTFT",
        "E2E",
        "p99 E2E",
        "successes",
        "phys TTFT",
        "phys E2E",
        "BLIS4a TTFT",
        "BLIS4a E2E",
        "BLIS4a p99 E2E",
    ]
    body, acc = [], {"rec": ([], [], []), "phys": ([], [], []), "blis": ([], [], [])}
    for e in exps:
        m = rec_of.get(e)
        r = w.filter((pl.col("experiment_id") == e) & (pl.col("step_model") == m)).to_dicts() if m else []
        p = w.filter((pl.col("experiment_id") == e) & (pl.col("step_model") == "physics")).to_dicts()
        r, p, b = (r[0] if r else {}), (p[0] if p else {}), blis.get(e, {})  # BLIS 4a replayed the real runs only
        body.append(
            [
                e,
                st[e]["role"] or "–",
                f"{m} ({'in' if r.get('sample') == 'in_sample' else 'out'})" if m else "none out of sample",
                _pct(r.get("ttft_mean_err")),
                _pct(r.get("e2e_mean_err")),
                _pct(r.get("e2e_p99_err")),
                _pct(r.get("successes_err")),
                _pct(p.get("ttft_mean_err")),
                _pct(p.get("e2e_mean_err")),
                _pct(b.get("ttft_mean_err_pct")),
                _pct(b.get("e2e_mean_err_pct")),
                _pct(b.get("e2e_p99_err_pct")),
            ]
        )
        for k, d in (("rec", r), ("phys", p)):
            acc[k][0].append(d.get("ttft_mean_err"))
            acc[k][1].append(d.get("e2e_mean_err"))
            acc[k][2].append(d.get("e2e_p99_err"))
        acc["blis"][0].append(b.get("ttft_mean_err_pct"))
        acc["blis"][1].append(b.get("e2e_mean_err_pct"))
        acc["blis"][2].append(b.get("e2e_p99_err_pct"))
    summary = []
    for k, label in (
        ("rec", "recommended (out of sample)"),
        ("phys", "physics (in sample)"),
        ("blis", "BLIS 4a (mostly in sample)"),
    ):
        t, e2, p99 = (_mean_abs(v) for v in acc[k])
        n = sum(1 for x in acc[k][1] if x is not None)
        summary.append([title, label, n, _f(t), _f(e2), _f(p99)])
    return [f"### {title.capitalize()}", "", _md(hdr, body), ""], summary


def _simulator_builder_lines(per_llm: pl.DataFrame | None) -> list[str]:
    if per_llm is None or not per_llm.height:
        return [
            "**For a simulator builder:** no step model was replayed out of sample on a scored non-saturated run, so none "
            "is recommended from this data.",
            "",
        ]
    return [
        "**For a simulator builder** (a run the model has not seen): per LLM model, the step model with the lowest "
        "mean of the absolute E2E and TTFT errors over its out-of-sample replays of non-saturated runs. That figure chose "
        "the model, so it is optimistic as an estimate for a new run (the winner of several candidates on the same "
        "runs); the out-of-sample estimate of choosing this way is the recommended rows of the tables above, each "
        "chosen without its run's ground truth.",
        "",
        _md(
            ["LLM model", "step model", "out-of-sample runs", "mean of abs. E2E and TTFT errors %"],
            [
                [r["llm_model"], r["step_model"], r["runs"], _f(r["mean_abs_err_pct"])]
                for r in per_llm.iter_rows(named=True)
            ],
        ),
        "",
    ]


def _per_request_lines(det: pl.DataFrame | None) -> list[str]:
    """Median per-request APE per step model and replay speed (simulated seconds per wall second)."""
    if det is None or not det.height or "e2e_median_ape_pct" not in det.columns:
        return []
    agg = (
        det.group_by("step_model")
        .agg(
            pl.col("e2e_median_ape_pct").median().alias("e2e"),
            pl.col("ttft_median_ape_pct").median().alias("ttft"),
            pl.col("real_time_ratio").median().alias("speed"),
            pl.len().alias("runs"),
        )
        .sort("step_model")
    )
    return [
        "Per-request error (median over runs of each run's median APE, requests that succeeded on both sides) "
        "and replay speed (simulated seconds per wall second):",
        "",
        _md(
            ["step model", "runs", "E2E median APE %", "TTFT median APE %", "× real time"],
            [
                [r["step_model"], r["runs"], _f(r["e2e"]), _f(r["ttft"]), _f(r["speed"], 0)]
                for r in agg.iter_rows(named=True)
            ],
        ),
        "",
    ]


def _f(x, nd: int = 1) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _md(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def plot_replay_cdfs(out_dir: Path, rows: pl.DataFrame, rec_of: dict[str, str], metric: str = "e2e") -> Path | None:
    """One panel per scored run: empirical CDFs of E2E (or TTFT), observed vs recommended vs physics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    exps = sorted(set(rows.filter(pl.col("observed").is_not_null())["experiment_id"]))
    if not exps:
        return None
    n = len(exps)
    cols = 4 if n > 4 else n
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.4 * nrows), squeeze=False)
    for ax, e in zip(axes.flat, exps):
        folder = Path(out_dir) / "replay" / e
        drawn = False
        for name, style in (
            (rec_of.get(e), dict(color="tab:blue", lw=1.2)),
            ("physics", dict(color="grey", ls="--", lw=1.0)),
        ):
            p = folder / f"{name}.parquet" if name else None
            if p is None or not p.is_file():
                continue
            t = pl.read_parquet(p)
            if not drawn:
                ob = (
                    t.filter(~pl.col("observed_has_error").fill_null(True))[f"observed_{metric}_s"]
                    .drop_nulls()
                    .sort()
                    .to_numpy()
                )
                if ob.size:
                    ax.plot(ob, np.arange(1, ob.size + 1) / ob.size, color="black", lw=1.2, label="observed")
                drawn = True
            pr = t.filter(pl.col("success"))[f"{metric}_s"].drop_nulls().sort().to_numpy()
            if pr.size:
                ax.plot(pr, np.arange(1, pr.size + 1) / pr.size, label=name, **style)
        ax.set_title(e.split("-", 2)[-1][:34], fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_xlabel(f"{metric.upper()} (s)", fontsize=6)
        if metric == "ttft":
            ax.set_xscale("log")
        ax.legend(fontsize=5, loc="lower right")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.08, top=0.93, wspace=0.3, hspace=0.6)
    path = Path(out_dir) / f"replay_{metric}_cdf.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def replay_summary(fid: dict) -> list[str]:
    """The request-level answer for the report's first screen: per step model, mean absolute errors of its replays
    (out-of-sample rows, plus the in-sample physics) on the non-saturated and the saturated scored runs."""
    rows, runs = fid.get("replay"), fid.get("runs")
    if rows is None or rows.height == 0 or runs is None or runs.height == 0:
        return []
    w = wide_rows(rows)
    st = {r["experiment_id"]: r for r in runs.iter_rows(named=True)}
    table = []
    for m in sorted(set(w["step_model"])):
        sub = w.filter(pl.col("step_model") == m)
        samples = set(sub["sample"])
        use = sub if m == "physics" else sub.filter(pl.col("sample") == "out_of_sample")
        cells = []
        for sat in (False, True):
            part = [
                r
                for r in use.iter_rows(named=True)
                if st.get(r["experiment_id"], {}).get("scored") and bool(st[r["experiment_id"]].get("saturated")) == sat
            ]
            cells += [
                len(part),
                _f(_mean_abs(r.get("ttft_mean_err") for r in part)),
                _f(_mean_abs(r.get("e2e_mean_err") for r in part)),
            ]
            if sat:
                cells.append(_f(_mean_abs(r.get("successes_err") for r in part)))
        label = f"{m} ({'in sample' if m == 'physics' or samples == {'in_sample'} else 'out of sample'})"
        if m != "physics" and cells[0] == 0 and cells[3] == 0:
            continue
        table.append([label, *cells])
    n_runs, n_scored = len(st), sum(1 for r in st.values() if r.get("scored"))
    per_llm = fid.get("recommended_per_llm")
    rec = (
        ", ".join(
            f"{r['llm_model']}: `{r['step_model']}` ({_f(r['mean_abs_err_pct'])} %)"
            for r in per_llm.iter_rows(named=True)
        )
        if per_llm is not None and per_llm.height
        else "none (no step model was replayed out of sample on a scored non-saturated run)"
    )
    return [
        "**Request level** (*Replaying the real runs*): "
        f"{n_runs} run(s) replayed request by request through StepML's simulator, {n_scored} with ground truth. "
        "Mean absolute error (%) of the replayed latencies per step model (out-of-sample replays; the physics is "
        "in sample):",
        "",
        _md(["step model", "non-saturated runs", "TTFT", "E2E", "saturated runs", "TTFT", "E2E", "successes"], table),
        "",
        *(
            [
                "Errors above 1,000 % come from replays in which the model overloads the engine (a queue the run never "
                "had): models extrapolating far outside the load they were fitted on (log-target models do so "
                "exponentially) or carried over from other LLM models (`requests_lomo`).",
                "",
            ]
            if any(_big(c) for r in table for c in r[1:])
            else []
        ),
        f"For a run a model has not seen, per LLM model: {rec} (each figure is the error on the runs that chose "
        "the model, so optimistic; the per-run recommended rows are the out-of-sample estimate).",
        "",
    ]


def _big(cell) -> bool:
    try:
        return float(cell) > 1000
    except (TypeError, ValueError):
        return False


def requests_only_report(fid: dict, replay_lines: list[str], out_dir: Path) -> str:
    """report.md for a study whose runs have request logs but no step traces (no H1 study possible)."""
    src = sorted(set(fid["replay"]["source"])) if fid.get("replay") is not None and fid["replay"].height else []
    lines = [
        "# StepML study report: replay of request logs",
        "",
        "## Summary",
        "",
        f"Data: {', '.join(src) or 'none'} runs with request logs only — no step traces, so no per-step models and "
        "no H1 verdict; the step-time models here are the synthesizer's physics and any request-calibrated ones.",
        "",
        *replay_summary(fid),
        *replay_lines,
    ]
    md = "\n".join(lines) + "\n"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".report.md.tmp"
    tmp.write_text(md)
    os.replace(tmp, out_dir / "report.md")
    return md
