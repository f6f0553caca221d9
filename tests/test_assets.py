"""Each asset on its own, invoked directly on a small synthetic run (no job, no instance), and every asset
check made to fail once."""

from __future__ import annotations

import warnings

import dagster as dg
import polars as pl
import pytest

from stepml_core import pipeline
from stepml_core.synth import synthesize_runs
from stepml_core.tables.ingest import ingest_run
from stepml_core.tables.steps import ValidatedSteps, validate_steps
from stepml_dagster import assets as A
from stepml_dagster.replay_assets import records_balance, request_log
from stepml_dagster.resources import StepMLSettings

RUN = "20260217-155451-llama-2-7b-tp1-codegen"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets_data")
    (folder,) = synthesize_runs(root, [RUN], scale=0.02, seed=1, workers=1)
    settings = StepMLSettings(data_dir=str(root), out_dir=str(tmp_path_factory.mktemp("assets_out")))
    raw = ingest_run(folder, root)
    return {"root": root, "folder": folder, "key": folder.name, "settings": settings, "raw": raw, "meta": raw["meta"]}


def _tables(run, **over) -> dict:
    """step_tables' inputs: the stored raw_traces (the run's metadata) and the trace tables it reads."""
    return {
        "raw_traces": run["meta"],
        "trace_steps": run["raw"]["steps"],
        "trace_quarantine": run["raw"]["quarantine"],
        **over,
    }


@pytest.fixture(scope="module")
def chain(run):
    """The partition's upstream values, as the assets themselves produce them."""
    raw, meta = run["raw"], run["meta"]
    outs = {o.output_name: o.value for o in A.step_tables(run["settings"], **_tables(run)) if isinstance(o, dg.Output)}
    ctx_value = A.request_context(meta, raw["steps"], raw["journey"], raw["snapshots"]).value
    fm = A.feature_matrix(meta, outs["step_table"], ctx_value, raw["snapshots"]).value
    sp = A.split(meta, outs["step_table"]).value
    fitted = A.fitted_models(feature_matrix=fm, split=sp)
    return {**outs, "request_context": ctx_value, "feature_matrix": fm, "split": sp, "fitted_models": fitted}


def _ctx(run):
    return dg.build_asset_context(partition_key=run["key"])


def _results(gen) -> tuple[dict, dict]:
    outs, checks = {}, {}
    for x in gen:
        if isinstance(x, dg.AssetCheckResult):
            checks[x.check_name] = x
        else:
            outs[x.output_name] = x
    return outs, checks


# --------------------------------------------------------------------------------- ingest ---


def test_raw_traces_reads_the_run_with_lineage(run):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = {o.output_name: o for o in A.raw_traces(_ctx(run), settings=run["settings"])}
    assert set(outs) == {"raw_traces", *A.TRACE_TABLES, "trace_spans"}
    meta, steps = outs["raw_traces"].value, outs["trace_steps"].value
    assert (
        meta["experiment_id"] == run["key"]
        and steps.height > 0
        and not any(isinstance(v, pl.DataFrame) for v in meta.values())
    )
    assert {o.data_version.value for o in outs.values()} == {meta["data_version"]}
    assert outs["raw_traces"].metadata["steps_read"].value == steps.height == meta["rows"]["steps"]
    for name, (table, _) in A.TRACE_TABLES.items():
        assert outs[name].value.equals(run["raw"][table])


def test_raw_traces_skips_a_run_without_traces(run, tmp_path):
    folder = tmp_path / run["key"]
    folder.mkdir()
    (folder / "exp-config.yaml").write_bytes((run["folder"] / "exp-config.yaml").read_bytes())
    settings = StepMLSettings(data_dir=str(tmp_path), out_dir=str(tmp_path / "out"))
    assert list(A.raw_traces(_ctx(run), settings=settings)) == []


def test_step_tables_keep_valid_rows_and_pass_every_check(run, chain):
    outs, checks = _results(A.step_tables(run["settings"], **_tables(run)))
    steps, quarantine = outs["step_table"].value, outs["quarantine"].value
    assert steps.height + outs["step_table"].metadata["rows_quarantined"].value == run["raw"]["steps"].height
    assert {"schedule_us", "cycle_us"} <= set(steps.columns)
    assert quarantine.columns[:4] == ["file", "line", "kind", "reason"]
    assert {n: c.passed for n, c in checks.items()} == {
        "schema_valid": True,
        "counts_balance": True,
        "no_unreadable_lines": True,
    }


def test_schema_valid_fails_on_a_kept_row_that_breaks_the_schema(run, monkeypatch):
    def broken(raw, file, exp_config=None):  # a validation bug: a row whose tokens do not add up is kept
        v = validate_steps(raw, file, exp_config)
        kept = v.kept.with_columns(
            pl.when(pl.int_range(pl.len()) == 0)
            .then(pl.col("batch.prefill_tokens") + 1)
            .otherwise(pl.col("batch.prefill_tokens"))
            .alias("batch.prefill_tokens")
        )
        return ValidatedSteps(kept=kept, quarantine=v.quarantine, rows_in=v.rows_in)

    monkeypatch.setattr(pipeline, "validate_steps", broken)
    _, checks = _results(A.step_tables(run["settings"], **_tables(run)))
    assert not checks["schema_valid"].passed and checks["counts_balance"].passed
    assert "prefill + decode tokens == scheduled tokens" in str(checks["schema_valid"].metadata["failures"].value)


