"""The CPU path of a two-path replay, learned without the run it predicts (docs/cpu_path.md, *Two paths*).

The two-path cycle is max(GPU path, CPU path) (stepml_core.stepmodels.two_path); the GPU path is a calibrated spec
(the model StepML recommends out of sample), the CPU path a plateau while the engine is saturated. Per scored run X
of LLM model A, the plateau comes from other runs only:

1. **training plateaus**: each training run r (never X) is replayed with a constant cycle (r's own observed mean
   decode time per token: :func:`own_cycle_us`) to reconstruct its engine state per step; its plateau is the median
   real ``schedule()`` time of its test-split steps whose reconstructed state is saturated
   (:func:`saturated_plateau`; simulated step = round(s · S_sim / S_real) for real step id s, S_real the last test
   step). A run with fewer than ``min_steps`` such steps never reaches the state;
2. **A's own runs** that reach it: plateau = the median of their plateaus;
3. else **an architecture-aware transfer** from the other LLM models' plateaus: plateau_A = x(A) · gmean_B(plateau_B
   / x(B)) over the other models B, with x one of :data:`SCALINGS` (declared quantities: parameters, TP, layers,
   experts), the one whose leave-one-model-out error among those B (each B predicted from the others) is least —
   chosen on the other models only.

Every run whose data reached the plateau is in the two-path spec's ``fitted_on`` (with the GPU spec's runs), so
``sample_of`` says in_sample if the scored run is among them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from stepml_core.replay.specs import ReplaySpec
from stepml_core.stepmodels.two_path import CpuPath

# x(model, tp) candidates of the transfer: a declared quantity the plateau is taken proportional to
SCALINGS = {
    "none": lambda m, tp: 1.0,
    "params": lambda m, tp: m.total_params / 1e9,
    "params_per_gpu": lambda m, tp: m.total_params / 1e9 / tp,
    "active_params_per_gpu": lambda m, tp: m.total_params * m.active_param_ratio / 1e9 / tp,
    "layers": lambda m, tp: float(m.num_layers),
    "experts": lambda m, tp: float(m.num_experts),
    "tp": lambda m, tp: float(tp),
}
MIN_SATURATED_STEPS = 50
SATURATION = CpuPath(0.0)  # the saturation rule (cap_frac, queue_frac) by default; its plateau is not read


@dataclass(frozen=True)
class RunPlateau:
    """A training run's CPU-path plateau (None: it never reaches the saturated state) and what it is made of."""

    experiment_id: str
    llm_model: str
    tp: int
    plateau_us: float | None
    saturated_steps: int
    test_steps: int


class _StateRecorder:
    """A step-time model of constant ``cycle_us`` recording (num_running, num_waiting) per step."""

    def __init__(self, cycle_us: float):
        self.cycle_us = float(cycle_us)
        self.running: list[int] = []
        self.waiting: list[int] = []

    def step_time_us(self, b) -> float:
        self.running.append(b.num_running)
        self.waiting.append(b.num_waiting)
        return self.cycle_us


def own_cycle_us(log_table, max_tokens: np.ndarray, index: np.ndarray) -> float:
    """A run's observed mean decode time per token (µs): mean over successful requests of (E2E − TTFT) / (generated
    tokens − 1), the generated tokens the replay workload's (``max_tokens`` by request ``index``)."""
    import polars as pl

    gen = pl.DataFrame({"index": index, "gen": max_tokens})
    t = log_table.join(gen, on="index").filter(
        (~pl.col("observed_has_error").fill_null(True)) & pl.col("observed_ttft_s").is_not_null()
    )
    if not t.height:
        raise ValueError("own_cycle_us: the run has no successful request with a first token")
    per = (t["observed_e2e_s"] - t["observed_ttft_s"]) / (t["gen"] - 1).clip(lower_bound=1)
    return float(per.mean()) * 1e6


