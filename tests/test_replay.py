"""The simulator as a replay engine: request logs, step-model clocks, scoring, determinism, real request logs."""

# long module: the replay's tests share one small study fixture (built once per session)

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import SHARED_REAL

from stepml_core.pipeline import replay_context
from stepml_core.replay.simulate import (
    CLIENT_TIMEOUT_S,
    RunContext,
    StepServingModel,
    replay,
    replay_workload,
    score_replay,
)
from stepml_core.replay.specs import physics_spec, replay_run, serving_model
from stepml_core.runs.request_log import RequestLogError, read_request_log
from stepml_core.runs.rules import client_limits_s
from stepml_core.stepmodels.sim_step_time import LinearStepTime, StepModelError

SHARED = SHARED_REAL.parent
REQUESTS = SHARED_REAL / "requests"


def write_request_run(
    folder: Path,
    requests: list[dict],
    ground_truth: list[dict] | None = None,
    *,
    config: dict | None = None,
    split: str = "train",
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    doc = {
        "experiment": folder.name,
        "model_short": "llama-2-7b",
        "profile": "codegen",
        "split": split,
        "config": config
        or {
            "tensor_parallelism": 1,
            "max_num_seqs": 128,
            "max_num_batched_tokens": 2048,
            "kv_blocks_total_gpu": 7000,
            "block_size": 16,
        },
        "requests": requests,
    }
    (folder / "requests.json.gz").write_bytes(gzip.compress(json.dumps(doc).encode()))
    if ground_truth is not None:
        (folder / "ground_truth.json").write_text(json.dumps(ground_truth))
    return folder


def linear_model(b0=9000.0, b1=40.0, b2=60.0, **extra) -> StepServingModel:
    doc = {
        "version": 1,
        "step_time": {
            "model_type": "linear",
            "intercept": b0,
            "feature_coefficients": {"prefill_tokens": b1, "decode_tokens": b2},
        },
        **extra,
    }
    lin = LinearStepTime(doc)
    return StepServingModel("lin", lin, queueing_us=lin.queueing_us, token_delay_us=lin.otpt_us)


CTX = RunContext(
    experiment_id="20260101-000000-llama-2-7b-tp1-codegen",
    model="llama-2-7b",
    tp=1,
    max_num_seqs=128,
    max_num_batched_tokens=2048,
    kv_blocks_total=7000,
    output_len=3,
    ignore_eos=True,
)


def one_request_log(input_tokens=1000, output_tokens=3) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "index": [0],
            "arrival_time_us": [0],
            "input_tokens": [input_tokens],
            "output_tokens": [output_tokens],
            "prefix_group": [None],
            "has_error": [False],
            "observed_has_error": [None],
            "observed_ttft_s": [None],
            "observed_e2e_s": [None],
        },
        schema_overrides={
            "prefix_group": pl.Utf8,
            "observed_has_error": pl.Boolean,
            "observed_ttft_s": pl.Float64,
            "observed_e2e_s": pl.Float64,
        },
    )


def test_lone_request_times_by_hand():
    """Input 1000 / output 3 with step = 9000 + 40·prefill + 60·decode µs: the prompt is one 49 ms step whose end
    brings the first token; two decode steps of 9.06 ms follow (async lag: the first decode is the next step).
    (The engine clock counts whole nanoseconds: 10 ns tolerance.)"""
    w = replay_workload(one_request_log(), CTX)
    r = replay(w, linear_model(), CTX).per_request
    assert r["ttft_s"][0] == pytest.approx(0.049, abs=1e-8)
    assert r["e2e_s"][0] == pytest.approx(0.049 + 2 * 0.00906, abs=1e-8)
    # queueing (α0 + α1·input_len) and per-token output processing shift TTFT and E2E as BLIS defines them
    m = linear_model(
        queueing_time={"model_type": "linear", "intercept": 5000, "feature_coefficients": {"input_len": 2.0}},
        output_token_processing_time_us=100,
    )
    r2 = replay(w, m, CTX).per_request
    assert r2["ttft_s"][0] == pytest.approx(0.049 + 0.007 + 0.0001, abs=1e-8)
    assert r2["e2e_s"][0] == pytest.approx(0.049 + 2 * 0.00906 + 0.007 + 0.0001, abs=1e-8)


