"""The step-time models a replay can use, as plain JSON specs, and replaying one run with them.

A spec is ``{"name", "kind", "llm_model", "fitted_on": [run ids], "basis", ...}`` with ``kind``:

* ``physics`` — the synthesizer's engine physics: efficiencies tuned on the 16 reference runs' per-stage
  TPOT, API terms on their per-stage TTFT, and a schedule() model with per-run parameters fitted to each
  run's own test-split schedule() times — in sample for each of them;
* ``stepml_export`` — a StepML ``cycle_us`` model fitted on one traced run's steps (per-experiment
  fit, ``stepml_core.stepmodels.json_export`` JSON through the reference predictor), for runs of the same LLM model;
* ``blis_linear`` — a BLIS StepML model file (e.g. ``blackbox_2f`` un-standardized to
  β0 + β1·prefill_tokens + β2·decode_tokens, the BLIS blackbox form), evaluated as BLIS does;
* request-calibrated models (``stepml_core.calibration.fit``) are ``blis_linear`` specs too.

``sample`` of a replay row is ``in_sample`` when the scored run's data built the model: the run is among
``fitted_on`` (its steps, its requests or its aggregates), or among the real runs the synthetic runs in
``fitted_on`` stand for (``stands_for``: a synthetic twin is built from its real run's aggregates), or the
scored run is a synthetic twin of a run the model was fitted on; else ``out_of_sample``.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from stepml_core.replay.simulate import (
    PhysicsServingModel,
    ReplayWorkload,
    RunContext,
    StepServingModel,
    replay,
    replay_workload,
    score_replay,
)
from stepml_core.sim.step_models import ExportedStepTime, LinearStepTime

REPLAY_STEP_MODELS = ("naive_mean", "blackbox_2f", "ridge_30f", "ridge_log_30f", "nnls_physics", "hgb_30f")
# models fitted on synthetic steps that are replayed by default: the BLIS blackbox form and the H1 model (a replay of a
# full-size run costs 3-5 CPU-s with a linear model, 6-9 with the 30-feature exports; every model fitted on *real* steps
# is replayed)
SYNTHETIC_REPLAY_STEP_MODELS = ("blackbox_2f", "ridge_30f")
PHYSICS_BASIS = (
    "the 16 reference runs: per-stage TPOT/TTFT aggregates (data/synth/engine_params.json) and each run's own "
    "test-split schedule() times (data/synth/schedule_time_model.json)"
)
INTERVAL_COLUMNS = {
    "experiment_id": pl.Utf8,
    "role": pl.Utf8,
    "step_model": pl.Utf8,
    "protocol": pl.Utf8,
    "fitted_on": pl.Utf8,
    "metric": pl.Utf8,
    "predicted": pl.Float64,
    "lo": pl.Float64,
    "hi": pl.Float64,
    "observed": pl.Float64,
    "inside": pl.Boolean,
    "brun_lo": pl.Float64,
    "brun_hi": pl.Float64,
    "brun_inside": pl.Boolean,
    "brun_step_pct": pl.Float64,
    "brun_runs": pl.Int64,
}
REPLAY_COLUMNS = {
    "experiment_id": pl.Utf8,
    "source": pl.Utf8,
    "role": pl.Utf8,
    "step_model": pl.Utf8,
    "fitted_on": pl.Utf8,
    "sample": pl.Utf8,
    "metric": pl.Utf8,
    "predicted": pl.Float64,
    "observed": pl.Float64,
    "rel_err_pct": pl.Float64,
}


def physics_spec() -> dict:
    from stepml_core.synth.spec import reference_runs

    return {
        "name": "physics",
        "kind": "physics",
        "llm_model": None,
        "fitted_on": sorted(reference_runs()),
        "basis": PHYSICS_BASIS,
    }


def blis_doc_from_linear(m: dict) -> dict:
    """A standardized linear fit (intercept, coef, mean, scale over BLIS feature names) → BLIS model file."""
    b0 = m["intercept"] - sum(c * mu / s for c, mu, s in zip(m["coef"], m["mean"], m["scale"]))
    coef = {f: c / s for f, c, s in zip(m["features"], m["coef"], m["scale"])}
    return {"version": 1, "step_time": {"model_type": "linear", "intercept": b0, "feature_coefficients": coef}}


def step_trained_specs(
    fits: dict[str, dict], runs: dict[str, dict], names=REPLAY_STEP_MODELS, synthetic_names=SYNTHETIC_REPLAY_STEP_MODELS
) -> list[dict]:
    """Specs from each traced run's per-experiment ``cycle_us`` fits (``fitted_models`` values): the models in
    ``names`` of real runs, those in ``synthetic_names`` of synthetic runs.

    ``runs[experiment]`` has ``model``, ``tp``, ``source``, ``data_version`` and ``kv_source`` (what its KV
    features were computed from)."""
    from stepml_core.stepmodels.json_export import export_model

    out = []
    for exp in sorted(fits):
        run = runs.get(exp)
        if run is None:
            continue
        wanted = synthetic_names if run.get("source") == "synthetic" else names
        for m in fits[exp].get("cycle_us", []):
            if m.get("name") not in wanted or m.get("scope", "per_experiment") != "per_experiment":
                continue
            base = {
                "llm_model": run["model"],
                "fitted_on": [exp],
                "source_run": exp,
                "source": run["source"],
                "n_fit": m.get("n_fit"),
                "stands_for": [run["stands_for"]] if run.get("stands_for") else [],
                "basis": f"{m.get('n_fit')} cycle_us steps of {exp}",
            }
            if m["name"] == "blackbox_2f":
                out.append({**base, "name": "blackbox_2f", "kind": "blis_linear", "doc": blis_doc_from_linear(m)})
            else:
                ex = export_model(
                    m, model=run["model"], tp=int(run["tp"]), data_versions={exp: run.get("data_version", "")}
                )
                out.append(
                    {
                        **base,
                        "name": m["name"],
                        "kind": "stepml_export",
                        "exported": ex,
                        "kv_source": run.get("kv_source", "proxy_blocks"),
                    }
                )
    return out


def serving_model(spec: dict):
    """A spec → a serving model the replay runs."""
    kind = spec["kind"]
    if kind == "physics":
        return PhysicsServingModel(spec["name"], fitted_on=spec["fitted_on"])
    if kind == "blis_linear":
        lin = LinearStepTime(spec["doc"], name=spec["name"])
        return StepServingModel(
            spec["name"],
            lin,
            queueing_us=lin.queueing_us,
            token_delay_us=lin.otpt_us,
            fitted_on=spec["fitted_on"],
            llm_model=spec.get("llm_model"),
            kind=kind,
        )
    if kind == "stepml_export":
        st = ExportedStepTime(spec["exported"], kv_source=spec.get("kv_source", "proxy_blocks"), name=spec["name"])
        return StepServingModel(
            spec["name"], st, fitted_on=spec["fitted_on"], llm_model=spec.get("llm_model"), kind=kind
        )
    raise ValueError(f"unknown replay model kind {kind!r}")


def specs_for_run(specs: list[dict], experiment_id: str, llm_model: str, stands_for: str | None = None) -> list[dict]:
    """The specs a run is replayed with: physics; every other spec of its LLM model that applies to it (a spec
    with ``for_runs`` applies to those runs only, e.g. the fold of a leave-one-workload-out calibration that
    held the run out); and per step-trained model name (specs with ``source_run``) one source run of the same
    LLM model — the largest traced run whose data is not the scored run's (out of sample: neither the run nor
    its synthetic twin; ``sample_of``) where there is one, else the run itself (in sample)."""
    chosen, by_name = [], {}
    for s in specs:
        if s["kind"] == "physics":
            chosen.append(s)
        elif s.get("llm_model") != llm_model or ("for_runs" in s and experiment_id not in s["for_runs"]):
            continue
        elif "source_run" not in s:
            chosen.append(s)
        else:
            by_name.setdefault(s["name"], []).append(s)
    for name in sorted(by_name):
        cands = sorted(
            by_name[name],
            key=lambda s: (
                sample_of(s, experiment_id, stands_for) == "in_sample",
                -(s.get("n_fit") or 0),
                s["source_run"],
            ),
        )
        chosen.append(cands[0])
    return chosen


def sample_of(spec: dict, experiment_id: str, stands_for: str | None) -> str:
    """``in_sample`` when the scored run's data built the model (its own run id, or a synthetic twin's, among the
    runs fitted on or the real runs they stand for), else ``out_of_sample``. ``stands_for``: the real run the scored
    run was modelled on, if it is synthetic."""
    data_of = set(spec.get("fitted_on") or []) | set(spec.get("stands_for") or [])
    ours = {experiment_id, stands_for} - {None}
    return "in_sample" if ours & data_of else "out_of_sample"


def fitted_on_label(spec: dict) -> str:
    if spec["kind"] == "physics":
        return spec.get("basis", PHYSICS_BASIS)
    return ";".join(spec.get("fitted_on") or [])


def _replay_detail(spec: dict, label: str, sample: str, r, secs: float, per_req: dict) -> dict:
    """What one replay did: steps, wall seconds, simulated seconds and their ratio, preemptions, clamped steps."""
    return {
        "step_model": spec["name"],
        "kind": spec["kind"],
        "fitted_on": label,
        "sample": sample,
        "steps": r.steps,
        "seconds": round(secs, 3),
        "simulated_s": round(r.sim_seconds, 3),
        "real_time_ratio": round(r.sim_seconds / secs, 1) if secs > 0 else None,
        "preemptions": r.counters.get("preemptions", 0),
        "steps_clamped": sum(v for k, v in r.counters.items() if k.startswith("step_time_")),
        **per_req,
    }


def _replay_spec(
    spec: dict,
    log,
    ctx: RunContext,
    w: ReplayWorkload,
    obs: pl.DataFrame,
    *,
    source: str,
    stands_for: str | None,
    seed: int,
    intervals: bool,
) -> tuple[list[dict], list[dict], pl.DataFrame, dict]:
    """Replay the workload with one spec: (replay.csv rows, interval rows, per-request table with the observed
    columns, details). The wall time covers building the serving model and the replay."""
    import time

    from stepml_core.replay.intervals import FeatureSums, replay_interval

    role = log.role or ""
    t0 = time.perf_counter()
    model = serving_model(spec)
    sample = sample_of(spec, ctx.experiment_id, stands_for)
    rec = None
    if intervals and sample == "out_of_sample" and (spec.get("bootstrap") or {}).get("rows"):
        rec = model.step_model = FeatureSums(model.step_model)
    r = replay(w, model, ctx, seed=seed)
    secs = time.perf_counter() - t0
    scores, per_req = score_replay(r.per_request, log.table)
    label = fitted_on_label(spec)
    head = {"experiment_id": ctx.experiment_id, "role": role, "step_model": spec["name"]}
    interval_rows = []
    if rec is not None:
        for iv in replay_interval(spec, w, ctx, log.table, scores, rec, seed=seed):
            interval_rows.append({**head, "protocol": spec.get("protocol", ""), "fitted_on": label, **iv})
    rows = [
        {
            "experiment_id": ctx.experiment_id,
            "source": source,
            "role": role,
            "step_model": spec["name"],
            "fitted_on": label,
            "sample": sample,
            **s,
        }
        for s in scores
    ]
    per_request = r.per_request.join(obs, on="index", how="left")
    return rows, interval_rows, per_request, _replay_detail(spec, label, sample, r, secs, per_req)


def replay_run(
    log,
    ctx: RunContext,
    specs: list[dict],
    *,
    source: str,
    stands_for: str | None = None,
    seed: int = 0,
    workload: ReplayWorkload | None = None,
    intervals: bool = True,
) -> dict:
    """Replay one run with each spec: {'rows': replay.csv rows, 'per_request': {step model: table}, 'runs': details,
    'intervals': interval rows}. A request-calibrated spec (with ``bootstrap`` rows) that predicts the run out of
    sample also gets an interval per metric (two more replays, stepml_core.calibration.fit.replay_interval)."""
    w = workload or replay_workload(log.table, ctx, seed=seed)
    rows, per_request, details, interval_rows = [], {}, [], []
    obs = log.table.select("index", "observed_has_error", "observed_ttft_s", "observed_e2e_s")
    for spec in specs:
        spec_rows, spec_intervals, per_request[spec["name"]], detail = _replay_spec(
            spec, log, ctx, w, obs, source=source, stands_for=stands_for, seed=seed, intervals=intervals
        )
        rows += spec_rows
        interval_rows += spec_intervals
        details.append(detail)
    table = pl.DataFrame(rows, schema=REPLAY_COLUMNS) if rows else pl.DataFrame(schema=REPLAY_COLUMNS)
    iv = (
        pl.DataFrame(interval_rows, schema=INTERVAL_COLUMNS) if interval_rows else pl.DataFrame(schema=INTERVAL_COLUMNS)
    )
    return {
        "rows": table,
        "per_request": per_request,
        "runs": details,
        "assumptions": w.assumptions,
        "has_ground_truth": bool(log.has_ground_truth),
        "intervals": iv,
    }


def merge_replays(parts: list[dict]) -> dict:
    """replay_run results of one run (each with some of its specs) as one replay_run result."""
    rows = [p["rows"] for p in parts if p["rows"].height]
    ivs = [p["intervals"] for p in parts if p["intervals"].height]
    return {
        "rows": pl.concat(rows) if rows else pl.DataFrame(schema=REPLAY_COLUMNS),
        "per_request": {k: v for p in parts for k, v in p["per_request"].items()},
        "runs": [d for p in parts for d in p["runs"]],
        "assumptions": parts[0]["assumptions"] if parts else {},
        "has_ground_truth": bool(parts and parts[0]["has_ground_truth"]),
        "intervals": pl.concat(ivs) if ivs else pl.DataFrame(schema=INTERVAL_COLUMNS),
    }


def write_per_request(out_dir: Path, experiment_id: str, per_request: dict[str, pl.DataFrame]) -> list[Path]:
    """out/replay/<experiment_id>/<step_model>.parquet (each written to a temporary name, then renamed)."""
    import os

    folder = Path(out_dir) / "replay" / experiment_id
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, df in per_request.items():
        p = folder / f"{name}.parquet"
        tmp = folder / f".{name}.parquet.tmp"
        df.write_parquet(tmp)
        os.replace(tmp, p)
        paths.append(p)
    for old in folder.glob("*.parquet"):
        if old.stem not in per_request:
            old.unlink()
    return paths
