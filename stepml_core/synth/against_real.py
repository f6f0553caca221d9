"""Calibration of synthetic runs against the real runs they stand for.

* :func:`compare_runs` — per synthetic run, the public figures of data/reference/runs.csv
  against the run's own inference-perf summary and provenance counts: mean TTFT, mean E2E,
  per-token decode interval ((E2E − TTFT)/(nominal output − 1), not the per-SSE TPOT),
  throughput, successes, sampled steps; ratios synthetic/real (counts compared per unit of
  scale). Aims: every non-saturated run within 15 % on TTFT, E2E and decode interval; the
  saturated (reasoning) runs within 25 % on successes.
* :func:`compare_step_quantiles` — quantiles of batch attributes, ``step.duration_us`` and
  the engine cycle time (``ts_start`` of step id+1 minus step id, where both are sampled)
  between a synthetic step table and a real one (e.g. the runs in ../shared/real).

Pure functions on metadata and tables; nothing here reads ../shared by itself.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import polars as pl

from stepml_core.paths import REFERENCE_DIR
from stepml_core.runs.folders import RunMetadata, read_run_metadata
from stepml_core.runs.rules import is_saturated as rules_saturated

TOL_LATENCY = 0.15
TOL_SATURATED_SUCCESSES = 0.25

STEP_COLUMNS = (
    "queue.running_depth",
    "queue.waiting_depth",
    "batch.num_prefill_reqs",
    "batch.num_decode_reqs",
    "batch.scheduled_tokens",
    "batch.prefill_tokens",
    "batch.decode_tokens",
    "batch.num_finished",
    "batch.num_preempted",
    "kv.usage_gpu_ratio",
    "kv.blocks_free_gpu",
    "step.duration_us",
)
DEFAULT_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def load_reference(runs_csv: Path | None = None) -> dict[str, dict]:
    with open(runs_csv or REFERENCE_DIR / "runs.csv", newline="") as f:
        return {r["experiment_id"]: r for r in csv.DictReader(f)}


def is_saturated(ref: dict) -> bool:
    """A real run's public figures (failures, mean TTFT) judged by stepml_core.runs.rules.is_saturated."""
    ttft = ref.get("ttft_mean_s")
    return rules_saturated(int(ref.get("num_failed") or 0), float(ttft) if ttft not in (None, "") else None)


def _summary_figures(summary: dict, output_len: int) -> dict:
    s = summary.get("successes") or {}
    lat = s.get("latency") or {}
    ttft = (lat.get("time_to_first_token") or {}).get("mean")
    e2e = (lat.get("request_latency") or {}).get("mean")
    thr = s.get("throughput") or {}
    di = (e2e - ttft) / (output_len - 1) * 1e3 if (ttft is not None and e2e is not None and output_len > 1) else None
    return {
        "ttft_mean_s": ttft,
        "e2e_mean_s": e2e,
        "decode_interval_ms": di,
        "throughput_requests_per_s": thr.get("requests_per_sec"),
        "throughput_output_tokens_per_s": thr.get("output_tokens_per_sec"),
        "successes": s.get("count"),
        "failures": (summary.get("failures") or {}).get("count"),
    }


def _reference(reference) -> dict[str, dict]:
    if reference is None or isinstance(reference, (str, Path)):
        return load_reference(Path(reference) if reference is not None else None)
    return reference


