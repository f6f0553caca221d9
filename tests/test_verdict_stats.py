"""The H1 verdict's statistics: circular block bootstrap, Wilcoxon's minimum n, the verdict rule, ties within noise."""

import numpy as np
import polars as pl
import pytest

from stepml_core.study.h1 import metrics_from_predictions
from stepml_core.study.stats import (
    WILCOXON_MIN_N,
    bootstrap_means,
    circular_block_indices,
    percentile_ci,
    wilcoxon_min_n,
    wilcoxon_one_sided,
)
from stepml_core.study.verdict import h1_verdict, rank_with_ties, recommend


def test_every_row_drawn_equally_often_and_bootstrap_centred_on_the_sample_mean():
    n = 142
    idx = circular_block_indices(n, 4000, seed=1)
    counts = np.bincount(idx.ravel(), minlength=n)
    assert (
        counts.min() > 0.85 * counts.mean() and counts.max() < 1.15 * counts.mean()
    )  # last rows as often as the middle
    d = np.random.default_rng(0).normal(0, 0.1, n)
    d[-3:] = 40.0  # one extreme error block at the end of the test rows (the real-run case)
    means = bootstrap_means(d, 4000, seed=2)
    assert abs(means.mean() - d.mean()) < 0.05 * d.mean()


def test_point_estimate_inside_its_interval_with_extreme_last_rows():
    rng = np.random.default_rng(3)
    for k in range(20):
        d = rng.normal(-0.2, 0.3, int(rng.integers(100, 1500)))
        d[-int(rng.integers(1, 4)) :] = rng.uniform(20, 80)
        lo, hi = percentile_ci(bootstrap_means(d, 1000, seed=k))
        assert lo <= d.mean() <= hi, (k, lo, d.mean(), hi)


def test_coverage_on_autocorrelated_errors_with_a_known_mean():
    """AR(1) errors (φ = 0.5) around a known mean of 1.0: the 95 % interval covers it about 95 % of the time."""
    rng = np.random.default_rng(7)
    n, reps, trials, hits = 400, 400, 300, 0
    for t in range(trials):
        e = rng.normal(0, 1, n)
        x = np.empty(n)
        x[0] = e[0]
        for i in range(1, n):
            x[i] = 0.5 * x[i - 1] + e[i]
        lo, hi = percentile_ci(bootstrap_means(1.0 + x, reps, seed=t))
        hits += lo <= 1.0 <= hi
    assert 0.88 <= hits / trials <= 0.99, hits / trials


def test_wilcoxon_cannot_reach_significance_below_its_minimum_n():
    assert wilcoxon_min_n(0.05) == WILCOXON_MIN_N == 5
    three = wilcoxon_one_sided([-1.0, -2.0, -3.0])
    assert three["p"] is None and not three["reachable"] and three["min_p"] == pytest.approx(0.125)
    five = wilcoxon_one_sided([-1.0, -2.0, -3.0, -4.0, -5.0])
    assert five["reachable"] and five["p"] == pytest.approx(1 / 32)


