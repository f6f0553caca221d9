"""Which runs calibrate which model, and which runs each model may predict (docs/calibration.md).

A *fold* names the runs whose request logs calibrate a model (``calibrate_on``) and the runs it is
replayed on (``for_runs``). Protocols (step-model names say which):

* ``requests_roles`` — per LLM model, the runs whose request file says ``split: train`` calibrate;
  every run of the model is replayed (the ``validate``/``test`` runs out of sample, the train runs in
  sample): the roles BLIS iteration 4a used, so the rows sit beside ``blis_iter4a_replay.csv``;
* ``requests_lowo`` — leave one workload out: per LLM model and workload w, the model's runs of the
  other workloads calibrate, the runs of w are predicted (every run gets an out-of-sample prediction);
* ``requests_lomo`` — leave one model out, for every LLM model of the study (``lomo_models`` to choose
  fewer): the other LLM models' calibrations (``requests_all``) are carried over through the architecture
  (:func:`transfer_params`). Which models are held out is a rule fixed in advance, never a count of
  observed latencies: a scored run's ground truth cannot decide whether it gets a leave-one-model-out
  prediction;
* ``requests_all`` — every run of the model with ground truth calibrates: the model StepML ships
  (``stepml export``) and the source of the leave-one-model-out transfer; not replayed.

The piecewise form (``stepml_core.calibration.fit.choose_break``: a hinge in the decoders, BLIS's
``step_time_regimes``) is calibrated on the same folds of the run roles, leave one workload out and all
(``requests_pw_roles``, ``requests_pw_lowo``, ``requests_pw_all``); not transferred across models (the architecture
scales say nothing of where a bend sits). Its calibrations carry no bootstrap, so its replays have no interval.

Out of sample is enforced by construction: :func:`run_calibrations` loads the request logs of a
fold's ``calibrate_on`` runs only and hands them to :func:`stepml_core.calibration.fit.calibrate`; a run in
``for_runs`` is never among them (:func:`check_folds`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np

from stepml_core.calibration.fit import ArchPrior, Calibration, arch_prior, calibrate
from stepml_core.calibration.params import PARAM_NAMES, StepParams
from stepml_core.calibration.timelines import CalibrationError, CalibrationRun
from stepml_core.errors import StepMLError
from stepml_core.parallel import process_workers

PROTOCOLS = ("roles", "lowo", "lomo")
STEP_MODEL_OF = {"roles": "requests_roles", "lowo": "requests_lowo", "lomo": "requests_lomo", "all": "requests_all"}
PIECEWISE_PROTOCOLS = ("roles", "lowo", "all")  # the protocols the piecewise form is calibrated in
PIECEWISE_STEP_MODEL_OF = {p: f"requests_pw_{p}" for p in PIECEWISE_PROTOCOLS}
LINEAR_STEP_MODELS = tuple(STEP_MODEL_OF[p] for p in PROTOCOLS)  # the replayed linear calibrated step models
PIECEWISE_STEP_MODELS = tuple(PIECEWISE_STEP_MODEL_OF[p] for p in PIECEWISE_PROTOCOLS if p in PROTOCOLS)
# whether the piecewise form's replays are recommendation candidates (fixed before any of its replays was scored; False:
# replayed and reported as evidence only, the recommendation as without it: docs/calibration.md, *The piecewise ...*)
PIECEWISE_RECOMMENDABLE = True
PROTOCOL_OF = {  # the replayed step models: requests_lowo → lowo, requests_pw_lowo → lowo, ...
    **{STEP_MODEL_OF[p]: p for p in PROTOCOLS},
    **{PIECEWISE_STEP_MODEL_OF[p]: p for p in PIECEWISE_PROTOCOLS if p in PROTOCOLS},
}


class FoldError(StepMLError, ValueError):
    """A fold that would score a model on a run it was calibrated on."""


@dataclass(frozen=True)
class RunInfo:
    """What planning folds may know about a run: no latencies, only whether ground truth exists (a run with it may
    calibrate; which runs are predicted, and by which protocol, never depends on it)."""

    experiment_id: str
    llm_model: str
    tp: int
    workload: str
    role: str | None
    has_ground_truth: bool
    requests: int = 0  # requests in its log (known without ground truth)
    stands_for: str | None = None  # a synthetic run: the real run it was modelled on (its data is that run's)


@dataclass(frozen=True)
class Fold:
    protocol: str  # roles | lowo | lomo | all
    llm_model: str
    calibrate_on: tuple[str, ...]  # runs whose request logs calibrate (empty for lomo)
    for_runs: tuple[str, ...] | None  # runs the model predicts (None: every run of llm_model)
    transfer_from: tuple[str, ...] = ()  # lomo: the LLM models whose requests_all calibrations are carried over
    held_out: str = ""  # lowo: the workload; lomo: the LLM model
    form: str = "linear"  # the calibrated form (calibration.fit.FORMS)

    @property
    def name(self) -> str:
        return STEP_MODEL_OF[self.protocol] if self.form == "linear" else PIECEWISE_STEP_MODEL_OF[self.protocol]

    @property
    def key(self) -> tuple:
        """Folds with the same calibration runs and form share one calibration (the linear key as before)."""
        return (
            (self.llm_model, self.calibrate_on)
            if self.form == "linear"
            else (self.llm_model, self.calibrate_on, self.form)
        )


def not_recommendable() -> frozenset[str]:
    """The replayed step models the recommendation never picks (the piecewise form's unless PIECEWISE_RECOMMENDABLE)."""
    return frozenset() if PIECEWISE_RECOMMENDABLE else frozenset(PIECEWISE_STEP_MODELS)


def plan_folds(
    runs: list[RunInfo], *, protocols=PROTOCOLS, lomo_models: list[str] | None = None, piecewise: bool = False
) -> list[Fold]:
    """The folds of each protocol for these runs (see module docstring); ``piecewise``: the same folds of
    PIECEWISE_PROTOCOLS once more for the piecewise form. Runs without ground truth are predicted, never
    calibrated on."""
    by_model: dict[str, list[RunInfo]] = {}
    for r in sorted(runs, key=lambda r: r.experiment_id):
        by_model.setdefault(r.llm_model, []).append(r)
    folds: list[Fold] = []
    for llm, rs in sorted(by_model.items()):
        gt = [r for r in rs if r.has_ground_truth]
        if gt:
            folds.append(Fold("all", llm, tuple(r.experiment_id for r in gt), ()))
        if "roles" in protocols:
            train = tuple(r.experiment_id for r in gt if r.role == "train")
            if train:
                folds.append(Fold("roles", llm, train, None))
        if "lowo" in protocols:
            for w in sorted({r.workload for r in rs}):
                cal = tuple(r.experiment_id for r in gt if r.workload != w)
                if cal:
                    folds.append(
                        Fold("lowo", llm, cal, tuple(r.experiment_id for r in rs if r.workload == w), held_out=w)
                    )
    if "lomo" in protocols:
        targets = sorted(by_model) if lomo_models is None else lomo_models  # every LLM model: no choice to make
        have_all = {f.llm_model for f in folds if f.protocol == "all"}
        for m in targets:
            sources = tuple(sorted(have_all - {m}))
            if m in by_model and sources:
                folds.append(
                    Fold("lomo", m, (), tuple(r.experiment_id for r in by_model[m]), transfer_from=sources, held_out=m)
                )
    if piecewise:
        folds += [replace(f, form="piecewise") for f in folds if f.protocol in PIECEWISE_PROTOCOLS]
    check_folds(folds, runs)
    return folds


def check_folds(folds: list[Fold], runs: list[RunInfo]) -> None:
    """Raise FoldError if a fold would predict a run out of sample that it calibrates on, or calibrates on a run
    without ground truth or of another LLM model."""
    info = {r.experiment_id: r for r in runs}
    for f in folds:
        for e in f.calibrate_on:
            r = info.get(e)
            if r is None or not r.has_ground_truth or r.llm_model != f.llm_model:
                raise FoldError(f"{f.name} ({f.llm_model}): cannot calibrate on {e}")
        if f.protocol in ("lowo", "lomo") and set(f.for_runs or ()) & set(f.calibrate_on):
            raise FoldError(
                f"{f.name} ({f.llm_model}): predicts {sorted(set(f.for_runs) & set(f.calibrate_on))} it calibrates on"
            )
        if f.protocol == "roles" and any(info[e].role != "train" for e in f.calibrate_on):
            raise FoldError(f"{f.name} ({f.llm_model}): calibrates on a run whose role is not train")
        if f.protocol == "lomo" and f.llm_model in f.transfer_from:
            raise FoldError(f"{f.name}: transfers from the held-out model {f.llm_model}")


# ---------------------------------------------------------------------------- running the calibrations


def _calibrate_job(args) -> tuple[tuple, Calibration | str, float]:
    """(key, the calibration or why it could not be made, seconds)."""
    key, runs, seed, kw = args
    t = time.perf_counter()
    try:
        cal = calibrate(runs, seed=seed, **kw)
    except CalibrationError as e:
        cal = str(e)
    return key, cal, time.perf_counter() - t


def run_calibrations(
    folds: list[Fold],
    load: Callable[[str], CalibrationRun],
    *,
    seed: int = 0,
    workers: int = 1,
    progress: Callable[[int, int, str], None] | None = None,
    **calibrate_kw,
) -> dict[tuple, Calibration | str]:
    """One calibration per distinct (LLM model, calibration runs) among the folds; ``load(run id)`` is called for
    calibration runs only (the runs a fold predicts are never loaded here). ``workers`` > 1: calibrations in that
    many processes (the simulator is pure Python; 1 inside a daemonic process, which may not have children). A calibration that cannot be made maps to the reason (str)."""
    jobs: dict[tuple, tuple[str, ...]] = {}
    for f in folds:
        if f.calibrate_on:
            jobs.setdefault(f.key, f.calibrate_on)
    form_of = {f.key: f.form for f in folds}
    cache: dict[str, CalibrationRun] = {}
    args = []
    for key, ids in sorted(jobs.items(), key=lambda kv: -len(kv[1])):  # biggest first: the pool ends together
        for e in ids:
            if e not in cache:
                cache[e] = load(e)
        args.append((key, [cache[e] for e in ids], seed, form_kw(form_of[key], calibrate_kw)))
    out: dict[tuple, Calibration] = {}
    done = 0
    workers = process_workers(workers)
    if workers > 1 and len(args) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(max_workers=min(workers, len(args)), mp_context=mp.get_context("spawn")) as pool:
            for fut in as_completed([pool.submit(_calibrate_job, a) for a in args]):
                key, cal, secs = fut.result()
                out[key] = cal
                done += 1
                if progress:
                    progress(done, len(args), f"{key[0]} on {len(key[1])} run(s): {secs:.1f} s")
    else:
        for a in args:
            key, cal, secs = _calibrate_job(a)
            out[key] = cal
            done += 1
            if progress:
                progress(
                    done,
                    len(args),
                    f"{key[0]} on {len(key[1])} run(s): {secs:.1f} s"
                    + (f" (not calibrated: {cal})" if isinstance(cal, str) else ""),
                )
    return out


# ---------------------------------------------------------------------------- leave one model out

RATIO_OF = {  # parameter → the architecture scale it is carried over in (µs): dimensionless efficiency ratios
    "b0_us": "weights_floor_us",  # per-step fixed cost / time to stream the weights once
    "b_dec_us": "compute_floor_us",  # per decode token / its compute at peak
    "b_kv_us": "kv_floor_us",  # per KV token / reading its bytes at peak bandwidth
    "b_npf_us": "layers",  # per prompt chunk / layer (the mixed batch's extra launches)
}


def transfer_params(
    sources: list[tuple[StepParams, ArchPrior]], target: ArchPrior
) -> tuple[StepParams, list[StepParams]]:
    """Carry calibrated models of other LLM models over to ``target`` through the architecture: each step
    coefficient as a ratio to its physics scale (weights streaming time, compute floor, KV-read floor,
    layers) — parameter count, MoE (active vs total parameters), layers, KV bytes per token and TP enter
    through the scales — geometric mean over the sources; β_pf from the target's compute prior; α0 (API
    overhead, no architecture scale) the sources' mean. Returns the transferred model and one per source."""

    def one(p: StepParams, a: ArchPrior, ratios: dict, q0: float) -> StepParams:
        v = {k: ratios[k] * float(getattr(target, s)) for k, s in RATIO_OF.items()}
        return StepParams(
            b0_us=v["b0_us"],
            b_dec_us=v["b_dec_us"],
            b_kv_us=max(v["b_kv_us"], target.kv_floor_us),
            b_pf_us=target.prefill_prior_us,
            b_npf_us=v["b_npf_us"],
            q0_us=q0,
            q1_us=p.q1_us,
        )

    per_source, rows = [], []
    for p, a in sources:
        ratios = {k: float(getattr(p, k)) / float(getattr(a, s)) for k, s in RATIO_OF.items()}
        rows.append(ratios)
        per_source.append(one(p, a, ratios, p.q0_us))
    gmean = {
        k: float(math.exp(np.mean([math.log(max(r[k], 1e-12)) for r in rows])))
        if all(r[k] > 0 for r in rows)
        else float(np.mean([r[k] for r in rows]))
        for k in RATIO_OF
    }
    q0 = float(np.mean([p.q0_us for p, _ in sources]))
    return one(sources[0][0], sources[0][1], gmean, q0), per_source


# ---------------------------------------------------------------------------- specs for replay


def fold_specs(
    folds: list[Fold], cals: dict[tuple, Calibration], runs: list[RunInfo]
) -> tuple[list[dict], dict[str, dict]]:
    """Replay specs (kind blis_linear) per fold, and the ``requests_all`` spec per LLM model (for export)."""
    info = {r.experiment_id: r for r in runs}
    all_by_model = {
        f.llm_model: cals[f.key] for f in folds if f.protocol == "all" and f.form == "linear" and f.key in cals
    }
    specs, shipped = [], {}
    for f in folds:
        if f.protocol == "lomo":
            srcs = [(all_by_model[m].params, all_by_model[m].prior) for m in f.transfer_from if m in all_by_model]
            if not srcs:
                continue
            tp = info[f.for_runs[0]].tp
            target = arch_prior(f.llm_model, tp)
            p, per_source = transfer_params(srcs, target)
            fitted = sorted(e for m in f.transfer_from if m in all_by_model for e in all_by_model[m].fitted_on)
            spec = _spec(
                f,
                p,
                fitted,
                info,
                {
                    "transfer_from": list(f.transfer_from),
                    "prior": asdict(target),
                    "per_source": {m: asdict(q) for m, q in zip(f.transfer_from, per_source)},
                },
                np.array([q.as_vector() for q in per_source]),
            )
            spec["basis"] = (
                f"leave-one-model-out: {', '.join(f.transfer_from)} calibrated on their request logs, carried "
                f"over to {f.llm_model} through the architecture"
            )
            specs.append(spec)
            continue
        cal = cals.get(f.key)
        if cal is None:
            continue
        spec = _spec(f, cal.params, list(cal.fitted_on), info, cal.summary(), cal.bootstrap)
        spec["basis"] = f"request logs of {len(cal.fitted_on)} run(s) ({f.protocol})"
        if cal.load_delay is not None:
            spec["load_delay"] = cal.load_delay.spec()
            spec["basis"] += ", with the load delay"
        if f.form != "linear":
            spec["form"] = f.form
            spec["basis"] += f", {f.form} form"
        if f.protocol == "all":
            shipped[shipped_key(f.llm_model, f.form)] = spec
        else:
            specs.append(spec)
    for s in specs:  # out of sample by construction: say so loudly if not
        if s["protocol"] in ("lowo", "lomo") and set(s.get("for_runs") or ()) & set(s["fitted_on"]):
            raise FoldError(f"{s['name']}: fitted on a run it predicts")
    return specs, shipped


def shipped_key(llm_model: str, form: str = "linear") -> str:
    """The key of a ``requests_all`` spec in ``shipped``: the LLM model (linear form), ``<model>:<form>`` otherwise."""
    return llm_model if form == "linear" else f"{llm_model}:{form}"


def _spec(
    f: Fold, p: StepParams, fitted_on: list[str], info: dict[str, RunInfo], calibration: dict, boot: np.ndarray
) -> dict:
    twins = sorted({t for e in fitted_on if (t := getattr(info.get(e), "stands_for", None))})
    spec = {
        "name": f.name,
        "kind": "blis_linear",
        "llm_model": f.llm_model,
        "fitted_on": sorted(fitted_on),
        "stands_for": twins,  # the real runs whose data the synthetic calibration runs were built from
        "protocol": f.protocol,
        "held_out": f.held_out,
        "doc": p.blis_doc(),
        "params": asdict(p),
        "calibration": calibration,
        "bootstrap": {"names": list(PARAM_NAMES), "rows": np.asarray(boot, dtype=np.float64).round(6).tolist()},
    }
    if f.for_runs is not None:
        spec["for_runs"] = list(f.for_runs)
    return spec


def form_kw(form: str, calibrate_kw: dict) -> dict:
    """calibrate()'s keywords for a fold's form (the linear form's as given: its cache keys stay as they were)."""
    return dict(calibrate_kw) if form == "linear" else {**calibrate_kw, "form": form}


def calibration_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


# ---------------------------------------------------------------------------- cache and the whole study


CALIBRATION_CODE = (
    "calibration",
    "replay/simulate.py",
    "sim",
    "catalog.py",
    "runs/rules.py",
)  # what a result depends on


def run_digest(run: CalibrationRun) -> str:
    """Content of a calibration run: its request table (columns, types, every row) and serving context."""
    import hashlib

    h = hashlib.sha256()
    t = run.table.sort("index")
    h.update(repr([(c, str(d)) for c, d in t.schema.items()]).encode())
    h.update(t.hash_rows(seed=0).to_numpy().tobytes())
    h.update(repr(sorted(asdict(run.ctx).items())).encode())
    return h.hexdigest()[:24]


class CalibrationCache:
    """Calibrations keyed by (code, calibration runs' content, seed, settings) in a :class:`~stepml_core.fit_cache.FitCache`:
    a calibration whose inputs did not change is read back instead of recomputed (same result, bit for bit)."""

    def __init__(self, folder, *, prune: bool = True):
        from stepml_core.fit_cache import FitCache

        self._cache = FitCache(folder, prune=prune, default=float)
        self.folder = self._cache.folder

    def key(self, runs: list[CalibrationRun], seed: int, kw: dict) -> str:
        import json

        from stepml_core.fit_cache import content_key

        parts = [str(seed), json.dumps(kw, sort_keys=True), *sorted(run_digest(r) for r in runs)]
        return content_key(CALIBRATION_CODE, parts)

    def get(self, key: str) -> Calibration | None:
        summary = self._cache.get_json(key)
        try:
            return Calibration.from_summary(summary) if summary is not None else None
        except (ValueError, KeyError, TypeError):
            return None  # a damaged entry is recomputed

    def put(self, key: str, cal: Calibration) -> None:
        self._cache.put_json(key, cal.summary())

    def keep_only(self, keys) -> None:
        self._cache.keep_only(keys)


def study_calibration(
    runs: list[RunInfo],
    load: Callable[[str], CalibrationRun],
    *,
    seed: int = 0,
    workers: int = 1,
    cache: CalibrationCache | None = None,
    lomo_models: list[str] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    piecewise: bool = False,
    **calibrate_kw,
) -> dict:
    """Plan the folds, calibrate each distinct calibration set once (from the cache where unchanged), and build
    the replay specs: {'specs', 'shipped' (requests_all per LLM model), 'folds', 'calibrations', 'seconds', 'reused'}.
    ``piecewise``: the piecewise decode form's folds too (opt-in: `stepml run --piecewise-decode`)."""
    t0 = time.perf_counter()
    folds = plan_folds(runs, lomo_models=lomo_models, piecewise=piecewise)
    loaded: dict[str, CalibrationRun] = {}

    def load_once(e: str) -> CalibrationRun:
        if e not in loaded:
            loaded[e] = load(e)
        return loaded[e]

    keys = {f.key for f in folds if f.calibrate_on}
    form_of = {f.key: f.form for f in folds}
    cached, todo, ckeys = {}, [], {}
    for k in sorted(keys, key=lambda k: (k[0], k[1], k[2:])):
        runs_k = [load_once(e) for e in k[1]]
        if cache is not None:
            ckeys[k] = cache.key(runs_k, seed, form_kw(form_of[k], calibrate_kw))
            hit = cache.get(ckeys[k])
            if hit is not None:
                cached[k] = hit
                continue
        todo.append(k)
    fresh = (
        run_calibrations(
            [f for f in folds if f.key in set(todo)],
            load_once,
            seed=seed,
            workers=workers,
            progress=progress,
            **calibrate_kw,
        )
        if todo
        else {}
    )
    failed = {f"{k[0]}: {', '.join(k[1])}": v for k, v in fresh.items() if isinstance(v, str)}
    fresh = {k: v for k, v in fresh.items() if not isinstance(v, str)}
    if cache is not None:
        for k, cal in fresh.items():
            cache.put(ckeys[k], cal)
        cache.keep_only(ckeys.values())
    cals = {**cached, **fresh}
    specs, shipped = fold_specs(folds, cals, runs)
    return {
        "specs": specs,
        "shipped": shipped,
        "folds": [asdict(f) | {"name": f.name} for f in folds],
        "calibrations": [
            {"llm_model": k[0], "calibrate_on": list(k[1]), **cals[k].summary()}
            for k in sorted(cals, key=lambda k: (k[0], k[1], k[2:]))
        ],
        "seconds": round(time.perf_counter() - t0, 3),
        "reused": len(cached),
        "computed": len(fresh),
        "failed": failed,
    }


def run_info(experiment_id: str, meta, table, header: dict, has_ground_truth: bool) -> RunInfo:
    """A run's RunInfo from its metadata (stepml_core.runs.folders.RunMetadata) and request log (no latency is kept; ground truth
    counts only if it has at least one successful request to calibrate on)."""
    import polars as pl

    ok = 0
    if has_ground_truth and table.height:
        ok = int(
            table.filter(~pl.col("observed_has_error").fill_null(True) & pl.col("observed_e2e_s").is_not_null()).height
        )
    return RunInfo(
        experiment_id=experiment_id,
        llm_model=meta.model,
        tp=int(meta.tp),
        workload=meta.workload,
        role=(header or {}).get("role"),
        has_ground_truth=bool(has_ground_truth and ok),
        requests=int(table.height),
        stands_for=getattr(meta, "stands_for", None),
    )