def test_long_prompt_is_chunked_under_the_token_budget():
    """A 3000-token prompt takes two prefill steps (2048 + 952 tokens) before its first token."""
    ctx = RunContext(**{**CTX.__dict__, "output_len": 2})
    r = replay(replay_workload(one_request_log(3000, 2), ctx), linear_model(), ctx).per_request
    assert r["ttft_s"][0] == pytest.approx((9000 + 40 * 2048 + 9000 + 40 * 952) * 1e-6, abs=1e-8)


def test_timeout_is_a_failure_on_the_predicted_side():
    slow = linear_model(b0=2e6)  # 2 s per step: 3 steps of decode > ... the request needs 4 steps of 2 s = 8 s
    w = replay_workload(one_request_log(), CTX)
    w.timeout_s = 5.0
    r = replay(w, slow, CTX).per_request
    assert not r["success"][0] and r["e2e_s"][0] == 5.0 and r["ttft_s"][0] is None


def test_the_client_gives_up_at_its_next_whole_second_after_300_s():
    """inference-perf's aiohttp timeout rounds send + 300 s up to the next whole second of the client's clock
    (stepml_core.runs.rules; the real runs' errors end at 300.0–301.0 s, four CodeLlama successes at 300.1–300.4 s):
    a request sent at 0.5 s whose last token comes 300.2 s later succeeds (limit 300.5 s), one sent at 0.9 s with
    the same E2E fails (limit 300.1 s) and records its limit as E2E. Before, any E2E above 300 s failed."""
    assert client_limits_s(np.array([0.0, 0.5, 0.9, 2.0])) == pytest.approx([300.0, 300.5, 300.1, 300.0])
    ctx = RunContext(**{**CTX.__dict__, "output_len": 40})
    slow = linear_model(b0=7.505e6, b1=0.0, b2=0.0)  # 40 steps of 7.505 s: E2E 300.2 s
    for sent_us, ok in ((500_000, True), (900_000, False)):
        log = one_request_log(output_tokens=40).with_columns(arrival_time_us=pl.lit(sent_us, pl.Int64))
        r = replay(replay_workload(log, ctx), slow, ctx).per_request
        assert r["success"][0] == ok
        assert r["e2e_s"][0] == pytest.approx(300.2 if ok else 300.1, abs=1e-6)
    # stage 2's windows of a run keep each request's own limit
    from stepml_core.calibration.refine import window_workloads

    n = 500
    log = pl.concat([one_request_log()] * n).with_columns(
        index=pl.int_range(n, dtype=pl.Int64), arrival_time_us=pl.int_range(n, dtype=pl.Int64) * 1_300_000
    )
    for sub, _ in window_workloads(replay_workload(log, CTX), 4, 60.0, 20.0):
        assert sub.timeout_s.shape == sub.arrival_s.shape
        assert np.array_equal(sub.timeout_s, client_limits_s(sub.arrival_s))


def test_same_inputs_same_predictions_bit_for_bit(tmp_path):
    rng = np.random.default_rng(1)
    n = 300
    reqs = [
        {
            "index": i,
            "arrival_time_us": int(t),
            "input_tokens": int(rng.integers(400, 900)),
            "output_tokens": 50,
            "prefix_group": "",
            "has_error": False,
        }
        for i, t in enumerate(np.sort(rng.uniform(0, 30e6, n)))
    ]
    folder = write_request_run(tmp_path / "20260101-000000-llama-2-7b-tp1-codegen", reqs)
    log = read_request_log(folder)
    ctx = RunContext(
        **{**CTX.__dict__, "output_len": 50, "num_groups": 10, "prompts_per_group": 10, "system_prompt_len": 100}
    )
    a = [replay(replay_workload(log.table, ctx), m, ctx).per_request for m in (linear_model(), linear_model())]
    assert a[0].equals(a[1])
    phys = [
        replay(replay_workload(log.table, ctx), serving_model(physics_spec()), ctx, seed=3).per_request
        for _ in range(2)
    ]
    assert phys[0].equals(phys[1])
    assert not phys[0].equals(
        replay(replay_workload(log.table, ctx), serving_model(physics_spec()), ctx, seed=4).per_request
    )