def reconstructed_state(log_table, ctx, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(running, waiting) per simulated step of a run replayed with its own constant cycle (own_cycle_us)."""
    from stepml_core.replay.simulate import StepServingModel, replay, replay_workload

    w = replay_workload(log_table, ctx, seed=seed)
    rec = _StateRecorder(own_cycle_us(log_table, w.max_tokens, w.index))
    replay(w, StepServingModel("own_cycle", rec), ctx, seed=seed)
    return np.asarray(rec.running, dtype=np.int64), np.asarray(rec.waiting, dtype=np.int64)


def saturated_plateau(
    step_ids: np.ndarray,
    sched_us: np.ndarray,
    running: np.ndarray,
    waiting: np.ndarray,
    max_num_seqs: int,
    template: CpuPath = SATURATION,
    min_steps: int = MIN_SATURATED_STEPS,
) -> tuple[float | None, int]:
    """(median real schedule() µs over the test steps whose mapped simulated state is saturated — template's rule —,
    how many such steps); None when fewer than ``min_steps``."""
    n_sim = len(running)
    if n_sim == 0 or len(step_ids) == 0:
        return None, 0
    k = np.clip(np.rint(step_ids / float(step_ids.max()) * n_sim).astype(np.int64) - 1, 0, n_sim - 1)
    sat = np.asarray(template.saturated_mask(running, waiting, max_num_seqs), dtype=bool)[k]
    n = int(sat.sum())
    return (float(np.median(sched_us[sat])) if n >= min_steps else None), n


def _gmean(values) -> float:
    v = list(values)
    return float(math.exp(sum(math.log(x) for x in v) / len(v)))


def transfer(per_model: dict[str, float], declared: dict[str, dict[str, float]], target: str) -> tuple[float, dict]:
    """plateau of ``target`` = x(target) · gmean over the other models B of plateau_B / x(B), x the scaling in SCALINGS
    of least mean |log error| when each B is predicted from the other B's (leave one model out, without target).
    ``declared[model][scaling]`` = x. Returns (plateau µs, {'scaling', 'loo_abs_log_err': {scaling: err}})."""
    others = sorted(m for m in per_model if m != target)
    if not others:
        raise ValueError(f"no other LLM model's run reaches the saturated state to transfer to {target}")
    names = [s for s in SCALINGS if all(s in declared[m] for m in (*others, target))]
    errs = {}
    for s in names if len(others) >= 2 else ():
        e = []
        for b in others:
            rest = [c for c in others if c != b]
            pred = declared[b][s] * _gmean(per_model[c] / declared[c][s] for c in rest)
            e.append(abs(math.log(pred / per_model[b])))
        errs[s] = sum(e) / len(e)
    best = min(errs, key=lambda s: (errs[s], names.index(s))) if errs else "none"
    value = declared[target][best] * _gmean(per_model[c] / declared[c][best] for c in others)
    return value, {"scaling": best, "loo_abs_log_err": errs, "from_models": others}


def transfer_errors(plateaus: list[RunPlateau]) -> list[dict]:
    """Per LLM model with a plateau, each scaling's transfer from the other models (x(A) · gmean_B(plateau_B / x(B)))
    against the model's own plateau: rows of llm_model, scaling, transferred_us, own_us, rel_err_pct, chosen (the
    scaling the leave-one-model-out rule picks without A). What the transfer can reach, scaling by scaling."""
    by_model: dict[str, list[RunPlateau]] = {}
    for p in plateaus:
        if p.plateau_us is not None:
            by_model.setdefault(p.llm_model, []).append(p)
    per_model = {m: float(np.median([p.plateau_us for p in v])) for m, v in by_model.items()}
    declared = {m: declared_quantities(m, v[0].tp) for m, v in by_model.items()}
    rows = []
    for a in sorted(per_model):
        others = [m for m in per_model if m != a]
        if not others:
            continue
        chosen = transfer(per_model, declared, a)[1]["scaling"]
        for s in SCALINGS:
            v = declared[a][s] * _gmean(per_model[c] / declared[c][s] for c in others)
            rows.append(
                {
                    "llm_model": a,
                    "scaling": s,
                    "transferred_us": v,
                    "own_us": per_model[a],
                    "rel_err_pct": 100 * (v - per_model[a]) / per_model[a],
                    "chosen": s == chosen,
                }
            )
    return rows


def declared_quantities(llm_model: str, tp: int) -> dict[str, float]:
    """x(model, tp) of every scaling, from the model catalogue (data/catalog/models.json) and the run's TP."""
    from stepml_core.catalog import model_spec

    m = model_spec(llm_model)
    return {s: float(f(m, tp)) for s, f in SCALINGS.items()}


