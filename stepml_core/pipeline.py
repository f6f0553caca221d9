"""The StepML pipeline as pure functions: one run folder → its step tables, features, split; all runs → the study.

Each function is the work of one Dagster asset of the same name (stepml_dagster/assets.py calls it
and attaches metadata); tests and benchmarks/bare_path.py call the same functions, so the chain is
written once:

    raw = ingest_run(folder, data_root)                         raw_traces (raw["meta"]) + trace_* (its tables)
    meta = raw["meta"]
    tables = step_tables(meta, raw["steps"], raw["quarantine"])  step_table + quarantine
    context = request_context(meta, raw["steps"], raw["journey"], raw["snapshots"])     request_context
    fm = feature_matrix(meta, tables.steps, context, raw["snapshots"])                  feature_matrix
    sp = split(meta, tables.steps)                              split
    study.with_split(fm, sp)                                    what fits, predictions and pooled folds read

Each function takes the run's metadata and only the tables it reads, so each asset loads only what it uses
(the run's tables are separate assets: raw_traces is the metadata alone).

`run_matrix(folder)` runs that chain for one run folder; `assemble_study(present, StudyTables(...))` is the study
report's assembly over all runs (filtering to the runs present, concatenation, verdict, findings, report).
"""

# long module: the chain as one plain function per asset in the graph's order, so the whole flow reads in one place
# (docs/architecture.md); each function is a few lines over the packages

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import polars as pl

from stepml_core.study import h1 as study
from stepml_core.tables.splits import split_table
from stepml_core.tables.steps import add_targets, cap_quarantine, cycle_rule_counts, quarantine_counts, validate_steps

DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048  # vLLM's default token budget, when exp-config.yaml does not give it


# ------------------------------------------------------------------------------- one run ---


@dataclass(frozen=True)
class StepTables:
    """Kept steps with targets, every rejected record, and the counts the asset checks read."""

    steps: pl.DataFrame  # BATCH_SUMMARY rows that pass StepTableSchema, with schedule_us, cycle_gap_us, cycle_us
    quarantine: pl.DataFrame  # the reader's quarantine + the rows validation rejected (file, line, kind, reason, count)
    rows_in: int  # step rows read (= kept + rows quarantined by validation)
    rows_quarantined: int  # step rows quarantined by validation
    counts: dict  # rows_in, rows_kept, rows_quarantined, cycle_rows, cycle_removed_idle, cycle_removed_stall


def step_tables(
    meta: dict, steps_read: pl.DataFrame, reader_quarantine: pl.DataFrame, max_quarantine_rows: int | None = None
) -> StepTables:
    """Validate the run's step rows (tables.validate_steps, with the bounds of its exp-config.yaml) and add the
    targets (tables.add_targets); the reader's quarantine + the rows rejected, capped at max_quarantine_rows
    records (tables.cap_quarantine)."""
    v = validate_steps(steps_read, meta["trace_file"], meta.get("exp_config"))
    steps = add_targets(v.kept)
    quarantine = pl.concat([reader_quarantine, v.quarantine], how="diagonal_relaxed")
    if max_quarantine_rows is not None:
        quarantine = cap_quarantine(quarantine, max_quarantine_rows)
    rule = cycle_rule_counts(steps)
    counts = {
        **v.counts,
        "cycle_rows": rule["kept"],
        "cycle_removed_idle": rule["idle"],
        "cycle_removed_stall": rule["stall"],
    }
    return StepTables(
        steps=steps, quarantine=quarantine, rows_in=v.rows_in, rows_quarantined=v.quarantine.height, counts=counts
    )


def request_context(meta: dict, steps_read: pl.DataFrame, journey: pl.DataFrame, snapshots: pl.DataFrame) -> dict:
    """Every step's batch rebuilt from journey events, with the token budget of the run's exp-config.yaml."""
    cfg = meta.get("exp_config") or {}
    return study.request_context(
        steps_read, journey, snapshots, int(cfg.get("max_num_batched_tokens", DEFAULT_MAX_NUM_BATCHED_TOKENS))
    )


def feature_matrix(meta: dict, steps: pl.DataFrame, context: dict, snapshots: pl.DataFrame) -> pl.DataFrame:
    """The 30 features (+ original-study features) and both targets per kept step; per-request
    aggregates from the journey reconstruction where it matches the step (docs/features.md §2)."""
    return study.build_feature_matrix(
        steps,
        snapshots,
        model=meta["model"],
        tp=meta["tp"],
        experiment_id=meta["experiment_id"],
        source=meta["source"],
        request_aggregates=study.journey_aggregates(context["step_inputs"]),
        request_source="journey",
    )


def split(meta: dict, steps: pl.DataFrame) -> pl.DataFrame:
    """Temporal 60/20/20 split by step id with each row's load stage (stage durations from the run's metadata)."""
    return split_table(steps, meta["stage_durations_s"])


