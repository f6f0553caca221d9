"""Request-level assets: request logs, the models a replay can use, per-run replays and their scores."""

import warnings

import dagster as dg

from stepml_core import pipeline
from stepml_core.progress import make_progress
from stepml_core.tables import data_checks as checks

from .checks import check_result
from .partitions import PART, experiment_partitions
from .resources import StepMLSettings
from .status import all_current_check, not_current, replay_statuses, status_metadata


@dg.asset(
    **PART,
    group_name="requests",
    output_required=False,
    description="Every request the run's load generator sent (arrival, tokens, role) and the TTFT/E2E its client saw, "
    "pandera-validated; bad records quarantined with file and record index.",
)
def request_log(context: dg.AssetExecutionContext, settings: StepMLSettings):
    folder = settings.run_folder(context.partition_key)
    value = pipeline.request_log(folder, settings.data_root(), settings.input_limits())
    if value is None:
        context.log.info(
            f"{folder}: no requests.json[.gz] or results/per_request_lifecycle_metrics.json: request-level assets skipped"
        )
        return
    # same data version as raw_traces: the digest of every input file of the run folder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)  # Output(data_version=...) is beta in 1.13
        out = dg.Output(
            value,
            data_version=dg.DataVersion(value["data_version"]),
            metadata={
                "role": value["header"].get("role") or "–",
                "format": value["header"].get("format"),
                "ground_truth": value["has_ground_truth"],
                "files": dg.MetadataValue.json(value["files"]),
                **value["counts"],
                "dagster/row_count": value["requests"].height,
            },
        )
    yield out


@dg.asset_check(
    asset=request_log,
    description="records in = records kept + records quarantined (runs only where a request log was materialized).",
)
def records_balance(request_log) -> dg.AssetCheckResult:
    from .io_manager import StoredPartitions

    # a check on a partitioned asset is handed the partition(s) of its run as {partition key: value}
    parts = dict(request_log.items()) if isinstance(request_log, StoredPartitions) else {"": request_log}
    return check_result(checks.records_balance(parts))


@dg.asset(
    group_name="replay",
    description="Step-time models calibrated from request logs alone (BLIS model files): per LLM "
    "model on its train runs (requests_roles), leaving one workload out (requests_lowo), "
    "leaving one model out (requests_lomo), and on all runs (requests_all, for export).",
)
def request_calibration(
    context: dg.AssetExecutionContext, settings: StepMLSettings, request_log, run_status: dict
) -> dict:
    skipped = {  # calibrate on current logs only
        e: f"request log not current ({r['status']}): {r['reason']}"
        for e, r in not_current(run_status).items()
        if e in request_log
    }
    bar = []  # one progress bar (stepml_core.progress), opened when the number of calibrations to make is known

    def progress(i: int, n: int, what: str) -> None:
        if not bar:
            bar.append(make_progress(n, "calibration").__enter__())
        bar[0].advance(what)
        context.log.info(f"calibration {i}/{n}: {what}")

    try:
        out = pipeline.request_calibration(
            request_log,
            settings.data_root(),
            skipped=skipped,
            seed=settings.seed,
            workers=settings.fit_threads,
            progress=progress,
            cache_dir=settings.out_dir_path() / "cache" / "request_calibration",
            warn=lambda e, err: context.log.warning(f"{e}: not used for calibration: {err}"),
            piecewise=settings.piecewise_decode,
            load_delay=settings.load_delay,
        )
    finally:
        if bar:
            bar[0].__exit__(None, None, None)
    skipped = out["skipped_runs"]
    context.add_output_metadata(
        {
            "specs": len(out["specs"]),
            "calibrations": len(out["calibrations"]),
            "skipped_runs": dg.MetadataValue.json(skipped),
            "failed": dg.MetadataValue.json(out["failed"]),
            "reused": out["reused"],
            "computed": out["computed"],
            "seconds": out["seconds"],
            "folds": dg.MetadataValue.json(
                [{k: f[k] for k in ("name", "llm_model", "calibrate_on", "for_runs")} for f in out["folds"]]
            ),
        }
    )
    return out


