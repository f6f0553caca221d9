"""Request-level assets: request logs, the models a replay can use, per-run replays and their scores."""

import warnings

import dagster as dg

from stepml_core import checks, pipeline
from stepml_core.ingest import fingerprint, fingerprint_digest

from .checks import check_result
from .partitions import PART
from .resources import StepMLSettings


@dg.asset(**PART, group_name="requests", output_required=False,
          description="Every request the run's load generator sent (arrival, tokens, role) and the TTFT/E2E its client saw, "
                      "pandera-validated; bad records quarantined with file and record index.")
def request_log(context: dg.AssetExecutionContext, settings: StepMLSettings):
    folder = settings.run_folder(context.partition_key)
    value = pipeline.request_log(folder)
    if value is None:
        context.log.info(f"{folder}: no requests.json[.gz] or results/per_request_lifecycle_metrics.json: request-level assets skipped")
        return
    # same data version as raw_traces: the digest of every input file of the run folder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)  # Output(data_version=...) is beta in 1.13
        out = dg.Output(value, data_version=dg.DataVersion(fingerprint_digest(fingerprint(folder))),
                        metadata={"role": value["header"].get("role") or "–", "format": value["header"].get("format"),
                                  "ground_truth": value["has_ground_truth"], "files": dg.MetadataValue.json(value["files"]),
                                  **value["counts"], "dagster/row_count": value["requests"].height})
    yield out


@dg.asset_check(asset=request_log, description="records in = records kept + records quarantined (runs only where a "
                                               "request log was materialized).")
def records_balance(request_log) -> dg.AssetCheckResult:
    from .io_manager import StoredPartitions

    # a check on a partitioned asset is handed the partition(s) of its run as {partition key: value}
    parts = dict(request_log.items()) if isinstance(request_log, StoredPartitions) else {"": request_log}
    return check_result(checks.records_balance(parts))


@dg.asset(group_name="replay", description="Step-time models a replay can use: the synthesizer's physics and every traced "
                                            "run's cycle_us models (StepML export JSON / BLIS model file), with what each was fitted on.")
def replay_models(context: dg.AssetExecutionContext, settings: StepMLSettings, fitted_models, run_summary) -> list:
    present = [e for e in run_summary if (settings.data_root() / e).is_dir()]
    specs = pipeline.replay_models(fitted_models, run_summary, present)
    context.add_output_metadata({"models": len(specs), "by_kind": dg.MetadataValue.json(
        {k: sum(1 for s in specs if s["kind"] == k) for k in sorted({s["kind"] for s in specs})})})
    return specs


@dg.asset(**PART, group_name="replay", output_required=False,
          description="The run's real requests replayed through StepML's vLLM simulator with each step-time model: "
                      "predicted vs observed TTFT/E2E per metric, per-request predictions under out/replay/.")
def replay(context: dg.AssetExecutionContext, settings: StepMLSettings, request_log, replay_models):
    key = context.partition_key
    value, facts = pipeline.replay(settings.run_folder(key), key, request_log, replay_models, data_root=settings.data_root(),
                                   out_dir=settings.out_dir, seed=settings.seed)
    yield dg.Output(value, metadata={**facts, "per_request_files": dg.MetadataValue.json(facts["per_request_files"]),
                                     "assumptions": dg.MetadataValue.json(facts["assumptions"])})


@dg.asset(group_name="replay", description="All replays: replay.csv (predicted vs observed per run × step model × metric, "
                                            "in/out of sample, the recommended model per LLM model) beside BLIS iteration 4a.")
def replay_fidelity(context: dg.AssetExecutionContext, settings: StepMLSettings, replay, request_log) -> dict:
    present = [e for e in replay if (settings.data_root() / e).is_dir()]
    tables = pipeline.replay_fidelity(replay, request_log, present, settings.out_dir)
    context.add_output_metadata({"runs": len(present), "rows": tables["replay"].height,
                                 "replay_csv": dg.MetadataValue.path(str(tables["replay_csv"]))})
    return {k: v for k, v in tables.items() if k != "replay_csv"}


_synth_kv_blocks = pipeline.synth_kv_blocks  # (name kept for callers in this module)


REQUEST_ASSETS = [request_log]
REQUEST_CHECKS = [records_balance]
MODEL_ASSETS = [replay_models]
REPLAY_ASSETS = [replay]
REPORT_ASSETS = [replay_fidelity]