def test_counts_balance_fails_when_a_row_is_lost(run, monkeypatch):
    def lossy(raw, file, exp_config=None):  # a validation bug: one row neither kept nor quarantined
        v = validate_steps(raw, file, exp_config)
        return ValidatedSteps(kept=v.kept.slice(1), quarantine=v.quarantine, rows_in=v.rows_in)

    monkeypatch.setattr(pipeline, "validate_steps", lossy)
    _, checks = _results(A.step_tables(run["settings"], **_tables(run)))
    assert not checks["counts_balance"].passed and checks["schema_valid"].passed


def test_no_unreadable_lines_warns_on_a_quarantined_line(run):
    meta = {**run["meta"], "counters": {**run["meta"]["counters"], "lines_quarantined": 2}}
    _, checks = _results(A.step_tables(run["settings"], **_tables(run, raw_traces=meta)))
    c = checks["no_unreadable_lines"]
    assert not c.passed and c.severity == dg.AssetCheckSeverity.WARN and c.metadata["lines_quarantined"].value == 2


# ------------------------------------------------------------------- features and models ---


def test_request_context_rebuilds_every_step(chain):
    a = chain["request_context"]["agreement"]
    assert a["available"] and a["steps"] >= chain["step_table"].height


def test_feature_matrix_one_row_per_kept_step(chain):
    fm, steps = chain["feature_matrix"], chain["step_table"]
    assert fm.height == steps.height and fm["step.id"].to_list() == steps["step.id"].to_list()
    assert set(fm["kv_source"].unique()) <= {"journey", "snapshot", "proxy_blocks"}


def test_split_is_temporal(chain):
    s = chain["split"].sort("step.id")
    order = {"train": 0, "valid": 1, "test": 2}
    assert s["split"].replace_strict(order).diff().drop_nulls().min() >= 0  # train, then valid, then test


def test_fitted_predictions_metrics(chain):
    fitted = chain["fitted_models"]
    assert set(fitted) == {"schedule_us", "cycle_us"} and {m["name"] for m in fitted["schedule_us"]} >= {
        "naive_mean",
        "ridge_30f",
    }
    pred = A.predictions(feature_matrix=chain["feature_matrix"], split=chain["split"], fitted_models=fitted)
    met = A.metrics(predictions=pred)
    assert set(met["split"].unique()) == {"train", "valid", "test"} and (met["n"] > 0).all()


def test_experiment_models_is_one_step_storing_each_of_its_assets(run, chain):
    """The seven per-experiment model assets come from one step, each value the same as computed on its own."""
    inputs = {k: chain[k] for k in ("step_table", "quarantine", "feature_matrix", "split", "request_context")}
    outs = {
        o.output_name: o
        for o in A.experiment_models(
            settings=run["settings"], raw_traces=run["meta"], trace_journey=run["raw"]["journey"], **inputs
        )
    }
    assert set(outs) == set(A.EXPERIMENT_MODEL_OUTS) == {k.to_user_string() for k in A.experiment_models.keys}
    assert outs["fitted_models"].value == chain["fitted_models"]
    assert outs["metrics"].value.equals(A.metrics(outs["predictions"].value)) and "test" in outs["metrics"].metadata


def test_run_summary_counts(run, chain):
    r = A.run_summary(
        raw_traces=run["meta"],
        step_table=chain["step_table"],
        quarantine=chain["quarantine"],
        feature_matrix=chain["feature_matrix"],
    )
    assert r["experiment_id"] == run["key"] and r["steps_kept"] == chain["step_table"].height
    assert r["steps_read"] == r["steps_kept"] + r["steps_quarantined"]


def test_method_checks_and_e2e(run, chain):
    mc = A.method_checks(
        settings=run["settings"],
        step_table=chain["step_table"],
        feature_matrix=chain["feature_matrix"],
        split=chain["split"],
        fitted_models=chain["fitted_models"],
    )
    assert {"stage_mix", "cycle_rule"} <= set(mc)
    e2e = A.e2e_fidelity(
        raw_traces=run["meta"],
        trace_journey=run["raw"]["journey"],
        request_context=chain["request_context"],
        fitted_models=chain["fitted_models"],
    )
    assert e2e["summary"].height > 0 and set(e2e["summary"]["model"]) <= {
        "naive_mean",
        "blackbox_2f",
        "ridge_30f",
        "nnls_physics",
        "hgb_30f",
    }


# ------------------------------------------------------------------------------ requests ---


def test_request_log_and_its_check(run):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (out,) = list(request_log(_ctx(run), settings=run["settings"]))
    log = out.value
    assert log["counts"]["records_in"] == log["requests"].height + log["quarantine"].height
    assert records_balance(request_log=log).passed
    lost = {**log, "requests": log["requests"].slice(1)}  # one record neither kept nor quarantined
    assert not records_balance(request_log=lost).passed
