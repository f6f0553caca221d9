"""The step-time models a replay can use, as :class:`ReplaySpec` (stored as JSON), and replaying one run with them.

A spec has a name, a ``kind``, the LLM model it applies to, the runs it was ``fitted_on`` and a ``basis`` (what
built it), and what its kind needs; ``kind``:

* ``physics`` — the synthesizer's engine physics: efficiencies tuned on the 16 reference runs' per-stage
  TPOT, API terms on their per-stage TTFT, and a schedule() model with per-run parameters fitted to each
  run's own test-split schedule() times — in sample for each of them;
* ``stepml_export`` — a StepML ``cycle_us`` model fitted on one traced run's steps (per-experiment
  fit, ``stepml_core.stepmodels.json_export`` JSON, predicted by its fitted kind: stepml_core.stepmodels.fitted),
  for runs of the same LLM model; which models' fits are replayed is each recipe's ``replayed_on``;
* ``blis_linear`` — a BLIS StepML model file, evaluated as BLIS does: a fit whose recipe says
  ``replay_in_blis_form`` (``blackbox_2f``: its ``blis_form()``, β0 + β1·prefill_tokens + β2·decode_tokens,
  the BLIS blackbox form);
* request-calibrated models (``stepml_core.calibration.fit``) are ``blis_linear`` specs too.

Any spec but ``physics`` may carry a ``cpu_path`` (``stepml_core.stepmodels.two_path.CpuPath`` as JSON): its replay
then runs the cycle max(GPU path = the spec's model, CPU path(the engine's running and waiting sets)), with the
run's ``max_num_seqs`` (``stepml_core.replay.two_path`` builds such specs, docs/cpu_path.md).

``sample`` of a replay row is ``in_sample`` when the scored run's data built the model: the run is among
``fitted_on`` (its steps, its requests or its aggregates), or among the real runs the synthetic runs in
``fitted_on`` stand for (``stands_for``: a synthetic twin is built from its real run's aggregates), or the
scored run is a synthetic twin of a run the model was fitted on; else ``out_of_sample``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
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
from stepml_core.sim.timing import CycleClock
from stepml_core.stepmodels.fitted import FittedStepModel
from stepml_core.stepmodels.recipes import REGISTRY, replayed_names
from stepml_core.stepmodels.sim_step_time import LinearStepTime
from stepml_core.stepmodels.two_path import CpuPath, TwoPathStepTime

# which fits are replayed is each recipe's `replayed_on` (stepml_core.stepmodels.recipes): of synthetic runs, the BLIS
# blackbox form and the H1 model only (a replay of a full-size run costs 3-5 CPU-s with a linear model, 6-9 with the
# 30-feature exports); every model fitted on *real* steps
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


REPLAY_KINDS = ("physics", "blis_linear", "stepml_export")
_LISTS = ("fitted_on", "stands_for", "for_runs")  # stored as JSON lists


@dataclass(frozen=True)
class ReplaySpec:
    """A step-time model a replay can use (the module docstring says each kind). Stored as JSON (``to_json``, the
    replay_models asset's value): ``from_json(d).to_json() == d``, a key stored as null stays null, an absent key
    absent."""

    name: str
    kind: str  # one of REPLAY_KINDS
    llm_model: str | None  # the LLM model whose runs it replays; None: any (physics)
    fitted_on: tuple[str, ...]  # the runs whose data built it
    basis: str | None = None  # what built it, in words
    source_run: str | None = None  # step-trained: the traced run fitted
    source: str | None = None  # step-trained: that run's source (real | synthetic)
    n_fit: int | None = None  # step-trained: rows fitted
    stands_for: tuple[str, ...] | None = None  # the real runs the synthetic runs in fitted_on were built from
    kv_source: str | None = None  # stepml_export: what its KV features were computed from
    doc: dict | None = None  # blis_linear: the BLIS model file
    exported: dict | None = None  # stepml_export: the json_export document
    protocol: str | None = None  # request-calibrated (stepml_core.calibration.protocols): its protocol
    form: str | None = None  # request-calibrated: "piecewise" (calibration.fit.FORMS); absent: the linear form
    held_out: str | None = None
    for_runs: tuple[str, ...] | None = None  # applies to these runs only
    params: dict | None = None
    calibration: dict | None = None
    bootstrap: dict | None = None  # {'names', 'rows'}: parameter draws for the replay interval
    cpu_path: dict | None = None  # two paths: stepmodels.two_path.CpuPath as JSON (cycle = max(GPU, CPU path))
    load_delay: dict | None = None  # request-calibrated, load-delay stage: {"shift_us", "per_request_us"} (not in doc)
    stored_nulls: frozenset[str] = field(default=frozenset(), compare=False, repr=False)  # keys stored as null

    def __post_init__(self):
        if self.kind not in REPLAY_KINDS:
            raise ValueError(f"unknown replay model kind {self.kind!r}")
        if self.cpu_path is not None and self.kind == "physics":
            raise ValueError("a physics spec has its own CPU path; cpu_path applies to step-time models")

    @classmethod
    def from_json(cls, d: dict) -> ReplaySpec:
        known = {f.name for f in fields(cls)} - {"stored_nulls"}
        if set(d) - known:
            raise ValueError(f"replay spec {d.get('name')!r}: unknown key(s) {sorted(set(d) - known)}")
        kw = {k: tuple(v) if k in _LISTS and v is not None else v for k, v in d.items()}
        return cls(**kw, stored_nulls=frozenset(k for k, v in d.items() if v is None))

    @classmethod
    def of(cls, spec: ReplaySpec | dict) -> ReplaySpec:
        return spec if isinstance(spec, ReplaySpec) else cls.from_json(spec)

    def to_json(self) -> dict:
        required = ("name", "kind", "llm_model", "fitted_on")
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "stored_nulls" or (v is None and f.name not in required and f.name not in self.stored_nulls):
                continue
            out[f.name] = list(v) if f.name in _LISTS and v is not None else v
        return out


def physics_spec() -> ReplaySpec:
    from stepml_core.synth.spec import reference_runs

    return ReplaySpec(
        "physics", "physics", llm_model=None, fitted_on=tuple(sorted(reference_runs())), basis=PHYSICS_BASIS
    )


def step_trained_specs(
    fits: dict[str, dict], runs: dict[str, dict], names=None, synthetic_names=None
) -> list[ReplaySpec]:
    """Specs from each traced run's per-experiment ``cycle_us`` fits (``fitted_models`` values): the models in
    ``names`` of real runs, those in ``synthetic_names`` of synthetic runs (by default the recipes'
    ``replayed_on``), in BLIS's form where the recipe says ``replay_in_blis_form``, else as StepML exports.

    ``runs[experiment]`` has ``model``, ``tp``, ``source``, ``data_version`` and ``kv_source`` (what its KV
    features were computed from)."""
    from stepml_core.stepmodels.json_export import export_model

    names = replayed_names("real") if names is None else names
    synthetic_names = replayed_names("synthetic") if synthetic_names is None else synthetic_names
    out = []
    for exp in sorted(fits):
        run = runs.get(exp)
        if run is None:
            continue
        wanted = synthetic_names if run.get("source") == "synthetic" else names
        for m in fits[exp].get("cycle_us", []):
            if m.get("name") not in wanted or m.get("scope", "per_experiment") != "per_experiment":
                continue
            base = dict(
                name=m["name"],
                llm_model=run["model"],
                fitted_on=(exp,),
                source_run=exp,
                source=run["source"],
                n_fit=m.get("n_fit"),
                stands_for=(run["stands_for"],) if run.get("stands_for") else (),
                basis=f"{m.get('n_fit')} cycle_us steps of {exp}",
            )
            recipe = REGISTRY.get(m["name"])
            if recipe is not None and recipe.replay_in_blis_form:
                out.append(ReplaySpec(**base, kind="blis_linear", doc=FittedStepModel.from_json(m).blis_form()))
            else:
                ex = export_model(
                    m, model=run["model"], tp=int(run["tp"]), data_versions={exp: run.get("data_version", "")}
                )
                kv = run.get("kv_source", "proxy_blocks")
                out.append(ReplaySpec(**base, kind="stepml_export", exported=ex, kv_source=kv))
    return out


class TwoPathServingModel(StepServingModel):
    """A step serving model whose clock runs max(its step model, a CPU path) (stepmodels.two_path), the CPU path
    seeing the run's ``max_num_seqs``."""

    def __init__(self, base: StepServingModel, cpu: CpuPath):
        super().__init__(
            base.name,
            base.step_model,
            queueing_us=base.queueing_us,
            fitted_on=base.fitted_on,
            llm_model=base.llm_model,
            kind=base.kind,
            detail=base.detail,
        )
        self.token_delay_s = base.token_delay_s
        self.load_delay = base.load_delay
        self.cpu = cpu
        self.two_path = None  # the last clock's TwoPathStepTime (its cpu_bound_steps)

    def clock(self, ctx: RunContext, rng):
        self.two_path = TwoPathStepTime(self.step_model, self.cpu, int(ctx.max_num_seqs or 128), name=self.name)
        return CycleClock(self.two_path)


def serving_model(spec: ReplaySpec | dict):
    """A spec → a serving model the replay runs (with a ``cpu_path``: TwoPathServingModel around it)."""
    spec = ReplaySpec.of(spec)
    base = _serving_model(spec)
    return base if spec.cpu_path is None else TwoPathServingModel(base, CpuPath.from_json(spec.cpu_path))


def _serving_model(spec: ReplaySpec):
    if spec.kind == "physics":
        return PhysicsServingModel(spec.name, fitted_on=list(spec.fitted_on))
    if spec.kind == "blis_linear":
        lin = LinearStepTime(spec.doc, name=spec.name)
        return StepServingModel(
            spec.name,
            lin,
            queueing_us=lin.queueing_us,
            token_delay_us=lin.otpt_us,
            fitted_on=list(spec.fitted_on),
            llm_model=spec.llm_model,
            kind=spec.kind,
            load_delay=spec.load_delay,
        )
    st = FittedStepModel.from_json(spec.exported).step_time_model(
        kv_source=spec.kv_source or "proxy_blocks", name=spec.name
    )
    return StepServingModel(spec.name, st, fitted_on=list(spec.fitted_on), llm_model=spec.llm_model, kind=spec.kind)


def specs_for_run(specs: list, experiment_id: str, llm_model: str, stands_for: str | None = None) -> list:
    """The specs a run is replayed with: physics; every other spec of its LLM model that applies to it (a spec
    with ``for_runs`` applies to those runs only, e.g. the fold of a leave-one-workload-out calibration that
    held the run out); and per step-trained model name (specs with ``source_run``) one source run of the same
    LLM model — the largest traced run whose data is not the scored run's (out of sample: neither the run nor
    its synthetic twin; ``sample_of``) where there is one, else the run itself (in sample). The specs come back
    as given (ReplaySpec or their JSON)."""
    chosen, by_name = [], {}
    for given in specs:
        s = ReplaySpec.of(given)
        if s.kind == "physics":
            chosen.append(given)
        elif s.llm_model != llm_model or (s.for_runs is not None and experiment_id not in s.for_runs):
            continue
        elif s.source_run is None:
            chosen.append(given)
        else:
            by_name.setdefault(s.name, []).append((s, given))
    for name in sorted(by_name):
        cands = sorted(
            by_name[name],
            key=lambda sg: (
                sample_of(sg[0], experiment_id, stands_for) == "in_sample",
                -(sg[0].n_fit or 0),
                sg[0].source_run,
            ),
        )
        chosen.append(cands[0][1])
    return chosen


def sample_of(spec: ReplaySpec | dict, experiment_id: str, stands_for: str | None) -> str:
    """``in_sample`` when the scored run's data built the model (its own run id, or a synthetic twin's, among the
    runs fitted on or the real runs they stand for), else ``out_of_sample``. ``stands_for``: the real run the scored
    run was modelled on, if it is synthetic."""
    spec = ReplaySpec.of(spec)
    data_of = set(spec.fitted_on or ()) | set(spec.stands_for or ())
    ours = {experiment_id, stands_for} - {None}
    return "in_sample" if ours & data_of else "out_of_sample"


def fitted_on_label(spec: ReplaySpec | dict) -> str:
    spec = ReplaySpec.of(spec)
    if spec.kind == "physics":
        return spec.basis if spec.basis is not None or "basis" in spec.stored_nulls else PHYSICS_BASIS
    return ";".join(spec.fitted_on or ())


def _replay_detail(spec: ReplaySpec, label: str, sample: str, r, secs: float, per_req: dict) -> dict:
    """What one replay did: steps, wall seconds, simulated seconds and their ratio, preemptions, clamped steps."""
    return {
        "step_model": spec.name,
        "kind": spec.kind,
        "fitted_on": label,
        "sample": sample,
        "steps": r.steps,
        "seconds": round(secs, 3),
        "simulated_s": round(r.sim_seconds, 3),
        "real_time_ratio": round(r.sim_seconds / secs, 1) if secs > 0 else None,
        "preemptions": r.counters.get("preemptions", 0),
        "steps_clamped": sum(v for k, v in r.counters.items() if k.startswith("step_time_")),
        **{k: r.counters[k] for k in ("cpu_bound_steps", "max_waiting") if k in r.counters},  # two paths only
        **per_req,
    }


def _replay_spec(
    spec: ReplaySpec,
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
    if intervals and sample == "out_of_sample" and (spec.bootstrap or {}).get("rows"):
        rec = model.step_model = FeatureSums(model.step_model)
    r = replay(w, model, ctx, seed=seed)
    secs = time.perf_counter() - t0
    scores, per_req = score_replay(r.per_request, log.table)
    label = fitted_on_label(spec)
    head = {"experiment_id": ctx.experiment_id, "role": role, "step_model": spec.name}
    interval_rows = []
    if rec is not None:
        for iv in replay_interval(spec.to_json(), w, ctx, log.table, scores, rec, seed=seed):
            interval_rows.append({**head, "protocol": spec.protocol or "", "fitted_on": label, **iv})
    rows = [
        {
            "experiment_id": ctx.experiment_id,
            "source": source,
            "role": role,
            "step_model": spec.name,
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
    specs: list,
    *,
    source: str,
    stands_for: str | None = None,
    seed: int = 0,
    workload: ReplayWorkload | None = None,
    intervals: bool = True,
) -> dict:
    """Replay one run with each spec: {'rows': replay.csv rows, 'per_request': {step model: table}, 'runs': details,
    'intervals': interval rows}. A request-calibrated spec (with ``bootstrap`` rows) that predicts the run out of
    sample also gets an interval per metric (two more replays, stepml_core.replay.intervals.replay_interval)."""
    w = workload or replay_workload(log.table, ctx, seed=seed)
    rows, per_request, details, interval_rows = [], {}, [], []
    obs = log.table.select("index", "observed_has_error", "observed_ttft_s", "observed_e2e_s")
    for given in specs:
        spec = ReplaySpec.of(given)
        spec_rows, spec_intervals, per_request[spec.name], detail = _replay_spec(
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