def test_ground_truth_never_changes_predictions(tmp_path):
    """Deleting a scored run's ground truth leaves its predictions bit-identical (only the scores go)."""
    reqs = [
        {
            "index": i,
            "arrival_time_us": i * 200_000,
            "input_tokens": 600,
            "output_tokens": 20,
            "prefix_group": "",
            "has_error": False,
        }
        for i in range(100)
    ]
    gt = [{"index": i, "has_error": False, "e2e_s": 0.5, "ttft_s": 0.05} for i in range(100)]
    folder = write_request_run(tmp_path / "20260101-000000-llama-2-7b-tp1-codegen", reqs, gt)
    ctx = RunContext(**{**CTX.__dict__, "output_len": 20})
    with_gt = replay_run(read_request_log(folder), ctx, [physics_spec()], source="real")
    (folder / "ground_truth.json").unlink()
    without = replay_run(read_request_log(folder), ctx, [physics_spec()], source="real")
    a, b = with_gt["per_request"]["physics"], without["per_request"]["physics"]
    assert a.select("index", "ttft_s", "e2e_s", "success").equals(b.select("index", "ttft_s", "e2e_s", "success"))
    assert with_gt["rows"]["observed"].is_not_null().all() and without["rows"]["observed"].is_null().all()
    assert without["rows"]["predicted"].equals(with_gt["rows"]["predicted"])


def test_one_saturation_rule_everywhere():
    """ "Saturated" is stepml_core.runs.rules.is_saturated wherever a run is judged (issue 20, point 9c): the calibration
    (from a request log), the replay scores (replay.csv's observed figures), the synthesizer's calibration table
    (the public aggregates). Before, the synthesizer's table read a mean TTFT above 10 s, the others above 5 s: a
    run at 7 s was saturated for the calibration and not for the synthesizer."""
    from stepml_core.calibration.timelines import is_saturated as table_saturated
    from stepml_core.replay.scores import run_status
    from stepml_core.runs.rules import SATURATED_TTFT_S, is_saturated
    from stepml_core.synth.against_real import is_saturated as ref_saturated

    for failed, ttft in ((0, 0.1), (0, 7.0), (0, 2 * SATURATED_TTFT_S + 1), (3, 0.1), (0, None)):
        want = is_saturated(failed, ttft)
        n = 10
        table = pl.DataFrame(
            {
                "observed_has_error": [True] * failed + [False] * (n - failed),
                "observed_ttft_s": [None] * failed + [ttft] * (n - failed),
            },
            schema={"observed_has_error": pl.Boolean, "observed_ttft_s": pl.Float64},
        )
        assert table_saturated(table) == want, (failed, ttft)
        rows = pl.DataFrame(
            {"experiment_id": ["r", "r"], "metric": ["successes", "ttft_mean"], "observed": [n - failed, ttft]},
            schema={"experiment_id": pl.Utf8, "metric": pl.Utf8, "observed": pl.Float64},
        )
        assert run_status(rows, {"r": n})["saturated"][0] == want, (failed, ttft)
        assert ref_saturated({"num_failed": str(failed), "ttft_mean_s": "" if ttft is None else str(ttft)}) == want


