"""Replay scores over all runs: replay.csv, the recommended step model, BLIS 4a beside, the report section.

Recommendation rule (nested: per run X, no fit, score or setting that X's ground truth reached): among
the step models whose replay of X is out of sample, the one with the lowest mean of (|E2E mean error| +
|TTFT mean error|)/2 over its *out-of-sample* replays of the other scored non-saturated runs, counting only
replays whose model could not have used X's request log had X ground truth (:func:`could_use_run`: the
calibration protocols' fold rule — run roles: X is a train run of that LLM model; leave one workload out:
X is of that LLM model and another workload; leave one model out: X is of another LLM model — and, for
any model, X or its synthetic twin among the runs it was fitted on). Runs of every LLM model count, so a
recipe is judged by how it generalizes. Ties: more scores, then the name. No candidate with such a score:
the first candidate in :data:`FALLBACK_ORDER` (a rule fixed in advance). A run is *saturated* as
stepml_core.runs.rules.is_saturated defines it (its clients saw failures, or its mean TTFT is above 5 s).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import polars as pl

from stepml_core.calibration.protocols import PROTOCOL_OF, not_recommendable
from stepml_core.paths import REFERENCE_DIR
from stepml_core.replay.intervals import could_use, widen_intervals
from stepml_core.replay.specs import INTERVAL_COLUMNS, REPLAY_COLUMNS
from stepml_core.runs.rules import is_saturated

BLIS_FILE = REFERENCE_DIR / "blis_iter4a_replay.csv"
# when no candidate has a score that X's ground truth could not have reached: calibrated on the LLM model's own
# other workloads first (the most data of that model that never saw X), then the run roles, the architecture transfer
FALLBACK_ORDER = ("requests_lowo", "requests_roles", "requests_lomo")


def load_blis4a() -> pl.DataFrame:
    return pl.read_csv(BLIS_FILE) if BLIS_FILE.is_file() else pl.DataFrame()


def _wide(rows: pl.DataFrame) -> pl.DataFrame:
    """One row per run × step model with `<metric>` (predicted), `<metric>_obs`, `<metric>_err` columns."""
    keys = ["experiment_id", "source", "role", "step_model", "fitted_on", "sample"]
    p = rows.pivot(on="metric", index=keys, values="predicted")
    o = rows.pivot(on="metric", index=keys, values="observed")
    e = rows.pivot(on="metric", index=keys, values="rel_err_pct")
    o = o.rename({c: f"{c}_obs" for c in o.columns if c not in keys})
    e = e.rename({c: f"{c}_err" for c in e.columns if c not in keys})
    return p.join(o, on=keys).join(e, on=keys)


def run_status(rows: pl.DataFrame, requests: dict[str, int]) -> pl.DataFrame:
    """Per run: scored (ground truth present), saturated (stepml_core.runs.rules.is_saturated of the observed failures =
    requests − successes, and the observed mean TTFT)."""
    obs = (
        rows.filter(pl.col("metric").is_in(["successes", "ttft_mean"]))
        .group_by("experiment_id", "metric")
        .agg(pl.col("observed").first())
        .pivot(on="metric", index="experiment_id", values="observed")
    )
    out = []
    for r in obs.iter_rows(named=True):
        scored = r.get("successes") is not None
        n = requests.get(r["experiment_id"], 0)
        sat = scored and is_saturated(max(0, n - int(r["successes"])), r.get("ttft_mean"))
        out.append({"experiment_id": r["experiment_id"], "scored": scored, "saturated": bool(sat)})
    return pl.DataFrame(out, schema={"experiment_id": pl.Utf8, "scored": pl.Boolean, "saturated": pl.Boolean})


def could_use_run(step_model: str, fitted_on: set[str], replayed: dict, x: str, runs: dict) -> bool:
    """Could the model behind `step_model`'s replay of another run have used run `x`'s request log, had `x` ground
    truth? `replayed`: that run's ``runs`` entry ({llm_model, workload, role, stands_for}); `fitted_on`: its row's.
    True when x or its synthetic twin is among `fitted_on` (or the real runs they stand for), or the calibration
    protocol's fold rule (stepml_core.replay.intervals.could_use) puts x among its calibration runs."""
    other = runs.get(x) or {}
    ours = {x, other.get("stands_for")} | {e for e, r in runs.items() if r.get("stands_for") == x}
    data = set(fitted_on) | {(runs.get(f) or {}).get("stands_for") for f in fitted_on}
    if (ours - {None}) & (data - {None}):
        return True
    p = PROTOCOL_OF.get(step_model)
    if p is None:
        return False
    arr = lambda k, r: np.array([str(r.get(k) or "")])  # noqa: E731
    u = could_use(
        p,
        arr("llm_model", replayed),
        arr("workload", replayed),
        arr("llm_model", other),
        arr("workload", other),
        arr("role", other),
    )
    return bool(u[0, 0])


