"""Method fixes: positive floor, like-for-like baselines, the cycle rule, stage-matched splits, batch N−1 alignment,
alpha grid edges, ablation noise, absurd generalization values."""

import json

import numpy as np
import polars as pl
import pytest

from stepml_core.features.step_features import feature_columns
from stepml_core.stepmodels.estimators import ALPHA_GRID, fit_ols_original, fit_ridge_validated
from stepml_core.stepmodels.fitted import predict_model
from stepml_core.study.findings import ablation_summary, generalization_summary, transfer_statement
from stepml_core.study.h1 import fit_models
from stepml_core.study.method_checks import alignment_comparison, alpha_choices, stage_mix_table
from stepml_core.tables.splits import random_split, split_sizes, stage_matched_split
from stepml_core.tables.steps import add_targets, cycle_rule_counts, validate_steps


def _linear_data(n=300, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 1, (n, 2))
    y = 50 + 400 * X[:, 0] + rng.normal(0, 5, n)
    return X, y


def test_every_stepml_model_and_the_exported_predictor_floor_predictions_the_same_way():
    from stepml_core.stepmodels.json_export import export_model
    from stepml_core.stepmodels.reference_predictor import predict_from_features

    X, y = _linear_data()
    m = fit_ridge_validated("r", "cycle_us", ["a", "b"], X[:200], y[:200], X[200:250], y[200:250]).to_dict() | {
        "kind": "linear"
    }
    assert m["floor_us"] == pytest.approx(y[:250][y[:250] > 0].min())
    X_neg = np.array([[-5.0, 0.0], [1.0, 0.0]])  # far outside: the linear score is negative
    raw = m["intercept"] + ((X_neg - np.array(m["mean"])) / np.array(m["scale"])) @ np.array(m["coef"])
    assert raw[0] < 0
    got = predict_model(m, X_neg)
    assert got[0] == m["floor_us"] and got[1] == pytest.approx(raw[1])
    exported = json.loads(json.dumps(export_model(m, model="llama-2-70b", tp=4, data_versions={"r": "x"})))
    assert exported["floor_us"] == m["floor_us"]
    for row, want in zip(X_neg, got):
        assert predict_from_features({"a": row[0], "b": row[1]}, exported) == pytest.approx(want, rel=1e-12)


def test_fit_models_floor_all_stepml_models_not_the_original_recipes():
    rng = np.random.default_rng(1)
    n = 400
    fm = pl.DataFrame({c: rng.uniform(0, 1, n) for c in feature_columns()}).with_columns(
        prefill_tokens=pl.Series(rng.uniform(0, 2000, n)),
        decode_tokens=pl.Series(rng.uniform(0, 100, n)),
        t_compute_us=pl.Series(rng.uniform(0, 10, n)),
        t_memory_us=pl.Series(rng.uniform(0, 10, n)),
        split=pl.Series(np.repeat(["train", "valid", "test"], [240, 80, 80])),
    )
    fm = fm.with_columns(cycle_us=50 + 0.2 * pl.col("prefill_tokens") + pl.Series(rng.normal(0, 5, n)))
    for c in [
        c for c in __import__("stepml_core.features.step_features", fromlist=["ORIGINAL_FEATURES"]).ORIGINAL_FEATURES
    ]:
        fm = fm.with_columns(pl.lit(1.0).alias(c))
    models = {m["name"]: m for m in fit_models(fm, "cycle_us", "per_experiment")}
    for name, m in models.items():
        if name.endswith("_orig"):
            assert m.get("floor_us") is None, name
        else:
            assert m["floor_us"] > 0, name
            X = fm.select(m["features"]).to_numpy() * (-100 if m["features"] else 1)  # push linear scores below zero
            assert (predict_model(m, X) >= m["floor_us"]).all(), name


def test_h1_trio_is_fitted_like_for_like_on_train_plus_valid():
    rng = np.random.default_rng(2)
    n = 500
    fm = pl.DataFrame({c: rng.uniform(0, 1, n) for c in feature_columns()}).with_columns(
        split=pl.Series(np.repeat(["train", "valid", "test"], [300, 100, 100])),
        cycle_us=pl.Series(np.r_[np.full(300, 100.0), np.full(100, 200.0), np.full(100, 200.0)] + rng.normal(0, 1, n)),
    )
    models = {
        m["name"]: m for m in fit_models(fm, "cycle_us", "per_experiment", ("naive_mean", "blackbox_2f", "ridge_30f"))
    }
    for m in models.values():
        assert m["fitted_on"] == ["train", "valid"] and m["n_fit"] == 400
    assert models["naive_mean"]["intercept"] == pytest.approx(fm.filter(pl.col("split") != "test")["cycle_us"].mean())