def test_scoring_definitions():
    pred = pl.DataFrame(
        {
            "index": [0, 1, 2],
            "arrival_time_us": [0, 1_000_000, 2_000_000],
            "ttft_s": [0.1, 0.2, None],
            "e2e_s": [1.1, 2.2, CLIENT_TIMEOUT_S],
            "success": [True, True, False],
            "output_tokens": [11, 11, 11],
        }
    )
    obs = pl.DataFrame(
        {
            "index": [0, 1, 2],
            "observed_has_error": [False, False, False],
            "observed_ttft_s": [0.1, 0.1, 0.1],
            "observed_e2e_s": [1.0, 2.0, 1.0],
        }
    )
    rows, per = score_replay(pred, obs)
    d = {r["metric"]: r for r in rows}
    assert d["successes"]["predicted"] == 2 and d["successes"]["observed"] == 3
    assert d["e2e_mean"]["predicted"] == pytest.approx(1.65) and d["e2e_mean"]["observed"] == pytest.approx(4 / 3)
    assert d["decode_time_per_token_mean"]["predicted"] == pytest.approx(((1.0 / 10) + (2.0 / 10)) / 2)
    assert d["throughput_rps"]["predicted"] == pytest.approx(2 / (2 + CLIENT_TIMEOUT_S))  # ends: last start + timeout
    assert d["e2e_mean"]["rel_err_pct"] == pytest.approx((1.65 - 4 / 3) / (4 / 3) * 100)
    assert per["requests_both_succeeded"] == 2 and per["e2e_median_ape_pct"] == pytest.approx(10.0)


def test_request_log_quarantines_bad_records_with_index_and_reason(tmp_path):
    reqs = [
        {
            "index": 0,
            "arrival_time_us": 0,
            "input_tokens": 600,
            "output_tokens": 20,
            "prefix_group": "",
            "has_error": False,
        },
        {
            "index": 1,
            "arrival_time_us": -5,
            "input_tokens": 600,
            "output_tokens": 20,
            "prefix_group": "",
            "has_error": False,
        },
        {
            "index": 2,
            "arrival_time_us": 10,
            "input_tokens": "many",
            "output_tokens": 20,
            "prefix_group": "",
            "has_error": False,
        },
        "garbage",
        {
            "index": 0,
            "arrival_time_us": 20,
            "input_tokens": 600,
            "output_tokens": 20,
            "prefix_group": "",
            "has_error": False,
        },
        {
            "index": 5,
            "arrival_time_us": 30,
            "input_tokens": 0,
            "output_tokens": 0,
            "prefix_group": "",
            "has_error": False,
        },
        {
            "index": 6,
            "arrival_time_us": 40,
            "input_tokens": 0,
            "output_tokens": 0,
            "prefix_group": "",
            "has_error": True,
        },
        {
            "index": 7,
            "arrival_time_us": 50,
            "input_tokens": 600,
            "output_tokens": 20,
            "prefix_group": "",
            "has_error": False,
        },
    ]
    gt = [
        {"index": 6, "has_error": True, "e2e_s": 300.2},
        {"index": 0, "has_error": False, "e2e_s": 0.4, "ttft_s": 0.1},
        {"index": 7, "has_error": False, "e2e_s": 0.4, "ttft_s": 0.9},
    ]
    folder = write_request_run(tmp_path / "20260101-000000-llama-2-7b-tp1-codegen", reqs, gt)
    log = read_request_log(folder)
    recs = log.quarantine.filter(pl.col("kind") == "record")
    q = {r["line"]: r["reason"] for r in recs.iter_rows(named=True)}
    assert log.records_in == 8 and log.table.height + recs.height == 8
    # bad truth (index 7: ttft > e2e) leaves its request in the load, unscored; the load never depends on the truth
    assert log.table["index"].to_list() == [0, 6, 7] and log.table["observed_e2e_s"].null_count() == 1
    assert "arrival_time_us" in q[1] and "input_tokens" in q[2] and "not a JSON object" in q[3]
    assert "duplicate index" in q[4] and "input_tokens is 0" in q[5] and recs["file"].n_unique() == 1
    truth = log.quarantine.filter(pl.col("kind") == "ground_truth").select("line", "reason").rows()
    assert truth == [(2, "ttft_s > e2e_s (the request is replayed, not scored)")] and log.truth["truth_in"] == 3
    (folder / "requests.json.gz").write_bytes(b"\x1f\x8b not gzip")
    with pytest.raises(RequestLogError, match="requests.json.gz"):
        read_request_log(folder)