def compare_run(meta: RunMetadata | Path, reference: dict[str, dict] | Path | None = None) -> list[dict]:
    """Rows (one per metric) comparing a synthetic run with the real run it stands for.

    ``meta``: the run's RunMetadata (or its folder); ``reference``: data/reference/runs.csv (default),
    another runs.csv path, or its rows as returned by :func:`load_reference`.
    """
    if not isinstance(meta, RunMetadata):
        meta = read_run_metadata(Path(meta))
    reference = _reference(reference)
    real_id = meta.stands_for or meta.experiment_id.removesuffix("-synth")
    ref = reference.get(real_id)
    if ref is None:
        raise KeyError(f"{meta.experiment_id}: stands for {real_id!r}, which is not in the reference runs")
    if meta.summary is None:
        raise ValueError(f"{meta.folder}: no results/summary_lifecycle_metrics.json")
    prov = meta.provenance or {}
    scale = float(prov.get("scale") or 1.0)
    out_len = int(ref["output_len"])
    syn = _summary_figures(meta.summary, out_len)
    syn["sampled_steps"] = (prov.get("counts") or {}).get("sampled_steps")
    sat = is_saturated(ref)
    real = {
        "ttft_mean_s": float(ref["ttft_mean_s"]),
        "e2e_mean_s": float(ref["e2e_mean_s"]),
        "decode_interval_ms": float(ref["derived_decode_interval_per_token_ms"]),
        "throughput_requests_per_s": float(ref["throughput_requests_per_s"]),
        "throughput_output_tokens_per_s": float(ref["throughput_output_tokens_per_s"]),
        "successes": float(ref["num_success"]),
        "failures": float(ref["num_failed"]),
        "sampled_steps": float(ref["num_sampled_steps"]),
    }
    rows = []
    for m in (
        "ttft_mean_s",
        "e2e_mean_s",
        "decode_interval_ms",
        "throughput_requests_per_s",
        "throughput_output_tokens_per_s",
        "successes",
        "failures",
        "sampled_steps",
    ):
        s_val = syn.get(m)
        r_val = real[m]
        per_scale = m in ("successes", "failures", "sampled_steps")
        r_cmp = r_val * scale if per_scale else r_val
        ratio = (float(s_val) / r_cmp) if (s_val is not None and r_cmp) else None
        tol = None
        if not sat and m in ("ttft_mean_s", "e2e_mean_s", "decode_interval_ms"):
            tol = TOL_LATENCY
        if sat and m == "successes":
            tol = TOL_SATURATED_SUCCESSES
        ok = None if tol is None or ratio is None else bool(abs(ratio - 1.0) <= tol)
        rows.append(
            {
                "experiment_id": meta.experiment_id,
                "stands_for": real_id,
                "workload": ref["workload"],
                "model": ref["model_short"],
                "saturated": sat,
                "scale": scale,
                "metric": m,
                "synthetic": None if s_val is None else float(s_val),
                "real": r_cmp,
                "ratio": ratio,
                "tolerance": tol,
                "within": ok,
            }
        )
    return rows


def compare_runs(metas, reference: dict[str, dict] | Path | None = None) -> pl.DataFrame:
    """Long table (run × metric) for several synthetic runs (RunMetadata objects or folders).

    Columns: experiment_id, stands_for, workload, model, saturated, scale, metric, synthetic,
    real, ratio (synthetic/real), tolerance (the aim, where one applies), within.
    """
    reference = _reference(reference)
    rows = [r for m in metas for r in compare_run(m, reference)]
    schema = {
        "experiment_id": pl.Utf8,
        "stands_for": pl.Utf8,
        "workload": pl.Utf8,
        "model": pl.Utf8,
        "saturated": pl.Boolean,
        "scale": pl.Float64,
        "metric": pl.Utf8,
        "synthetic": pl.Float64,
        "real": pl.Float64,
        "ratio": pl.Float64,
        "tolerance": pl.Float64,
        "within": pl.Boolean,
    }
    return pl.DataFrame(rows, schema=schema)


def ratio_table(long: pl.DataFrame) -> pl.DataFrame:
    """Wide view: one row per run, one ratio column per metric."""
    return long.pivot(on="metric", index=["stands_for", "model", "workload", "saturated", "scale"], values="ratio")


# ---------------------------------------------------------------------------- step tables
def cycle_times_ms(steps: pl.DataFrame) -> np.ndarray:
    """Engine cycle times (ms): ts_start of step id+1 minus step id, where both are in the table."""
    if steps.height == 0:
        return np.zeros(0)
    s = steps.select("step.id", "step.ts_start_ns").drop_nulls().unique("step.id").sort("step.id")
    ids = s["step.id"].to_numpy()
    ts = s["step.ts_start_ns"].to_numpy()
    m = np.diff(ids) == 1
    return (np.diff(ts)[m] / 1e6).astype(np.float64)


