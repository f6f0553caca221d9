"""Step-time models calibrated from request logs: the closed form and the simulator-in-the-loop refinement
recover a known model, folds never calibrate on a run they score, a scored run's ground truth cannot change
its predictions, leave-one-model-out transfer and intervals."""

# long module: the calibration's tests share the synthetic-timeline builders

from __future__ import annotations

import dataclasses
import gzip
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from stepml_core.calibration import protocols as cp
from stepml_core.calibration.fit import (
    BetweenRunErrors,
    Calibration,
    SaturatedSetting,
    arch_prior,
    between_run_errors,
    calibrate,
    fit_closed_form,
)
from stepml_core.calibration.params import PARAM_NAMES, StepParams, serving_model
from stepml_core.calibration.timelines import CalibrationRun, Timelines, fcfs_admissions, request_timelines
from stepml_core.oos_audit import INTERVAL_KEYS
from stepml_core.pipeline import calibration_inputs, log_as_stored, replay_context
from stepml_core.replay.intervals import between_run_bounds, interval_bounds
from stepml_core.replay.simulate import RunContext, replay, replay_workload
from stepml_core.replay.specs import replay_run, specs_for_run
from stepml_core.runs.folders import read_run_metadata
from stepml_core.runs.request_log import read_request_log

TRUTH = StepParams(b0_us=6000.0, b_dec_us=20.0, b_kv_us=0.2, b_pf_us=27.0, b_npf_us=500.0, q0_us=15000.0)
CONFIG = {
    "tensor_parallelism": 1,
    "max_num_seqs": 128,
    "max_num_batched_tokens": 2048,
    "kv_blocks_total_gpu": 7000,
    "block_size": 16,
}


def _ctx(eid: str, output_len: int) -> RunContext:
    return RunContext(
        experiment_id=eid,
        model="llama-2-7b",
        tp=1,
        max_num_seqs=128,
        max_num_batched_tokens=2048,
        kv_blocks_total=7000,
        num_groups=10,
        prompts_per_group=10,
        system_prompt_len=100,
        output_len=output_len,
        ignore_eos=True,
    )