def test_blis_model_file_rules():
    with pytest.raises(StepModelError, match="unknown feature"):
        LinearStepTime(
            {
                "version": 1,
                "step_time": {"model_type": "linear", "intercept": 1.0, "feature_coefficients": {"prefil_tokens": 2.0}},
            }
        )
    with pytest.raises(StepModelError, match="op"):
        LinearStepTime(
            {
                "version": 1,
                "step_time_regimes": [
                    {"name": "x", "condition": {"feature": "prefill_tokens", "op": "!=", "value": 0}, "model": {}}
                ],
            }
        )
    m = LinearStepTime(
        {
            "version": 2,
            "step_time_regimes": [
                {
                    "name": "decode_only",
                    "condition": {"feature": "prefill_tokens", "op": "==", "value": 0},
                    "model": {
                        "model_type": "linear",
                        "intercept": 9000,
                        "feature_coefficients": {"decode_tokens": 30.0},
                    },
                },
                {
                    "name": "mixed",
                    "condition": None,
                    "model": {
                        "model_type": "linear",
                        "intercept": 12000,
                        "feature_coefficients": {"scheduled_tokens": 40.0},
                    },
                },
            ],
            "step_overhead_us": 10000,
            "step_overhead_per_req_us": 5,
        }
    )
    f = dict(prefill_tokens=0.0, decode_tokens=10.0, num_prefill_reqs=0.0, num_decode_reqs=10.0, scheduled_tokens=10.0)
    assert m.predict_features_us(f) == pytest.approx(10000 + 50)  # 9300 clamped up to the 10 ms overhead, + 5 µs × 10
    f = dict(
        prefill_tokens=1000.0, decode_tokens=10.0, num_prefill_reqs=1.0, num_decode_reqs=10.0, scheduled_tokens=1010.0
    )
    assert m.predict_features_us(f) == pytest.approx(30000 + 55)  # 52400 clamped down to 3 × overhead
    e = LinearStepTime(
        {
            "version": 1,
            "step_time": {
                "model_type": "linear",
                "intercept": 1.0,
                "feature_coefficients": {},
                "output_transform": "expm1",
            },
        }
    )
    assert e.predict_features_us({"num_prefill_reqs": 0, "num_decode_reqs": 0}) == pytest.approx(
        max(np.expm1(1.0), 1.0)
    )


# ---------------------------------------------------------------------------- real request logs


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    if not REQUESTS.is_dir():
        pytest.skip(f"real request logs not available at {REQUESTS}")
    from stepml_core.runs.real_data import assemble_real_runs

    out = tmp_path_factory.mktemp("real")
    return assemble_real_runs(
        SHARED, out, ["20260218-150956-codellama-34b-tp2-codegen", "20260218-155500-codellama-34b-tp2-roleplay"]
    )


def test_assembled_real_runs_have_what_replay_needs(real_runs):
    cg, rp = real_runs
    for f in real_runs:
        prov = json.loads((f / "provenance.json").read_text())
        assert prov["source"] == "real"
        for rel, info in prov["files"].items():
            assert hashlib.sha256((f / rel).read_bytes()).hexdigest() == info["sha256"]
    assert (cg / "ground_truth.json.gz").is_file() and not (rp / "ground_truth.json.gz").exists()  # withheld on purpose
    log = read_request_log(cg)
    assert log.role == "validate" and log.records_in == 9000 and log.quarantine.height == 0


def test_physics_replay_of_a_real_run_and_an_unscored_one(real_runs):
    from stepml_core.runs.folders import read_run_metadata

    out = {}
    for f in real_runs:
        meta = read_run_metadata(f)
        log = read_request_log(f)
        ctx = replay_context(f.name, meta, log.header)
        assert ctx.kv_blocks_total == 26602 and ctx.output_len > 200 and ctx.ignore_eos
        out[f.name] = replay_run(log, ctx, [physics_spec()], source=meta.source)
    cg = {r["metric"]: r for r in out[real_runs[0].name]["rows"].iter_rows(named=True)}
    assert cg["successes"]["predicted"] == cg["successes"]["observed"] == 9000
    assert abs(cg["e2e_mean"]["rel_err_pct"]) < 5 and abs(cg["ttft_mean"]["rel_err_pct"]) < 15
    assert all(r["sample"] == "in_sample" for r in out[real_runs[0].name]["rows"].iter_rows(named=True))
    rp = out[real_runs[1].name]["rows"]
    assert rp["observed"].is_null().all() and rp["rel_err_pct"].is_null().all() and rp["predicted"].is_not_null().all()


