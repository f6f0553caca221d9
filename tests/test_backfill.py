"""`stepml backfill --experiment A` recomputes only A's partitions and the study assets (real runs)."""

from __future__ import annotations

import dagster as dg
import pytest
from ops_helpers import RUN_A, RUN_B, copy_run

from stepml_dagster import assets as A
from stepml_dagster import sensors as S
from stepml_dagster.assets import ALL_ASSETS, STEP_ASSETS, STUDY_ASSETS
from stepml_dagster.cli import main, run_study

PART_KEYS = [
    k for a in STEP_ASSETS for k in a.keys
]  # the real traced runs here have no request logs: no request_log, no replay
STUDY_KEYS = [k for a in STUDY_ASSETS for k in a.keys]


@pytest.fixture(scope="module")
def study(real_experiments, tmp_path_factory):
    base = tmp_path_factory.mktemp("backfill")
    data, out = base / "data", base / "out"
    for rid in (RUN_A, RUN_B):
        copy_run(real_experiments / rid, data / rid)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(base / "home"))
        res = run_study(data, out, synth_if_empty=False, quiet=True)
        assert res["study_ok"] and not res["failed"]
        yield data, out, dg.DagsterInstance.get()


def mat_counts(instance) -> dict:
    counts = {}
    for k in PART_KEYS:
        for p in (RUN_A, RUN_B):
            counts[(k.to_user_string(), p)] = len(
                instance.fetch_materializations(
                    dg.AssetRecordsFilter(asset_key=k, asset_partitions=[p]), limit=100
                ).records
            )
    for k in STUDY_KEYS:
        counts[(k.to_user_string(), None)] = len(instance.fetch_materializations(k, limit=100).records)
    return counts


def stored_mtimes(out) -> dict:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in (out / "assets").rglob("*") if p.is_file()}


def test_backfill_one_experiment_recomputes_only_it_and_the_study(study):
    data, out, instance = study
    before, files_before = mat_counts(instance), stored_mtimes(out)
    report_before = (out / "report.md").stat().st_mtime_ns
    assert all(v == 1 for v in before.values()), before
    for key in (
        "global_models",
        "generalization",
    ):  # stepml run fitted the pooled folds while the last partition finished
        meta = instance.fetch_materializations(dg.AssetKey(key), limit=1).records[0].asset_materialization.metadata
        assert meta["folds_reused"].value == meta["folds"].value > 0, (key, meta)
    assert main(["backfill", "--data", str(data), "--out", str(out), "--experiment", RUN_A]) == 0
    after, files_after = mat_counts(instance), stored_mtimes(out)
    changed = {k for k in after if after[k] != before[k]}
    assert changed == {(k.to_user_string(), RUN_A) for k in PART_KEYS} | {
        (k.to_user_string(), None) for k in STUDY_KEYS
    }
    assert all(after[k] == 2 for k in changed)
    for rel, mtime in files_before.items():
        if f"/{RUN_B}" in rel:
            assert files_after[rel] == mtime, f"{rel} was rewritten"
        elif f"/{RUN_A}" in rel or "/__all__" in rel:
            assert files_after[rel] > mtime, f"{rel} was not rewritten"
    assert (out / "report.md").stat().st_mtime_ns > report_before
    for key in ("global_models", "generalization"):  # same traces again: every pooled fold reuses its stored fit
        meta = instance.fetch_materializations(dg.AssetKey(key), limit=1).records[0].asset_materialization.metadata
        assert meta["folds_reused"].value == meta["folds"].value > 0, (key, meta)
    assert not [p for p in out.rglob("*") if p.suffix in {".pkl", ".pickle"}]  # nothing pickled


def test_study_sensor_up_to_date_after_cli_and_backfill(study):
    _, _, instance = study
    res = S.build_study_sensor(minimum_interval_seconds=1)(dg.build_sensor_context(instance=instance))
    assert isinstance(res, dg.SkipReason) and "up to date" in res.skip_message