def e2e_fidelity(meta: dict, journey: pl.DataFrame, context: dict, fitted: dict) -> dict:
    """Teacher-forced E2E of the run's cycle_us models (study.e2e_fidelity_for_models)."""
    return study.e2e_fidelity_for_models(
        journey, context, fitted, model=meta["model"], tp=meta["tp"], experiment_id=meta["experiment_id"]
    )


def method_checks(fm_split: pl.DataFrame, fitted: dict, steps: pl.DataFrame, seed: int = 0) -> dict:
    """Stage mix, split schemes, the cycle rule's effect, batch N vs N−1 alignment, alpha at the grid ends (method_checks.py)."""
    from stepml_core.study.method_checks import method_checks as checks

    return checks(fm_split, fitted, cycle_rule_counts(steps), seed=seed)


RUN_SUMMARY_META = ("experiment_id", "source", "stands_for", "model", "tp", "workload", "data_version", "files")


def run_summary(meta: dict, steps: pl.DataFrame, quarantine: pl.DataFrame, fm: pl.DataFrame) -> dict:
    """The small per-run record the study report reads: lineage, counts, where the KV features came from."""
    m = meta  # raw_traces: the run's metadata, with each table's row count
    kv = dict(fm["kv_source"].value_counts().iter_rows())
    summary = {
        **{k: m[k] for k in RUN_SUMMARY_META},
        "steps_read": m["rows"]["steps"],
        "steps_kept": steps.height,
        "steps_quarantined": quarantine_counts(quarantine).get("row", 0),
        "lines_quarantined": m["counters"].get("lines_quarantined", 0),
        "quarantine_rows": sum(quarantine_counts(quarantine).values()),
        "kv_source": ", ".join(f"{k} {v}" for k, v in sorted(kv.items())),
        "kv_source_counts": kv,
    }
    damage = (
        "the gzip stream ends early (cut short)"
        if m["counters"].get("gzip_truncated")
        else "its last line is cut short"
        if _last_line_cut(quarantine)
        else None
    )
    if damage:  # only then: a whole trace's summary is unchanged
        summary["read_in_part"] = f"{damage}: studied on the {steps.height} steps read before the damage"
    return summary


def _last_line_cut(quarantine: pl.DataFrame) -> bool:
    """Whether the trace's quarantine holds a last line cut short (traces.general: 'truncated JSON at end of file')."""
    return quarantine.height > 0 and bool(quarantine["reason"].str.starts_with("truncated JSON at end of file").any())


def run_matrix(folder: Path, data_root: Path | None = None) -> pl.DataFrame:
    """One run folder → its feature matrix with split and load stage (what fits and pooled folds read)."""
    from stepml_core.tables.ingest import ingest_run

    raw = ingest_run(Path(folder), data_root)
    meta = raw["meta"]
    tables = step_tables(meta, raw["steps"], raw["quarantine"])
    fm = feature_matrix(
        meta, tables.steps, request_context(meta, raw["steps"], raw["journey"], raw["snapshots"]), raw["snapshots"]
    )
    return study.with_split(fm, split(meta, tables.steps))


# ---------------------------------------------------------------------------- the study ---


@dataclass(frozen=True)
class StudyTables:
    """What the study reads: per-run values ({run: value}; a mapping may hold other runs and may load each value on
    access, as Dagster's stored partitions do) and the pooled fits over all runs."""

    metrics: Mapping  # {run: metrics table of its own fits} (study.metrics_from_predictions)
    predictions: Mapping  # {run: predictions table} (all splits; the study reads the test rows)
    run_summary: Mapping  # {run: run_summary record}
    ablation: Mapping  # {run: feature-group ablation table}
    agreements: Mapping  # {run: request_context's journey-vs-step agreement}
    e2e_fidelity: Mapping  # {run: {"summary", "per_request"}} (e2e_fidelity)
    method_checks: Mapping  # {run: method_checks record}
    global_models: Mapping  # pooled fits: {"models", "metrics", "predictions"}
    generalization: Mapping  # leave-one-out fits: {"metrics", "predictions"}
    synthetic_vs_real: Mapping  # {"public", "steps"} (synth.against_real.synthetic_vs_real_tables)


@dataclass(frozen=True)
class ReportAdditions:
    """What the study report holds beyond the step study: `sections` after the calibration section (e.g. the replay),
    `summary_lines` ending the first screen, and the runs `left_out` ({run: {status, reason}}: failed or stale among
    the `stored` ones), named first and recorded in verdict.json."""

    sections: tuple[str, ...] = ()
    summary_lines: tuple[str, ...] = ()
    left_out: Mapping[str, Mapping] = field(default_factory=dict)
    stored: frozenset[str] = frozenset()


def _concat(frames: list[pl.DataFrame]) -> pl.DataFrame | None:
    frames = [f for f in frames if f.height]
    return pl.concat(frames, how="diagonal_relaxed") if frames else None