def test_exported_model_sees_the_proxy_features_it_was_trained_on():
    """On a BATCH_SUMMARY-only run a model is fitted on proxy KV features (features.step_table_features); in a replay
    ExportedStepTime computes the same features from the simulator's batch counts and KV pool."""
    from types import SimpleNamespace

    from stepml_core.catalog import gpu_spec, known_model_names, model_spec
    from stepml_core.features.step_features import SEED_FEATURES, gpu_dict, spec_dict, step_table_features
    from stepml_core.stepmodels import reference_predictor as rp
    from stepml_core.stepmodels.sim_step_time import ExportedStepTime

    spec, gpu = model_spec("llama-2-70b"), gpu_spec()
    exported = {"model_spec": spec_dict(spec), "gpu_spec": gpu_dict(gpu), "tp": 4, "model_names": known_model_names()}
    st = ExportedStepTime(exported, kv_source="proxy_blocks", name="x")
    cases = [
        dict(
            prefill_tokens=700,
            decode_tokens=60,
            num_prefill_reqs=3,
            num_decode_reqs=60,
            num_running=66,
            kv_blocks_free=20000,
            kv_blocks_total=31356,
        ),
        dict(
            prefill_tokens=0,
            decode_tokens=128,
            num_prefill_reqs=0,
            num_decode_reqs=128,
            num_running=128,
            kv_blocks_free=9000,
            kv_blocks_total=31356,
        ),
        dict(
            prefill_tokens=2048,
            decode_tokens=0,
            num_prefill_reqs=1,
            num_decode_reqs=0,
            num_running=1,
            kv_blocks_free=31000,
            kv_blocks_total=31356,
        ),
    ]
    steps = pl.DataFrame(
        [
            {
                "step.id": i + 1,
                "batch.prefill_tokens": c["prefill_tokens"],
                "batch.decode_tokens": c["decode_tokens"],
                "batch.scheduled_tokens": c["prefill_tokens"] + c["decode_tokens"],
                "batch.num_prefill_reqs": c["num_prefill_reqs"],
                "batch.num_decode_reqs": c["num_decode_reqs"],
                "queue.running_depth": c["num_running"],
                "kv.blocks_total_gpu": c["kv_blocks_total"],
                "kv.blocks_free_gpu": c["kv_blocks_free"],
            }
            for i, c in enumerate(cases)
        ]
    )
    vec = step_table_features(steps, spec, gpu, 4)
    assert set(vec["kv_source"]) == {"proxy_blocks"}
    for i, c in enumerate(cases):
        f = rp.features_from_sums(st.sums(SimpleNamespace(**c)), st._consts, st._gpu, 4, st._names, "llama-2-70b")
        for name in [n for n in SEED_FEATURES if n != "model_id"]:
            assert f[name] == pytest.approx(vec[name][i], rel=1e-9, abs=1e-9), (i, name)


