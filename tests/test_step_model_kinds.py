"""A step model is one typed thing: a new model kind defined in one file is fitted by the study, scored, replayed,
exported (StepML JSON; BLIS says why not) and shown in the report, with no other edit (issue 22, point 1)."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import polars as pl
import pytest
from test_replay import CTX, write_request_run

from stepml_core.replay.simulate import RunContext
from stepml_core.replay.specs import ReplaySpec, replay_run, specs_for_run, step_trained_specs
from stepml_core.report.plots import figure_mape_by_experiment, model_order
from stepml_core.runs.request_log import read_request_log
from stepml_core.stepmodels import fitted, recipes
from stepml_core.stepmodels.blis import choose_exports
from stepml_core.stepmodels.json_export import export_model
from stepml_core.study import h1
from stepml_core.study.verdict import simplicity_order

# the whole new model: a fitted form (kind "power_law") and the recipe that fits it, in one file
POWER_LAW_MODEL = '''
import numpy as np

from stepml_core.stepmodels.estimators import fit_floor_us
from stepml_core.stepmodels.fitted import FittedStepModel, NoBlisForm, register_kind
from stepml_core.stepmodels.recipes import Recipe, register


@register_kind
class PowerLawFit(FittedStepModel):
    """ŷ = a · (1 + Σ x)^b (x: the step's token counts)."""

    kind = "power_law"

    def score(self, X):
        return self.doc["a"] * (1.0 + X.sum(axis=1)) ** self.doc["b"]

    def blis_form(self):
        raise NoBlisForm("power law in the step's tokens; BLIS reads linear models only")


@register
class Power2f(Recipe):
    """log y = log a + b log(1 + P + D), least squares on train + valid."""

    name, recipe, features = "power_2f", "stepml", ("prefill_tokens", "decode_tokens")
    replayed_on, generalization, simplicity = ("real", "synthetic"), True, 6

    def fit(self, target, X_tr, y_tr, X_va, y_va, *, seed=0):
        X, y = np.vstack([X_tr, X_va]), np.concatenate([y_tr, y_va])
        ok = y > 0
        b, log_a = np.polyfit(np.log1p(X[ok].sum(axis=1)), np.log(y[ok]), 1)
        return {"name": self.name, "target": target, "kind": "power_law", "features": list(self.features),
                "a": float(np.exp(log_a)), "b": float(b), "fitted_on": ["train", "valid"], "n_fit": int(ok.sum()),
                "recipe": self.recipe, "floor_us": fit_floor_us(y)}
'''

EXP = "20260101-000000-llama-2-7b-tp1-codegen"


@pytest.fixture
def power_law(tmp_path):
    """Import the one-file model; afterwards the registries are as they were (no leak into other tests)."""
    saved_recipes, saved_kinds = dict(recipes.REGISTRY), dict(fitted.KINDS)
    path = tmp_path / "power_law_model.py"
    path.write_text(POWER_LAW_MODEL)
    spec = importlib.util.spec_from_file_location("power_law_model", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("power_law_model", None)
        for registry, saved in ((recipes.REGISTRY, saved_recipes), (fitted.KINDS, saved_kinds)):
            registry.clear()
            registry.update(saved)


def _matrix(n=80, seed=0) -> pl.DataFrame:
    """A feature matrix with every column any registered recipe reads; cycle_us grows like a power of the tokens."""
    rng = np.random.default_rng(seed)
    cols = sorted({c for r in recipes.REGISTRY.values() for c in r.feature_columns()})
    P, D = rng.integers(0, 2048, n).astype(float), rng.integers(1, 128, n).astype(float)
    y = 300 * (1 + P + D) ** 0.5 * rng.lognormal(0, 0.05, n)
    split = ["train"] * (n * 3 // 5) + ["valid"] * (n // 5) + ["test"] * (n - n * 3 // 5 - n // 5)
    base = {
        "experiment_id": [EXP] * n,
        "source": ["real"] * n,
        "step.id": np.arange(n),
        "split": split,
        "load_stage": [0] * n,
        "kv_mean": rng.uniform(0, 1000, n),
        "num_prefill_reqs": np.ones(n),
        "num_decode_reqs": D,
        "cycle_us": y,
        "schedule_us": y / 20,
    }
    other = {c: rng.uniform(0, 10, n) for c in cols if c not in base}
    return pl.DataFrame({**base, **other, "prefill_tokens": P, "decode_tokens": D})


def _request_log(tmp_path):
    reqs = [
        {
            "index": i,
            "arrival_time_us": i * 300_000,
            "input_tokens": 500,
            "output_tokens": 20,
            "prefix_group": "",
            "has_error": False,
        }
        for i in range(30)
    ]
    gt = [{"index": i, "has_error": False, "e2e_s": 0.8, "ttft_s": 0.08} for i in range(30)]
    return read_request_log(write_request_run(tmp_path / EXP, reqs, gt))


def test_a_new_model_kind_in_one_file_goes_through_the_whole_study(power_law, tmp_path):
    # fitted by the study: every registered model by default, and in the generalization folds by its role
    fm = _matrix()
    fits = h1.fit_experiment(fm)
    power = next(m for m in fits["cycle_us"] if m["name"] == "power_2f")
    assert power["kind"] == "power_law" and isinstance(fitted.FittedStepModel.from_json(power), power_law.PowerLawFit)
    assert "power_2f" in h1.pooled_sets()["generalization"][1]

    # scored: its predictions and metrics are the study's, like any model's
    metrics = h1.metrics_from_predictions(h1.predict_experiment(fm, fits))
    test = metrics.filter((pl.col("model") == "power_2f") & (pl.col("split") == "test"))
    assert test.height == 2 and (test["mape_pct"] < 10).all()  # the data follow a power law

    # exported: StepML's JSON round-trips to the same predictions; BLIS's form is refused with the kind's reason
    ex = json.loads(json.dumps(export_model(power, model="llama-2-7b", tp=1, data_versions={EXP: "v"})))
    X = fm.select(power["features"]).to_numpy()
    assert np.array_equal(fitted.FittedStepModel.from_json(ex).predict(X), fitted.predict_model(power, X))
    assert fitted.FittedStepModel.from_json(power).to_json() == power
    with pytest.raises(fitted.NoBlisForm, match="power law"):
        fitted.FittedStepModel.from_json(power).blis_form()

    # replayed: its recipe's replayed_on makes it a replay spec; the simulator's step time is the new kind's
    run = {"model": "llama-2-7b", "tp": 1, "source": "real", "data_version": "v"}
    specs = [s.to_json() for s in step_trained_specs({EXP: {"cycle_us": fits["cycle_us"]}}, {EXP: run})]
    assert {s["name"]: s["kind"] for s in specs}["power_2f"] == "stepml_export"
    assert all(ReplaySpec.from_json(s).to_json() == s for s in specs)
    chosen = [s for s in specs_for_run(specs, EXP, "llama-2-7b") if s["name"] in ("power_2f", "blackbox_2f")]
    ctx = RunContext(**{**CTX.__dict__, "output_len": 20})
    out = replay_run(_request_log(tmp_path), ctx, chosen, source="real")
    rows = out["rows"].filter(pl.col("step_model") == "power_2f")
    assert rows.height and rows["predicted"].is_not_null().all()
    assert out["per_request"]["power_2f"]["e2e_s"].is_not_null().all()

    # BLIS export: recommended, it is not shipped, and the manifest says why (the kind's own reason)
    chosen_exports = choose_exports(out["rows"], specs, {}, {EXP: "llama-2-7b"}, {"llama-2-7b": "power_2f"})
    c = chosen_exports["llama-2-7b"]
    assert c["recommended"] == "power_2f" and c["step_model"] == "blackbox_2f"
    assert "power law in the step's tokens" in c["note"]

    # reported: the legend shows it with a colour of its own, and the recommendation ranks it
    assert model_order()[-1] == "power_2f" and simplicity_order()[-1] == "power_2f"
    fig = figure_mape_by_experiment(metrics, "cycle_us")
    ax = fig.axes[0]
    assert "power_2f" in [t.get_text() for t in ax.get_legend().get_texts()]
    colours = {tuple(np.round(c.get_facecolor()[0], 3)) for c in ax.collections}
    assert len(colours) == len(set(metrics["model"].to_list()))


def test_registration_is_undone_after_the_test():
    assert "power_2f" not in recipes.REGISTRY and "power_law" not in fitted.KINDS


def test_replay_specs_round_trip_their_json():
    """ReplaySpec keeps the stored form: null stays null, an absent key stays absent, lists stay lists."""
    calibrated = {
        "name": "requests_lowo",
        "kind": "blis_linear",
        "llm_model": "m",
        "fitted_on": ["a", "b"],
        "stands_for": [],
        "protocol": "lowo",
        "held_out": None,
        "doc": {"version": 1},
        "params": {"b0_us": 1.0},
        "calibration": {},
        "bootstrap": {"names": [], "rows": []},
        "for_runs": ["c"],
        "basis": "request logs of 2 run(s) (lowo)",
    }
    s = ReplaySpec.from_json(calibrated)
    assert s.for_runs == ("c",) and s.held_out is None and s.to_json() == calibrated
    with pytest.raises(ValueError, match="unknown key"):
        ReplaySpec.from_json({**calibrated, "colour": "red"})
    with pytest.raises(ValueError, match="unknown replay model kind"):
        ReplaySpec.from_json({**calibrated, "kind": "oracle"})


def test_reference_predictor_caps_a_log_linear_score_as_the_study_does():
    """A log-linear score past 50 gave OverflowError in the stdlib predictor; the study's predictor caps it at exp(50)."""
    from stepml_core.stepmodels.reference_predictor import predict_from_features

    m = {"kind": "log_linear", "features": ["x"], "mean": [0.0], "scale": [1.0], "coef": [1.0], "intercept": 0.0}
    m["floor_us"] = 1.0
    assert predict_from_features({"x": 800.0}, m) == pytest.approx(fitted.predict_model(m, np.array([[800.0]]))[0])