def _study_tables(present: list[str], tables: StudyTables) -> tuple[pl.DataFrame, pl.DataFrame]:
    """All metrics of the runs present (per run + pooled fits), and their test-split predictions (what the verdict
    and the plots read; one partition in memory at a time)."""
    metrics, predictions = tables.metrics, tables.predictions
    gm, gp = tables.global_models["metrics"], tables.global_models["predictions"]
    all_metrics = pl.concat(
        [*(metrics[e] for e in present if e in metrics), gm.filter(pl.col("experiment_id").is_in(present))],
        how="diagonal_relaxed",
    )
    test = pl.col("split") == "test"  # filtered per partition before the concat
    all_pred = pl.concat(
        [
            *(predictions[e].filter(test) for e in present if e in predictions),
            gp.filter(pl.col("experiment_id").is_in(present) & test),
        ],
        how="diagonal_relaxed",
    )
    return all_metrics, all_pred


def _study_findings(
    present: list[str], all_pred: pl.DataFrame, tables: StudyTables, seed: int
) -> tuple[pl.DataFrame | None, dict, dict]:
    """(ablation of the runs present, method checks gathered, findings: rankings, recommendations, ...)."""
    from stepml_core.study.findings import study_findings
    from stepml_core.study.method_checks import gather as gather_checks

    gen_present = {
        k: v.filter(pl.col("experiment_id").is_in(present)) if v.height else v
        for k, v in tables.generalization.items()
        if k in ("metrics", "predictions")
    }
    ablation = tables.ablation
    abl = pl.concat([ablation[e] for e in present if e in ablation], how="diagonal_relaxed") if ablation else None
    checks = gather_checks(tables.method_checks, present, tables.global_models["models"])
    findings = study_findings(predictions=all_pred, generalization=gen_present, ablation=abl, checks=checks, seed=seed)
    return abl, checks, findings


def _extra_study_sections(
    present: list[str],
    runs: list[dict],
    abl: pl.DataFrame | None,
    tables: StudyTables,
    additions: ReportAdditions,
    out_dir: Path,
) -> list[str]:
    """The report's sections after the verdict, in order: runs left out, feature provenance, reconstruction,
    teacher-forced E2E (plots written to out_dir), calibration, then the additions' sections."""
    from stepml_core.report.evidence import (
        e2e_section,
        feature_provenance_section,
        reconstruction_section,
        synthetic_vs_real_sections,
    )
    from stepml_core.report.status import runs_left_out_section, runs_read_in_part_section

    # failed or stale runs: named, their old results unused
    extra = runs_left_out_section(dict(additions.left_out), set(additions.stored))
    extra += runs_read_in_part_section(runs)  # traces cut short: studied on part of their steps, said so
    extra += feature_provenance_section(runs, abl)
    agreements, e2e = tables.agreements, tables.e2e_fidelity
    extra += reconstruction_section({e: agreements[e] for e in present if e in agreements})
    e2e_parts = [e2e[e] for e in present if e in e2e]
    per_request = _concat([p["per_request"] for p in e2e_parts])
    extra += e2e_section(
        _concat([p["summary"] for p in e2e_parts]), pl.DataFrame() if per_request is None else per_request, out_dir
    )
    extra += synthetic_vs_real_sections(tables.synthetic_vs_real["public"], tables.synthetic_vs_real["steps"])
    extra += list(additions.sections)
    return extra


def assemble_study(
    present: list[str],
    tables: StudyTables,
    *,
    out_dir: Path,
    seed: int = 0,
    additions: ReportAdditions = ReportAdditions(),
) -> dict:
    """The study over the runs `present` (sorted; the per-run mappings of `tables` may hold others): verdict,
    findings, metrics.csv, verdict.json and report.md (+ plots) written to out_dir, with the report's `additions`.

    Per-run values are read one run at a time (a mapping may load each on access); predictions are
    reduced to their test rows, what the verdict and plots read. Pooled fits are kept for the runs
    present. Returns {"verdict", "markdown", "experiments"}.
    """
    present = sorted(present)
    runs = [tables.run_summary[e] for e in present]
    all_metrics, all_pred = _study_tables(present, tables)
    verdict = study.h1_verdict(all_metrics, all_pred, seed=seed)
    gen = tables.generalization["metrics"]
    abl, checks, findings = _study_findings(present, all_pred, tables, seed)
    from stepml_core.report.study import render_report, write_outputs

    verdict["recommendations"] = findings["recommendations"]
    extra = _extra_study_sections(present, runs, abl, tables, additions, out_dir)
    verdict["runs_left_out"] = {
        e: {"status": r["status"], "reason": r["reason"]} for e, r in sorted(additions.left_out.items())
    }
    write_outputs(
        out_dir, pl.concat([all_metrics, gen], how="diagonal_relaxed") if gen.height else all_metrics, verdict
    )
    md = render_report(
        runs=runs,
        metrics=all_metrics,
        predictions=all_pred,
        verdict=verdict,
        out_dir=out_dir,
        findings=findings,
        checks=checks,
        extra_sections=extra,
        summary_extra=list(additions.summary_lines),
    )
    return {"verdict": verdict, "markdown": md, "experiments": present}


