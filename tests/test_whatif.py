"""What if (stepml_core.whatif): workloads from a description, the SLO parser, sweeps with intervals, saturation.
The command line and the Dagster asset on a study are in test_calibration_pipeline.py (its small study)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from stepml_core.calibration.params import StepParams
from stepml_core.whatif.slo import SLOError, meets, parse_slo
from stepml_core.whatif.sweep import WHATIF_COLUMNS, WHATIF_METRICS, run_sweep, summarize, sweep_points, whatif_table
from stepml_core.whatif.workload import ServingLimits, WorkloadDescription, whatif_workload

PROFILE = {  # the shape of the real `general` runs' inference-perf profile
    "load": {"type": "constant", "stages": [{"rate": 8, "duration": 60}, {"rate": 20, "duration": 60}]},
    "data": {
        "type": "shared_prefix",
        "shared_prefix": {"system_prompt_len": 100, "question_len": 447, "output_len": 248},
    },
}
LIMITS = ServingLimits("llama-2-7b", 1, kv_blocks_total=7462)


def _spec(params: StepParams, draws: int = 12, seed: int = 1) -> dict:
    """A request-calibrated spec as the study stores it: the BLIS file of the central parameters and draws around it."""
    rng = np.random.default_rng(seed)
    rows = [params.scaled(float(s)).as_vector().tolist() for s in rng.lognormal(0.0, 0.05, draws)]
    names = ["b0_us", "b_dec_us", "b_kv_us", "b_pf_us", "b_npf_us", "q0_us", "q1_us"]
    return {
        "name": "requests_all",
        "kind": "blis_linear",
        "llm_model": "llama-2-7b",
        "fitted_on": ["a", "b"],
        "doc": params.blis_doc(),
        "params": {k: getattr(params, k) for k in names},
        "bootstrap": {"names": names, "rows": rows},
    }


PARAMS = StepParams(b0_us=6000.0, b_dec_us=10.0, b_kv_us=0.01, b_pf_us=25.0, b_npf_us=300.0, q0_us=20000.0)


def test_profile_becomes_the_described_workload():
    d = WorkloadDescription.from_profile(PROFILE, template_tokens=30)
    assert d.stages == ((8.0, 60.0), (20.0, 60.0)) and (d.num_groups, d.prompts_per_group) == (10, 10)
    w, ctx = whatif_workload(d, LIMITS, seed=3)
    n = w.arrival_s.size
    assert n == 8 * 60 + 20 * 60 and np.all(np.diff(w.arrival_s) >= 0) and w.arrival_s[0] == 0
    assert (w.max_tokens == 248).all() and abs(w.prompt_tokens.mean() - 577) < 10  # system + question + template
    assert w.group.max() < 10 and w.nshared_blk == 101 // 16 and ctx.kv_blocks_total == 7462
    assert ((w.timeout_s >= 300) & (w.timeout_s <= 301)).all()


def test_same_seed_same_requests_other_seed_other_requests():
    d = WorkloadDescription(stages=((5.0, 30.0),))
    a, _ = whatif_workload(d, LIMITS, seed=7)
    b, _ = whatif_workload(d, LIMITS, seed=7)
    c, _ = whatif_workload(d, LIMITS, seed=8)
    assert np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(a.prompt_id, b.prompt_id)
    assert not np.array_equal(a.arrival_s, c.arrival_s)


@pytest.mark.parametrize(
    "text, says",
    [
        ("", "empty SLO"),
        ("ttft_p99<2s,", "empty term"),
        ("ttft_p999<2s", "unknown metric 'ttft_p999'"),
        ("ttft_p99<2h", "unit 'h'"),
        ("ttft_p99=2s", "not <metric><op><number><unit>"),
        ("throughput_rps>3s", "throughput is in rps"),
    ],
)
def test_slo_parser_says_what_is_wrong(text, says):
    with pytest.raises(SLOError, match=says.replace("<", ".").replace(">", ".")):
        parse_slo(text)


def test_slo_terms_and_units():
    terms = parse_slo("ttft_p99<2s, e2e_p99 <= 30000ms,throughput_rps>=4")
    assert [(t.metric, t.op, t.bound) for t in terms] == [
        ("ttft_p99", "<", 2.0),
        ("e2e_p99", "<=", 30.0),
        ("throughput_rps", ">=", 4.0),
    ]
    assert meets(terms, {"ttft_p99": 1.0, "e2e_p99": 30.0, "throughput_rps": 4.0})
    assert not meets(terms, {"ttft_p99": float("nan"), "e2e_p99": 1.0, "throughput_rps": 5.0})


def test_sweep_intervals_hold_the_prediction_and_repeat_with_the_seed():
    spec = _spec(PARAMS)
    d = WorkloadDescription(stages=((4.0, 30.0),), output_tokens=64)
    pts = sweep_points([2, 6], [64, 128], [], LIMITS)
    assert len(pts) == 4
    rows = run_sweep(spec, d, LIMITS, pts, seed=0)
    t = whatif_table(rows)
    assert dict(t.schema) == WHATIF_COLUMNS and t.height == 4 * len(WHATIF_METRICS)
    ok = t.drop_nans().drop_nulls()
    assert ((ok["lo"] <= ok["predicted"]) & (ok["predicted"] <= ok["hi"])).all()
    lat = t.filter(t["metric"] == "e2e_mean")
    assert (lat["hi"] > lat["lo"]).all()  # the draws move the prediction
    assert whatif_table(run_sweep(spec, d, LIMITS, pts, seed=0)).equals(t)


def test_saturation_rate_and_largest_rate_meeting_the_slo():
    """A model slow enough that ≈ 9 req/s of 128 tokens fill the engine (128 × 128 tokens per 60 ms + 128 × 400 µs
    step): 16 req/s saturates it, 4 req/s does not and meets the SLO."""
    slow = _spec(StepParams(b0_us=60000.0, b_dec_us=400.0, b_kv_us=0.0, b_pf_us=200.0, b_npf_us=0.0, q0_us=0.0))
    d = WorkloadDescription(stages=((1.0, 120.0),), output_tokens=128)
    rows = run_sweep(slow, d, LIMITS, sweep_points([0.5, 1, 4, 16], [], [], LIMITS), seed=0)
    s = summarize(whatif_table(rows), parse_slo("e2e_p99<60s"))[0]
    assert s["saturation_rate_rps"] == 16.0 and s["largest_rate_meeting_slo_rps"] == 4.0
    assert s["saturation_rate_lo_rps"] <= s["saturation_rate_rps"] <= s["saturation_rate_hi_rps"]


def test_profile_check_reads_no_ground_truth_of_the_scored_run():
    """Out of sample (stepml_core.whatif.check): delete the scored run's ground truth and its predicted figures and
    saturation do not move; only the observed side goes."""
    import polars as pl

    from stepml_core.whatif.check import check_run, lowo_spec
    from stepml_core.whatif.study import StudyRun

    run = StudyRun(
        "r", "general", WorkloadDescription(stages=((2.0, 20.0), (4.0, 20.0)), output_tokens=32), LIMITS, 580.0, 120
    )
    n = 120
    truth = pl.DataFrame(
        {
            "index": np.arange(n),
            "arrival_time_us": np.sort(np.random.default_rng(0).random(n) * 40e6).astype(np.int64),
            "input_tokens": np.full(n, 580),
            "output_tokens": np.full(n, 32),
            "observed_has_error": np.zeros(n, dtype=bool),
            "observed_ttft_s": np.full(n, 0.05),
            "observed_e2e_s": np.full(n, 0.6),
        }
    )
    spec = {**_spec(PARAMS), "name": "requests_lowo", "for_runs": ["r"], "fitted_on": ["a", "b"]}
    assert lowo_spec([spec], run) is spec
    cols = ["stage", "metric", "predicted"]
    with_truth = check_run(spec, run, 30.0, truth)
    deleted = truth.with_columns(
        observed_has_error=pl.lit(None, pl.Boolean),
        observed_ttft_s=pl.lit(None, pl.Float64),
        observed_e2e_s=pl.lit(None, pl.Float64),
    )
    without = check_run(spec, run, 30.0, deleted)
    a, b = pl.DataFrame(with_truth["rows"]), pl.DataFrame(without["rows"])
    assert a.select(cols).equals(b.select(cols)) and with_truth["saturation"] == without["saturation"]
    assert a["observed"].is_not_null().any() and b["observed"].is_null().all()
    assert set(a["stage"]) == {"all", "0", "1"}
    with pytest.raises(AssertionError, match="fitted on it"):
        lowo_spec([{**spec, "fitted_on": ["r"]}], run)


def test_a_model_without_parameter_draws_has_a_point_interval():
    """A shipped model without bootstrap rows (a step-trained BLIS fit) is replayed as it is: lo = predicted = hi."""
    spec = {k: v for k, v in _spec(PARAMS).items() if k != "bootstrap"}
    rows = run_sweep(
        spec,
        WorkloadDescription(stages=((2.0, 20.0),), output_tokens=32),
        LIMITS,
        sweep_points([2], [], [], LIMITS),
        seed=0,
    )
    t = whatif_table(rows).filter(pl.col("metric") == "e2e_mean")
    assert t["lo"][0] == t["predicted"][0] == t["hi"][0] > 0


def test_the_studys_whatif_check_is_opt_in(monkeypatch):
    from stepml_dagster.cli import build_parser
    from stepml_dagster.resources import StepMLSettings

    monkeypatch.delenv("STEPML_WHATIF_CHECK", raising=False)
    assert StepMLSettings().whatif_check is False
    monkeypatch.setenv("STEPML_WHATIF_CHECK", "1")
    assert StepMLSettings().whatif_check is True and StepMLSettings(whatif_check_runs=False).whatif_check is False
    assert build_parser().parse_args(["run", "--whatif-check"]).whatif_check


def test_a_load_over_the_request_limit_is_refused_at_once(monkeypatch):
    """--rates 100000 (a typo) would simulate 6·10^7 requests for hours: refused before anything runs, naming the
    load and the limit."""
    from stepml_core.errors import UsageError
    from stepml_core.whatif.workload import WorkloadDescription

    d = WorkloadDescription(stages=((10.0, 600.0),))
    with pytest.raises(UsageError, match=r"100000 req/s for 600 s: 60,000,000 requests, over the limit of 1,000,000"):
        d.at_rate(100000.0)
    monkeypatch.setenv("STEPML_WHATIF_MAX_REQUESTS", "5000")
    with pytest.raises(UsageError, match="over the limit of 5,000"):
        d.at_rate(10.0)


# ---------------------------------------------------------------------------- another TP (stepml_core.whatif.tp)


def test_another_tp_divides_the_gpu_terms_and_gives_the_kv_cache_the_weights_leave():
    """TP 1 → 2 for Llama-2-7B: β0, β_dec, β_kv, β_pf and every draw halve; β_npf, α0, α1 stay; the KV blocks come
    from the TP 1 engine's per-GPU budget (weights 13.5 GB + 7,462 blocks) less half the weights; back to TP 1 gives
    the blocks it started from."""
    from stepml_core.calibration.fit import arch_prior
    from stepml_core.whatif.tp import kv_budget_bytes, limits_at_tp, spec_at_tp

    spec = _spec(PARAMS)
    two = spec_at_tp(spec, LIMITS, 2)
    p1, p2 = spec["params"], two["params"]
    for k in ("b0_us", "b_dec_us", "b_kv_us", "b_pf_us"):
        assert p2[k] == pytest.approx(p1[k] / 2)
    for k in ("b_npf_us", "q0_us", "q1_us"):
        assert p2[k] == p1[k]
    rows1, rows2 = np.array(spec["bootstrap"]["rows"]), np.array(two["bootstrap"]["rows"])
    assert np.allclose(rows2[:, :4], rows1[:, :4] / 2) and np.array_equal(rows2[:, 4:], rows1[:, 4:])
    assert two["calibration"]["tp_transfer"]["from_tp"] == 1 and "TP 2" in two["basis"]
    assert spec_at_tp(spec, LIMITS, 1) is spec and "tp_transfer" not in (spec.get("calibration") or {})
    at2 = limits_at_tp(LIMITS, 2)
    a1, a2 = arch_prior("llama-2-7b", 1), arch_prior("llama-2-7b", 2)
    budget = a1.weights_bytes + 7462 * 16 * a1.kv_bytes_per_token
    assert kv_budget_bytes(LIMITS) == pytest.approx(budget)
    assert at2.tp == 2 and at2.kv_blocks_total == int((budget - a2.weights_bytes) // (16 * a2.kv_bytes_per_token))
    assert at2.kv_blocks_total > 2 * LIMITS.kv_blocks_total  # half the weights per GPU, half the KV bytes per token
    assert abs(limits_at_tp(at2, 1).kv_blocks_total - LIMITS.kv_blocks_total) <= 1


def test_a_tp_the_model_cannot_run_at_is_refused_with_the_reason():
    from stepml_core.errors import UsageError
    from stepml_core.whatif.tp import limits_at_tp, spec_at_tp

    with pytest.raises(UsageError, match="TP 3 for llama-2-7b: vLLM shards its 32 attention heads"):
        limits_at_tp(LIMITS, 3)
    mixtral = ServingLimits("mixtral-8x7b", 2, kv_blocks_total=27510, max_model_len=4096)  # the real run's engine
    with pytest.raises(UsageError, match=r"TP 1 for mixtral-8x7b: 93\.4 GB of weights per GPU leave 0\.0 GB"):
        limits_at_tp(mixtral, 1)
    tree = {"name": "xgboost", "kind": "trees", "llm_model": "llama-2-7b", "fitted_on": ["a"]}
    with pytest.raises(UsageError, match="not calibrated in BLIS's terms"):
        spec_at_tp(tree, LIMITS, 2)


def test_a_tp_sweep_replays_each_tp_with_its_model_and_says_where_they_come_from(tmp_path):
    """`--tps 1,2` on one rate: the TP 2 point is the TP 1 model carried over, faster per token; whatif.json names
    the calibrated TP's model and the carried one with its KV blocks."""
    import json

    from stepml_core.whatif.run import run_whatif

    d = WorkloadDescription(stages=((4.0, 30.0),), output_tokens=64)
    res = run_whatif(_spec(PARAMS), {"step_model": "requests_all"}, d, LIMITS, tmp_path, tps=[2, 1])
    t = res["table"]
    assert sorted(t["tp"].unique().to_list()) == [1, 2] and t.columns[-1] == "tp"
    dec = {r["tp"]: r["predicted"] for r in t.filter(pl.col("metric") == "decode_time_per_token_mean").to_dicts()}
    assert dec[2] < dec[1]
    doc = json.loads((tmp_path / "whatif.json").read_text())
    notes = {n["tp"]: n for n in doc["tp"]}
    assert notes[1]["step_model"] == "as calibrated" and notes[1]["kv_blocks_total"] == LIMITS.kv_blocks_total
    assert notes[2]["step_model"].startswith("carried from TP 1") and notes[2]["kv_blocks_total"] > 7462
    assert {s["tp"] for s in doc["summary"]} == {1, 2}


