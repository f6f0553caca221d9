"""StepML assets. Bodies stay a few lines: the work is in stepml_core (the chain in stepml_core.pipeline)."""

import warnings
from pathlib import Path

import dagster as dg
import polars as pl

from stepml_core import pipeline
from stepml_core.replay.scores_text import replay_section, replay_summary, requests_only_report
from stepml_core.runs.folders import find_trace_file
from stepml_core.study import h1 as study
from stepml_core.tables import data_checks as checks
from stepml_core.tables.ingest import ingest_run
from stepml_core.tables.splits import split_summary
from stepml_core.tables.steps import quarantine_counts

from .checks import check_result
from .partitions import PART, experiment_partitions  # noqa: F401 (re-exported)
from .replay_assets import (
    blis_round_trip,
    calibration_fidelity,
    replay,
    replay_fidelity,
    replay_models,
    replay_status,
    request_calibration,
    request_log,
    two_path,
)
from .resources import StepMLSettings
from .status import FAILED, all_current_check, not_current, run_statuses, status_metadata, stored_fingerprints
from .whatif_assets import whatif_check


def _lineage(meta: dict) -> dict:
    c = meta.get("counters", {})
    return {
        "source": meta["source"],
        "stands_for": meta.get("stands_for") or "–",
        "model": meta["model"],
        "tp": meta["tp"],
        "workload": meta["workload"],
        "data_version": meta["data_version"],
        "files": dg.MetadataValue.json(meta["files"]),
        "lines": c.get("lines_total", 0),
        "lines_quarantined": c.get("lines_quarantined", 0),
        "events_by_name": dg.MetadataValue.json(c.get("events_by_name", {})),
    }


TRACE_TABLES = {  # asset → the table of ingest_run it holds, and who reads it
    "trace_steps": (
        "steps",
        "BATCH_SUMMARY rows as read (before validation): read by experiment_features (step_table, request_context).",
    ),
    "trace_snapshots": (
        "snapshots",
        "Scheduler snapshot events: read by experiment_features (request_context, feature_matrix).",
    ),
    "trace_journey": (
        "journey",
        "Request journey events: read by experiment_features (request_context) and experiment_models.",
    ),
    "trace_quarantine": (
        "quarantine",
        "The reader's rejected lines, events and files: read by experiment_features (quarantine).",
    ),
}