# ------------------------------------------------------------------------- request level ---


def request_log(folder: Path, data_root: Path | None = None, limits=None) -> dict | None:
    """The run's request log as stored (requests, quarantine, header, files with sha256 as read, counts, truth, and
    the run folder's file fingerprint with its digest: the same data version as raw_traces); None without one.

    The files are read as traces are (inside the data root, regular, within ``limits``); the header is checked
    against the run's exp-config.yaml (request_log.check_header) and the run must be replayable: its KV-cache size
    known and able to hold one max_model_len sequence (vLLM does not start otherwise). Every problem is a
    RequestLogError (or RunMetadataError) naming the file and key: this run fails, alone. The run's metadata, read
    here once, is stored beside the log (``run_metadata``: RunMetadata.to_json) for the request path after it
    (request_calibration, replay: ``stored_run_metadata``)."""
    from stepml_core.runs.folders import read_run_metadata
    from stepml_core.runs.request_log import RequestLogError, has_request_log, read_request_log
    from stepml_core.tables.ingest import fingerprint, fingerprint_digest

    folder = Path(folder)
    if not has_request_log(folder):
        return None  # (its metadata is raw_traces' to read and judge)
    meta = read_run_metadata(folder, data_root=data_root, limits=limits)
    reads: dict = {}
    log = read_request_log(folder, data_root=data_root, limits=limits, exp_config=meta.exp_config, reads=reads)
    if log is None:
        return None
    tp = (log.header.get("config") or {}).get("tensor_parallelism")
    if tp is not None and tp != meta.run.tp:
        raise RequestLogError(
            f"{folder / log.files[0]}: key config.tensor_parallelism: {tp}, but the run id {folder.name!r} says "
            f"tp{meta.run.tp}"
        )
    problem = replayable(replay_context(folder.name, meta, log.header))
    if problem:
        raise RequestLogError(f"{folder / log.files[0]}: {problem}")
    files = [{"file": k, "size_bytes": v["size_bytes"], "sha256": v["sha256"]} for k, v in sorted(reads.items())]
    run_files = fingerprint(folder)
    return {
        "requests": log.table,
        "quarantine": log.quarantine,
        "header": log.header,
        "files": files,
        "has_ground_truth": log.has_ground_truth,
        "counts": log.counts,
        "truth": log.truth,
        "run_files": run_files,
        "data_version": fingerprint_digest(run_files),
        "run_metadata": meta.to_json(),
    }


def stored_run_metadata(key: str, stored_log: Mapping, data_root: Path):
    """The RunMetadata the request_log value of run `key` was read with (runs.folders.RunMetadata); a value stored
    before it held one (no ``run_metadata``) has its run folder's metadata read again, with the checks of
    StepMLSettings.run_folder (run-id syntax, inside the data root)."""
    from stepml_core.runs.folders import RunMetadata, check_inside_root, parse_run_id, read_run_metadata

    if stored_log.get("run_metadata") is not None:
        return RunMetadata.from_json(stored_log["run_metadata"])
    parse_run_id(key)
    folder = Path(data_root) / key
    check_inside_root(folder, Path(data_root))
    return read_run_metadata(folder, data_root=data_root)


def replayable(ctx) -> str | None:
    """Why a run with this context (replay.RunContext) cannot be replayed, naming the key; None if it can."""
    if not ctx.kv_blocks_total:
        return "key config.kv_blocks_total_gpu: missing (the run's KV-cache size; the replay needs it)"
    if ctx.max_model_len and 16 * int(ctx.kv_blocks_total) < int(ctx.max_model_len):
        return (
            f"key config.kv_blocks_total_gpu: {ctx.kv_blocks_total} blocks ({16 * int(ctx.kv_blocks_total)} tokens) "
            f"cannot hold one sequence of max_model_len {ctx.max_model_len} (exp-config.yaml): vLLM does not start so"
        )
    return None


def log_from_stored(stored: Mapping):
    """A stored request_log value back as a request_log.RequestLog."""
    from stepml_core.runs.request_log import RequestLog

    return RequestLog(
        table=stored["requests"],
        quarantine=stored["quarantine"],
        header=stored["header"],
        files=[f["file"] for f in stored["files"]],
        has_ground_truth=stored["has_ground_truth"],
        records_in=stored["counts"]["records_in"],
        truth=stored.get("truth") or {},
    )


def synth_kv_blocks(meta) -> int | None:
    """KV blocks of a synthetic run's engine (the synthesizer's per-model value); None for real runs."""
    if meta.source != "synthetic":
        return None
    from stepml_core.synth.spec import engine_params

    return int(engine_params()["models"][meta.model]["kv_blocks_total"])