def test_recommendation_never_reads_the_scored_runs_errors():
    """The model recommended for a run is picked on the other runs of its LLM model: changing that run's own errors
    cannot change its pick; per LLM model the recommendation reads out-of-sample rows only."""
    from stepml_core.replay.scores import recommend, recommend_per_llm, run_status

    def rows(err_a_on_r1):
        out = []
        errs = {
            ("r1", "A"): err_a_on_r1,
            ("r1", "B"): 5.0,
            ("r2", "A"): 9.0,
            ("r2", "B"): 2.0,
            ("r3", "A"): 8.0,
            ("r3", "B"): 3.0,
        }
        for (e, m), err in errs.items():
            for metric in ("e2e_mean", "ttft_mean", "successes"):
                obs = 100.0 if metric == "successes" else 1.0
                out.append(
                    {
                        "experiment_id": e,
                        "source": "real",
                        "role": "train",
                        "step_model": m,
                        "fitted_on": "x",
                        "sample": "in_sample" if (e, m) == ("r2", "B") else "out_of_sample",
                        "metric": metric,
                        "predicted": obs if metric == "successes" else obs * (1 + err / 100),
                        "observed": obs,
                        "rel_err_pct": 0.0 if metric == "successes" else err,
                    }
                )
        return pl.DataFrame(out)

    llm = {"r1": "m", "r2": "m", "r3": "m"}
    facts = {e: {"llm_model": "m", "workload": f"w{e}", "role": "test"} for e in llm}
    picks = []
    for err in (0.1, 50.0):
        r = rows(err)
        st = run_status(r, {"r1": 100, "r2": 100, "r3": 100})
        picks.append({e: m for e, m, _ in recommend(r, facts, st).iter_rows()})
    assert picks[0]["r1"] == picks[1]["r1"] == "B"  # B is best on r2 and r3, whatever A does on r1
    per = recommend_per_llm(rows(0.1), llm, run_status(rows(0.1), {"r1": 100, "r2": 100, "r3": 100}))
    # out-of-sample rows only: B's in-sample 2 % on r2 does not count (B: 5, 3 → 4; A: 0.1, 9, 8 → 5.7)
    assert per.row(0, named=True)["step_model"] == "B" and per.row(0, named=True)["runs"] == 2


def _replay_rows(errs: dict[tuple[str, str], tuple[float, str]]) -> pl.DataFrame:
    """replay.csv rows: per (run, step model) an error % on e2e_mean and ttft_mean, fitted on the runs named."""
    out = []
    for (e, m), (err, fitted) in errs.items():
        for metric in ("e2e_mean", "ttft_mean", "successes"):
            out.append(
                {
                    "experiment_id": e,
                    "source": "real",
                    "role": "test",
                    "step_model": m,
                    "fitted_on": fitted,
                    "sample": "in_sample" if e in fitted.split(";") else "out_of_sample",
                    "metric": metric,
                    "predicted": 100.0 if metric == "successes" else 1 + err / 100,
                    "observed": 100.0 if metric == "successes" else 1.0,
                    "rel_err_pct": 0.0 if metric == "successes" else err,
                }
            )
    return pl.DataFrame(out)


def test_recommendation_is_nested_no_score_that_saw_the_scored_run_decides():
    """Issue 20 point 1: for run X (llama, codegen) a leave-one-workload-out fold of another llama workload
    calibrated on X, so its error there carries X's ground truth; the run-roles and leave-one-model-out rows of
    other runs could not have used X. Making those X-fed rows as good or as bad as one likes must not change X's
    pick, while making a row that never saw X worse does. Runs of every LLM model count."""
    from stepml_core.replay.scores import recommend, run_status

    runs = {
        "l-codegen": ("llama", "codegen", "test"),
        "l-general": ("llama", "general", "train"),
        "l-roleplay": ("llama", "roleplay", "validate"),
        "m-codegen": ("mixtral", "codegen", "validate"),
        "m-general": ("mixtral", "general", "train"),
    }
    facts = {e: {"llm_model": m, "workload": w, "role": r} for e, (m, w, r) in runs.items()}

    def errs(lowo_fed_by_x: float, roles_other: float) -> dict:
        return {
            ("l-codegen", "requests_lowo"): (1.0, "l-general;l-roleplay"),
            ("l-codegen", "requests_roles"): (1.0, "l-general"),
            ("l-roleplay", "requests_lowo"): (lowo_fed_by_x, "l-codegen;l-general"),  # calibrated on X
            ("l-roleplay", "requests_roles"): (roles_other, "l-general"),  # X is not a train run: never saw X
            ("m-codegen", "requests_lowo"): (6.0, "m-general"),  # another LLM model: never saw X
            ("m-codegen", "requests_roles"): (roles_other, "m-general"),
        }

    def pick(*a) -> str:
        r = _replay_rows(errs(*a))
        st = run_status(r, dict.fromkeys(runs, 100))
        return {e: m for e, m, _ in recommend(r, facts, st).iter_rows()}["l-codegen"]

    # lowo's only score that never saw X is 6 % (mixtral); roles' are 5 % on both runs
    assert pick(0.0, 5.0) == pick(100.0, 5.0) == "requests_roles"
    assert pick(0.0, 9.0) == "requests_lowo"  # a row that never saw X does decide
    st = run_status(_replay_rows(errs(0.0, 5.0)), dict.fromkeys(runs, 100))
    rec = {e: n for e, _, n in recommend(_replay_rows(errs(0.0, 5.0)), facts, st).iter_rows()}
    assert rec["l-codegen"] == 2  # two other runs' replays scored the winner


