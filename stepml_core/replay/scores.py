"""Replay scores over all runs: replay.csv, the recommended step model, BLIS 4a beside (the report section that
renders them: stepml_core.replay.scores_text).

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


def wide_rows(rows: pl.DataFrame) -> pl.DataFrame:
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
    w = wide_rows(rows)
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
    w = wide_rows(rows).filter(pl.col("experiment_id").is_in(sorted(calm)) & (pl.col("sample") == "out_of_sample"))
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
