"""Replay through Dagster: a run folder with request logs only is a run; `stepml run` writes replay.csv,
per-request predictions and the report section; the request_log check evaluates; lineage to each request file."""

from __future__ import annotations

import gzip
import json

import dagster as dg
import numpy as np
import polars as pl
import pytest
import yaml

from stepml_dagster.cli import run_study

RUN = "20260101-000000-llama-2-7b-tp1-codegen"
RUN_NO_GT = "20260101-010000-llama-2-7b-tp1-roleplay"
COLUMNS = [
    "experiment_id",
    "source",
    "role",
    "step_model",
    "fitted_on",
    "sample",
    "metric",
    "predicted",
    "observed",
    "rel_err_pct",
    "recommended",
]


def request_only_run(folder, n=150, seed=0, ground_truth=True, bad_records=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    (folder / "exp-config.yaml").write_text(
        yaml.safe_dump(
            {
                "model": "meta-llama/Llama-2-7b-hf",
                "tensor_parallelism": 1,
                "max_num_seqs": 128,
                "max_num_batched_tokens": 2048,
            }
        )
    )
    (folder / "profile.yaml").write_text(
        json.dumps(
            {
                "data": {
                    "shared_prefix": {
                        "num_groups": 2,
                        "num_prompts_per_group": 3,
                        "system_prompt_len": 100,
                        "output_len": 30,
                    }
                },
                "server": {"ignore_eos": True},
            }
        )
    )
    reqs = [
        {
            "index": i,
            "arrival_time_us": int(t),
            "input_tokens": int(rng.integers(300, 500)),
            "output_tokens": 30,
            "prefix_group": "",
            "has_error": False,
        }
        for i, t in enumerate(np.sort(rng.uniform(0, 20e6, n)))
    ]
    reqs += [
        {
            "index": n + k,
            "arrival_time_us": "soon",
            "input_tokens": 10,
            "output_tokens": 1,
            "prefix_group": "",
            "has_error": False,
        }
        for k in range(bad_records)
    ]
    doc = {
        "experiment": folder.name,
        "model_short": "llama-2-7b",
        "profile": "codegen",
        "split": "validate",
        "config": {
            "tensor_parallelism": 1,
            "max_num_seqs": 128,
            "max_num_batched_tokens": 2048,
            "kv_blocks_total_gpu": 7000,
        },
        "requests": reqs,
    }
    (folder / "requests.json.gz").write_bytes(gzip.compress(json.dumps(doc).encode()))
    if ground_truth:
        gt = [{"index": r["index"], "has_error": False, "ttft_s": 0.03, "e2e_s": 0.03 + 29 * 0.009} for r in reqs[:n]]
        (folder / "ground_truth.json.gz").write_bytes(gzip.compress(json.dumps(gt).encode()))
    return folder


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    base = tmp_path_factory.mktemp("replay_pipeline")
    data, out = base / "data", base / "out"
    request_only_run(data / RUN, bad_records=2)
    request_only_run(data / RUN_NO_GT, seed=1, ground_truth=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(base / "home"))
        res = run_study(data, out, synth_if_empty=False, quiet=True, workers=1)
        yield res, data, out, dg.DagsterInstance.get()


def test_request_only_runs_are_replayed_and_reported(study):
    res, data, out, instance = study
    assert res["study_ok"] and not res["failed"], res
    rows = pl.read_csv(out / "replay.csv")
    assert rows.columns == COLUMNS
    assert set(rows["experiment_id"]) == {RUN, RUN_NO_GT} and set(rows["step_model"]) == {"physics", "requests_lowo"}
    # the run without ground truth is predicted by a model calibrated on the other workload's request log only
    lowo = rows.filter(pl.col("step_model") == "requests_lowo")
    assert (
        set(lowo["experiment_id"]) == {RUN_NO_GT}
        and set(lowo["fitted_on"]) == {RUN}
        and set(lowo["sample"]) == {"out_of_sample"}
    )
    assert set(rows["metric"]) == {
        "ttft_mean",
        "ttft_p50",
        "ttft_p90",
        "ttft_p99",
        "e2e_mean",
        "e2e_p50",
        "e2e_p90",
        "e2e_p99",
        "decode_time_per_token_mean",
        "throughput_rps",
        "successes",
    }
    scored = rows.filter(pl.col("experiment_id") == RUN)
    assert scored["observed"].is_not_null().all() and (scored["role"] == "validate").all()
    assert rows.filter(pl.col("experiment_id") == RUN_NO_GT)["observed"].is_null().all()
    per = pl.read_parquet(out / "replay" / RUN / "physics.parquet")
    assert per.height == 150 and {
        "index",
        "arrival_time_us",
        "ttft_s",
        "e2e_s",
        "observed_ttft_s",
        "observed_e2e_s",
    } <= set(per.columns)
    report = (out / "report.md").read_text()
    assert "Replaying the real runs" in report and "no H1 verdict" in report and "predicted only" in report
    assert report.index("**Request level**") < report.index("## Replaying the real runs")  # on the first screen


def test_step_assets_skipped_request_assets_materialized_with_lineage(study):
    _, data, out, instance = study
    for key, want in (("raw_traces", 0), ("step_table", 0), ("request_log", 1), ("replay", 1)):
        recs = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[RUN]), limit=5
        ).records
        assert len(recs) == want, key
    meta = (
        instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("request_log"), asset_partitions=[RUN]), limit=1
        )
        .records[0]
        .asset_materialization.metadata
    )
    files = {f["file"]: f for f in meta["files"].value}
    assert set(files) == {"requests.json.gz", "ground_truth.json.gz"} and all(
        len(f["sha256"]) == 64 for f in files.values()
    )
    assert (
        meta["records_in"].value == 152 and meta["records_quarantined"].value == 2 and meta["role"].value == "validate"
    )
    checks = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(dg.AssetKey("request_log"), "records_balance"), limit=10
    )
    assert checks and all(c.status.value == "SUCCEEDED" for c in checks)


