"""The piecewise decode form (issue 25, point 3): a hinge in the decoders, written as BLIS's step_time_regimes,
its break placed on the calibration runs alone, calibrated and replayed in the run-roles, leave-one-workload-out and
all folds."""

from __future__ import annotations

import numpy as np

from stepml_core.calibration import fit as F
from stepml_core.calibration import protocols as cp
from stepml_core.calibration.params import StepParams, serving_model
from stepml_core.calibration.timelines import Timelines
from stepml_core.stepmodels.blis import check_blis_doc, validate_schema
from stepml_core.stepmodels.sim_step_time import BLIS_STEP_FEATURES, LinearStepTime

PW = StepParams(
    b0_us=15000.0,
    b_dec_us=70.0,
    b_kv_us=0.03,
    b_pf_us=60.0,
    b_npf_us=1500.0,
    q0_us=25000.0,
    b_hinge_us=-25.0,
    hinge_decoders=60.0,
)


def _features(rng, n):
    """Random BLIS feature dicts (num_decode_reqs = decode_tokens: no recompute)."""
    out = []
    for _ in range(n):
        d = float(rng.integers(0, 129))
        f = dict.fromkeys(BLIS_STEP_FEATURES, 0.0)
        f.update(
            decode_tokens=d,
            num_decode_reqs=d,
            kv_sum=float(rng.integers(0, 200_000)),
            prefill_tokens=float(rng.integers(0, 600)),
            num_prefill_reqs=float(rng.integers(0, 3)),
        )
        out.append(f)
    return out


def test_the_piecewise_form_is_what_blis_reads():
    doc = PW.blis_doc()
    check_blis_doc(doc)
    validate_schema(doc)
    assert "step_time" not in doc and [r["condition"] for r in doc["step_time_regimes"]][1] is None
    lin = LinearStepTime(doc)
    for f in _features(np.random.default_rng(0), 2000):
        hinge = max(0.0, f["num_decode_reqs"] - PW.hinge_decoders)
        want = PW.step_us(f["decode_tokens"], f["kv_sum"], f["prefill_tokens"], f["num_prefill_reqs"], hinge)
        assert abs(lin.predict_features_us(f) - max(want, 1.0)) <= 1e-9 * abs(want)
    # continuous at the break: both regimes give the same step time there
    below, above = (r["model"] for r in doc["step_time_regimes"])
    f = {"decode_tokens": 60.0, "num_decode_reqs": 60.0, "kv_sum": 40_000.0}
    val = [
        m["intercept"] + sum(w * f.get(k, 0.0) for k, w in m["feature_coefficients"].items()) for m in (below, above)
    ]
    assert abs(val[0] - val[1]) < 1e-6
    assert StepParams.from_blis_doc(doc) == PW
    assert StepParams.from_vector(PW.as_vector()) == PW
    # the linear form's file is as before: one step_time, no regimes
    linear = StepParams(**{**PW.__dict__, "b_hinge_us": 0.0, "hinge_decoders": 0.0})
    assert "step_time" in linear.blis_doc() and "step_time_regimes" not in linear.blis_doc()
    assert linear.as_vector().size == 7


def test_regimes_are_read_on_the_feature_tuple_as_on_the_dict():
    lin = LinearStepTime(PW.blis_doc())
    assert lin.reads_values
    for f in _features(np.random.default_rng(1), 2000):
        v = tuple(f[k] for k in BLIS_STEP_FEATURES)
        assert lin.predict_values_us(v) == lin.predict_features_us(f)
    # a stage-2 scaled model stays piecewise, every step coefficient scaled, the break kept
    s = PW.scaled(1.1, 500.0)
    assert s.hinge_decoders == PW.hinge_decoders and abs(s.b_hinge_us - 1.1 * PW.b_hinge_us) < 1e-12
    assert serving_model(s).step_model.reads_values


def _timelines(dec_grid: np.ndarray, windows: list[tuple[int, int]], saturated: bool = False) -> Timelines:
    n = len(windows)
    z = np.zeros(n)
    return Timelines(
        experiment_id="x",
        saturated=saturated,
        arrival_s=z,
        ttft_s=z,
        e2e_s=z,
        success=np.ones(n, dtype=bool),
        generated=z,
        input_tokens=z,
        cycle_us=z,
        dec_mean=z,
        kv_mean=z,
        prefills_per_step=z,
        kv_over=z,
        dec_at_arrival=z,
        kv_at_arrival=z,
        dec_grid=np.asarray(dec_grid, dtype=np.float64),
        window_grid=np.asarray(windows, dtype=np.int64),
    )


def test_hinge_mean_is_the_window_average_of_the_decoders_above_the_break():
    tl = _timelines([10, 50, 70, 90, 30], [(0, 5), (2, 4), (-1, -1)])
    h = tl.hinge_mean(60)
    assert h[0] == (10 + 30 + 0 + 0 + 0) / 5 and h[1] == (10 + 30) / 2 and np.isnan(h[2])
    assert tl.time_share_above(60) == 2 / 5


def test_no_break_is_placed_where_the_calibration_runs_do_not_reach_both_sides():
    """Every non-saturated calibration run below the smallest candidate (a saturated run far above it does not count:
    its cycle is max(GPU path, CPU path)): the piecewise calibration stays linear and says why."""
    calm = _timelines(np.full(100, 20.0), [(0, 100)])
    sat = _timelines(np.full(100, 128.0), [(0, 100)], saturated=True)
    choice = F.choose_break([calm, sat], F.arch_prior("llama-2-70b", 4))
    assert choice.break_decoders is None and "linear" in choice.chosen_by