@dg.asset(
    group_name="replay",
    description="Step-time models a replay can use: the synthesizer's physics, every traced "
    "run's cycle_us models (StepML export JSON / BLIS model file) and the models "
    "calibrated from request logs, with what each was fitted on.",
)
def replay_models(
    context: dg.AssetExecutionContext, settings: StepMLSettings, fitted_models, run_summary, request_calibration
) -> list:
    present = list(run_summary)
    specs = pipeline.replay_models(fitted_models, run_summary, present, request_calibration["specs"])
    context.add_output_metadata(
        {
            "models": len(specs),
            "by_kind": dg.MetadataValue.json(
                {k: sum(1 for s in specs if s["kind"] == k) for k in sorted({s["kind"] for s in specs})}
            ),
        }
    )
    return specs


@dg.asset(
    **PART,
    group_name="replay",
    output_required=False,
    description="The run's real requests replayed through StepML's vLLM simulator with each step-time model: "
    "predicted vs observed TTFT/E2E per metric, per-request predictions under out/replay/.",
)
def replay(context: dg.AssetExecutionContext, settings: StepMLSettings, request_log, replay_models):
    key = context.partition_key
    settings.run_folder(key)  # the run id's checks (syntax, inside the data root)
    value, facts = pipeline.replay(
        key,
        request_log,
        replay_models,
        data_root=settings.data_root(),
        out_dir=settings.out_dir,
        seed=settings.seed,
    )
    yield dg.Output(
        value,
        metadata={
            **facts,
            "per_request_files": dg.MetadataValue.json(facts["per_request_files"]),
            "assumptions": dg.MetadataValue.json(facts["assumptions"]),
        },
    )


@dg.asset(
    group_name="replay",
    description="Each stored replay current, stale (made from an earlier request log or with other step models than "
    "apply to its run now) or failed (its run, or its replay: which step, the error); replay_fidelity scores the "
    "current ones only.",
    check_specs=[
        dg.AssetCheckSpec(
            "replays_current",
            asset="replay_status",
            description="Every stored replay is current (warns naming the others).",
        )
    ],
)
def replay_status(context: dg.AssetExecutionContext, replay, request_log, replay_models, run_status: dict):
    statuses = replay_statuses(context.instance, experiment_partitions, replay, request_log, replay_models, run_status)
    out = {k: v.as_dict() for k, v in statuses.items()}
    yield dg.Output(out, metadata=status_metadata(out, "replay"))
    yield all_current_check(out, "replays_current", "replay_status")


@dg.asset(
    group_name="replay",
    description="All replays: replay.csv (predicted vs observed per run × step model × metric, "
    "in/out of sample, the recommended model per LLM model) beside BLIS iteration 4a.",
)
def replay_fidelity(
    context: dg.AssetExecutionContext, settings: StepMLSettings, replay, request_log, replay_status: dict
) -> dict:
    left_out = {e: {"status": r["status"], "reason": r["reason"]} for e, r in not_current(replay_status).items()}
    present = [e for e in replay if e not in left_out]
    tables = pipeline.replay_fidelity(replay, request_log, present, settings.out_dir)
    context.add_output_metadata(
        {
            "runs": len(present),
            "rows": tables["replay"].height,
            "left_out": dg.MetadataValue.json(left_out),
            "replay_csv": dg.MetadataValue.path(str(tables["replay_csv"])),
        }
    )
    return {**{k: v for k, v in tables.items() if k != "replay_csv"}, "left_out": left_out}