def _requests(rate: float, seconds: float, prompt: int, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    arr = np.cumsum(rng.exponential(1.0 / rate, int(rate * seconds)))
    n = arr.size
    return pl.DataFrame(
        {
            "index": np.arange(n),
            "arrival_time_us": np.rint((arr - arr[0]) * 1e6).astype(np.int64),
            "input_tokens": prompt + rng.integers(-8, 9, n),
            "output_tokens": np.full(n, 64),
            "prefix_group": [None] * n,
            "has_error": np.zeros(n, dtype=bool),
        },
        schema_overrides={"prefix_group": pl.Utf8},
    )


def _observed(table: pl.DataFrame, ctx: RunContext, truth: StepParams, load_delay: dict | None = None) -> pl.DataFrame:
    """What a client of an engine whose steps follow ``truth`` would log (the simulator as ground truth; its tokens
    reach the clients ``load_delay`` later, calibration.load_delay)."""
    r = replay(
        replay_workload(
            table.with_columns(
                observed_has_error=pl.lit(None, pl.Boolean),
                observed_ttft_s=pl.lit(None, pl.Float64),
                observed_e2e_s=pl.lit(None, pl.Float64),
            ),
            ctx,
        ),
        serving_model(truth, load_delay=load_delay),
        ctx,
    ).per_request
    return table.join(
        r.select(
            "index",
            observed_has_error=~pl.col("success"),
            observed_ttft_s=pl.col("ttft_s"),
            observed_e2e_s=pl.col("e2e_s"),
        ),
        on="index",
    )


def _run(
    eid: str, rate: float, seconds: float, prompt: int, seed: int, role="train", truth=TRUTH, load_delay=None
) -> CalibrationRun:
    ctx = _ctx(eid, 64)
    return CalibrationRun(
        eid,
        "llama-2-7b",
        eid.rsplit("-", 1)[-1],
        role,
        _observed(_requests(rate, seconds, prompt, seed), ctx, truth, load_delay),
        ctx,
    )


def test_timelines_by_hand():
    """Two requests: A decodes over [1, 3] s, B over [2, 4] s, each 3 generated tokens after prompts of 100 / 200:
    A's window sees 1.5 decoders on average and Σ context 100 + 3·0.5 + (B's 0.5 s: 200 + …)."""
    ctx = _ctx("20260101-000000-llama-2-7b-tp1-codegen", 3)
    t = pl.DataFrame(
        {
            "index": [0, 1],
            "arrival_time_us": [0, 1_000_000],
            "input_tokens": [100, 200],
            "output_tokens": [3, 3],
            "prefix_group": [None, None],
            "has_error": [False, False],
            "observed_has_error": [False, False],
            "observed_ttft_s": [1.0, 1.0],
            "observed_e2e_s": [3.0, 3.0],
        },
        schema_overrides={"prefix_group": pl.Utf8},
    )
    tl = request_timelines(CalibrationRun(ctx.experiment_id, "llama-2-7b", "codegen", "train", t, ctx), grid_s=0.001)
    assert tl.cycle_us[0] == pytest.approx(1e6)  # (3 − 1) s / (3 − 1) tokens
    assert tl.dec_mean[0] == pytest.approx(1.5, abs=2e-3)
    # A's context grows 100 → 103 over [1, 3]: mean 101.5; B is in A's window for [2, 3]: mean 200.75 over half of it
    assert tl.kv_mean[0] == pytest.approx(101.5 + 0.5 * 200.75, rel=2e-3)
    assert tl.prefills_per_step[0] == pytest.approx(1 / 2)  # B's first token (t = 2 s) inside A's window, 2 steps


def _errored_run(cap: int) -> CalibrationRun:
    """A (success): first token at 0.1 s, done at 10 s; B, C errored (no first token logged) arriving at 0.2 / 0.3 s,
    aborted by their clients at 8 / 5 s; D a success arriving at 20 s (A's and D's TTFT, 0.1 s after their admission on
    arrival, is the delay from a modelled admission to the first token)."""
    ctx = replace(_ctx("20260101-000000-llama-2-7b-tp1-reasoning", 11), max_num_seqs=cap)
    t = pl.DataFrame(
        {
            "index": [0, 1, 2, 3],
            "arrival_time_us": [0, 200_000, 300_000, 20_000_000],
            "input_tokens": [100, 0, 0, 100],
            "output_tokens": [11, 0, 0, 11],
            "prefix_group": [None] * 4,
            "has_error": [False, True, True, False],
            "observed_has_error": [False, True, True, False],
            "observed_ttft_s": [0.1, None, None, 0.1],
            "observed_e2e_s": [10.0, 7.8, 4.7, 1.1],
        },
        schema_overrides={"prefix_group": pl.Utf8},
    )
    return CalibrationRun(ctx.experiment_id, "llama-2-7b", "reasoning", "train", t, ctx)


def test_errored_requests_decode_until_their_abort_within_the_cap():
    """Errored requests count in the decoding population until their abort (issue 20, point 7): with
    max_num_seqs = 2, B gets the second slot on arrival (first token 0.1 s later, the successes' delay) and decodes
    until its abort at 8 s, inside A's window [0.1, 10]; C waits behind A and B until B leaves at 8 s, after its own
    abort at 5 s, so it never decodes. With max_num_seqs = 1 B waits for A to leave and never decodes either.
    Before, the timelines dropped every request without a logged first token: A's window saw 1 decoder."""
    tl = request_timelines(_errored_run(cap=2), grid_s=0.001)
    assert tl.dec_mean[0] == pytest.approx(1 + (8.0 - 0.3) / (10.0 - 0.1), abs=2e-3)
    assert tl.prefills_per_step[0] == pytest.approx(1 / 10)  # B's (modelled) first token inside A's window
    assert np.isnan(tl.cycle_us[1]) and np.isnan(tl.cycle_us[2])  # no cycle of its own: it never finished
    assert request_timelines(_errored_run(cap=1), grid_s=0.001).dec_mean[0] == pytest.approx(1.0, abs=2e-3)
    adm = fcfs_admissions(np.array([0.0, 0.2, 0.3, 20.0]), np.array([10.0, 8.0, 5.0, 21.1]), 2)
    assert adm.tolist() == [0.0, 0.2, 8.0, 20.0]


def test_calibration_recovers_a_known_engine():
    """Request logs of an engine whose steps follow a known BLIS model: the calibrated model's step time agrees
    with it within a few % where the runs operate, and replaying the runs reproduces their latencies."""
    runs = [
        _run("20260101-000000-llama-2-7b-tp1-codegen", 6.0, 90, 500, 1),
        _run("20260101-010000-llama-2-7b-tp1-general", 14.0, 90, 560, 2),
    ]
    cal = calibrate(runs, refine_evals=4, n_boot=8)
    p = cal.params
    for dec, kv in ((10, 6000), (40, 24000), (80, 48000)):  # decoders, Σ context
        assert p.step_us(dec, kv) == pytest.approx(TRUTH.step_us(dec, kv), rel=0.04)
    for r in runs:
        pred = replay(replay_workload(r.table, r.ctx), serving_model(p), r.ctx).per_request
        obs = r.table["observed_e2e_s"].mean()
        assert abs(pred["e2e_s"].mean() / obs - 1) < 0.015
        assert abs(pred["ttft_s"].mean() / r.table["observed_ttft_s"].mean() - 1) < 0.06
    assert cal.refine is not None and cal.refine.evaluations <= 4
    assert cal.bootstrap.shape[1] == len(PARAM_NAMES) and cal.bootstrap.shape[0] >= 4
    # what is replayed is the BLIS file: the doc round-trips
    assert StepParams.from_blis_doc(cal.doc()) == p
    # typed records, JSON at the cache: the summary round-trips to the same record and the same JSON
    assert isinstance(cal.saturated_setting, SaturatedSetting) and isinstance(cal.between_runs, BetweenRunErrors)
    text = json.dumps(cal.summary())
    back = Calibration.from_summary(json.loads(text))
    assert json.dumps(back.summary()) == text
    assert (back.saturated_setting, back.between_runs, back.refine) == (
        cal.saturated_setting,
        cal.between_runs,
        cal.refine,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        cal.params = back.params


def _infos() -> list[cp.RunInfo]:
    R = cp.RunInfo
    return [
        R("a-codegen", "m1", 1, "codegen", "train", True, 900),
        R("a-general", "m1", 1, "general", "train", True, 1600),
        R("a-roleplay", "m1", 1, "roleplay", "validate", False, 0),
        R("a-reasoning", "m1", 1, "reasoning", "test", True, 100),
        R("b-codegen", "m2", 2, "codegen", "train", True, 900),
        R("b-general", "m2", 2, "general", "validate", True, 1700),
    ]


def test_folds_never_calibrate_on_what_they_score():
    infos = _infos()
    folds = cp.plan_folds(infos, lomo_models=["m1", "m2"])
    gt = {r.experiment_id for r in infos if r.has_ground_truth}
    by = {(f.protocol, f.llm_model, f.held_out): f for f in folds}
    assert by[("roles", "m1", "")].calibrate_on == ("a-codegen", "a-general")
    assert by[("roles", "m2", "")].calibrate_on == ("b-codegen",)
    for f in folds:
        assert set(f.calibrate_on) <= gt  # never a run without ground truth
        if f.protocol in ("lowo", "lomo"):
            assert not set(f.for_runs) & set(f.calibrate_on)
    assert by[("lowo", "m1", "roleplay")].for_runs == ("a-roleplay",)  # predicted without ground truth
    assert by[("lowo", "m1", "reasoning")].calibrate_on == ("a-codegen", "a-general")
    assert by[("lomo", "m1", "m1")].transfer_from == ("m2",)
    every = {(f.llm_model, f.transfer_from) for f in cp.plan_folds(infos) if f.protocol == "lomo"}
    assert every == {("m1", ("m2",)), ("m2", ("m1",))}  # by default every LLM model is held out once
    with pytest.raises(cp.FoldError):
        cp.check_folds([cp.Fold("lowo", "m1", ("a-codegen", "a-general"), ("a-codegen",))], infos)
    with pytest.raises(cp.FoldError):
        cp.check_folds([cp.Fold("roles", "m2", ("b-general",), None)], infos)  # a validate run
    with pytest.raises(cp.FoldError):
        cp.check_folds([cp.Fold("lowo", "m1", ("a-roleplay",), ("a-general",))], infos)  # no ground truth


def test_which_runs_get_a_prediction_never_depends_on_their_ground_truth():
    """Issue 20 point 3: the folds that predict a run out of sample are the same whether that run has ground truth or
    not, and every LLM model is held out once; before, the leave-one-model-out target was the model with the most
    observed successes, so a withheld run's truth could switch it and give that very run a prediction."""
    from dataclasses import replace

    infos = [*_infos(), cp.RunInfo("b-roleplay", "m2", 2, "roleplay", "validate", False, 1800)]

    def predicting(inf, run):
        return sorted(
            (f.protocol, f.calibrate_on, f.transfer_from)
            for f in cp.plan_folds(inf)
            if f.protocol in ("lowo", "lomo") and run in f.for_runs
        )

    assert {f.llm_model for f in cp.plan_folds(infos) if f.protocol == "lomo"} == {"m1", "m2"}
    for k, r in enumerate(infos):  # give a run without truth truth, take a run's truth away
        flipped = [*infos[:k], replace(r, has_ground_truth=not r.has_ground_truth), *infos[k + 1 :]]
        assert predicting(flipped, r.experiment_id) == predicting(infos, r.experiment_id), r.experiment_id


def test_only_calibration_runs_are_loaded(monkeypatch):
    """run_calibrations hands calibrate() the logs of a fold's calibration runs and never loads another run."""
    infos = _infos()
    folds = [f for f in cp.plan_folds(infos, protocols=("roles",), piecewise=True) if f.protocol == "roles"]
    loaded, seen = [], []
    monkeypatch.setattr(cp, "calibrate", lambda runs, **kw: seen.append([r.experiment_id for r in runs]) or "fit")
    cals = cp.run_calibrations(folds, lambda e: loaded.append(e) or CalibrationRun(e, "m", "w", None, None, None))
    assert sorted(loaded) == ["a-codegen", "a-general", "b-codegen"]
    # each calibration set twice: the linear form and the piecewise one (the same folds)
    assert sorted(map(tuple, seen)) == [("a-codegen", "a-general")] * 2 + [("b-codegen",)] * 2
    assert len(cals) == 4


def _write_run(root: Path, eid: str, run: CalibrationRun, split: str) -> None:
    f = root / eid
    f.mkdir(parents=True)
    (f / "exp-config.yaml").write_text("tensor_parallelism: 1\nmax_num_seqs: 128\nmax_num_batched_tokens: 2048\n")
    (f / "profile.yaml").write_text(
        json.dumps(
            {
                "data": {
                    "shared_prefix": {
                        "num_groups": 10,
                        "num_prompts_per_group": 10,
                        "system_prompt_len": 100,
                        "output_len": 64,
                    }
                },
                "server": {"ignore_eos": True},
            }
        )
    )
    t = run.table
    reqs = [
        {
            "index": int(i),
            "arrival_time_us": int(a),
            "input_tokens": int(x),
            "output_tokens": 64,
            "prefix_group": "",
            "has_error": False,
        }
        for i, a, x in zip(t["index"], t["arrival_time_us"], t["input_tokens"])
    ]
    doc = {
        "experiment": eid,
        "model_short": "llama-2-7b",
        "profile": eid.rsplit("-", 1)[-1],
        "split": split,
        "config": CONFIG,
        "requests": reqs,
    }
    (f / "requests.json.gz").write_bytes(gzip.compress(json.dumps(doc).encode()))
    gt = [
        {"index": int(i), "has_error": bool(h), "ttft_s": float(tt), "e2e_s": float(e)}
        for i, h, tt, e in zip(t["index"], t["observed_has_error"], t["observed_ttft_s"], t["observed_e2e_s"])
    ]
    (f / "ground_truth.json.gz").write_bytes(gzip.compress(json.dumps(gt).encode()))


def _predict(root: Path, scored: str, **calibrate_kw) -> tuple[dict[str, pl.DataFrame], pl.DataFrame]:
    """The whole path of the pipeline for one scored run: read every log, calibrate the folds, replay every run with
    intervals, widen them (stepml_core.replay.intervals, at 50 % so that one other run's score bounds the widening).
    Returns the scored run's per-request predictions and its interval rows."""
    from stepml_core.replay.intervals import widen_intervals

    logs = {f.name: read_request_log(f) for f in sorted(root.iterdir())}
    metas = {e: read_run_metadata(root / e) for e in logs}
    infos, load = calibration_inputs(metas, {e: log_as_stored(log) for e, log in logs.items()})
    ctx_of = lambda e: replay_context(e, metas[e], logs[e].header)  # noqa: E731
    out = cp.study_calibration(
        infos,
        load,
        refine_evals=2,
        n_boot=6,
        lomo_models=[],
        **({"piecewise": True} | calibrate_kw),
    )
    res = {
        e: replay_run(
            logs[e],
            ctx_of(e),
            [s for s in specs_for_run(out["specs"], e, "llama-2-7b") if s["kind"] != "physics"],
            source="real",
        )
        for e in logs
    }
    ivs = widen_intervals(
        pl.concat([r["intervals"] for r in res.values()]),
        {e: {"llm_model": metas[e].model, "workload": metas[e].workload} for e in logs},
        level=0.5,
    )
    return (
        {name: t.select("index", "ttft_s", "e2e_s", "success") for name, t in res[scored]["per_request"].items()},
        ivs.filter(pl.col("experiment_id") == scored).select(INTERVAL_KEYS).sort("step_model", "metric"),
    )


def test_deleting_a_scored_runs_ground_truth_leaves_its_predictions_and_intervals_bit_identical(tmp_path):
    """The validate run's ground truth is read by nothing that predicts it or bounds its interval: deleting the file
    changes none of its predicted latencies (requests_roles and requests_lowo) and none of its intervals (bootstrap,
    widened, and bootstrap + between-run term), bit for bit, although the other runs' leave-one-workload-out folds lose
    it. Deleting a *calibration*
    run's ground truth does change the predictions, deleting the other validate run's (whose error widens the
    interval) the interval (the test can fail)."""

    def run(eid, rate, prompt, seed):
        return _run(eid, rate, 50, prompt, seed)

    runs = {
        "20260101-000000-llama-2-7b-tp1-codegen": (5.0, 500, 3, "train"),
        "20260101-010000-llama-2-7b-tp1-general": (10.0, 560, 4, "train"),
        "20260101-020000-llama-2-7b-tp1-roleplay": (6.0, 760, 5, "validate"),
        "20260101-030000-llama-2-7b-tp1-reasoning": (4.0, 640, 6, "validate"),
    }
    for eid, (rate, prompt, seed, split) in runs.items():
        _write_run(tmp_path, eid, run(eid, rate, prompt, seed), split)
    scored = "20260101-020000-llama-2-7b-tp1-roleplay"
    before, iv_before = _predict(tmp_path, scored)
    # the piecewise form's replays (same folds) are checked bit for bit with the linear ones below
    assert set(before) == {"requests_roles", "requests_lowo", "requests_pw_roles", "requests_pw_lowo"}
    assert set(iv_before["step_model"]) == {"requests_roles", "requests_lowo"}
    assert (iv_before["extrap_n"] == 1).all() and iv_before["extrap_q_pct"].is_finite().all()  # the other validate run
    # the between-run term: roles from its 2 train runs, lowo from the fold's 3 calibration runs
    assert iv_before.group_by("step_model").agg(pl.col("brun_runs").max()).sort("step_model").rows() == [
        ("requests_lowo", 3),
        ("requests_roles", 2),
    ]
    assert iv_before["brun_lo"].is_not_null().all() and (iv_before["brun_step_pct"] > 0).all()
    (tmp_path / scored / "ground_truth.json.gz").unlink()
    after, iv_after = _predict(tmp_path, scored)
    for name in before:
        assert before[name].equals(after[name]), name
    assert iv_before.equals(iv_after)
    (tmp_path / "20260101-030000-llama-2-7b-tp1-reasoning" / "ground_truth.json.gz").unlink()
    _, iv_other = _predict(tmp_path, scored)
    roles = pl.col("step_model") == "requests_roles"  # (its lowo fold calibrated on that run: those change anyway)
    assert (
        iv_other.filter(roles)
        .select("predicted", "boot_lo", "boot_hi", "brun_lo", "brun_hi")
        .equals(iv_before.filter(roles).select("predicted", "boot_lo", "boot_hi", "brun_lo", "brun_hi"))
    )
    lowo = pl.col("step_model") == "requests_lowo"  # its fold calibrated on that run: its between-run term moves
    assert not iv_other.filter(lowo)["brun_step_pct"].equals(iv_before.filter(lowo)["brun_step_pct"])
    assert not iv_other.filter(roles).select("lo", "hi").equals(iv_before.filter(roles).select("lo", "hi"))
    (tmp_path / "20260101-010000-llama-2-7b-tp1-general" / "ground_truth.json.gz").unlink()
    changed, _ = _predict(tmp_path, scored)
    assert not changed["requests_roles"].equals(before["requests_roles"])


def test_leave_one_model_out_transfer_through_the_architecture():
    """Sources with the same efficiency ratios give the target those ratios × its own physics scales."""
    a, b, t = arch_prior("llama-2-70b", 4), arch_prior("codellama-34b", 2), arch_prior("mixtral-8x7b", 2)

    def src(pr):
        return StepParams(
            b0_us=1.4 * pr.weights_floor_us,
            b_dec_us=2.0 * pr.compute_floor_us,
            b_kv_us=1.8 * pr.kv_floor_us,
            b_pf_us=pr.prefill_prior_us,
            b_npf_us=15.0 * pr.layers,
            q0_us=25000.0,
        )

    p, per = cp.transfer_params([(src(a), a), (src(b), b)], t)
    assert p.b0_us == pytest.approx(1.4 * t.weights_floor_us)
    assert p.b_dec_us == pytest.approx(2.0 * t.compute_floor_us)
    assert p.b_kv_us == pytest.approx(1.8 * t.kv_floor_us)
    assert p.b_npf_us == pytest.approx(15.0 * t.layers)
    assert p.q0_us == 25000.0 and len(per) == 2
    assert t.moe and t.compute_floor_us < 2 * t.params / 2 / 989.5e12 * 1e6  # MoE: active parameters only


def test_interval_bounds_pick_the_quantile_models():
    rows = np.array(
        [
            StepParams(b0_us=b0, b_dec_us=0, b_kv_us=0.1, b_pf_us=20, b_npf_us=0, q0_us=1e4).as_vector()
            for b0 in (5000, 5100, 4900, 5300, 4700, 5000, 5200, 4800, 5050, 4950, 5150)
        ]
    )
    lo, hi = interval_bounds(
        {"rows": rows.tolist()},
        1000,
        {"decode_tokens": 1e4, "kv_sum": 1e7, "prefill_tokens": 1e3, "num_prefill_reqs": 10},
        100,
        500,
    )
    assert lo.b0_us == 4700 and hi.b0_us == 5300
    assert interval_bounds({"rows": rows[:1].tolist()}, 10, {}, 1, 1) is None


def _timelines(eid: str, saturated: bool, dec: np.ndarray, ctx_per_seq: float, cycle_us: np.ndarray) -> Timelines:
    n = dec.size
    kv = dec * ctx_per_seq
    z = np.zeros(n)
    return Timelines(
        experiment_id=eid,
        saturated=saturated,
        arrival_s=np.arange(n, dtype=np.float64),
        ttft_s=np.full(n, 0.05),
        e2e_s=np.full(n, 3.0),
        success=np.ones(n, dtype=bool),
        generated=np.full(n, 200.0),
        input_tokens=np.full(n, 600.0),
        cycle_us=cycle_us,
        dec_mean=dec,
        kv_mean=kv,
        prefills_per_step=z,
        kv_over=z,
        dec_at_arrival=dec,
        kv_at_arrival=kv,
    )


def test_a_cpu_bound_saturated_run_only_bounds_the_gpu_path_from_above():
    """Cycle = max(GPU path, CPU path). Two non-saturated runs (10–70 decoders, 500 / 900 tokens of context each)
    follow a GPU-path model; a saturated run at 128 decoders × 1,800 tokens is CPU-bound (its cycle is a CPU floor
    of 1.3× the GPU path, as the real Mixtral reasoning run's schedule() of 32 ms against its cycle). Its cycles
    only bound the GPU path from above: the fit recovers the GPU path where the non-saturated runs operate and at
    110 decoders (the general workload's second stage). Fitted two-sided, the CPU-bound cycles inflate β_kv."""
    truth = StepParams(b0_us=16000.0, b_dec_us=10.0, b_kv_us=0.04, b_pf_us=25.0, b_npf_us=0.0, q0_us=2e4)
    prior = arch_prior("mixtral-8x7b", 2)
    rng = np.random.default_rng(3)

    def gpu(dec, cps):
        return truth.step_us(dec, dec * cps)

    d1, d2 = rng.uniform(10, 70, 400), rng.uniform(10, 70, 400)
    d3 = rng.uniform(120, 128, 200)
    tls = [
        _timelines("a-codegen", False, d1, 500.0, gpu(d1, 500.0)),
        _timelines("a-roleplay", False, d2, 900.0, gpu(d2, 900.0)),
        _timelines("a-reasoning", True, d3, 1800.0, 1.3 * gpu(d3, 1800.0)),
    ]
    p = fit_closed_form(tls, prior).params
    for dec, cps in ((40, 700.0), (110, 700.0), (125, 1800.0)):
        assert p.step_us(dec, dec * cps) == pytest.approx(gpu(dec, cps), rel=0.005)
    # a GPU-bound saturated run below what the non-saturated runs alone extrapolate to still pulls the fit down
    flat = [
        _timelines("b-codegen", False, d1, 700.0, gpu(d1, 700.0)),  # one context length: split unidentified
        _timelines("b-reasoning", True, d3, 1800.0, gpu(d3, 1800.0)),
    ]
    alone = fit_closed_form(flat[:1], prior).params
    both = fit_closed_form(flat, prior).params
    assert alone.step_us(125, 125 * 1800.0) > 1.02 * gpu(125, 1800.0)  # the calm run alone over-extrapolates
    assert (
        abs(both.step_us(125, 125 * 1800.0) / gpu(125, 1800.0) - 1)
        < abs(alone.step_us(125, 125 * 1800.0) / gpu(125, 1800.0) - 1) / 2
    )


def test_the_saturated_runs_treatment_is_chosen_inside_the_calibration_runs():
    """Issue 20 point 2: the weight and one-sidedness of saturated calibration runs are chosen by inner validation on
    the calibration runs alone (hold out each non-saturated one, score its decode cycles), not on a held-out run's
    errors. A CPU-bound saturated run (cycles 1.3× the GPU path) must count one-sided; with one non-saturated run
    there is nothing to hold out and the order fixed in advance decides; the choice is recorded."""
    from stepml_core.calibration.fit import SATURATED_SETTINGS, choose_saturated_setting

    truth = StepParams(b0_us=16000.0, b_dec_us=10.0, b_kv_us=0.04, b_pf_us=25.0, b_npf_us=0.0, q0_us=2e4)
    prior = arch_prior("mixtral-8x7b", 2)
    rng = np.random.default_rng(5)
    gpu = lambda dec, cps: truth.step_us(dec, dec * cps)  # noqa: E731
    d1, d2, d3 = rng.uniform(10, 70, 400), rng.uniform(10, 70, 400), rng.uniform(120, 128, 200)
    calm = [
        _timelines("a-codegen", False, d1, 500.0, gpu(d1, 500.0) * rng.normal(1, 0.01, 400)),
        _timelines("a-roleplay", False, d2, 900.0, gpu(d2, 900.0) * rng.normal(1, 0.01, 400)),
    ]
    cpu_bound = _timelines("a-reasoning", True, d3, 1800.0, 1.3 * gpu(d3, 1800.0))
    s = choose_saturated_setting([*calm, cpu_bound], prior)
    assert s.one_sided and s.chosen_by.startswith("inner validation")
    assert len(s.inner_error_pct) == len(SATURATED_SETTINGS)
    two_sided = min(v for k, v in s.inner_error_pct.items() if k.startswith("two-sided"))
    assert two_sided > s.inner_error_pct[f"one-sided, weight {s.weight:g}"]  # bending the fit costs the held-out run
    one = choose_saturated_setting([calm[0], cpu_bound], prior)
    assert (one.one_sided, one.weight) == SATURATED_SETTINGS[0] and one.chosen_by.startswith("fixed in advance")
    assert choose_saturated_setting(calm, prior).chosen_by.startswith("not needed")


def test_stage_two_scores_only_the_requests_with_ground_truth():
    """Issue 21: truth for half the requests made stage 2 count the other half as observed failures (and predicted
    successes); both sides now cover the requests with truth only, and those without stay in the load."""
    from stepml_core.calibration.refine import _Objective

    run = _run("20260101-000000-llama-2-7b-tp1-codegen", 4.0, 60.0, 600, 1)
    n = run.table.height
    half = replace(
        run,
        table=run.table.with_columns(
            *(
                pl.when(pl.col("index") < n // 2).then(pl.col(c)).otherwise(None).alias(c)
                for c in ("observed_has_error", "observed_ttft_s", "observed_e2e_s")
            )
        ),
    )
    whole = _Objective(TRUTH, [run], 0, None)
    part = _Objective(TRUTH, [half], 0, None)
    ok_first_half = int((~run.table.filter(pl.col("index") < n // 2)["observed_has_error"]).sum())
    assert part.observed[0]["successes"] == ok_first_half < whole.observed[0]["successes"]
    x0 = np.zeros(2)
    assert part.evaluate(x0)[1][0]["successes"] <= n // 2 < whole.evaluate(x0)[1][0]["successes"]


def test_between_run_errors_leave_each_calibration_run_out():
    """Three runs of one linear engine: each left-out run is predicted by the other two within a fraction of a %;
    a fourth run whose cycles are 10 % slower is off by ≈ log 1.1 when left out, and only calibration runs enter."""
    rng = np.random.default_rng(3)
    truth = lambda d, kv: 6000.0 + 20.0 * d + 0.2 * kv  # noqa: E731

    def tl(eid, lo, hi, ctx, slow=1.0):
        dec = rng.uniform(lo, hi, 400)
        return _timelines(eid, False, dec, ctx, truth(dec, dec * ctx) * slow * rng.normal(1, 0.01, 400))

    prior = arch_prior("llama-2-7b", 1)
    same = [tl("a", 10, 60, 500), tl("b", 20, 90, 700), tl("c", 5, 40, 900)]
    br = between_run_errors(same, prior)
    assert br.runs == ("a", "b", "c") and max(abs(e) for e in br.step_log_err) < 0.01
    br = between_run_errors([*same, tl("d", 10, 70, 600, slow=1.1)], prior)
    assert br.runs == ("a", "b", "c", "d")
    assert br.step_log_err[3] == pytest.approx(np.log(1.1), abs=0.02)
    assert all(-0.08 < e < 0 for e in br.step_log_err[:3])  # the slow run, calibrating, pulls the others up


def test_between_run_bounds_widen_the_bootstrap_models():
    """z = t_k(0.95)·√(Σe²/k) of the leave-one-run-out log step errors; the bound models' step part of the latency
    index sits at exp(±√(h_boot² + z²)) of the central one, α0 moved by the same quantile of the α0 errors."""
    from scipy.stats import t as student_t

    c = StepParams(b0_us=5000.0, b_dec_us=10.0, b_kv_us=0.1, b_pf_us=20.0, b_npf_us=0.0, q0_us=2e4)
    sums = {"decode_tokens": 4e4, "kv_sum": 2e7, "prefill_tokens": 0.0, "num_prefill_reqs": 0.0}
    spec = {"params": c.__dict__, "calibration": {"between_runs": {"step_log_err": [0.1, -0.1], "q_err_us": [3e3]}}}
    z, zq = student_t.ppf(0.95, 2) * 0.1, student_t.ppf(0.95, 1) * 3e3
    lo, hi, info = between_run_bounds(spec, (c, c), 1000, sums, 200.0, 0.9)  # bootstrap of zero width: h = 0
    assert lo.b0_us == pytest.approx(5000.0 * np.exp(-z)) and hi.b_kv_us == pytest.approx(0.1 * np.exp(z))
    assert (lo.q0_us, hi.q0_us) == pytest.approx((2e4 - zq, 2e4 + zq))
    assert info["runs"] == 2 and info["step_pct"] == pytest.approx(100 * np.expm1(z))
    up = c.scaled(1.05)  # a bootstrap bound 5 % up: that side's half-width √(log(1.05)² + z²)
    _, hi2, _ = between_run_bounds(spec, (c, up), 1000, sums, 200.0, 0.9)
    assert hi2.b0_us == pytest.approx(5000.0 * np.exp(np.hypot(np.log(1.05), z)))
    assert between_run_bounds({**spec, "calibration": {}}, (c, c), 1000, sums, 200.0, 0.9) is None


# ---------------------------------------------------------------------------- the load delay (calibration.load_delay)


def test_a_load_delay_moves_each_token_by_its_steps_requests_and_leaves_the_engine_alone():
    r = _run("20260101-000000-llama-2-7b-tp1-codegen", 10.0, 30, 500, 3)
    w = replay_workload(r.table, r.ctx)
    ld = {"shift_us": -2000.0, "per_request_us": 150.0}
    plain = replay(w, serving_model(TRUTH), r.ctx)
    loaded = replay(w, serving_model(TRUTH, load_delay=ld), r.ctx)
    assert loaded.steps == plain.steps and loaded.sim_seconds == plain.sim_seconds
    n = plain.first_step_requests
    assert n.min() >= 1 and n.max() > n.min()  # the steps that carried first tokens differ in size
    dt = (loaded.per_request["ttft_s"] - plain.per_request["ttft_s"]).to_numpy()
    np.testing.assert_allclose(dt, (-2000.0 + 150.0 * n) * 1e-6, rtol=0, atol=1e-12)
    de = (loaded.per_request["e2e_s"] - plain.per_request["e2e_s"]).to_numpy()  # the last token's step's size
    assert ((de > (-2000.0 + 150.0 * 0.5) * 1e-6) & (de < (-2000.0 + 150.0 * 129) * 1e-6)).all()
    assert not np.allclose(de, dt)


def test_the_load_delay_stage_recovers_a_delay_per_request_planted_in_the_logs():
    """Logs of an engine whose tokens reach the clients 150 µs per request in their step later: stage 3 finds that
    slope from the calibration runs' own replays (off: none, and the high-rate run's TTFT is missed)."""
    ld = {"shift_us": 0.0, "per_request_us": 150.0}
    runs = [
        _run("20260101-000000-llama-2-7b-tp1-codegen", 6.0, 60, 500, 1, load_delay=ld),
        _run("20260101-010000-llama-2-7b-tp1-general", 16.0, 60, 560, 2, load_delay=ld),
    ]
    from stepml_core.calibration.load_delay import fit_load_delay

    exact = fit_load_delay(TRUTH, runs)  # with the engine's own step model the residuals are the delay alone
    assert (exact.per_request_us, exact.shift_us) == pytest.approx((150.0, 0.0), abs=1e-3)
    with_stage = calibrate(runs, refine_evals=4, n_boot=0, load_delay=True)
    # after stages 1-2 (their step model a few % off where these runs operate) the slope is found within 30 %
    assert with_stage.load_delay.per_request_us == pytest.approx(150.0, rel=0.3)
    assert with_stage.load_delay.requests_used == sum(r.table.height for r in runs)
    back = Calibration.from_summary(json.loads(json.dumps(with_stage.summary())))
    assert back.load_delay == with_stage.load_delay
    without = calibrate(runs, refine_evals=4, n_boot=0)
    assert without.load_delay is None and "load_delay" not in without.summary()

    def ttft_errors(cal) -> list[float]:  # each run's mean TTFT, replayed / observed − 1
        out = []
        for r in runs:
            ld_spec = cal.load_delay.spec() if cal.load_delay else None
            p = replay(replay_workload(r.table, r.ctx), serving_model(cal.params, load_delay=ld_spec), r.ctx)
            out.append(p.per_request["ttft_s"].mean() / r.table["observed_ttft_s"].mean() - 1)
        return out

    # without the stage one α0 serves both loads: the low-rate run's TTFT over, the high-rate run's under
    lo, hi = ttft_errors(without)
    assert lo > 0.005 and hi < -0.005
    assert max(map(abs, ttft_errors(with_stage))) < 0.5 * min(abs(lo), abs(hi))


def test_no_planted_delay_no_slope():
    runs = [
        _run("20260101-000000-llama-2-7b-tp1-codegen", 6.0, 60, 500, 1),
        _run("20260101-010000-llama-2-7b-tp1-general", 16.0, 60, 560, 2),
    ]
    assert calibrate(runs, refine_evals=4, n_boot=0, load_delay=True).load_delay.per_request_us < 15.0


def test_a_spec_carries_its_load_delay_to_its_replays_and_its_bound_models():
    from stepml_core.replay.specs import ReplaySpec
    from stepml_core.replay.specs import serving_model as spec_model

    ld = {"shift_us": -1000.0, "per_request_us": 100.0}
    spec = {
        "name": "requests_all",
        "kind": "blis_linear",
        "llm_model": "llama-2-7b",
        "fitted_on": ["x"],
        "doc": TRUTH.blis_doc(),
        "params": dataclasses.asdict(TRUTH),
        "load_delay": ld,
    }
    assert ReplaySpec.from_json(spec).to_json() == spec
    assert spec_model(spec).load_delay == ld
    assert "load_delay" not in spec["doc"]  # BLIS's file: the stage-2 model


def test_the_load_delay_reads_no_ground_truth_of_the_run_it_predicts(tmp_path, monkeypatch):
    """With the load-delay stage on, the scored run's predictions still move when a calibration run's truth goes and
    not at all when its own does (the stage fits on its fold's calibration runs only); the setting is opt-in."""
    from ops_helpers import assert_opt_in

    ld = {"shift_us": 0.0, "per_request_us": 150.0}
    runs = {
        "20260101-000000-llama-2-7b-tp1-codegen": (5.0, 500, 3, "train"),
        "20260101-010000-llama-2-7b-tp1-general": (12.0, 560, 4, "train"),
        "20260101-020000-llama-2-7b-tp1-roleplay": (8.0, 760, 5, "validate"),
    }
    for eid, (rate, prompt, seed, split) in runs.items():
        _write_run(tmp_path, eid, _run(eid, rate, 40, prompt, seed, load_delay=ld), split)
    scored = "20260101-020000-llama-2-7b-tp1-roleplay"
    plain, _ = _predict(tmp_path, scored, piecewise=False)
    before, _ = _predict(tmp_path, scored, piecewise=False, load_delay=True)
    assert set(before) == {"requests_roles", "requests_lowo"}
    assert not before["requests_lowo"].equals(plain["requests_lowo"])  # the stage is in its replays
    (tmp_path / scored / "ground_truth.json.gz").unlink()
    after, _ = _predict(tmp_path, scored, piecewise=False, load_delay=True)
    for name in before:
        assert before[name].equals(after[name]), name
    (tmp_path / "20260101-000000-llama-2-7b-tp1-codegen" / "ground_truth.json.gz").unlink()
    changed, _ = _predict(tmp_path, scored, piecewise=False, load_delay=True)
    assert not changed["requests_lowo"].equals(before["requests_lowo"])

    assert_opt_in(monkeypatch, "STEPML_LOAD_DELAY", "load_delay_stage", "load_delay", "--load-delay")


def test_the_report_says_when_a_study_was_calibrated_with_the_load_delay():
    from stepml_core.report.calibration_text import _load_delay_lines

    assert _load_delay_lines({}) == []  # off: the report as before
    text = " ".join(_load_delay_lines({"llama-2-7b": {"shift_us": -3218.0, "per_request_us": 171.9}}))
    assert "llama-2-7b γ 171.9 µs per request, δα0 -3.22 ms" in text and "exported BLIS files do not" in text
