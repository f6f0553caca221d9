"""Request-level assets: request logs, the models a replay can use, per-run replays and their scores."""

import warnings


import dagster as dg
import polars as pl

from stepml_core import checks
from stepml_core import replay_models as rm
from stepml_core.ingest import fingerprint, fingerprint_digest, sha256_file
from stepml_core.replay import run_context
from stepml_core.replay_report import replay_fidelity_tables
from stepml_core.request_log import find_request_files, read_request_log
from stepml_core.runs import read_run_metadata

from .checks import check_result
from .partitions import PART
from .resources import StepMLSettings


@dg.asset(**PART, group_name="requests", output_required=False,
          description="Every request the run's load generator sent (arrival, tokens, role) and the TTFT/E2E its client saw, "
                      "pandera-validated; bad records quarantined with file and record index.")
def request_log(context: dg.AssetExecutionContext, settings: StepMLSettings):
    folder = settings.run_folder(context.partition_key)
    log = read_request_log(folder)
    if log is None:
        context.log.info(f"{folder}: no requests.json[.gz] or results/per_request_lifecycle_metrics.json: request-level assets skipped")
        return
    files = [{"file": str(p.relative_to(folder)), "size_bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in find_request_files(folder).values()]
    value = {"requests": log.table, "quarantine": log.quarantine, "header": log.header, "files": files,
             "has_ground_truth": log.has_ground_truth, "counts": log.counts}
    # same data version as raw_traces: the digest of every input file of the run folder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.BetaWarning)  # Output(data_version=...) is beta in 1.13
        out = dg.Output(value, data_version=dg.DataVersion(fingerprint_digest(fingerprint(folder))),
                        metadata={"role": log.role or "–", "format": log.header.get("format"),
                                  "ground_truth": log.has_ground_truth, "files": dg.MetadataValue.json(files), **log.counts,
                                  "dagster/row_count": log.table.height})
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
    runs = {}
    for e in present:
        r = run_summary[e]
        kv = r.get("kv_source_counts") or {}
        runs[e] = {**r, "kv_source": max(kv, key=kv.get) if kv else "proxy_blocks"}
    specs = [rm.physics_spec(), *rm.step_trained_specs({e: fitted_models[e] for e in present if e in fitted_models}, runs)]
    context.add_output_metadata({"models": len(specs), "by_kind": dg.MetadataValue.json(
        {k: sum(1 for s in specs if s["kind"] == k) for k in sorted({s["kind"] for s in specs})})})
    return specs


@dg.asset(**PART, group_name="replay", output_required=False,
          description="The run's real requests replayed through StepML's vLLM simulator with each step-time model: "
                      "predicted vs observed TTFT/E2E per metric, per-request predictions under out/replay/.")
def replay(context: dg.AssetExecutionContext, settings: StepMLSettings, request_log, replay_models):
    key = context.partition_key
    folder = settings.run_folder(key)
    meta = read_run_metadata(folder, data_root=settings.data_root())
    log = _log_from_stored(request_log)
    ctx = run_context(folder, experiment_id=key, model=meta.model, tp=meta.tp, exp_config=meta.exp_config,
                      profile=meta.profile, header=log.header, kv_blocks_from_traces=_synth_kv_blocks(meta))
    specs = rm.specs_for_run(list(replay_models), key, meta.model)
    out = rm.replay_run(log, ctx, specs, source=meta.source, stands_for=meta.stands_for, seed=settings.seed)
    paths = rm.write_per_request(settings.out_dir, key, out["per_request"])
    details = pl.DataFrame(out["runs"])
    yield dg.Output({"rows": out["rows"], "details": details, "assumptions": out["assumptions"],
                     "has_ground_truth": out["has_ground_truth"], "model": meta.model, "role": log.role or "",
                     "requests": log.table.height},
                    metadata={"step_models": len(specs), "per_request_files": dg.MetadataValue.json([str(p) for p in paths]),
                              "seconds": float(details["seconds"].sum()) if details.height else 0.0,
                              "assumptions": dg.MetadataValue.json(out["assumptions"])})


@dg.asset(group_name="replay", description="All replays: replay.csv (predicted vs observed per run × step model × metric, "
                                            "in/out of sample, the recommended model per LLM model) beside BLIS iteration 4a.")
def replay_fidelity(context: dg.AssetExecutionContext, settings: StepMLSettings, replay, request_log) -> dict:
    present = [e for e in replay if (settings.data_root() / e).is_dir()]
    tables = replay_fidelity_tables({e: replay[e] for e in present},
                                    {e: request_log[e]["header"] for e in present if e in request_log},
                                    settings.out_dir)
    context.add_output_metadata({"runs": len(present), "rows": tables["replay"].height,
                                 "replay_csv": dg.MetadataValue.path(str(tables["replay_csv"]))})
    return {k: v for k, v in tables.items() if k != "replay_csv"}


def _log_from_stored(stored):
    """The stored request_log value back as a RequestLog."""
    from stepml_core.request_log import RequestLog

    c = stored["counts"]
    return RequestLog(table=stored["requests"], quarantine=stored["quarantine"], header=stored["header"],
                      files=[f["file"] for f in stored["files"]], has_ground_truth=stored["has_ground_truth"],
                      records_in=c["records_in"])


def _synth_kv_blocks(meta) -> int | None:
    """KV blocks of a synthetic run's engine (the synthesizer's per-model value); None for real runs."""
    if meta.source != "synthetic":
        return None
    from stepml_core.synth.spec import engine_params

    return int(engine_params()["models"][meta.model]["kv_blocks_total"])


REQUEST_ASSETS = [request_log]
REQUEST_CHECKS = [records_balance]
MODEL_ASSETS = [replay_models]
REPLAY_ASSETS = [replay]
REPORT_ASSETS = [replay_fidelity]