def _predictions(errors: dict[str, float], n_exp: int, *, n_rows: int = 200, noise: float = 0.0, seed: int = 1):
    """Per-experiment test predictions with |ŷ − y| / y = err (± noise) per model."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_exp):
        y = rng.uniform(100, 200, n_rows)
        for model, err in errors.items():
            ape = np.clip(err + noise * rng.normal(size=n_rows), 0, None)
            rows.append(
                pl.DataFrame(
                    {
                        "experiment_id": f"e{i}",
                        "source": "synthetic",
                        "step.id": np.arange(n_rows),
                        "split": "test",
                        "load_stage": 0,
                        "target": "cycle_us",
                        "model": model,
                        "scope": "per_experiment",
                        "y": y,
                        "y_pred": y * (1 + ape * rng.choice([-1, 1], n_rows)),
                    }
                )
            )
    pred = pl.concat(rows)
    return metrics_from_predictions(pred), pred


def _verdict(errors, n_exp, **kw):
    met, pred = _predictions(errors, n_exp, **kw)
    return h1_verdict(met, pred, reps=300)["targets"]["cycle_us"]


def test_verdict_supported_needs_threshold_and_clear_wins():
    v = _verdict({"ridge_30f": 0.10, "blackbox_2f": 0.40, "naive_mean": 0.60}, 6, noise=0.02)
    assert v["verdict"] == "supported" and v["threshold_separates"]
    assert (
        v["baselines"]["blackbox_2f"]["outcome"] == "clearly_beats"
        and v["baselines"]["blackbox_2f"]["wilcoxon_p_one_sided"] < 0.05
    )


def test_verdict_refuted_when_below_threshold_but_no_better_than_the_blackbox():
    """The real-run cycle_us case: everything under 25 %, ridge_30f ≈ blackbox_2f → the comparative half of H1 fails."""
    v = _verdict({"ridge_30f": 0.02, "blackbox_2f": 0.0202, "naive_mean": 0.08}, 2, n_rows=400, noise=0.005)
    assert v["threshold"] == "below"
    assert v["baselines"]["blackbox_2f"]["outcome"] == "does_not_clearly_beat"
    assert v["baselines"]["naive_mean"]["outcome"] == "clearly_beats"
    assert v["verdict"] == "refuted"
    assert not v["threshold_separates"] and any("does not separate" in r for r in v["reasons"])
    assert v["skill_vs_naive_mean"] == pytest.approx(0.75, abs=0.05)


def test_verdict_refuted_above_threshold_and_inconclusive_between():
    assert _verdict({"ridge_30f": 0.40, "blackbox_2f": 0.90, "naive_mean": 0.95}, 6, noise=0.02)["verdict"] == "refuted"
    v = _verdict({"ridge_30f": 0.27, "blackbox_2f": 0.90, "naive_mean": 0.95}, 6, noise=0.02)
    assert v["threshold"] == "between" and v["verdict"] == "inconclusive"


def test_verdict_inconclusive_when_the_comparison_is_undecided():
    """Ridge 10 % lower than the blackbox on average but very noisy rows: neither clearly better nor clearly not."""
    v = _verdict({"ridge_30f": 0.18, "blackbox_2f": 0.20, "naive_mean": 0.9}, 2, n_rows=40, noise=0.3)
    assert v["baselines"]["blackbox_2f"]["outcome"] == "undecided" and v["verdict"] == "inconclusive"


def test_few_experiments_give_no_p_value_as_evidence():
    v = _verdict({"ridge_30f": 0.10, "blackbox_2f": 0.40, "naive_mean": 0.60}, 3, noise=0.02)
    b = v["baselines"]["blackbox_2f"]
    assert (
        b["wilcoxon_p_one_sided"] is None
        and not b["wilcoxon_reachable"]
        and b["wilcoxon_min_p"] == pytest.approx(0.125)
    )
    assert b["outcome"] == "clearly_beats" and "run by run" in b["decided_by"]  # every run's interval decides
    from stepml_core.report.study import verdict_section

    md = "\n".join(verdict_section({"rule": "r", "targets": {"cycle_us": v}}))
    assert "p =" not in md and "cannot reach p < 0.05" in md
    v6 = _verdict({"ridge_30f": 0.10, "blackbox_2f": 0.40, "naive_mean": 0.60}, 6, noise=0.02)
    assert "Wilcoxon p =" in "\n".join(verdict_section({"rule": "r", "targets": {"cycle_us": v6}}))


def test_ties_within_noise_are_ties_and_the_simplest_tied_model_is_recommended():
    met, pred = _predictions(
        {"hgb_30f": 0.0200, "ridge_30f": 0.0201, "blackbox_2f": 0.0202, "naive_mean": 0.08}, 4, noise=0.01
    )
    pred = pred.with_columns(scope=pl.lit("per_model"))
    r = rank_with_ties(pred, "cycle_us", "per_model", reps=300)
    tied = dict(zip(r["model"].to_list(), r["tied_with_best"].to_list()))
    assert tied["hgb_30f"] and tied["ridge_30f"] and tied["blackbox_2f"] and not tied["naive_mean"]
    rec = recommend(r)
    assert rec["model"] == "blackbox_2f" and set(rec["tied"]) == {"hgb_30f", "ridge_30f", "blackbox_2f"}


def test_a_model_with_an_absurd_run_is_never_tied_with_the_best():
    """One exploding run widens the interval to include 0; it does not make the model as good as the best."""
    met, pred = _predictions({"nnls_physics": 0.30, "ridge_log_30f": 0.28}, 16, n_rows=60, noise=0.05)
    blow = (
        (pl.col("model") == "ridge_log_30f") & (pl.col("experiment_id") == "e0") & (pl.col("step.id") < 2)
    )  # exp() of two outlying rows
    pred = pred.with_columns(
        y_pred=pl.when(blow).then(pl.col("y") * 4e4).otherwise(pl.col("y_pred")), scope=pl.lit("per_model")
    )
    r = rank_with_ties(pred, "cycle_us", "per_model", reps=300)
    row = r.filter(pl.col("model") == "ridge_log_30f").row(0, named=True)
    assert row["worst_run_mape_pct"] > 1000 and row["diff_lo_pct"] <= 0  # the interval alone would call it a tie
    assert not row["tied_with_best"]