def test_inter_token_latencies_are_the_per_token_gaps_of_the_replay():
    """Every successful request of a what-if generates the same tokens, so the token-weighted mean of the ITLs is the
    mean of (E2E − TTFT)/(tokens − 1) exactly; the percentiles are ordered and the p50 is a step duration; a small
    KV cache that preempts adds gaps longer than any step."""
    from stepml_core.replay.simulate import replay, weighted_percentile
    from stepml_core.replay.specs import serving_model

    d = WorkloadDescription(stages=((6.0, 30.0),), output_tokens=64)
    w, ctx = whatif_workload(d, LIMITS, seed=2)
    r = replay(w, serving_model(_spec(PARAMS)), ctx, seed=0, itl=True)
    v, wt = r.itl_s
    t = r.per_request.filter(pl.col("success"))
    per_req = ((t["e2e_s"] - t["ttft_s"]) / (t["output_tokens"] - 1)).mean()
    assert t.height == w.index.size and float((v * wt).sum() / wt.sum()) == pytest.approx(per_req, rel=1e-9)
    assert wt.sum() == t.height * 63
    p = [weighted_percentile(v, wt, q) for q in (50, 90, 99)]
    assert 0 < p[0] <= p[1] <= p[2] and p[0] in set(np.diff(np.sort(v)).tolist()) | set(v.tolist())
    assert replay(w, serving_model(_spec(PARAMS)), ctx, seed=0).itl_s is None  # only when asked: no cost otherwise
    tight, tctx = whatif_workload(d, ServingLimits("llama-2-7b", 1, kv_blocks_total=80), seed=2)
    rt = replay(tight, serving_model(_spec(PARAMS)), tctx, seed=0, itl=True)
    assert rt.counters["preemptions"] > 0, rt.counters
    v, wt = rt.itl_s  # the gaps across preemptions are there: every successful request's 63 gaps, same mean
    t = rt.per_request.filter(pl.col("success"))
    assert t.height > 0 and wt.sum() == t.height * 63
    per_req = ((t["e2e_s"] - t["ttft_s"]) / (t["output_tokens"] - 1)).mean()
    assert float((v * wt).sum() / wt.sum()) == pytest.approx(per_req, rel=1e-9)