def cpu_path_for(
    scored_run: str,
    llm_model: str,
    tp: int,
    plateaus: list[RunPlateau],
    *,
    exclude: tuple[str, ...] = (),
    template: CpuPath = SATURATION,
) -> tuple[CpuPath, tuple[str, ...], dict]:
    """The CPU path of ``scored_run`` from the other runs' plateaus (module docstring, steps 2–3): (CpuPath, the runs
    whose steps set it, how it was set). ``exclude``: more runs that are the scored run's data (a synthetic twin)."""
    usable = [p for p in plateaus if p.plateau_us is not None and p.experiment_id not in {scored_run, *exclude}]
    own = [p for p in usable if p.llm_model == llm_model]
    if not usable:  # nothing to learn the level from: the GPU path alone
        return replace(template, plateau_us=0.0, basis="no other run reaches the saturated state"), (), {"source": None}
    if own:
        value = float(np.median([p.plateau_us for p in own]))
        runs = tuple(sorted(p.experiment_id for p in own))
        how = {"source": "own_model", "runs": list(runs)}
        basis = f"median saturated schedule() of {llm_model}'s other runs {', '.join(runs)}"
    else:
        by_model: dict[str, list[RunPlateau]] = {}
        for p in usable:
            by_model.setdefault(p.llm_model, []).append(p)
        per_model = {m: float(np.median([p.plateau_us for p in v])) for m, v in by_model.items()}
        declared = {m: declared_quantities(m, v[0].tp) for m, v in by_model.items()}
        declared[llm_model] = declared_quantities(llm_model, tp)
        value, how = transfer(per_model, declared, llm_model)
        runs = tuple(sorted(p.experiment_id for p in usable))
        how |= {"source": "transfer", "runs": list(runs), "per_model_us": per_model}
        basis = (
            f"transfer from {', '.join(how['from_models'])} scaled by {how['scaling']} "
            f"(chosen by leave-one-model-out among them)"
        )
    cpu = replace(template, plateau_us=value, basis=basis)
    return cpu, runs, how


def two_path_spec(gpu: ReplaySpec, cpu: CpuPath, cpu_runs: tuple[str, ...], scored_run: str) -> ReplaySpec:
    """``gpu`` with the CPU path, for ``scored_run`` only: named ``two_path``, fitted on the GPU spec's runs and the
    CPU path's; no bootstrap (no interval)."""
    return replace(
        gpu,
        name="two_path",
        fitted_on=tuple(dict.fromkeys((*gpu.fitted_on, *cpu_runs))),
        basis=f"GPU path: {gpu.name} ({gpu.basis or ';'.join(gpu.fitted_on)}); CPU path: {cpu.basis}",
        for_runs=(scored_run,),
        bootstrap=None,
        cpu_path=cpu.to_json(),
        stored_nulls=frozenset(),
    )


# ---------------------------------------------------------------------------- the study: replays with both models


@dataclass
class TwoPathRun:
    """What a two-path replay of a run needs: its request log (``table``, ``role``, ``has_ground_truth``), its
    RunContext, LLM model and TP, its test-split steps (real step ids and schedule() µs; None: none), the GPU-path
    spec it is predicted with (None: not replayed) and, for a synthetic run, the real run it stands for."""

    log: object
    ctx: object
    llm_model: str
    tp: int
    test_steps: tuple[np.ndarray, np.ndarray] | None = None
    gpu_spec: ReplaySpec | None = None
    stands_for: str | None = None  # a synthetic run: the real run it was built from (its steps are the run's data)


def training_plateaus(
    runs: dict[str, TwoPathRun],
    *,
    template: CpuPath = SATURATION,
    seed: int = 0,
    min_steps: int = MIN_SATURATED_STEPS,
):
    """RunPlateau of every run with ground truth and test steps (saturated_plateau over its reconstructed state)."""
    out = []
    for eid in sorted(runs):
        r = runs[eid]
        if r.test_steps is None or not r.log.has_ground_truth:
            continue
        running, waiting = reconstructed_state(r.log.table, r.ctx, seed=seed)
        ids, sched = r.test_steps
        value, n = saturated_plateau(ids, sched, running, waiting, int(r.ctx.max_num_seqs or 128), template, min_steps)
        out.append(RunPlateau(eid, r.llm_model, r.tp, value, n, len(ids)))
    return out


def queue_over_time(arrival_s: np.ndarray, first_s: np.ndarray, grid_s: np.ndarray) -> np.ndarray:
    """Requests arrived and without a first token (nor an end) at each grid time: #{arrival ≤ t < first}, ``first``
    the absolute time of the first token or, without one, of the request's end."""
    a = np.sort(arrival_s)
    f = np.sort(first_s[np.isfinite(first_s)])
    return np.searchsorted(a, grid_s, side="right") - np.searchsorted(f, grid_s, side="right")