def compare_step_quantiles(
    synth_steps: pl.DataFrame, real_steps: pl.DataFrame, *, quantiles=DEFAULT_QUANTILES, columns=STEP_COLUMNS
) -> pl.DataFrame:
    """Quantiles of step attributes, step.duration_us and cycle time: synthetic vs real."""
    rows = []

    def add(metric, a: np.ndarray, b: np.ndarray):
        a = a[np.isfinite(a)] if a.size else a
        b = b[np.isfinite(b)] if b.size else b
        for q in quantiles:
            sv = float(np.quantile(a, q)) if a.size else None
            rv = float(np.quantile(b, q)) if b.size else None
            rows.append(
                {
                    "metric": metric,
                    "quantile": float(q),
                    "synthetic": sv,
                    "real": rv,
                    "ratio": (sv / rv) if (sv is not None and rv) else None,
                    "n_synthetic": int(a.size),
                    "n_real": int(b.size),
                }
            )

    for c in columns:
        if c in synth_steps.columns and c in real_steps.columns:
            add(
                c,
                synth_steps[c].drop_nulls().cast(pl.Float64).to_numpy(),
                real_steps[c].drop_nulls().cast(pl.Float64).to_numpy(),
            )
    add("cycle_time_ms", cycle_times_ms(synth_steps), cycle_times_ms(real_steps))
    return pl.DataFrame(
        rows,
        schema={
            "metric": pl.Utf8,
            "quantile": pl.Float64,
            "synthetic": pl.Float64,
            "real": pl.Float64,
            "ratio": pl.Float64,
            "n_synthetic": pl.Int64,
            "n_real": pl.Int64,
        },
    )


def synthetic_vs_real_tables(
    run_records: list[dict],
    step_tables: dict[str, pl.DataFrame],
    data_root: Path,
    real_reference_dir: Path | None = None,
) -> dict[str, pl.DataFrame]:
    """Calibration of every synthetic run in a study.

    public: compare_run() for each synthetic run (its own inference-perf summary vs runs.csv).
    steps: compare_step_quantiles() where the real run's step table is available — as a real
    partition of the same study, or as a run folder under real_reference_dir (e.g. shared/real).
    """
    from stepml_core.runs.folders import find_trace_file
    from stepml_core.tables.steps import add_targets, validate_steps
    from stepml_core.traces import read_traces

    reference = load_reference()
    synth = [r for r in run_records if r.get("source") == "synthetic"]
    metas = []
    for r in synth:  # a run whose summary is missing or was left out as malformed has nothing to compare
        try:
            m = read_run_metadata(Path(data_root) / r["experiment_id"])
        except (OSError, ValueError):
            continue
        if m.summary is not None:
            metas.append(m)
    public = compare_runs(metas, reference)
    real_tables = {
        r["experiment_id"]: step_tables[r["experiment_id"]]
        for r in run_records
        if r.get("source") == "real" and r["experiment_id"] in step_tables
    }
    parts = []
    for r in synth:
        real_id = r.get("stands_for") or r["experiment_id"].removesuffix("-synth")
        real = real_tables.get(real_id)
        if real is None and real_reference_dir is not None:
            tf = (
                find_trace_file(Path(real_reference_dir) / real_id)
                if (Path(real_reference_dir) / real_id).is_dir()
                else None
            )
            if tf is not None:
                real = add_targets(validate_steps(read_traces(tf).steps, str(tf)).kept)
        if real is None or r["experiment_id"] not in step_tables:
            continue
        q = compare_step_quantiles(step_tables[r["experiment_id"]], real)
        parts.append(q.with_columns(experiment_id=pl.lit(r["experiment_id"]), real_run=pl.lit(real_id)))
    steps = (
        pl.concat(parts)
        if parts
        else pl.DataFrame(
            schema={
                "metric": pl.Utf8,
                "quantile": pl.Float64,
                "synthetic": pl.Float64,
                "real": pl.Float64,
                "ratio": pl.Float64,
                "n_synthetic": pl.Int64,
                "n_real": pl.Int64,
                "experiment_id": pl.Utf8,
                "real_run": pl.Utf8,
            }
        )
    )
    return {"public": public, "steps": steps}