def replay_context(key: str, meta, header: Mapping):
    """The simulator's context of one run (stepml_core.replay.simulate.run_context): engine and cluster from the run's metadata
    (runs.RunMetadata), arrival facts from its request log's header; a synthetic run also gets its engine's KV blocks.
    Every replay and calibration (assets, benchmarks, tests) builds it here."""
    from stepml_core.replay.simulate import run_context

    return run_context(
        meta.folder,
        experiment_id=key,
        model=meta.model,
        tp=meta.tp,
        exp_config=meta.exp_config,
        profile=meta.profile,
        header=header,
        kv_blocks_from_traces=synth_kv_blocks(meta),
    )


def calibration_inputs(metas: Mapping, logs: Mapping) -> tuple[list, Callable]:
    """(run infos, load) for calibration_protocols.study_calibration over the runs of `metas` ({run: RunMetadata}),
    sorted; logs: {run: {"requests", "header", "has_ground_truth"}} (the request_log asset's value, or
    log_as_stored(RequestLog)). load(run) builds the CalibrationRun, when a protocol needs that run."""
    from stepml_core.calibration import protocols as cp
    from stepml_core.calibration.timelines import CalibrationRun

    present = sorted(metas)
    infos = [
        cp.run_info(e, metas[e], logs[e]["requests"], logs[e]["header"], logs[e]["has_ground_truth"]) for e in present
    ]

    def load(e: str) -> CalibrationRun:  # called for calibration runs only (calibration_protocols.run_calibrations)
        m, log = metas[e], logs[e]
        return CalibrationRun(
            e, m.model, m.workload, log["header"].get("role"), log["requests"], replay_context(e, m, log["header"])
        )

    return infos, load


def log_as_stored(log) -> dict:
    """A RequestLog (request_log.read_request_log) as the request_log asset stores it, for calibration_inputs."""
    return {"requests": log.table, "header": log.header, "has_ground_truth": log.has_ground_truth}


def request_calibration(
    logs: Mapping,
    data_root: Path,
    *,
    skipped: dict[str, str] | None = None,
    seed: int = 0,
    workers: int = 1,
    cache_dir: Path | None = None,
    progress=None,
    warn=None,
    piecewise: bool = False,
    load_delay: bool = False,
) -> dict:
    """Step-time models calibrated from the request logs alone (calibration_protocols.study_calibration) over the
    runs in `logs` less those `skipped` ({run: why}); a run whose metadata cannot be read is added to the skipped
    ones (warn(run, error) is told), as is one that cannot be replayed (pipeline.replayable), and the others calibrate.
    Each run's metadata is the one stored with its log (stored_run_metadata). Returns study_calibration's value with
    skipped_runs."""
    from stepml_core.calibration import protocols as cp

    skipped = dict(skipped or {})
    metas = {}
    for e in sorted(e for e in logs if e not in skipped):
        try:  # a run whose metadata cannot be read is left out (its own partitions say why), the others calibrate
            meta = stored_run_metadata(e, logs[e], data_root)
            problem = replayable(replay_context(e, meta, logs[e]["header"]))  # a stored log from before the checks
            if problem:
                raise ValueError(f"{e}: {problem}")
            metas[e] = meta
        except (ValueError, KeyError, TypeError, OSError) as err:  # StepMLErrors are ValueErrors
            skipped[e] = str(err)
            if warn is not None:
                warn(e, err)
    infos, load = calibration_inputs(metas, logs)
    out = cp.study_calibration(
        infos,
        load,
        seed=seed,
        workers=workers,
        cache=cp.CalibrationCache(cache_dir) if cache_dir is not None else None,
        progress=progress,
        piecewise=piecewise,
        **({"load_delay": True} if load_delay else {}),  # absent when off: the calibration cache keys stay
    )
    out["skipped_runs"] = skipped
    return out


def calibration_fidelity(calibrated: dict, replay_fidelity: dict, step_table: Mapping, out_dir: Path) -> dict:
    """The request-calibrated models against the real steps and their replays per protocol beside BLIS 4a
    (calibration_report.calibration_fidelity) and the report's section: {"lines", tables..., "goals"}."""
    from stepml_core.report.calibration import calibration_fidelity as gather
    from stepml_core.report.calibration_text import calibration_section
    from stepml_core.runs.folders import parse_run_id

    steps = {e: step_table[e] for e in step_table}
    runs = replay_fidelity.get("runs")
    ids = set(runs["experiment_id"].to_list()) if runs is not None and runs.height else set()
    llm_of = {e: parse_run_id(e).model for e in ids | set(steps)}
    t = gather(calibrated, replay_fidelity, steps, llm_of, Path(out_dir))
    return {
        "lines": calibration_section(t),
        **{k: v for k, v in t.items() if isinstance(v, pl.DataFrame)},
        "goals": t["goals"],
    }


