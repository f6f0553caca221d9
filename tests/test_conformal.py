"""Intervals widened by a split-conformal extrapolation term (stepml_core.replay.intervals): the formula by hand, a run's
interval never reads its own ground truth nor the errors of models that could have used its data, and on
exchangeable runs the widened 90 % intervals cover ≥ 90 % where the bootstrap alone does not."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from stepml_core.replay.intervals import conformal_quantile, could_use, excess_pct, min_scores, widen_intervals
from stepml_core.replay.specs import INTERVAL_COLUMNS


def _rows(specs):
    """specs: (experiment_id, role, protocol, fitted_on, predicted, lo, hi, observed)."""
    return pl.DataFrame(
        [
            {
                "experiment_id": e,
                "role": role,
                "step_model": f"requests_{p}",
                "protocol": p,
                "fitted_on": f,
                "metric": "e2e_mean",
                "predicted": pr,
                "lo": lo,
                "hi": hi,
                "observed": ob,
                "inside": None if ob is None else lo <= ob <= hi,
            }
            for e, role, p, f, pr, lo, hi, ob in specs
        ],
        schema=INTERVAL_COLUMNS,
    )


def test_conformal_rank_and_min_scores():
    assert min_scores(0.9) == 9 and min_scores(0.5) == 1
    s = np.arange(1.0, 11.0)  # 10 scores 1..10: rank ⌈11·0.9⌉ = 10 → 10
    q, n = conformal_quantile(s, np.ones((1, 10), dtype=bool), 0.9)
    assert n[0] == 10 and q[0] == 10.0
    q, n = conformal_quantile(s, np.arange(10)[None, :] < 8, 0.9)  # 8 scores: rank 9 > 8 → unbounded
    assert n[0] == 8 and q[0] == np.inf
    q, _ = conformal_quantile(s, np.ones((1, 10), dtype=bool), 0.5)  # rank ⌈5.5⌉ = 6
    assert q[0] == 6.0
    assert excess_pct([90.0], [110.0], [100.0], [125.0])[0] == pytest.approx(15.0)
    assert excess_pct([90.0], [110.0], [100.0], [100.0])[0] == 0.0


def test_who_could_have_used_whose_data():
    llm = np.array(["a", "a", "b"])
    wl = np.array(["codegen", "general", "codegen"])
    role = np.array(["validate", "train", "test"])
    # rows r, columns j
    assert could_use("lowo", llm, wl, llm, wl, role).tolist() == [
        [False, True, False],
        [True, False, False],
        [False, False, False],
    ]
    assert could_use("roles", llm, wl, llm, wl, role).tolist() == [
        [False, False, False],
        [True, True, False],
        [False, False, False],
    ]
    assert could_use("lomo", llm, wl, llm, wl, role).tolist() == [
        [False, False, True],
        [False, False, True],
        [True, True, False],
    ]


RUNS = {
    f"r{i}": {"llm_model": f"m{i % 3}", "workload": ("codegen", "general", "roleplay", "reasoning")[i // 3]}
    for i in range(12)
}


def _lowo_table(observed: dict[str, float]):
    return _rows(
        [(e, "test", "lowo", "", 100.0, 95.0, 105.0, observed.get(e, 100.0 + 3 * i)) for i, e in enumerate(RUNS)]
    )


def test_widened_interval_by_hand_and_independent_of_own_and_dependent_runs():
    obs = {e: 100.0 + 3 * i for i, e in enumerate(RUNS)}  # excess beyond [95, 105] = max(0, 3i − 5) % of 100
    w = widen_intervals(_lowo_table(obs), RUNS, level=0.5).sort("experiment_id")
    r0 = w.filter(pl.col("experiment_id") == "r0").row(0, named=True)
    # r0 (m0): eligible = the 8 runs of m1 and m2, excesses of r1, r2, r4, r5, r7, r8, r10, r11 = 0, 1, 7, 10, 16, 19, 25, 28
    assert r0["extrap_n"] == 8 and r0["extrap_q_pct"] == pytest.approx(16.0)  # rank ⌈9·0.5⌉ = 5
    assert (r0["lo"], r0["hi"]) == pytest.approx((95.0 - 16.0, 105.0 + 16.0))
    assert (r0["boot_lo"], r0["boot_hi"], r0["boot_inside"], r0["inside"]) == (95.0, 105.0, True, True)
    assert r0["extrap_pool"] == "protocol"
    # r0's own observed value, and those of m0's other runs (their lowo folds calibrate on r0), change nothing for r0
    for changed in ({"r0": 1e6}, {"r3": 1e6, "r6": -5.0, "r9": 0.0}):
        w2 = widen_intervals(_lowo_table({**obs, **changed}), RUNS, level=0.5)
        assert (
            w2.filter(pl.col("experiment_id") == "r0")
            .select("lo", "hi", "extrap_q_pct")
            .equals(w.filter(pl.col("experiment_id") == "r0").select("lo", "hi", "extrap_q_pct"))
        )
    # ... while an eligible run's does (the test can fail)
    w3 = widen_intervals(_lowo_table({**obs, "r1": 150.0, "r2": 150.0, "r4": 150.0}), RUNS, level=0.5)
    assert w3.filter(pl.col("experiment_id") == "r0")["extrap_q_pct"][0] > 16.0


def test_too_few_scores_pool_the_protocols_then_go_unbounded():
    t = _rows(
        [
            ("a1", "test", "roles", "a0", 100.0, 95.0, 105.0, 120.0),
            ("b1", "test", "roles", "b0", 100.0, 95.0, 105.0, 130.0),
        ]
    )
    w = widen_intervals(
        t, {"a1": {"llm_model": "a", "workload": "x"}, "b1": {"llm_model": "b", "workload": "x"}}, level=0.9
    )
    assert w["extrap_n"].to_list() == [1, 1] and w["extrap_pool"].to_list() == ["all protocols"] * 2
    assert w["hi"].to_list() == [np.inf, np.inf] and w["lo"].to_list() == [0.0, 0.0] and w["inside"].all()
    assert widen_intervals(t.head(0), {}).columns[-7:] == [
        "boot_lo",
        "boot_hi",
        "boot_inside",
        "excess_pct",
        "extrap_q_pct",
        "extrap_n",
        "extrap_pool",
    ]


def test_widened_intervals_cover_exchangeable_runs():
    """200 runs of 20 LLM models, each prediction off by a heavy-tailed extrapolation error the bootstrap (±2 %) does
    not see: the bootstrap covers far below 90 %, the widened interval ≥ 90 % (the conformal guarantee)."""
    rng = np.random.default_rng(0)
    n = 200
    runs = {f"e{i}": {"llm_model": f"m{i % 20}", "workload": f"w{i // 20}"} for i in range(n)}
    err = rng.standard_t(3, n) * 0.05
    pred = np.full(n, 10.0)
    obs = pred * (1 + err)
    t = _rows([(e, "test", "lowo", "", pred[i], pred[i] * 0.98, pred[i] * 1.02, obs[i]) for i, e in enumerate(runs)])
    w = widen_intervals(t, runs)
    assert w["boot_inside"].mean() < 0.5
    assert w["inside"].mean() >= 0.9 and np.isfinite(w["hi"].to_numpy()).all()


def test_an_unbounded_interval_is_not_counted_as_covered():
    """With fewer than 9 other runs' scores the widened interval is unbounded: it contains every value, so the coverage
    table counts it apart (unbounded) instead of as a covered prediction, and the run's row says 'unbounded'."""
    from stepml_core.report.calibration import _coverage
    from stepml_core.report.calibration_text import _interval_cell

    specs = [(f"r{i}", "test", "lowo", f"t{i}", 100.0, 95.0, 105.0, 100.0 + 3.0 * i) for i in range(4)]
    runs = {f"r{i}": {"llm_model": f"m{i}", "workload": "codegen"} for i in range(4)}
    wide = widen_intervals(_rows(specs), runs)
    assert (wide["extrap_q_pct"] == np.inf).all() and wide["inside"].all()  # 3 scores each: unbounded, contains all
    cov = _coverage(wide, pl.DataFrame()).row(0, named=True)
    assert cov["predictions"] == 4 and cov["unbounded"] == 4 and cov["counted"] == 0 and cov["inside"] == 0
    assert cov["coverage_pct"] is None and cov["cp_lo_pct"] is None  # not 100 %
    row = wide.row(0, named=True)
    assert (
        _interval_cell({"e2e_mean_lo": row["lo"], "e2e_mean_hi": row["hi"], "e2e_mean_inside": row["inside"]})
        == "unbounded"
    )
    cell = {"e2e_mean_lo": 0.5, "e2e_mean_hi": 1.6, "e2e_mean_inside": True, "e2e_mean_pred": 1.0}
    assert _interval_cell(cell) == "[0.50, 1.60] ✓ wide"  # at least as wide as the prediction: carries little
    assert _interval_cell({**cell, "e2e_mean_hi": 1.4}) == "[0.50, 1.40] ✓"


