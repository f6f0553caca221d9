import numpy as np
import polars as pl
import pytest

from stepml_core.runs.folders import RunIdError, parse_run_id
from stepml_core.stepmodels.estimators import LinearStepModel, fit_ridge_validated, mape_pct
from stepml_core.study.h1 import h1_verdict, metrics_from_predictions
from stepml_core.tables.splits import load_stage, split_sizes, temporal_split
from stepml_core.tables.steps import add_targets, validate_steps


def test_split_sizes_follow_original_rounding():
    assert split_sizes(15588) == (9353, 3118, 3117)
    ids = np.array([5, 1, 3, 2, 4, 9, 8, 7, 6, 10])
    labels = temporal_split(ids)
    by_id = dict(zip(ids.tolist(), labels.tolist()))
    assert [by_id[i] for i in range(1, 11)] == ["train"] * 6 + ["valid"] * 2 + ["test"] * 2


def test_load_stage_boundaries():
    ts = np.array([0, 599, 601, 1199]) * 1_000_000_000
    assert load_stage(ts, [600, 600]).tolist() == [0, 0, 1, 1]


def test_run_ids():
    r = parse_run_id("20260217-203421-llama-2-70b-hf-tp4-codegen")
    assert (r.model, r.tp, r.workload, r.synthetic_suffix) == ("llama-2-70b", 4, "codegen", False)
    assert parse_run_id("20260217-203421-llama-2-70b-hf-tp4-codegen-synth").synthetic_suffix
    for bad in [
        "../etc",
        "20260217-203421-llama-2-7b-tp1-codegen/../../x",
        "x" * 200,
        "20261317-000000-llama-2-7b-tp1-codegen",
    ]:
        with pytest.raises(RunIdError):
            parse_run_id(bad)


def _steps(n=20):
    return pl.DataFrame(
        {
            "step.id": list(range(1, n + 1)),
            "step.ts_start_ns": [i * 20_000_000 for i in range(n)],
            "step.ts_end_ns": [i * 20_000_000 + 150_000 for i in range(n)],
            "step.duration_us": [150] * n,
            "queue.running_depth": [3] * n,
            "queue.waiting_depth": [0] * n,
            "batch.num_prefill_reqs": [1] * n,
            "batch.num_decode_reqs": [2] * n,
            "batch.scheduled_tokens": [312] * n,
            "batch.prefill_tokens": [310] * n,
            "batch.decode_tokens": [2] * n,
            "batch.num_finished": [0] * n,
            "batch.num_preempted": [0] * n,
            "kv.usage_gpu_ratio": [0.1] * n,
            "kv.blocks_total_gpu": [6852] * n,
            "kv.blocks_free_gpu": [6000] * n,
            "source_line": list(range(1, n + 1)),
            "parse_issue": [None] * n,
        },
        schema_overrides={"parse_issue": pl.Utf8},
    )


def test_validation_quarantines_each_bad_row_with_reason():
    s = _steps().with_columns(
        pl.when(pl.col("step.id") == 3)
        .then(999)
        .otherwise(pl.col("batch.prefill_tokens"))
        .alias("batch.prefill_tokens"),
        pl.when(pl.col("step.id") == 5).then(9000).otherwise(pl.col("kv.blocks_free_gpu")).alias("kv.blocks_free_gpu"),
        pl.when(pl.col("step.id") == 7).then(1.5).otherwise(pl.col("kv.usage_gpu_ratio")).alias("kv.usage_gpu_ratio"),
        pl.when(pl.col("step.id") == 9)
        .then(pl.lit("step.duration_us: non-finite"))
        .otherwise(pl.col("parse_issue"))
        .alias("parse_issue"),
    )
    s = pl.concat([s, s.filter(pl.col("step.id") == 11).with_columns(source_line=pl.lit(99, pl.Int64))])
    v = validate_steps(s, "traces.json")
    assert v.rows_in == 21 and v.kept.height == 16 and v.quarantine.height == 5
    reasons = dict(zip(v.quarantine["line"].to_list(), v.quarantine["reason"].to_list()))
    assert "prefill + decode" in reasons[3]
    assert "free" in reasons[5]
    assert "kv.usage_gpu_ratio" in reasons[7]
    assert reasons[9].startswith("parse:")
    assert "duplicate step.id 11 (first seen at line 11)" in reasons[99]


def test_cycle_target_only_for_consecutive_ids():
    s = _steps(6).filter(pl.col("step.id") != 4)
    t = add_targets(validate_steps(s, "f").kept)
    assert t["cycle_us"].to_list() == [20000.0, 20000.0, None, 20000.0, None]
    assert t["schedule_us"].to_list() == [150.0] * 5


def test_ridge_alpha_on_validation_and_json_roundtrip():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 3))
    y = 100 + X @ np.array([5.0, -2.0, 0.5]) + rng.normal(0, 0.1, 300)
    m = fit_ridge_validated("r", "t", ["a", "b", "c"], X[:200], y[:200], X[200:250], y[200:250])
    m2 = LinearStepModel.from_dict(m.to_dict())
    assert mape_pct(y[250:], m2.predict(X[250:])) < 1.0
    np.testing.assert_array_equal(m.predict(X), m2.predict(X))


def test_verdict_rule_and_metrics():
    rows = []
    rng = np.random.default_rng(1)
    for e in ["a", "b", "c", "d", "e", "f"]:
        y = rng.uniform(100, 200, 50)
        for model, err in [("ridge_30f", 0.1), ("blackbox_2f", 0.5), ("naive_mean", 0.6)]:
            rows.append(
                pl.DataFrame(
                    {
                        "experiment_id": e,
                        "source": "synthetic",
                        "step.id": np.arange(50),
                        "split": "test",
                        "load_stage": 0,
                        "target": "schedule_us",
                        "model": model,
                        "scope": "per_experiment",
                        "y": y,
                        "y_pred": y * (1 + err * rng.choice([-1, 1], 50)),
                    }
                )
            )
    pred = pl.concat(rows)
    met = metrics_from_predictions(pred)
    r = met.filter((pl.col("model") == "ridge_30f") & (pl.col("experiment_id") == "a"))
    assert r["mape_pct"][0] == pytest.approx(10.0) and r["n"][0] == 50
    v = h1_verdict(met, pred, reps=200)["targets"]["schedule_us"]
    assert v["verdict"] == "supported" and v["clearly_beats_baselines"]
    assert v["baselines"]["blackbox_2f"]["wilcoxon_p_one_sided"] < 0.05