def replay_models(
    fitted_models: Mapping, run_summary: Mapping, present: list[str], calibrated: list[dict] | None = None
) -> list[dict]:
    """The step-time models a replay can use: the synthesizer's physics, the cycle_us fits of the runs present and
    the models `calibrated` from request logs (request_calibration's specs)."""
    from stepml_core.replay import specs as rm

    runs = {}
    for e in present:
        r = run_summary[e]
        kv = r.get("kv_source_counts") or {}
        runs[e] = {**r, "kv_source": max(kv, key=kv.get) if kv else "proxy_blocks"}
    specs = [
        rm.physics_spec(),
        *rm.step_trained_specs({e: fitted_models[e] for e in present if e in fitted_models}, runs),
    ]
    return [s.to_json() for s in specs] + list(calibrated or [])  # stored as JSON (rm.ReplaySpec.from_json reads it)


def replay(
    key: str, stored_log: Mapping, specs: list[dict], *, data_root: Path, out_dir, seed: int = 0
) -> tuple[dict, dict]:
    """One run's requests replayed with each applicable step-time model; per-request predictions written under
    out_dir/replay/. The run's metadata is the one stored with its log (stored_run_metadata). Returns (stored value,
    facts for the asset's metadata)."""
    from stepml_core.replay import specs as rm

    meta = stored_run_metadata(key, stored_log, data_root)
    log = log_from_stored(stored_log)
    ctx = replay_context(key, meta, log.header)
    specs = rm.specs_for_run(list(specs), key, meta.model, meta.stands_for)
    out = rm.replay_run(log, ctx, specs, source=meta.source, stands_for=meta.stands_for, seed=seed)
    out["assumptions"].update(header_choices(log.header, ctx))
    paths = rm.write_per_request(out_dir, key, out["per_request"])
    value = replay_value(out, meta, log)
    value["request_log_version"] = stored_log.get("data_version")  # a replay is current only for this request log
    value["models_version"] = models_version(specs)  # ... and for these step models
    details = value["details"]
    return value, {
        "step_models": len(specs),
        "per_request_files": [str(p) for p in paths],
        "seconds": float(details["seconds"].sum()) if details.height else 0.0,
        "assumptions": out["assumptions"],
    }


def header_choices(header: Mapping, ctx) -> dict:
    """Where the request file's header and the run's other files disagree on the workload's shape, the replay takes
    results/config.yaml or profile.yaml (what inference-perf ran; the 16 real headers say 0 for system_prompt_len,
    their profiles 100-150): the stated choice, {"header_not_used": {key: {header, used, from}}} (empty: agree)."""
    cfg = header.get("config") or {}
    pairs = (("system_prompt_len", "system_prompt_len"), ("num_prefix_groups", "num_groups"))
    out = {
        hk: {"header": cfg[hk], "used": getattr(ctx, ck), "from": ctx.sources.get(ck)}
        for hk, ck in pairs
        if cfg.get(hk) is not None and getattr(ctx, ck) is not None and cfg[hk] != getattr(ctx, ck)
    }
    return {"header_not_used": out} if out else {}