def _steps(n=200, gap_ns=20_000_000):
    ts = np.arange(n, dtype=np.int64) * gap_ns
    ts[120:] += 10 * gap_ns  # step 121 starts late: the gap 120 → 121 is a stall of 11 cycles
    return pl.DataFrame(
        {
            "step.id": list(range(1, n + 1)),
            "step.ts_start_ns": ts,
            "step.ts_end_ns": ts + 150_000,
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


def test_cycle_rule_removes_idle_gaps_and_stalls_and_counts_them():
    s = _steps()
    # step 60 finishes its only running request, nothing waits, and the next step comes 3 cycles later: idle
    s = s.with_columns(
        pl.when(pl.col("step.id") == 60).then(3).otherwise(pl.col("batch.num_finished")).alias("batch.num_finished"),
        *[
            pl.when(pl.col("step.id") > 60).then(pl.col(c) + 40_000_000).otherwise(pl.col(c)).alias(c)
            for c in ("step.ts_start_ns", "step.ts_end_ns")
        ],
    )
    # step 30 also finishes everything but the next step follows at the usual cycle: kept (no wait happened)
    s = s.with_columns(
        pl.when(pl.col("step.id") == 30).then(3).otherwise(pl.col("batch.num_finished")).alias("batch.num_finished")
    )
    t = add_targets(validate_steps(s, "f").kept)
    ex = dict(zip(t["step.id"].to_list(), t["cycle_excluded"].to_list()))
    assert ex[60] == "idle" and ex[120] == "stall" and ex[30] is None
    assert t.filter(pl.col("step.id").is_in([60, 120]))["cycle_us"].null_count() == 2
    assert t.filter(~pl.col("step.id").is_in([60, 120, 200]))["cycle_us"].null_count() == 0
    assert t.filter(pl.col("step.id") == 60)["cycle_gap_us"][0] == pytest.approx(60_000.0)
    assert cycle_rule_counts(t) == {"pairs": 199, "kept": 197, "idle": 1, "stall": 1}


def test_stage_matched_split_gives_every_block_the_run_stage_mix():
    ids = np.arange(1000)
    stages = (ids >= 300).astype(int)  # 30 % low-rate stage first
    labels = stage_matched_split(ids, stages)
    for block in ("train", "valid", "test"):
        share = stages[labels == block].mean()
        assert share == pytest.approx(0.7, abs=0.01), block
    r = random_split(ids, seed=3)
    assert [int((r == b).sum()) for b in ("train", "valid", "test")] == list(split_sizes(1000))
    fm = pl.DataFrame(
        {
            "experiment_id": "e",
            "step.id": ids,
            "load_stage": stages,
            "split": np.where(ids < 600, "train", np.where(ids < 800, "valid", "test")),
        }
    )
    mix = stage_mix_table(fm)
    temporal_test = mix.filter((pl.col("scheme") == "temporal") & (pl.col("block") == "test"))
    assert temporal_test["load_stage"].to_list() == [1] and temporal_test["share"][0] == 1.0
    assert set(mix["scheme"]) == {"temporal", "stage_matched", "random"}


def test_alignment_comparison_finds_a_cycle_driven_by_the_previous_batch():
    rng = np.random.default_rng(4)
    n = 900
    fm = pl.DataFrame({c: rng.uniform(0, 1, n) for c in feature_columns()}).with_columns(
        pl.Series("step.id", np.arange(1, n + 1)),
        experiment_id=pl.lit("e"),
        decode_tokens=pl.Series(rng.uniform(1, 128, n)),
        prefill_tokens=pl.Series(rng.uniform(0, 2048, n)),
        split=pl.Series(np.where(np.arange(n) < 540, "train", np.where(np.arange(n) < 720, "valid", "test"))),
    )
    prev_decode = np.r_[np.nan, fm["decode_tokens"].to_numpy()[:-1]]
    fm = fm.with_columns(cycle_us=pl.Series(10_000 + 60 * prev_decode + rng.normal(0, 50, n)))
    a = alignment_comparison(fm, reps=200)
    r = {
        (m, al): (mp, lo, hi)
        for m, al, mp, lo, hi in a.select("model", "alignment", "mape_pct", "diff_lo_pct", "diff_hi_pct").iter_rows()
    }
    assert r[("blackbox_2f", "N-1")][0] < 0.5 * r[("blackbox_2f", "N")][0]
    assert r[("blackbox_2f", "N-1")][2] < 0  # better beyond noise


def test_alpha_grid_is_wider_and_edge_choices_are_flagged():
    assert ALPHA_GRID[0] == pytest.approx(1e-6) and ALPHA_GRID[-1] == pytest.approx(1e8)
    rng = np.random.default_rng(5)
    X, y = rng.normal(size=(300, 5)), 1000 + rng.normal(0, 10, 300)  # pure noise: shrink to the mean
    m = fit_ridge_validated("ridge_30f", "cycle_us", list("abcde"), X[:200], y[:200], X[200:], y[200:]).to_dict()
    t = alpha_choices(
        {
            "cycle_us": [
                m,
                {**m, "alpha": ALPHA_GRID[0]},
                {**fit_ols_original("o", "cycle_us", list("abcde"), X, y).to_dict()},
            ]
        },
        "e",
        "per_experiment",
    )
    assert t.height == 2  # the original recipe has no validated alpha
    assert t["at_low_edge"].to_list()[1] and not t["at_high_edge"].to_list()[1]


def test_ablation_effect_only_beyond_noise():
    abl = pl.DataFrame(
        {
            "experiment_id": ["a", "b", "a", "b", "a", "b"],
            "target": "cycle_us",
            "model": "ridge_30f",
            "group": ["physics", "physics", "phase", "phase", "architecture", "architecture"],
            "mape_all_pct": 10.0,
            "mape_without_pct": [13.0, 12.0, 10.2, 9.9, 10.0, 10.0],
            "mape_only_pct": 20.0,
            "change_se_pct": [0.5, 0.5, 0.5, 0.5, 1e-9, 1e-9],
        }
    )
    eff = dict(ablation_summary(abl).select("group", "effect").iter_rows())
    assert eff == {"physics": "carried the fit", "phase": "within noise", "architecture": "no change"}


def test_absurd_generalization_values_are_flagged_explained_and_ranked_on_the_median():
    rows = []
    for model, vals in {
        "ridge_log_30f": [20.0, 389_051_084.0, 30.0],
        "naive_mean": [25.0, 26.0, 27.0],
        "hgb_30f": [22.0, 40.0, 21.0],
    }.items():
        for e, v in zip("abc", vals):
            rows.append(
                {
                    "experiment_id": e,
                    "target": "cycle_us",
                    "model": model,
                    "scope": "leave_one_model_out",
                    "split": "test",
                    "mape_pct": v,
                }
            )
    gm = pl.DataFrame(rows)
    gp = pl.DataFrame(
        {
            "experiment_id": "b",
            "target": "cycle_us",
            "model": "ridge_log_30f",
            "scope": "leave_one_model_out",
            "split": "test",
            "y": [100.0, 200.0],
            "y_pred": [3.9e8, 150.0],
        }
    )
    g = generalization_summary(gm, gp)
    assert g["model"].to_list() == [
        "hgb_30f",
        "naive_mean",
        "ridge_log_30f",
    ]  # medians 22, 26, 30 (the mean would put ridge_log last by 10⁸)
    bad = g.filter(pl.col("absurd")).row(0, named=True)
    assert bad["model"] == "ridge_log_30f" and "exp(" in bad["why"] and "3.9e+06×" in bad["why"]
    t = transfer_statement(g, "cycle_us")
    assert t["transfers"] and t["best_model"] == "hgb_30f" and t["naive_median_pct"] == 26.0  # 22 ≤ 0.9 × 26
    g2 = generalization_summary(
        gm.with_columns(
            pl.when(pl.col("model") == "hgb_30f").then(25.0).otherwise(pl.col("mape_pct")).alias("mape_pct")
        ),
        None,
    )
    assert not transfer_statement(g2, "cycle_us")["transfers"]  # 25 % vs the naive mean's 26 %: nothing transfers