def observed_and_predicted_queue(log_table, per_request, grid_points: int = 200):
    """(grid s, observed queue, predicted queue): observed from the request log (arrival + TTFT, or arrival + E2E of
    a request without a first token), predicted from the replay's per-request table (TTFT, or E2E where it failed)."""
    import polars as pl

    o = log_table.select("index", "arrival_time_us", "observed_ttft_s", "observed_e2e_s")
    arr = o["arrival_time_us"].to_numpy() * 1e-6
    first_o = arr + o.select(pl.coalesce("observed_ttft_s", "observed_e2e_s")).to_series().fill_null(np.nan).to_numpy()
    p = per_request.select("arrival_time_us", "ttft_s", "e2e_s")
    parr = p["arrival_time_us"].to_numpy() * 1e-6
    first_p = parr + p.select(pl.coalesce("ttft_s", "e2e_s")).to_series().fill_null(np.nan).to_numpy()
    end = float(np.nanmax(np.concatenate([first_o, first_p])))
    grid = np.linspace(0.0, end, grid_points)
    return grid, queue_over_time(arr, first_o, grid), queue_over_time(parr, first_p, grid)


def two_path_study(
    runs: dict[str, TwoPathRun],
    *,
    seed: int = 0,
    template: CpuPath = SATURATION,
    min_steps: int = MIN_SATURATED_STEPS,
    own_plateau: bool = True,
) -> dict:
    """Replay every run that has a gpu_spec with it (GPU path only) and with its two-path spec (the CPU path from the
    other runs: cpu_path_for); with ``own_plateau``, a run with a plateau of its own also with that plateau
    (variant two_path_own_plateau: in sample, what the two-path form reaches when the CPU level is known). Returns {'rows': replay.csv-style rows with ``variant`` (gpu_path | two_path),
    'plateaus': RunPlateau list, 'cpu_paths': {run: (CpuPath, runs, how)}, 'queues': {run: {variant: (grid, obs,
    pred)}}, 'details': replay details}."""
    import polars as pl

    from stepml_core.replay.simulate import replay_workload
    from stepml_core.replay.specs import replay_run

    plateaus = training_plateaus(runs, template=template, seed=seed, min_steps=min_steps)
    own = {p.experiment_id: p.plateau_us for p in plateaus if p.plateau_us is not None}
    rows, cpu_paths, queues, details = [], {}, {}, []
    for eid in sorted(runs):
        r = runs[eid]
        if r.gpu_spec is None:
            continue
        twin = (r.stands_for,) if r.stands_for else ()
        cpu, cpu_runs, how = cpu_path_for(eid, r.llm_model, r.tp, plateaus, exclude=twin, template=template)
        cpu_paths[eid] = (cpu, cpu_runs, how)
        w = replay_workload(r.log.table, r.ctx, seed=seed)
        variants = [("gpu_path", r.gpu_spec), ("two_path", two_path_spec(r.gpu_spec, cpu, cpu_runs, eid))]
        if own_plateau and eid in own:  # in sample: the form's ceiling, never an out-of-sample figure
            mine = replace(template, plateau_us=own[eid], basis="the run's own plateau (in sample)")
            variants.append(("two_path_own_plateau", two_path_spec(r.gpu_spec, mine, (eid,), eid)))
        for variant, spec in variants:
            res = replay_run(r.log, r.ctx, [spec], source="real", seed=seed, workload=w, intervals=False)
            rows.append(res["rows"].with_columns(variant=pl.lit(variant)))
            details += [d | {"experiment_id": eid, "variant": variant} for d in res["runs"]]
            if r.log.has_ground_truth:
                queues.setdefault(eid, {})[variant] = observed_and_predicted_queue(
                    r.log.table, res["per_request"][spec.name]
                )
    return {
        "rows": pl.concat(rows) if rows else pl.DataFrame(),
        "plateaus": plateaus,
        "cpu_paths": cpu_paths,
        "queues": queues,
        "details": details,
    }


# ---------------------------------------------------------------------------- inputs and the side-by-side table

REPORT_METRICS = ("ttft_mean", "e2e_mean", "successes", "throughput_rps")
BLIS_4A_COLUMNS = {
    "ttft_mean": "ttft_mean_err_pct",
    "e2e_mean": "e2e_mean_err_pct",
    "throughput_rps": "throughput_err_pct",
}