def models_version(specs: list[dict]) -> str:
    """A digest of the step-model specs one run is replayed with (replay_models.specs_for_run): its stored replay is
    current only while the specs that apply to the run are these."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(specs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stale_replay_reason(key: str, stored_replay: Mapping, stored_log: Mapping | None, specs: list[dict] | None) -> str:
    """Why a stored replay of run `key` is not current ('' when it is): made from an earlier request log than the one
    stored now, or with other step models than the `specs` (replay_models' value) that apply to the run now."""
    made_from, now = stored_replay.get("request_log_version"), (stored_log or {}).get("data_version")
    if made_from and now and made_from != now:
        return f"replay made from an earlier request log ({made_from}; now {now}) and not re-run since"
    return models_behind_reason(key, stored_replay, specs)


def models_behind_reason(key: str, stored_replay: Mapping, specs: list[dict] | None) -> str:
    """'' when the stored replay of run `key` was made with the step models that `specs` give the run now (or cannot
    tell: no specs, a replay stored before models_version), else why not."""
    from stepml_core.replay import specs as rm

    made_with = stored_replay.get("models_version")
    if not made_with or specs is None:
        return ""
    run_specs = rm.specs_for_run(list(specs), key, stored_replay.get("model"), stored_replay.get("stands_for"))
    current = models_version(run_specs)
    if current == made_with:
        return ""
    return f"replay made with earlier step models ({made_with}; now {current}) and not re-run since"


def replay_value(out: dict, meta, log) -> dict:
    """The replay asset's value of one run from replay_models.replay_run's result, its metadata and request log."""
    return {
        "rows": out["rows"],
        "details": pl.DataFrame(out["runs"]),
        "assumptions": out["assumptions"],
        "intervals": out["intervals"],
        "has_ground_truth": out["has_ground_truth"],
        "model": meta.model,
        "role": log.role or "",
        "stands_for": meta.stands_for,
        "requests": log.table.height,
        "truth": dict(log.truth),
    }


def replay_fidelity(replays: Mapping, logs: Mapping, present: list[str], out_dir) -> dict:
    """replay.csv over the runs present and the tables the report reads (replay_report.replay_fidelity_tables)."""
    from stepml_core.replay.scores import replay_fidelity_tables

    return replay_fidelity_tables(
        {e: replays[e] for e in present}, {e: logs[e]["header"] for e in present if e in logs}, out_dir
    )


def whatif_runs(logs: Mapping, data_root: Path) -> list:
    """The study's runs as a what-if sees them (stepml_core.whatif.study.StudyRun: profile, serving limits, prompt
    tokens; no latencies), from their stored request logs; a run whose metadata cannot be read or that cannot be
    replayed is left out."""
    from stepml_core.errors import StepMLError
    from stepml_core.whatif.study import study_run

    out = []
    for e in sorted(logs):
        try:
            meta = stored_run_metadata(e, logs[e], data_root)
            ctx = replay_context(e, meta, logs[e]["header"])
            if replayable(ctx) is None:
                out.append(study_run(e, meta.workload, meta.profile, ctx, logs[e]["requests"]))
        except (StepMLError, ValueError, KeyError, TypeError, OSError):  # its own assets say why
            continue
    return out


def whatif(
    replay_fidelity: Mapping,
    replay_models: list,
    request_calibration: Mapping,
    logs: Mapping,
    data_root: Path,
    out_dir: Path,
    *,
    models: list[str] | None = None,
    progress_factory=None,
    **sweep,
) -> dict:
    """The whatif asset's value: per LLM model (``models``, default every one with an exportable model) a sweep with
    the model `stepml export` ships (stepml_core.whatif.run.run_whatif, written under out_dir/whatif/<model>/) from
    the defaults of its runs; ``sweep``: run_whatif's keywords. {"table": every model's rows, "summary": rows}."""
    from stepml_core.runs.folders import parse_run_id
    from stepml_core.whatif.run import run_whatif
    from stepml_core.whatif.study import choose_model, model_defaults

    rows = replay_fidelity["replay"]
    llm_of = {e: parse_run_id(e).model for e in set(rows["experiment_id"].to_list())}
    per = replay_fidelity["recommended_per_llm"]
    per_llm = dict(zip(per["llm_model"].to_list(), per["step_model"].to_list())) if per.height else None
    st = replay_fidelity["runs"]
    saturated = set(st.filter(pl.col("saturated").fill_null(False))["experiment_id"].to_list())
    shipped = dict(request_calibration.get("shipped") or {})
    runs = whatif_runs(logs, data_root)
    tables, summary = [], []
    for llm in models or sorted({m for m in llm_of.values() if m}):
        spec, info = choose_model(llm, rows, list(replay_models), shipped, llm_of, per_llm, saturated)
        desc, limits, from_run = model_defaults(llm, runs)
        res = run_whatif(
            spec,
            info,
            desc,
            limits,
            Path(out_dir) / "whatif" / llm,
            defaults_from=from_run,
            progress_factory=progress_factory,
            **sweep,
        )
        tables.append(res["table"])
        summary += [{"model": llm, "step_model": info["step_model"], **s} for s in res["summary"]]
    return {"table": pl.concat(tables) if tables else pl.DataFrame(), "summary": summary}


# ------------------------------------------------------------------------- the BLIS round trip ---


def export_choice(rows: pl.DataFrame, specs: list, calibration: Mapping | None, fidelity: Mapping | None) -> dict:
    """The model file per LLM model that `stepml export --format blis` ships (stepmodels.blis.choose_exports) from
    replay.csv's rows, replay_models' specs, request_calibration's value and replay_fidelity's value (either may be
    None)."""
    from stepml_core.runs.folders import parse_run_id
    from stepml_core.stepmodels.blis import choose_exports

    llm_of = {e: parse_run_id(e).model for e in set(rows["experiment_id"].to_list())}
    shipped = dict(calibration["shipped"]) if calibration is not None else {}
    per = fidelity.get("recommended_per_llm") if fidelity is not None else None
    per_llm = (
        dict(zip(per["llm_model"].to_list(), per["step_model"].to_list())) if per is not None and per.height else None
    )
    st = fidelity.get("runs") if fidelity is not None else None
    saturated = None
    if st is not None and "saturated" in st.columns:
        saturated = set(st.filter(pl.col("saturated").fill_null(False))["experiment_id"].to_list())
    return choose_exports(rows, list(specs), shipped, llm_of, per_llm, saturated)


def blis_bundle_run(key: str, stored_log: Mapping, data_root: Path, *, seed: int = 0):
    """One run's replay.blis_round_trip.BundleRun from its stored request_log value: the workload StepML's replay
    builds (replay_workload, same seed) and its context; a run that cannot be replayed raises ValueError."""
    from stepml_core.replay.blis_round_trip import BundleRun
    from stepml_core.replay.simulate import replay_workload

    meta = stored_run_metadata(key, stored_log, data_root)
    log = log_from_stored(stored_log)
    ctx = replay_context(key, meta, log.header)
    problem = replayable(ctx)
    if problem:
        raise ValueError(f"{key}: {problem}")
    w = replay_workload(log.table, ctx, seed=seed)
    return BundleRun(key, meta.model, w, ctx, log.table)


def blis_round_trip(
    chosen: dict,
    logs: Mapping,
    present: list[str],
    *,
    data_root: Path,
    out_dir: Path,
    seed: int = 0,
    blis=None,
    why_not: str = "",
) -> dict:
    """The export bundle of the runs `present` (their stored request logs) under out_dir/blis (what `stepml export
    --format blis --study OUT` writes) and, with a BLIS binary, each run's script run there beside StepML's replay of
    the same file (replay.blis_round_trip.agreement_table). Returns {"table", "manifest", "blis", "why_not"}."""
    from stepml_core.replay import blis_round_trip as brt

    bundle_dir = Path(out_dir) / "blis"
    runs = [blis_bundle_run(e, logs[e], data_root, seed=seed) for e in sorted(present)]
    manifest = brt.write_bundle(chosen, runs, bundle_dir, source=str(out_dir), seed=seed)
    table = brt.agreement_table(chosen, runs, bundle_dir, blis, seed=seed, why_not=why_not)
    return {"table": table, "manifest": manifest, "blis": str(blis) if blis else "", "why_not": why_not}


def whatif_check(
    logs: Mapping,
    specs: list,
    replay_fidelity: Mapping,
    data_root: Path,
    *,
    seed: int = 0,
    workers: int = 1,
    progress=None,
) -> dict:
    """Every run predicted from its profile alone with its leave-one-workload-out model and scored
    (stepml_core.whatif.check.check_runs); the saturated runs and ground truth from the study's run status.
    Returns {"table", "saturation", "lines"} (the report's section)."""
    from stepml_core.whatif.check import check_runs, check_section

    runs = whatif_runs(logs, data_root)
    st = replay_fidelity.get("runs")
    rows = st.to_dicts() if st is not None and st.height else []
    saturated = {r["experiment_id"] for r in rows if r.get("saturated")}
    truth = {r["experiment_id"]: bool(r.get("ground_truth")) for r in rows}
    table, sat = check_runs(
        runs,
        list(specs),
        {r.experiment_id: logs[r.experiment_id]["requests"] for r in runs},
        seed=seed,
        workers=workers,
        progress=progress,
    )
    return {"table": table, "saturation": sat, "lines": check_section(table, sat, saturated, truth)}


def two_path(
    logs: Mapping, specs: list, replay_fidelity: Mapping, data_root: Path, steps_path: Path, out_dir: Path, *, seed=0
) -> dict:
    """Every replayable run predicted with its recommended model (GPU path only) and with two paths (the CPU path
    from the other runs' test-split schedule() times in ``steps_path``: stepml_core.replay.two_path); the table,
    queue plots and BLIS forms under out_dir/two_path. Returns {"table", "plateaus", "lines"} (the report's section)."""
    import json

    from stepml_core.replay import two_path as tp
    from stepml_core.replay.specs import ReplaySpec, specs_for_run
    from stepml_core.report.two_path import two_path_markdown, write_queue_plots

    steps = tp.read_test_steps(steps_path)
    rows = replay_fidelity["replay"]
    rec = dict(rows.filter(pl.col("recommended")).select("experiment_id", "step_model").unique().iter_rows())
    runs = {}
    for e in sorted(logs):
        meta = stored_run_metadata(e, logs[e], data_root)
        log = log_from_stored(logs[e])
        ctx = replay_context(e, meta, log.header)
        if replayable(ctx) is not None:
            continue
        cands = [ReplaySpec.of(s) for s in specs_for_run(list(specs), e, meta.model)] if e in rec else []
        gpu = next((s for s in cands if s.name == rec[e]), None)
        runs[e] = tp.TwoPathRun(log, ctx, meta.model, int(meta.tp), steps.get(e), gpu, meta.stands_for)
    res = tp.two_path_study(runs, seed=seed)
    table = tp.comparison_table(res["rows"], rows, replay_fidelity.get("blis4a"))
    folder = Path(out_dir) / "two_path"
    (folder / "blis").mkdir(parents=True, exist_ok=True)
    table.write_csv(folder / "two_path.csv")
    for e, form in tp.blis_forms(runs, res).items():
        (folder / "blis" / f"{e}.json").write_text(json.dumps(form, indent=1))
    plots = write_queue_plots(res["queues"], res["plateaus"], folder)
    transfers = pl.DataFrame(tp.transfer_errors(res["plateaus"]))
    md = two_path_markdown(table, res["plateaus"], res["cpu_paths"], plots, out_dir=out_dir, transfers=transfers)
    return {"table": table, "plateaus": [p.__dict__ for p in res["plateaus"]], "lines": [*md.splitlines(), ""]}