def _scores(w: pl.DataFrame, calm: set[str]) -> list[tuple[str, str, set[str], float]]:
    """(run, step model, fitted_on, (|E2E mean err| + |TTFT mean err|)/2) of the out-of-sample rows on calm runs."""
    out = []
    for r in w.filter(pl.col("sample") == "out_of_sample").iter_rows(named=True):
        if r["experiment_id"] in calm and r.get("e2e_mean_err") is not None and r.get("ttft_mean_err") is not None:
            s = (abs(r["e2e_mean_err"]) + abs(r["ttft_mean_err"])) / 2
            out.append((r["experiment_id"], r["step_model"], set((r["fitted_on"] or "").split(";")) - {""}, s))
    return out


def candidate_scores(rows: pl.DataFrame, runs: dict[str, dict], status: pl.DataFrame) -> pl.DataFrame:
    """Per run X and out-of-sample candidate m: score = mean (|E2E mean err| + |TTFT mean err|)/2 over m's
    out-of-sample replays of the other calm scored runs whose model could not have used X (could_use_run), and
    score_runs = how many (0: no such replay, score null). ``runs[e]`` = {llm_model, workload, role, stands_for}."""
    schema = {"experiment_id": pl.Utf8, "step_model": pl.Utf8, "score": pl.Float64, "score_runs": pl.Int64}
    if rows.height == 0:
        return pl.DataFrame(schema=schema)
    w = _wide(rows)
    calm = {r["experiment_id"] for r in status.iter_rows(named=True) if r["scored"] and not r["saturated"]}
    scores = _scores(w, calm)
    cands = (
        w.filter((pl.col("sample") == "out_of_sample") & ~pl.col("step_model").is_in(sorted(not_recommendable())))
        .select("experiment_id", "step_model")
        .unique()
    )
    out = []
    for x, m in sorted(cands.iter_rows()):
        vals = [
            s
            for y, mm, fitted, s in scores
            if mm == m and y != x and not could_use_run(m, fitted, runs.get(y) or {}, x, runs)
        ]
        out.append(
            {
                "experiment_id": x,
                "step_model": m,
                "score": float(np.mean(vals)) if vals else None,
                "score_runs": len(vals),
            }
        )
    return pl.DataFrame(out, schema=schema)


def recommend(rows: pl.DataFrame, runs: dict[str, dict], status: pl.DataFrame) -> pl.DataFrame:
    """(experiment_id, step_model, score_runs) marked recommended (see module docstring): the candidate of least
    score (ties: more score_runs, then the name), else the first candidate in FALLBACK_ORDER (score_runs 0)."""
    schema = {"experiment_id": pl.Utf8, "step_model": pl.Utf8, "score_runs": pl.Int64}
    cs = candidate_scores(rows, runs, status)
    out = []
    for x in sorted(set(cs["experiment_id"])):
        c = cs.filter(pl.col("experiment_id") == x)
        scored = sorted(
            (r["score"], -r["score_runs"], r["step_model"]) for r in c.iter_rows(named=True) if r["score_runs"]
        )
        if scored:
            out.append({"experiment_id": x, "step_model": scored[0][2], "score_runs": -scored[0][1]})
        elif fixed := [m for m in FALLBACK_ORDER if m in set(c["step_model"])]:
            out.append({"experiment_id": x, "step_model": fixed[0], "score_runs": 0})
    return pl.DataFrame(out, schema=schema)