@dg.multi_asset(
    **PART,
    group_name="ingest",
    can_subset=False,
    outs={
        "raw_traces": dg.AssetOut(
            is_required=False,
            description="A run folder read: its metadata, file fingerprints (size, sha256), "
            "reader counters and each table's row count; the tables are the trace_* assets beside it.",
        ),
        **{k: dg.AssetOut(is_required=False, description=d) for k, (_, d) in TRACE_TABLES.items()},
        "trace_spans": dg.AssetOut(
            is_required=False, description="API and scheduler-step spans ({api, step_spans}): stored, read by no asset."
        ),
    },
)
def raw_traces(context: dg.AssetExecutionContext, settings: StepMLSettings):
    """The run folder read once, stored as one asset per table so that each consumer loads only the tables it reads.
    Skipped (with the step-level assets after it) for a run folder without traces (request logs only)."""
    folder = settings.run_folder(context.partition_key)
    if find_trace_file(folder) is None:
        context.log.info(
            f"{folder}: no traces.json[.gz]: step-level assets skipped for this run (request-level assets only)"
        )
        return
    out = ingest_run(folder, settings.data_root(), limits=settings.input_limits())
    meta = out["meta"]
    # data version = fingerprint digest of the input files: new content → downstream shows as stale
    version = dg.DataVersion(meta["data_version"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)  # Output(data_version=...) is beta in 1.13
        yield dg.Output(
            meta,
            "raw_traces",
            data_version=version,
            metadata={
                **_lineage(meta),
                "run_folder": dg.MetadataValue.path(str(folder)),
                "steps_read": out["steps"].height,
                "snapshots_read": out["snapshots"].height,
                "journey_events_read": out["journey"].height,
                "api_spans_read": out["api"].height,
                "step_spans_read": out["step_spans"].height,
                "reader_quarantine_records": out["quarantine"].height,
            },
        )
        for name, (table, _) in TRACE_TABLES.items():
            yield dg.Output(out[table], name, data_version=version)
        yield dg.Output({"api": out["api"], "step_spans": out["step_spans"]}, "trace_spans", data_version=version)


def _feature_out(group: str, description: str, *deps: str) -> tuple[dg.AssetOut, set[dg.AssetKey]]:
    return dg.AssetOut(group_name=group, description=description), {dg.AssetKey(d) for d in deps}


EXPERIMENT_FEATURE_OUTS = {  # output: (AssetOut, the assets it is computed from: the graph's edges)
    "step_table": _feature_out(
        "ingest",
        "Sampled steps (BATCH_SUMMARY) that pass StepTableSchema, with targets schedule_us and cycle_us.",
        "raw_traces",
        "trace_steps",
        "trace_quarantine",
    ),
    "quarantine": _feature_out(
        "ingest",
        "Every rejected line, event or step row with file, line and reason.",
        "raw_traces",
        "trace_steps",
        "trace_quarantine",
    ),
    "request_context": _feature_out(
        "ingest",
        "Every step's batch rebuilt from journey events (requests, new tokens, context lengths), checked against "
        "snapshots and BATCH_SUMMARY.",
        "raw_traces",
        "trace_steps",
        "trace_journey",
        "trace_snapshots",
    ),
    "feature_matrix": _feature_out(
        "features",
        "The seed's 30 features (+ original-study features) and both targets per kept step.",
        "raw_traces",
        "step_table",
        "request_context",
        "trace_snapshots",
    ),
    "split": _feature_out(
        "features", "Temporal 60/20/20 split by step id, with the load stage of each row.", "raw_traces", "step_table"
    ),
}
STEP_TABLE_CHECKS = [
    dg.AssetCheckSpec("schema_valid", asset="step_table", description="Kept rows pass the pandera StepTableSchema."),
    dg.AssetCheckSpec("counts_balance", asset="step_table", description="rows in = rows kept + rows quarantined."),
    dg.AssetCheckSpec(
        "no_unreadable_lines", asset="quarantine", description="Every trace line parsed (warns otherwise)."
    ),
]


@dg.multi_asset(
    **PART,
    can_subset=False,
    outs={name: out for name, (out, _) in EXPERIMENT_FEATURE_OUTS.items()},
    internal_asset_deps={name: deps for name, (_, deps) in EXPERIMENT_FEATURE_OUTS.items()},
    check_specs=STEP_TABLE_CHECKS,
)
def experiment_features(
    settings: StepMLSettings,
    raw_traces: dict,
    trace_steps: pl.DataFrame,
    trace_quarantine: pl.DataFrame,
    trace_journey: pl.DataFrame,
    trace_snapshots: pl.DataFrame,
):
    """One experiment's step table, request context, features and split in one step (five assets and the step
    table's checks, each stored and shown with its own lineage): one step's events and input loads instead of four
    (docs/architecture.md, Steps and lineage)."""
    tables = list(step_tables(settings, raw_traces, trace_steps, trace_quarantine))
    yield from tables
    step_table = next(t.value for t in tables if isinstance(t, dg.Output) and t.output_name == "step_table")
    ctx = request_context(raw_traces, trace_steps, trace_journey, trace_snapshots)
    yield ctx
    yield feature_matrix(raw_traces, step_table, ctx.value, trace_snapshots)
    yield split(raw_traces, step_table)


# the values of experiment_features, each computable on its own (tests): dg.Output (value and metadata), and checks
def step_tables(settings, raw_traces: dict, trace_steps: pl.DataFrame, trace_quarantine: pl.DataFrame):
    """step_table and quarantine, then the three checks on them."""
    t = pipeline.step_tables(
        raw_traces, trace_steps, trace_quarantine, max_quarantine_rows=settings.input_limits().max_quarantine_rows
    )
    steps, quarantine, counts = t.steps, t.quarantine, t.counts
    yield dg.Output(steps, "step_table", metadata={**counts, "source": raw_traces["source"]})
    by_kind = quarantine_counts(quarantine)
    yield dg.Output(
        quarantine,
        "quarantine",
        metadata={
            "rows": quarantine.height,
            "records": sum(by_kind.values()),
            "by_reason": dg.MetadataValue.json([{"kind": k, "len": n} for k, n in sorted(by_kind.items())]),
            **{f"quarantined_{k}s": int(by_kind.get(k, 0)) for k in ("line", "event", "row", "file")},
        },
    )
    yield check_result(checks.schema_valid(steps), "schema_valid", "step_table")
    yield check_result(
        checks.counts_balance(t.rows_in, steps.height, t.rows_quarantined), "counts_balance", "step_table"
    )
    yield check_result(
        checks.no_unreadable_lines(raw_traces["counters"]),
        "no_unreadable_lines",
        "quarantine",
        severity=dg.AssetCheckSeverity.WARN,
    )


def request_context(
    raw_traces: dict, trace_steps: pl.DataFrame, trace_journey: pl.DataFrame, trace_snapshots: pl.DataFrame
) -> dg.Output:
    out = pipeline.request_context(raw_traces, trace_steps, trace_journey, trace_snapshots)
    a, snap = out["agreement"], (out["agreement"].get("snapshots") or {})
    metadata = {
        "available": a["available"],
        "steps": a.get("steps", 0),
        "pairs": a.get("pairs", 0),
        "snapshot_pairs": snap.get("pairs_scheduled_both", 0),
        "snapshot_agreement_all_fields": snap.get("all_fields") if snap.get("all_fields") is not None else -1.0,
        "agreement": dg.MetadataValue.json(a),
    }
    return dg.Output(out, "request_context", metadata=metadata)


def feature_matrix(raw_traces: dict, step_table: pl.DataFrame, request_context, trace_snapshots) -> dg.Output:
    fm = pipeline.feature_matrix(raw_traces, step_table, request_context, trace_snapshots)
    kv_source = dg.MetadataValue.json(dict(fm["kv_source"].value_counts().iter_rows()))
    return dg.Output(fm, "feature_matrix", metadata={"rows": fm.height, "kv_source": kv_source})


def split(raw_traces: dict, step_table: pl.DataFrame) -> dg.Output:
    s = pipeline.split(raw_traces, step_table)
    return dg.Output(s, "split", metadata={"blocks": dg.MetadataValue.json(split_summary(s))})


def _model_out(group: str, description: str, *deps: str) -> tuple[dg.AssetOut, set[dg.AssetKey]]:
    return dg.AssetOut(group_name=group, description=description), {dg.AssetKey(d) for d in deps}


EXPERIMENT_MODEL_OUTS = {  # output: (AssetOut, the assets it is computed from: the graph's edges)
    "fitted_models": _model_out(
        "models", "Per-experiment fitted models per target, as plain JSON coefficients.", "feature_matrix", "split"
    ),
    "predictions": _model_out(
        "models",
        "Per-step predictions of every per-experiment model on every split.",
        "feature_matrix",
        "split",
        "fitted_models",
    ),
    "metrics": _model_out(
        "models", "n, MAPE, median/p90 APE, Pearson r, MSPE per target × model × split.", "predictions"
    ),
    "run_summary": _model_out(
        "study",
        "Small per-run record for the study report (lineage, counts, KV sources).",
        "raw_traces",
        "step_table",
        "quarantine",
        "feature_matrix",
    ),
    "ablation": _model_out(
        "beyond_h1",
        "Test MAPE of ridge_30f with all features, without each feature group, and with only it.",
        "feature_matrix",
        "split",
    ),
    "e2e_fidelity": _model_out(
        "beyond_h1",
        "Teacher-forced E2E: each cycle_us model predicts every step; per-request sums vs observed TTFT, "
        "decode interval, E2E.",
        "raw_traces",
        "trace_journey",
        "request_context",
        "fitted_models",
    ),
    "method_checks": _model_out(
        "study",
        "Method checks: each block's load-stage mix under temporal / stage-matched / random splits and the H1 "
        "models under each, the cycle rule's effect, batch N vs N−1 features for cycle_us, alpha at the grid ends.",
        "step_table",
        "feature_matrix",
        "split",
        "fitted_models",
    ),
}


@dg.multi_asset(
    **PART,
    can_subset=False,
    outs={name: out for name, (out, _) in EXPERIMENT_MODEL_OUTS.items()},
    internal_asset_deps={name: deps for name, (_, deps) in EXPERIMENT_MODEL_OUTS.items()},
)
def experiment_models(
    settings: StepMLSettings,
    raw_traces: dict,
    step_table: pl.DataFrame,
    quarantine: pl.DataFrame,
    feature_matrix: pl.DataFrame,
    split: pl.DataFrame,
    request_context,
    trace_journey: pl.DataFrame,
):
    """One experiment's models, scores and checks in one step (seven assets, each stored and shown with its own
    lineage): one step's events and input loads instead of seven (docs/architecture.md, Steps and lineage)."""
    data = study.with_split(feature_matrix, split)
    fitted = fitted_models(feature_matrix, split, data)
    yield dg.Output(fitted, "fitted_models")
    pred = predictions(feature_matrix, split, fitted, data)
    yield dg.Output(pred, "predictions")
    m = metrics(pred)
    test = m.filter(pl.col("split") == "test").select("target", "model", "n", "mape_pct")
    yield dg.Output(m, "metrics", metadata={"test": dg.MetadataValue.md(_md(test))})
    yield dg.Output(run_summary(raw_traces, step_table, quarantine, feature_matrix), "run_summary")
    yield dg.Output(ablation(feature_matrix, split, data), "ablation")
    yield dg.Output(e2e_fidelity(raw_traces, trace_journey, request_context, fitted), "e2e_fidelity")
    yield dg.Output(method_checks(settings, step_table, feature_matrix, split, fitted, data), "method_checks")


# the seven values of experiment_models, each computable on its own (tests; `data` = the matrix with its split)
def fitted_models(feature_matrix: pl.DataFrame, split: pl.DataFrame, data: pl.DataFrame | None = None) -> dict:
    return study.fit_experiment(study.with_split(feature_matrix, split) if data is None else data)


def predictions(feature_matrix, split, fitted_models, data: pl.DataFrame | None = None) -> pl.DataFrame:
    return study.predict_experiment(study.with_split(feature_matrix, split) if data is None else data, fitted_models)


def metrics(predictions: pl.DataFrame) -> pl.DataFrame:
    return study.metrics_from_predictions(predictions)


def run_summary(raw_traces: dict, step_table, quarantine, feature_matrix) -> dict:
    return pipeline.run_summary(raw_traces, step_table, quarantine, feature_matrix)


def ablation(feature_matrix, split, data: pl.DataFrame | None = None) -> pl.DataFrame:
    return study.feature_group_ablation(study.with_split(feature_matrix, split) if data is None else data)


def e2e_fidelity(raw_traces: dict, trace_journey: pl.DataFrame, request_context, fitted_models) -> dict:
    return pipeline.e2e_fidelity(raw_traces, trace_journey, request_context, fitted_models)


def method_checks(settings, step_table, feature_matrix, split, fitted_models, data: pl.DataFrame | None = None) -> dict:
    data = study.with_split(feature_matrix, split) if data is None else data
    return pipeline.method_checks(data, fitted_models, step_table, seed=settings.seed)


@dg.multi_asset(
    outs={
        "global_models": dg.AssetOut(
            group_name="study",
            description="Models pooled over all experiments (global) and per model over its workloads, scored per experiment.",
        ),
        "generalization": dg.AssetOut(
            group_name="beyond_h1",
            description="Leave-one-model-out and leave-one-workload-out cross-validation over experiments.",
        ),
    },
)
def pooled_models(settings: StepMLSettings, feature_matrix, split, run_status: dict):
    """Both sets of pooled folds in one thread pool; unchanged folds reuse their stored fit. Runs not current
    (run_status) are left out."""
    matrices = pooled_matrices(settings, feature_matrix, split, exclude=set(not_current(run_status)))
    out = study.fit_study_pooled(
        matrices, seed=settings.seed, threads=settings.fit_threads, caches=settings.fold_caches()
    )
    for name, value in out.items():
        yield dg.Output(
            value,
            name,
            metadata={
                "experiments": len(matrices),
                "folds": value["folds"]["total"],
                "folds_reused": value["folds"]["reused"],
            },
        )


def pooled_matrices(
    settings: StepMLSettings, feature_matrix, split, exclude: set | None = None
) -> dict[str, pl.DataFrame]:
    """{experiment: feature matrix with splits} for the partitions stored (less exclude). The partition set is the
    truth: a run folder that left the data folder has its partition deleted (experiment_sensor, stepml run)."""
    present = {e for e in feature_matrix if e in split} - set(exclude or ())
    return {e: study.with_split(feature_matrix[e], split[e]) for e in sorted(present)}


@dg.asset(
    group_name="study",
    description="Each run current, stale (its run folder changed since its results were stored: which files) or "
    "failed (which step, the error), as Dagster's partition status and the run folders show it now. Every study "
    "asset leaves out the runs that are not current and the report lists them.",
    check_specs=[
        dg.AssetCheckSpec(
            "runs_current", asset="run_status", description="Every run is current (warns naming the others)."
        )
    ],
)
def run_status(context: dg.AssetExecutionContext, settings: StepMLSettings, run_summary, request_log):
    keys = [k for a in PARTITIONED_ASSETS for k in a.keys]
    stored = stored_fingerprints(run_summary, request_log)
    statuses = run_statuses(context.instance, settings.data_root(), experiment_partitions, keys, stored)
    out = {k: v.as_dict() for k, v in statuses.items()}
    yield dg.Output(out, metadata=status_metadata(out, "experiment"))
    yield all_current_check(out, "runs_current", "run_status")


@dg.asset(
    group_name="synthetic",
    description="Synthetic runs against the real runs they stand for: public latency/throughput figures and step-level quantiles.",
)
def synthetic_vs_real(
    context: dg.AssetExecutionContext, settings: StepMLSettings, run_summary, step_table, run_status: dict
) -> dict:
    from stepml_core.synth.against_real import synthetic_vs_real_tables

    left_out = not_current(run_status)
    runs = [r for e, r in run_summary.items() if e not in left_out]
    out = synthetic_vs_real_tables(
        runs,
        step_table,
        settings.data_root(),
        Path(settings.real_reference_dir) if settings.real_reference_dir else None,
    )
    judged = out["public"].filter(pl.col("within").is_not_null())
    context.add_output_metadata(
        {
            "synthetic_runs": len({r["experiment_id"] for r in runs if r["source"] == "synthetic"}),
            "within_aim": f"{int(judged['within'].sum()) if judged.height else 0}/{judged.height}",
            "step_quantile_runs": out["steps"]["experiment_id"].n_unique() if out["steps"].height else 0,
        }
    )
    return out


@dg.asset(
    group_name="study", description="H1 verdict, metrics.csv, verdict.json and the study report over all experiments."
)
def study_report(
    context: dg.AssetExecutionContext,
    settings: StepMLSettings,
    metrics,
    predictions,
    global_models,
    run_summary,
    ablation,
    generalization,
    synthetic_vs_real,
    request_context,
    e2e_fidelity,
    method_checks,
    replay_fidelity,
    calibration_fidelity,
    blis_round_trip,
    whatif_check,
    two_path,
    run_status: dict,
) -> dict:
    # failed or stale: results not current (a stale run without step results is the replay's to list)
    left_out = {e: r for e, r in not_current(run_status).items() if e in run_summary or r["status"] == FAILED}
    present = sorted(
        e for e in run_summary if e not in left_out
    )  # the partitions, less those left out, in a fixed order
    replay_lines = (
        replay_section(replay_fidelity, settings.out_dir)
        + list(calibration_fidelity["lines"])
        + list(blis_round_trip["lines"])
        + list(whatif_check["lines"])
        + list(two_path["lines"])
    )
    if not present:  # request logs only: no step data, no H1 study; the replay is the report
        md = requests_only_report(replay_fidelity, replay_lines, settings.out_dir)
        context.add_output_metadata(
            {"report": dg.MetadataValue.md(md), "out_dir": dg.MetadataValue.path(settings.out_dir)}
        )
        return {"verdict": None, "experiments": []}
    tables = pipeline.StudyTables(
        metrics=metrics,
        predictions=predictions,
        run_summary=run_summary,
        ablation=ablation,
        agreements={e: request_context[e]["agreement"] for e in present if e in request_context},
        e2e_fidelity=e2e_fidelity,
        method_checks=method_checks,
        global_models=global_models,
        generalization=generalization,
        synthetic_vs_real=synthetic_vs_real,
    )
    additions = pipeline.ReportAdditions(
        sections=tuple(replay_lines),
        summary_lines=tuple(replay_summary(replay_fidelity)),
        left_out=left_out,
        stored=frozenset(run_summary),
    )
    out = pipeline.assemble_study(present, tables, out_dir=settings.out_dir, seed=settings.seed, additions=additions)
    verdict, md = out["verdict"], out["markdown"]
    context.add_output_metadata(
        {
            "report": dg.MetadataValue.md(md),
            "out_dir": dg.MetadataValue.path(settings.out_dir),
            **{f"verdict_{t}": v["verdict"] for t, v in verdict["targets"].items()},
        }
    )
    return {"verdict": verdict, "experiments": out["experiments"], "runs_left_out": verdict["runs_left_out"]}


def _md(df: pl.DataFrame) -> str:
    cols = df.columns
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in df.iter_rows():
        rows.append("| " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(rows)


STEP_ASSETS = [raw_traces, experiment_features, experiment_models]
# the pipeline's four phases (a job each): partitions → study-level models → replays per partition → report
PARTITIONED_ASSETS = [*STEP_ASSETS, request_log]  # experiment_job
MODEL_ASSETS = [run_status, pooled_models, synthetic_vs_real, request_calibration, replay_models]  # models_job
REPLAY_ASSETS = [replay]  # replay_job (partitioned: reads the study-level replay_models)
REPORT_ASSETS = [
    replay_status,
    replay_fidelity,
    calibration_fidelity,
    blis_round_trip,
    whatif_check,
    two_path,
    study_report,
]  # study_job
STUDY_ASSETS = [*MODEL_ASSETS, *REPORT_ASSETS]  # every unpartitioned asset
ALL_ASSETS = [*PARTITIONED_ASSETS, *MODEL_ASSETS, *REPLAY_ASSETS, *REPORT_ASSETS]