def test_a_model_fitted_on_a_runs_synthetic_twin_is_in_sample_for_it():
    """Issue 20 point 4: a model fitted on X-synth (built from X's aggregates) replayed on real X is in sample, and
    a step-trained source that is not X's twin is preferred for X."""
    from stepml_core.replay.specs import sample_of, specs_for_run

    x = "20260217-155451-llama-2-7b-tp1-codegen"
    twin = {"name": "ridge_30f", "kind": "stepml_export", "llm_model": "llama-2-7b", "fitted_on": [x + "-synth"]}
    twin |= {"source_run": x + "-synth", "stands_for": [x], "n_fit": 900}
    other = {**twin, "fitted_on": ["r-other"], "source_run": "r-other", "stands_for": [], "n_fit": 100}
    assert sample_of(twin, x, None) == "in_sample"
    assert sample_of(twin, x + "-synth", x) == "in_sample"
    assert sample_of({**twin, "fitted_on": [x], "stands_for": []}, x + "-synth", x) == "in_sample"
    assert sample_of(other, x, None) == "out_of_sample"
    assert specs_for_run([twin, other], x, "llama-2-7b")[0]["source_run"] == "r-other"  # despite fewer steps
    assert specs_for_run([twin], x, "llama-2-7b")[0]["source_run"] == x + "-synth"  # the only one: in sample


def test_linear_step_model_on_the_feature_tuple_is_the_dict_path_bit_for_bit():
    """LinearStepTime.step_time_us (feature tuple) and FeatureSums give exactly what predict_features_us on
    blis_features' dict gives, for every option of a BLIS file that the tuple path serves."""
    from types import SimpleNamespace

    from stepml_core.replay.intervals import FeatureSums
    from stepml_core.stepmodels.sim_step_time import BLIS_STEP_FEATURES, blis_features

    rng = np.random.default_rng(7)
    names = [f for f in BLIS_STEP_FEATURES if f not in ("kv_max", "kv_std")]
    docs = [
        {"step_time": {"model_type": "linear", "intercept": 5000.5, "feature_coefficients": {"decode_tokens": 31.7}}},
        {
            "step_time": {
                "model_type": "linear",
                "intercept": 7.1,
                "feature_coefficients": {n: float(rng.normal(0, 1e-3)) for n in names},
                "output_transform": "expm1",
            },
            "step_overhead_us": 900.0,
            "step_overhead_per_req_us": 3.3,
        },
    ]
    for doc in docs:
        m = LinearStepTime({"version": 1, **doc})
        assert m.reads_values
        sums = FeatureSums(LinearStepTime({"version": 1, **doc}))
        for _ in range(300):
            chunks = tuple(
                (int(rng.integers(1, 600)), int(rng.integers(0, 3000)), int(rng.integers(1, 3000)))
                for _ in range(int(rng.integers(0, 4)))
            )
            n_dec = int(rng.integers(0, 200))
            new = sum(q for q, _, _ in chunks)
            b = SimpleNamespace(
                scheduled_tokens=n_dec + new,
                new_prompt_tokens=new,
                chunks=chunks,
                decode_context_tokens=n_dec * int(rng.integers(1, 4000)),
            )
            want = m.predict_features_us(blis_features(b))
            assert m.step_time_us(b) == want and sums.step_time_us(b) == want