def recommend_per_llm(rows: pl.DataFrame, llm_of: dict[str, str], status: pl.DataFrame) -> pl.DataFrame:
    """Per LLM model, the step model to give a simulator builder for a run it has not seen: the lowest mean of
    (|E2E mean error| + |TTFT mean error|)/2 over its *out-of-sample* rows on non-saturated scored runs."""
    schema = {"llm_model": pl.Utf8, "step_model": pl.Utf8, "runs": pl.Int64, "mean_abs_err_pct": pl.Float64}
    if rows.height == 0:
        return pl.DataFrame(schema=schema)
    calm = {r["experiment_id"] for r in status.iter_rows(named=True) if r["scored"] and not r["saturated"]}
    w = _wide(rows).filter(pl.col("experiment_id").is_in(sorted(calm)) & (pl.col("sample") == "out_of_sample"))
    acc: dict[tuple[str, str], list[float]] = {}
    for r in w.iter_rows(named=True):
        if r.get("e2e_mean_err") is None or r.get("ttft_mean_err") is None:
            continue
        if r["step_model"] in not_recommendable():
            continue
        acc.setdefault((llm_of.get(r["experiment_id"]), r["step_model"]), []).append(
            (abs(r["e2e_mean_err"]) + abs(r["ttft_mean_err"])) / 2
        )
    best: dict[str, tuple] = {}
    for (llm, m), v in sorted(acc.items()):
        cand = (float(np.mean(v)), -len(v), m)
        if llm not in best or cand < best[llm][0]:
            best[llm] = (cand, len(v))
    return pl.DataFrame(
        [
            {"llm_model": llm, "step_model": c[2], "runs": n, "mean_abs_err_pct": c[0]}
            for llm, (c, n) in sorted(best.items())
        ],
        schema=schema,
    )


def _scored_requests(replay: dict) -> int:
    """Requests scored: those with ground truth (request_log's truth_used), else all replayed (older stored values)."""
    used = (replay.get("truth") or {}).get("truth_used")
    return int(used if used is not None else replay.get("requests") or 0)


def _workload(experiment_id: str) -> str:
    from stepml_core.runs.folders import RunIdError, parse_run_id

    try:
        return parse_run_id(experiment_id).workload
    except RunIdError:
        return ""


def run_facts(replays: dict[str, dict]) -> dict[str, dict]:
    """Per replayed run what a rule may read without ground truth: LLM model, workload, role, stands_for."""
    return {
        e: {
            "llm_model": r.get("model"),
            "workload": _workload(e),
            "role": r.get("role") or "",
            "stands_for": r.get("stands_for"),
        }
        for e, r in replays.items()
    }


def replay_fidelity_tables(replays: dict[str, dict], headers: dict[str, dict], out_dir: Path) -> dict:
    """replay.csv (+ `recommended`) under out_dir; tables for the report and the replay_fidelity asset."""
    parts = [r["rows"] for r in replays.values() if r["rows"].height]
    rows = pl.concat(parts) if parts else pl.DataFrame(schema=REPLAY_COLUMNS)
    llm_of = {e: r.get("model") for e, r in replays.items()}
    status = run_status(rows, {e: _scored_requests(r) for e, r in replays.items()})
    facts = run_facts(replays)
    rec = recommend(rows, facts, status).drop("score_runs").with_columns(recommended=pl.lit(True))
    rows = rows.join(rec, on=["experiment_id", "step_model"], how="left").with_columns(
        pl.col("recommended").fill_null(False)
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "replay.csv"
    tmp = out_dir / ".replay.csv.tmp"
    rows.write_csv(tmp)
    os.replace(tmp, path)
    ivs = [iv for r in replays.values() if (iv := r.get("intervals")) is not None and iv.height]
    intervals = widen_intervals(
        pl.concat(ivs) if ivs else pl.DataFrame(schema=INTERVAL_COLUMNS),
        {e: {"llm_model": r.get("model"), "workload": _workload(e)} for e, r in replays.items()},
    )
    tmp = out_dir / ".replay_intervals.csv.tmp"
    intervals.write_csv(tmp)
    os.replace(tmp, out_dir / "replay_intervals.csv")
    det = [r["details"].with_columns(experiment_id=pl.lit(e)) for e, r in replays.items() if r["details"].height]
    runs = pl.DataFrame(
        [
            {
                "experiment_id": e,
                "llm_model": r.get("model"),
                "role": r.get("role") or "",
                "requests": int(r.get("requests") or 0),
                "ground_truth": bool(r.get("has_ground_truth")),
                "scored_requests": _scored_requests(r) if r.get("has_ground_truth") else 0,
            }
            for e, r in sorted(replays.items())
        ]
    )
    if runs.height:
        runs = runs.join(status, on="experiment_id", how="left")
    return {
        "replay": rows,
        "details": pl.concat(det, how="diagonal_relaxed") if det else pl.DataFrame(),
        "runs": runs,
        "blis4a": load_blis4a(),
        "replay_csv": path,
        "recommended_per_llm": recommend_per_llm(rows, llm_of, status),
        "candidate_scores": candidate_scores(rows, facts, status),
        "intervals": intervals,
    }


# ---------------------------------------------------------------------------- report section


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
    w = _wide(rows)
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
    w = _wide(rows)
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