def test_clopper_pearson_and_the_coverage_by_construction():
    """The exact binomial interval against its closed forms at k = 0 and k = n; with n = 9 … 18 eligible scores the
    conformal rank is the largest, so the widened interval covers n/(n + 1) of exchangeable runs by construction."""
    from stepml_core.replay.coverage import clopper_pearson, construction_coverage

    assert clopper_pearson(0, 5) == pytest.approx((0.0, 1 - 0.025 ** (1 / 5)))
    assert clopper_pearson(5, 5) == pytest.approx((0.025 ** (1 / 5), 1.0))
    lo, hi = clopper_pearson(13, 14)  # 93 %: anything from ~66 % to ~100 % is consistent with it
    assert 0.6 < lo < 0.7 and hi > 0.99
    assert np.isnan(clopper_pearson(0, 0)).all()
    n = np.arange(9, 19)
    assert construction_coverage(n, 0.9) == pytest.approx(n / (n + 1))
    assert np.isnan(construction_coverage([8], 0.9)[0]) and construction_coverage([19], 0.9)[0] == pytest.approx(0.9)


def test_point_and_wide_intervals_are_not_evidence_and_regimes_are_apart():
    """An interval around a point (successes = every request, predicted and observed: every model variant agrees),
    widened or not, is not counted as covered; an interval at least as wide as its prediction is counted but flagged
    wide; saturated and non-saturated runs get their own rows, each with its binomial interval."""
    from stepml_core.replay.coverage import coverage_table, interval_kind

    assert interval_kind([90.0, 100.0, 40.0], [110.0, 100.0, 140.0], [100.0] * 3, [5.0, 0.0, 5.0]).tolist() == [
        "informative",
        "point",
        "wide",
    ]
    # a point widened by q = 10 % is still a point's interval; an unbounded one is unbounded
    assert interval_kind(
        [90.0, 0.0], [110.0, np.inf], [100.0] * 2, [10.0, np.inf], [100.0] * 2, [100.0] * 2
    ).tolist() == [
        "point",
        "unbounded",
    ]
    rows = []
    for i in range(12):
        e = f"r{i}"
        sat = i >= 8
        # successes: a point at every request for the non-saturated runs, an interval for the saturated ones
        rows.append((e, "successes", 500.0, 500.0 if not sat else 300.0, 500.0, 500.0 if not sat else 420.0))
        rows.append((e, "ttft_mean", 1.0, 0.9 if i % 2 else 0.2, 1.1 if i % 2 else 1.5, 1.05 if i != 3 else 2.0))
    t = pl.DataFrame(
        [
            {
                "experiment_id": e,
                "role": "test",
                "step_model": "requests_lowo",
                "protocol": "lowo",
                "fitted_on": "",
                "metric": m,
                "predicted": p,
                "boot_lo": lo,
                "boot_hi": hi,
                "lo": lo * 0.9,  # widened by q = 10 %
                "hi": hi * 1.1,
                "observed": ob,
                "inside": lo * 0.9 <= ob <= hi * 1.1,
                "boot_inside": lo <= ob <= hi,
                "extrap_q_pct": 10.0,
                "extrap_n": 11,
                "extrap_pool": "protocol",
            }
            for e, m, p, lo, hi, ob in rows
        ]
    )
    sat = {f"r{i}": i >= 8 for i in range(12)}
    cov = {(r["metric"], r["regime"]): r for r in coverage_table(t, sat, ("ttft_mean", "successes")).to_dicts()}
    s = cov[("successes", "non-saturated")]
    assert (s["predictions"], s["point"], s["counted"], s["coverage_pct"]) == (8, 8, 0, None)
    assert (s["boot_point"], s["boot_counted"]) == (8, 0)
    s = cov[("successes", "saturated")]
    assert (s["counted"], s["inside"], s["wide"]) == (4, 4, 0)
    assert s["cp_lo_pct"] == pytest.approx(100 * 0.025 ** (1 / 4))
    a = cov[("successes", "all")]
    assert (a["predictions"], a["counted"], a["inside"]) == (12, 4, 4)
    tt = cov[("ttft_mean", "non-saturated")]  # r0, r2, r4, r6 wide ([0.2, 1.5] of 1.0); r3 outside
    assert (tt["counted"], tt["wide"], tt["inside"], tt["informative_inside"]) == (8, 4, 7, 3)
    assert tt["by_construction_pct"] == pytest.approx(100 * 11 / 12)