TWO_PATH_ENV = "STEPML_TWO_PATH"  # 1 (the shared real runs' step times) or a step-times CSV: `stepml run --two-path`
SHARED_TEST_STEPS = ("shared", "real", "xgboost_round1_test_predictions.csv.gz")  # beside the project


def steps_file(value: str | None, project_root) -> object | None:
    """The step-times CSV a two-path study reads (None: not asked): ``value`` "", "0", "off" or None → None; "1",
    "true", "yes", "on", "auto" → ../shared/real/xgboost_round1_test_predictions.csv.gz beside the project; else the
    path given."""
    from pathlib import Path

    v = (value or "").strip()
    if v.lower() in ("", "0", "off", "false", "no"):
        return None
    if v.lower() in ("1", "true", "yes", "on", "auto"):
        return Path(project_root).parent.joinpath(*SHARED_TEST_STEPS)
    return Path(v)


def read_test_steps(path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{run: (step ids, schedule() µs)} from a CSV (gzipped or not) with ``experiment_id``, ``step.id`` and
    ``step.duration_us`` (e.g. ../shared/real/xgboost_round1_test_predictions.csv.gz: each run's test split)."""
    import gzip
    from pathlib import Path

    import polars as pl

    raw = Path(path).read_bytes()
    t = pl.read_csv(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw, infer_schema_length=10000)
    missing = {"experiment_id", "step.id", "step.duration_us"} - set(t.columns)
    if missing:
        raise ValueError(f"{path}: no column(s) {sorted(missing)} (the runs' step ids and schedule() times)")
    return {
        eid: (g["step.id"].to_numpy(), g["step.duration_us"].to_numpy().astype(np.float64))
        for (eid,), g in t.sort("step.id").group_by("experiment_id", maintain_order=True)
    }


def comparison_table(rows, study_rows, blis4a):
    """One row per run and REPORT_METRICS metric: observed, the relative error (%) of each variant in ``rows``
    (two_path_study's, plus any more variants), of the study's physics replay (``study_rows``: replay.csv rows) and
    of BLIS 4a (its anchors table; no successes there)."""
    import polars as pl

    ours = rows.filter(pl.col("metric").is_in(REPORT_METRICS))
    wide = ours.pivot(on="variant", index=["experiment_id", "metric"], values="rel_err_pct")
    obs = ours.group_by("experiment_id", "metric").agg(pl.col("observed").first())
    out = wide.join(obs, on=["experiment_id", "metric"])
    if study_rows is not None and study_rows.height:
        phys = study_rows.filter((pl.col("step_model") == "physics") & pl.col("metric").is_in(REPORT_METRICS))
        out = out.join(
            phys.select("experiment_id", "metric", physics_in_sample=pl.col("rel_err_pct")),
            on=["experiment_id", "metric"],
            how="left",
        )
    if blis4a is not None and blis4a.height:
        bl = pl.concat(
            [
                blis4a.select("experiment_id", metric=pl.lit(m), blis_4a=pl.col(c).cast(pl.Float64))
                for m, c in BLIS_4A_COLUMNS.items()
            ]
        )
        out = out.join(bl, on=["experiment_id", "metric"], how="left")
    return out.sort("experiment_id", "metric")


def blis_forms(runs: dict[str, TwoPathRun], study: dict) -> dict[str, dict]:
    """{run: {'model': BLIS model file or None, 'lost': [what it loses or why there is none]}} of each saturated run's
    two-path model (stepmodels.two_path.two_path_blis_form; a GPU path BLIS reads as one linear step_time)."""
    from stepml_core.stepmodels.two_path import two_path_blis_form

    out = {}
    for p in study["plateaus"]:
        r, cpu = runs[p.experiment_id], study["cpu_paths"].get(p.experiment_id)
        if p.plateau_us is None or cpu is None:
            continue
        if r.gpu_spec.kind != "blis_linear":
            out[p.experiment_id] = {"model": None, "lost": [f"the GPU path is a {r.gpu_spec.kind} model, not BLIS's"]}
            continue
        try:
            doc, lost = two_path_blis_form(r.gpu_spec.doc, cpu[0], int(r.ctx.max_num_seqs or 128))
        except ValueError as e:
            doc, lost = None, [str(e)]
        out[p.experiment_id] = {"model": doc, "lost": lost}
    return out