def test_the_piecewise_folds_mirror_the_linear_ones():
    runs = [
        cp.RunInfo(f"r-{m}-{w}", m, 1, w, "train" if w != "c" else "test", True)
        for m in ("m1", "m2")
        for w in ("a", "b", "c")
    ]
    folds = cp.plan_folds(runs, piecewise=True)
    lin = {(f.protocol, f.llm_model, f.calibrate_on, f.for_runs) for f in folds if f.form == "linear"}
    pw = [f for f in folds if f.form == "piecewise"]
    assert {(f.protocol, f.llm_model, f.calibrate_on, f.for_runs) for f in pw} == {
        x for x in lin if x[0] in cp.PIECEWISE_PROTOCOLS
    }
    assert {f.name for f in pw} == {"requests_pw_roles", "requests_pw_lowo", "requests_pw_all"}
    assert all(f.key != g.key for f in pw for g in folds if g.form == "linear")
    assert cp.PROTOCOL_OF["requests_pw_lowo"] == "lowo"
    assert not [f for f in cp.plan_folds(runs, piecewise=False) if f.form != "linear"]
    assert not [f for f in cp.plan_folds(runs) if f.form != "linear"]  # opt-in: `stepml run --piecewise-decode`


def test_piecewise_specs_load_and_replay_as_their_blis_file():
    """fold_specs: a piecewise fold's spec says its form, loads as a ReplaySpec, serves its regimes; its requests_all
    twin is shipped under "<model>:piecewise", the linear one under the model as before."""
    from stepml_core.replay.specs import ReplaySpec
    from stepml_core.replay.specs import serving_model as spec_model

    runs = [
        cp.RunInfo(f"r-{m}-{w}", m, tp, w, "train", True)
        for m, tp in (("llama-2-70b", 4), ("codellama-34b", 2))
        for w in ("a", "b")
    ]
    folds = cp.plan_folds(runs, piecewise=True)
    linear = StepParams(**{**PW.__dict__, "b_hinge_us": 0.0, "hinge_decoders": 0.0})
    cals = {}
    for f in folds:
        if f.calibrate_on:
            p = PW if f.form == "piecewise" else linear
            cals[f.key] = F.Calibration(
                llm_model=f.llm_model,
                fitted_on=f.calibrate_on,
                params=p,
                closed_form=p,
                prior=F.arch_prior(f.llm_model, 4 if f.llm_model == "llama-2-70b" else 2),
                refine=None,
                bootstrap=np.zeros((0, 7)),
                seconds={},
                requests_used={},
                r2=1.0,
                bounds_active=(),
                form=f.form,
            )
    specs, shipped = cp.fold_specs(folds, cals, runs)
    pw = [s for s in specs if s["name"].startswith("requests_pw_")]
    assert pw and all(s["form"] == "piecewise" and "step_time_regimes" in s["doc"] for s in pw)
    for s in specs:
        r = ReplaySpec.from_json(s)
        assert r.to_json() == s
        assert spec_model(r).step_model.reads_values
    assert (
        "step_time_regimes" in shipped["llama-2-70b:piecewise"]["doc"] and "step_time" in shipped["llama-2-70b"]["doc"]
    )
    pw_key = next(f.key for f in folds if f.form == "piecewise")
    back = F.Calibration.from_summary(cals[pw_key].summary())
    assert back.form == "piecewise" and back.params == PW


def test_the_piecewise_form_is_a_candidate_unless_switched_off(monkeypatch):
    """The recommendation picks requests_pw_lowo where its errors on the other runs are lower; with
    PIECEWISE_RECOMMENDABLE off it is evidence only and the linear model is picked, per run and per LLM model."""
    import polars as pl

    from stepml_core.replay import scores

    rows = []
    for run in ("x", "y"):
        for model, err in (("requests_lowo", 10.0), ("requests_pw_lowo", 1.0)):
            for metric in ("ttft_mean", "e2e_mean"):
                rows.append(
                    {
                        "experiment_id": run,
                        "source": "real",
                        "role": "",
                        "step_model": model,
                        "fitted_on": f"{run}-other",
                        "sample": "out_of_sample",
                        "metric": metric,
                        "predicted": 1.0 + err / 100,
                        "observed": 1.0,
                        "rel_err_pct": err,
                    }
                )
    rows = pl.DataFrame(rows)
    runs = {"x": {"llm_model": "m", "workload": "a"}, "y": {"llm_model": "n", "workload": "a"}}
    status = pl.DataFrame({"experiment_id": ["x", "y"], "scored": [True, True], "saturated": [False, False]})
    llm_of = {"x": "m", "y": "n"}
    assert set(scores.recommend(rows, runs, status)["step_model"]) == {"requests_pw_lowo"}
    assert set(scores.recommend_per_llm(rows, llm_of, status)["step_model"]) == {"requests_pw_lowo"}
    monkeypatch.setattr(cp, "PIECEWISE_RECOMMENDABLE", False)
    assert set(scores.recommend(rows, runs, status)["step_model"]) == {"requests_lowo"}
    assert set(scores.recommend_per_llm(rows, llm_of, status)["step_model"]) == {"requests_lowo"}


def test_the_piecewise_form_is_opt_in(monkeypatch):
    """Off unless asked: the settings field, else STEPML_PIECEWISE_DECODE (which `stepml run --piecewise-decode` sets)."""
    from ops_helpers import assert_opt_in

    assert_opt_in(
        monkeypatch, "STEPML_PIECEWISE_DECODE", "piecewise_decode_form", "piecewise_decode", "--piecewise-decode"
    )