def test_a_replay_made_with_earlier_models_is_replayed_again_not_shown_as_current(study):
    """`stepml run --experiment RUN` after RUN's ground truth changed re-calibrates; RUN_NO_GT's stored replay was made
    with the models calibrated on the old truth, so it is replayed again (its predictions move and its stored
    models_version is the current one); left alone, the report would have shown the old replay as current. Runs
    before the test that breaks RUN's log (both change the module's data)."""
    from stepml_core import pipeline
    from stepml_dagster.io_manager import stored_assets
    from stepml_dagster.resources import StepMLSettings

    _, data, out, _ = study
    before = pl.read_csv(out / "replay.csv").filter(pl.col("experiment_id") == RUN_NO_GT)
    gt = json.loads(gzip.decompress((data / RUN / "ground_truth.json.gz").read_bytes()))
    for r in gt:
        r["e2e_s"] *= 1.5  # a slower engine: every calibrated model changes
    (data / RUN / "ground_truth.json.gz").write_bytes(gzip.compress(json.dumps(gt).encode()))
    res = run_study(data, out, synth_if_empty=False, quiet=True, workers=1, experiments=[RUN])
    assert res["study_ok"] and not res["failed"], res
    after = pl.read_csv(out / "replay.csv").filter(pl.col("experiment_id") == RUN_NO_GT)
    calibrated = pl.col("step_model").str.starts_with("requests_")
    assert not before.filter(calibrated)["predicted"].equals(after.filter(calibrated)["predicted"])
    io = stored_assets(StepMLSettings(data_dir=str(data), out_dir=str(out)))
    stored = io.stored_partitions("replay", [RUN_NO_GT])[RUN_NO_GT]
    assert pipeline.models_behind_reason(RUN_NO_GT, stored, io.stored_value("replay_models")) == ""
    assert "Left out of the replay scores" not in (out / "report.md").read_text()
    # a replay whose models moved on is named stale, never shown as current
    assert "earlier step models" in pipeline.models_behind_reason(
        RUN_NO_GT, {**stored, "models_version": "x"}, io.stored_value("replay_models")
    )


def test_a_run_whose_request_log_breaks_is_left_out_not_shown_stale(study):
    """After a scored run's request file is damaged, `stepml run` fails that run, does not replay it with its old stored
    log, and the report lists it as left out instead of showing its earlier replay as current (runs last: it changes
    the module's data)."""
    _, data, out, instance = study
    (data / RUN / "requests.json.gz").write_bytes(b"\x1f\x8b\x08 broken")
    res = run_study(data, out, synth_if_empty=False, quiet=True, workers=1)
    assert RUN in res["failed"] and RUN_NO_GT not in res["failed"]
    rows = pl.read_csv(out / "replay.csv")
    assert set(rows["experiment_id"]) == {RUN_NO_GT}
    report = (out / "report.md").read_text()
    assert "Left out of the replay scores" in report and RUN in report.split("Left out of the replay scores")[1]
    # the graph says so: replay_status (read by replay_fidelity) names the run failed at its request_log step
    status = json.loads((out / "assets" / "replay_status" / "__all__.json").read_text())
    assert status[RUN]["status"] == "failed" and status[RUN]["step"] == "request_log", status[RUN]
    assert status[RUN_NO_GT]["status"] == "current"
    check = instance.get_latest_asset_check_evaluation_record(
        dg.AssetCheckKey(dg.AssetKey("replay_status"), "replays_current")
    )
    assert not check.event.asset_check_evaluation.passed


def test_request_path_carries_the_run_metadata_it_read(tmp_path):
    """request_log stores the RunMetadata it read (JSON at the store); the replay uses that one and reads no
    metadata file again: with exp-config.yaml gone from the folder afterwards, the stored log still replays."""
    import dataclasses

    from stepml_core import pipeline
    from stepml_core.replay import specs as rm
    from stepml_core.runs.folders import RunMetadata, read_run_metadata
    from stepml_dagster.io_manager import read_object, write_object

    folder = request_only_run(tmp_path / "data" / RUN)
    meta = read_run_metadata(folder, data_root=folder.parent)
    assert RunMetadata.from_json(json.loads(json.dumps(meta.to_json()))) == meta
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.source = "synthetic"
    write_object(tmp_path / "store" / RUN, pipeline.request_log(folder, folder.parent))
    stored = read_object(tmp_path / "store" / RUN)  # the request_log value as an asset reads it
    assert pipeline.stored_run_metadata(RUN, stored, folder.parent) == meta
    (folder / "exp-config.yaml").unlink()
    value, _ = pipeline.replay(
        RUN, stored, [rm.physics_spec()], data_root=folder.parent, out_dir=tmp_path / "out", seed=0
    )
    assert value["model"] == meta.model and value["details"].height