def test_backfill_refuses_unknown_or_traversal_ids_before_running(study, capsys):
    data, out, instance = study
    n_runs = len(instance.get_run_records())
    for bad in ("../../etc", "20260217-203421-llama-2-70b-hf-tp4-nope", str(data / RUN_A)):
        assert main(["backfill", "--data", str(data), "--out", str(out), "--experiment", bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not a run folder" in err and RUN_A in err
    assert main(["backfill", "--data", str(data), "--out", str(out)]) == 2  # neither --experiment nor --all
    assert "--experiment ID (repeatable) or --all" in capsys.readouterr().err
    assert len(instance.get_run_records()) == n_runs


def test_changed_input_marks_downstream_partition_stale(study):
    """raw_traces carries the fingerprint digest as its data version: what the UI's 'Stale' badges use."""
    from dagster._core.definitions.data_version import StaleStatus
    from dagster._utils.test.data_versions import get_stale_status_resolver  # the resolver the UI queries go through

    from stepml_dagster.definitions import build_definitions
    from stepml_dagster.resources import StepMLSettings

    data, out, instance = study
    rec = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("raw_traces"), asset_partitions=[RUN_A]), limit=1
    ).records[0]
    from stepml_core.tables.ingest import fingerprint, fingerprint_digest

    assert rec.asset_materialization.tags["dagster/data_version"] == fingerprint_digest(fingerprint(data / RUN_A))
    with open(data / RUN_A / "profile.yaml", "a") as f:
        f.write("# edited after the run\n")
    defs = build_definitions(StepMLSettings(data_dir=str(data), out_dir=str(out)))
    res = dg.materialize(
        ALL_ASSETS,
        selection=[k.to_user_string() for k in A.raw_traces.keys],
        partition_key=RUN_A,  # one step
        instance=instance,
        resources=dict(defs.resources),
    )
    assert res.success
    resolver = get_stale_status_resolver(instance, ALL_ASSETS)
    assert resolver.get_status(dg.AssetKey("step_table"), RUN_A) == StaleStatus.STALE
    assert resolver.get_status(dg.AssetKey("step_table"), RUN_B) == StaleStatus.FRESH
    assert resolver.get_status(dg.AssetKey("raw_traces"), RUN_A) == StaleStatus.FRESH
    assert resolver.get_status(dg.AssetKey("trace_steps"), RUN_A) == StaleStatus.FRESH


def test_study_sensor_chains_models_replays_and_study(study):
    """New experiment data → models_job; then one replay_job per partition with a request log; then study_job;
    each request has a stable run key (Dagster launches it once) and nothing is requested while a phase runs."""
    _, _, instance = study
    sensor = S.build_study_sensor(minimum_interval_seconds=1)
    tick = lambda: sensor(dg.build_sensor_context(instance=instance))  # noqa: E731
    assert isinstance(tick(), dg.SkipReason)  # raw_traces alone: no
    instance.report_runless_asset_event(dg.AssetMaterialization("run_summary", partition=RUN_A))
    req = tick()
    assert [r.job_name for r in req] == ["models_job"] and req[0].run_key.startswith("models:")
    assert tick()[0].run_key == req[0].run_key  # same key: Dagster launches it once
    instance.report_runless_asset_event(dg.AssetMaterialization("replay_models"))
    instance.report_runless_asset_event(dg.AssetMaterialization("request_log", partition=RUN_B))
    req = tick()  # the new request log is also an input of the models phase: models first
    assert [r.job_name for r in req] == ["models_job"]
    instance.report_runless_asset_event(dg.AssetMaterialization("replay_models"))
    req = tick()
    assert [(r.job_name, r.partition_key) for r in req] == [("replay_job", RUN_B)] and req[0].run_key.startswith(
        "replay:"
    )
    instance.report_runless_asset_event(dg.AssetMaterialization("replay", partition=RUN_B))
    req = tick()
    assert [r.job_name for r in req] == ["study_job"] and req[0].run_key.startswith("study:")
    instance.report_runless_asset_event(dg.AssetMaterialization("study_report"))
    res = tick()
    assert isinstance(res, dg.SkipReason) and "up to date" in res.skip_message


def test_experiment_sensor_does_not_relaunch_what_the_cli_materialized(study):
    """Same instance as `stepml run`: a fresh sensor (empty cursor) launches only the run whose inputs
    changed after its last materialization, not the one `stepml run` already materialized."""
    from stepml_dagster.resources import StepMLSettings

    data, out, instance = study
    with open(data / RUN_A / "profile.yaml", "a") as f:
        f.write("# changed once more\n")
    sensor = S.build_experiment_sensor(minimum_interval_seconds=1)
    ctx = lambda cursor: dg.build_sensor_context(
        instance=instance,
        cursor=cursor,  # noqa: E731
        resources={"settings": StepMLSettings(data_dir=str(data), out_dir=str(out))},
    )
    first = sensor(ctx(None))  # RUN_B: up to date → not launched; RUN_A: just written → later tick
    assert not first.run_requests
    second = sensor(ctx(first.cursor))
    assert [r.partition_key for r in second.run_requests] == [RUN_A]
    assert not second.dynamic_partitions_requests