@dg.asset(
    group_name="replay",
    description="The request-calibrated models against the real steps (per-step MAPE on cycle_us "
    "of traced runs) and their replays per protocol beside BLIS 4a, interval coverage, "
    "the issue's goals; the report's calibration section.",
)
def calibration_fidelity(
    context: dg.AssetExecutionContext, settings: StepMLSettings, request_calibration, replay_fidelity, step_table
) -> dict:
    out = pipeline.calibration_fidelity(request_calibration, replay_fidelity, step_table, settings.out_dir_path())
    context.add_output_metadata(
        {"goals": dg.MetadataValue.json([{k: g[k] for k in ("goal", "measured", "met")} for g in out["goals"]])}
    )
    return out


@dg.asset(
    group_name="replay",
    description="The BLIS round trip: the exported model files with each run's trace and `blis run` script under "
    "out/blis/ (what `stepml export --format blis` writes), each script run in the real BLIS binary beside StepML's "
    "replay of the same file; the report's section. Opt-in: `stepml run --blis [PATH]` or STEPML_BLIS=auto|PATH "
    "(auto: ../shared/tools/blis/blis, else `blis` on PATH); otherwise the section says it was not run.",
)
def blis_round_trip(
    context: dg.AssetExecutionContext,
    settings: StepMLSettings,
    request_log,
    replay_models,
    request_calibration,
    replay_fidelity,
) -> dict:
    from stepml_core.paths import PROJECT_ROOT
    from stepml_core.replay.blis_round_trip import blis_section, not_asked
    from stepml_core.replay.blis_trace import study_blis

    runs = replay_fidelity.get("runs")
    present = [
        e for e in (runs["experiment_id"].to_list() if runs is not None and runs.height else []) if e in request_log
    ]
    blis, why, asked = study_blis(PROJECT_ROOT)
    if not asked:  # opt-in: nothing written, the section says how to ask
        out = not_asked(why)
    else:
        chosen = pipeline.export_choice(replay_fidelity["replay"], replay_models, request_calibration, replay_fidelity)
        out = pipeline.blis_round_trip(
            chosen,
            request_log,
            present,
            data_root=settings.data_root(),
            out_dir=settings.out_dir_path(),
            seed=settings.seed,
            blis=blis,
            why_not="" if blis is not None else f"BLIS not found: {why}",
        )
    out["lines"] = blis_section(
        out["table"], replay_fidelity.get("blis4a"), blis_note=out["why_not"], out_dir_name="blis"
    )
    context.add_output_metadata(
        {"blis": out["blis"] or out["why_not"], "runs": out["table"].height, "dagster/row_count": out["table"].height}
    )
    return out


REQUEST_ASSETS = [request_log]
REQUEST_CHECKS = [records_balance]
MODEL_ASSETS = [request_calibration, replay_models]
REPLAY_ASSETS = [replay]


@dg.asset(
    group_name="replay",
    description="Two paths (opt-in: `stepml run --two-path [STEPS]` or STEPML_TWO_PATH=1|STEPS): every run replayed "
    "with its recommended model alone and with cycle = max(that model, a CPU path learned from the other runs' "
    "test-split schedule() times); per saturated run beside the physics and BLIS 4a, queue plots, BLIS forms under "
    "out/two_path/; the report's section (docs/cpu_path.md). Otherwise the section says how to ask.",
)
def two_path(
    context: dg.AssetExecutionContext, settings: StepMLSettings, request_log, replay_models, replay_fidelity
) -> dict:
    from stepml_core.report.two_path import two_path_not_run

    steps = settings.two_path_steps_file()
    if steps is None:
        return {"table": None, "plateaus": [], "lines": two_path_not_run()}
    if not steps.is_file():
        raise FileNotFoundError(f"two paths: no step-times file {steps} (STEPML_TWO_PATH / --two-path)")
    out = pipeline.two_path(
        request_log,
        replay_models,
        replay_fidelity,
        settings.data_root(),
        steps,
        settings.out_dir_path(),
        seed=settings.seed,
    )
    context.add_output_metadata({"runs": out["table"]["experiment_id"].n_unique() if out["table"].height else 0})
    return out
