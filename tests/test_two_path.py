"""The two-path step model (stepml_core.stepmodels.two_path, stepml_core.replay.two_path): cycle = max(GPU path, CPU
path), the CPU path learned from other runs only — "delete the scored run's truth (its request ground truth and its
steps), the figure does not move" on small synthetic runs, as tests/test_out_of_sample.py checks the study's rows."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from stepml_core.replay.simulate import RunContext
from stepml_core.replay.specs import ReplaySpec, sample_of, serving_model
from stepml_core.replay.two_path import (
    RunPlateau,
    TwoPathRun,
    cpu_path_for,
    queue_over_time,
    saturated_plateau,
    transfer,
    two_path_spec,
    two_path_study,
)
from stepml_core.stepmodels.two_path import CpuPath, TwoPathStepTime

CAP = 4
MIN_STEPS = 10  # saturated test steps a run needs to have a plateau (60 test steps per run here)
LLMS = {"llama-2-7b": 1, "llama-2-70b": 4, "codellama-34b": 2}  # LLM model: TP


def gpu_spec(llm: str, fitted_on: str, b0_us: float = 3000.0) -> ReplaySpec:
    doc = {
        "version": 1,
        "step_time": {
            "model_type": "linear",
            "intercept": b0_us,
            "feature_coefficients": {"prefill_tokens": 5.0, "decode_tokens": 50.0},
        },
    }
    return ReplaySpec("requests_roles", "blis_linear", llm_model=llm, fitted_on=(fitted_on,), doc=doc)


def request_log(n: int, spacing_s: float, seed: int, truth: bool = True) -> SimpleNamespace:
    """n requests of 64 prompt / 16 output tokens every spacing_s; an observed TTFT growing with the queue."""
    rng = np.random.default_rng(seed)
    ttft = 0.05 + 0.02 * np.arange(n) + rng.random(n) * 0.01
    e2e = ttft + 15 * 0.03
    table = pl.DataFrame(
        {
            "index": np.arange(n),
            "arrival_time_us": (np.arange(n) * spacing_s * 1e6).astype(np.int64),
            "input_tokens": np.full(n, 64),
            "output_tokens": np.full(n, 16),
            "prefix_group": [None] * n,
            "has_error": [False] * n,
            "observed_has_error": [False] * n if truth else [None] * n,
            "observed_ttft_s": ttft if truth else [None] * n,
            "observed_e2e_s": e2e if truth else [None] * n,
        },
        schema_overrides={
            "prefix_group": pl.Utf8,
            "observed_has_error": pl.Boolean,
            "observed_ttft_s": pl.Float64,
            "observed_e2e_s": pl.Float64,
        },
    )
    return SimpleNamespace(table=table, role="test", has_ground_truth=truth)


def synthetic_runs() -> dict[str, TwoPathRun]:
    """Per LLM model: a saturated run (a burst of 40 requests at once, its steps on a plateau) and a calm one (one
    request per 2 s); the plateaus differ by model."""
    runs = {}
    for i, (llm, tp) in enumerate(LLMS.items()):
        for kind, n, spacing, plateau in (("reasoning", 40, 0.0, 2000.0 * (i + 2)), ("codegen", 10, 2.0, 200.0)):
            eid = f"20260101-00000{i}-{llm}-tp{tp}-{kind}"
            ctx = RunContext(
                experiment_id=eid, model=llm, tp=tp, max_num_seqs=CAP, max_num_batched_tokens=2048, kv_blocks_total=4000
            )
            ids = np.arange(1, 61)
            sched = plateau * (1 + 0.05 * np.sin(ids))
            runs[eid] = TwoPathRun(request_log(n, spacing, seed=i), ctx, llm, tp, (ids, sched), None)
    for eid, r in runs.items():
        other = next(e for e in runs if runs[e].llm_model == r.llm_model and e != eid)
        runs[eid] = replace(r, gpu_spec=gpu_spec(r.llm_model, other))
    return runs


def scored(runs: dict, llm: str, kind: str) -> str:
    return next(e for e in runs if llm in e and e.endswith(kind))


def without_truth(runs: dict, eid: str) -> dict:
    """The runs with eid's request ground truth and its steps deleted."""
    r = runs[eid]
    log = request_log(r.log.table.height, 0.0 if eid.endswith("reasoning") else 2.0, seed=0, truth=False)
    return {**runs, eid: replace(r, log=log, test_steps=None)}


def predicted(study: dict, eid: str) -> dict:
    rows = study["rows"].filter((pl.col("experiment_id") == eid) & (pl.col("variant") == "two_path"))
    return dict(rows.select("metric", "predicted").iter_rows())


@pytest.fixture(scope="module")
def study_runs():
    runs = synthetic_runs()
    return runs, two_path_study(runs, template=CpuPath(0.0, 0.97, 1.0), min_steps=MIN_STEPS)


def test_cycle_is_the_longer_path_the_cpu_path_entered_with_a_full_queue_and_held_at_the_cap():
    gpu = SimpleNamespace(step_time_us=lambda b: 1000.0)

    def cycles(cpu, states):
        tp = TwoPathStepTime(gpu, cpu, max_num_seqs=4)
        return [tp.step_time_us(SimpleNamespace(num_running=r, num_waiting=w)) for r, w in states], tp

    states = [(4, 3), (4, 4), (4, 1), (3, 9), (4, 3), (4, 0)]
    got, tp = cycles(CpuPath(5000.0, cap_frac=1.0, queue_frac=1.0), states)
    # less than a full queue: calm; a full one: saturated; held at the cap while anything waits; left below the cap
    assert got == [1000.0, 5000.0, 5000.0, 1000.0, 1000.0, 1000.0]
    assert tp.cpu_bound_steps == 2 and tp.max_waiting == 9
    got, _ = cycles(CpuPath(5000.0, cap_frac=1.0, queue_frac=1.0, hold=False), states)
    assert got == [1000.0, 5000.0, 1000.0, 1000.0, 1000.0, 1000.0]
    assert CpuPath(1.0, cap_frac=1.0).saturated_mask([4, 4, 4, 3], [4, 1, 0, 5], 4) == [True, True, False, False]
    fast = TwoPathStepTime(SimpleNamespace(step_time_us=lambda b: 9000.0), CpuPath(5000.0), max_num_seqs=4)
    assert fast.step_time_us(SimpleNamespace(num_running=4, num_waiting=4)) == 9000.0  # the GPU path binds
    assert CpuPath.from_json(CpuPath(5000.0, basis="x").to_json()) == CpuPath(5000.0, basis="x")


def test_spec_with_a_cpu_path_round_trips_and_replays_two_paths():
    spec = two_path_spec(gpu_spec("llama-2-7b", "a"), CpuPath(7000.0), ("b", "c"), "x")
    assert ReplaySpec.from_json(spec.to_json()) == spec
    assert spec.fitted_on == ("a", "b", "c") and spec.for_runs == ("x",)
    assert sample_of(spec, "b", None) == "in_sample"  # a run whose steps set the CPU path
    assert serving_model(spec).cpu.plateau_us == 7000.0
    assert "cpu_path" not in gpu_spec("llama-2-7b", "a").to_json()  # no key unless set: stored specs unchanged
    with pytest.raises(ValueError):
        ReplaySpec("physics", "physics", None, (), cpu_path=CpuPath(1.0).to_json())


def test_plateau_is_the_median_over_saturated_steps_only():
    ids = np.arange(1, 11)
    sched = np.array([1, 1, 1, 1, 1, 9, 9, 9, 9, 9], dtype=float)
    running = np.array([1, 2, 4, 4, 4, 4, 4, 4, 4, 4])
    waiting = np.array([0, 0, 0, 0, 0, 8, 8, 8, 8, 8])
    value, n = saturated_plateau(ids, sched, running, waiting, 4, CpuPath(0.0), min_steps=3)
    assert (value, n) == (9.0, 5)
    assert saturated_plateau(ids, sched, running, waiting, 4, CpuPath(0.0), min_steps=6) == (None, 5)


def test_transfer_scaling_is_chosen_without_the_target():
    declared = {m: {"none": 1.0, "params": p} for m, p in (("a", 1.0), ("b", 2.0), ("c", 4.0), ("t", 8.0))}
    per_model = {"a": 10.0, "b": 20.0, "c": 40.0}  # proportional to params
    value, how = transfer(per_model, declared, "t")
    assert how["scaling"] == "params" and value == pytest.approx(80.0)
    assert transfer({**per_model, "t": 1e9}, declared, "t")[0] == pytest.approx(value)  # the target's own is not read


def test_own_model_runs_first_then_transfer():
    plats = [
        RunPlateau("r1", "llama-2-7b", 1, 5000.0, 100, 100),
        RunPlateau("r2", "llama-2-70b", 4, 10000.0, 100, 100),
        RunPlateau("r3", "codellama-34b", 2, 20000.0, 100, 100),
        RunPlateau("x", "llama-2-70b", 4, 1e9, 100, 100),  # the scored run: never read
    ]
    cpu, runs, how = cpu_path_for("x", "llama-2-70b", 4, plats)
    assert how["source"] == "own_model" and cpu.plateau_us == 10000.0 and runs == ("r2",)
    cpu, runs, how = cpu_path_for("x", "llama-2-70b", 4, [p for p in plats if p.experiment_id != "r2"])
    assert how["source"] == "transfer" and runs == ("r1", "r3") and "x" not in runs
    cpu, runs, how = cpu_path_for("x-synth", "llama-2-70b", 4, plats, exclude=("x",))  # x: the real run it stands for
    assert runs == ("r2",) and cpu.plateau_us == 10000.0
    cpu, runs, how = cpu_path_for("x", "llama-2-70b", 4, [plats[-1]])  # no other run reaches it: the GPU path alone
    assert cpu.plateau_us == 0.0 and runs == () and how["source"] is None


def test_queue_over_time_counts_requests_without_a_first_token():
    arr = np.array([0.0, 0.0, 1.0])
    first = np.array([0.5, 2.0, np.nan])  # the third never got one (nor an end): it stays queued
    assert queue_over_time(arr, first, np.array([0.1, 1.0, 2.5])).tolist() == [2, 2, 1]


def test_deleting_the_scored_runs_truth_moves_none_of_its_two_path_figures(study_runs):
    runs, base = study_runs
    for eid in (scored(runs, "llama-2-70b", "reasoning"), scored(runs, "codellama-34b", "codegen")):
        after = two_path_study(without_truth(runs, eid), template=CpuPath(0.0, 0.97, 1.0), min_steps=MIN_STEPS)
        assert predicted(after, eid) == predicted(base, eid)
        assert after["cpu_paths"][eid][0] == base["cpu_paths"][eid][0]


def test_the_cpu_path_reads_other_runs_steps(study_runs):
    """The check has power: deleting another saturated run's steps moves the scored run's CPU path."""
    runs, base = study_runs
    eid = scored(runs, "llama-2-70b", "reasoning")
    cpu = base["cpu_paths"][eid]
    assert cpu[2]["source"] == "transfer" and cpu[0].plateau_us > 0
    other = scored(runs, "llama-2-7b", "reasoning")
    after = two_path_study(without_truth(runs, other), template=CpuPath(0.0, 0.97, 1.0), min_steps=MIN_STEPS)
    assert after["cpu_paths"][eid][0].plateau_us != cpu[0].plateau_us
    bound = [d for d in base["details"] if d["experiment_id"] == eid and d["variant"] == "two_path"]
    assert bound and bound[0]["cpu_bound_steps"] > 0  # the CPU path sets the cycle of the saturated replay


def test_blis_form_is_the_two_paths_where_blis_can_see_them():
    """BLIS's regimes reproduce max(GPU, CPU) on decode-only batches with the running set at the cap (a queue assumed)
    and the GPU path below the cap; what is lost is said."""
    from stepml_core.stepmodels.sim_step_time import BLIS_STEP_FEATURES, LinearStepTime
    from stepml_core.stepmodels.two_path import two_path_blis_form

    gpu = gpu_spec("llama-2-7b", "a", b0_us=5000.0).doc | {
        "step_time": {
            "model_type": "linear",
            "intercept": 5000.0,
            "feature_coefficients": {"prefill_tokens": 20.0, "num_prefill_reqs": 500.0, "kv_sum": 0.1},
        }
    }
    cpu = CpuPath(20000.0, cap_frac=1.0)
    doc, lost = two_path_blis_form(gpu, cpu, max_num_seqs=128)
    blis, g = LinearStepTime(doc), LinearStepTime(gpu)
    assert any("waiting" in x for x in lost)

    def batch(n_dec, kv, prefill=0, n_pf=0):
        f = dict.fromkeys(BLIS_STEP_FEATURES, 0.0)
        f |= {"num_decode_reqs": n_dec, "decode_tokens": n_dec, "kv_sum": kv, "prefill_tokens": prefill}
        return f | {"num_prefill_reqs": n_pf, "scheduled_tokens": n_dec + prefill}

    for kv in (1e4, 1e5, 1.4e5, 1.6e5, 4e5):  # the crossing at kv_sum = 150,000
        at_cap = batch(128, kv)
        assert blis.predict_features_us(at_cap) == pytest.approx(max(g.predict_features_us(at_cap), 20000.0))
        below = batch(100, kv)
        assert blis.predict_features_us(below) == pytest.approx(g.predict_features_us(below))
    with pytest.raises(ValueError):
        two_path_blis_form({"version": 1, "step_time_regimes": [{"condition": None, "model": {}}]}, cpu, 128)


def test_the_studys_two_path_section_is_opt_in(monkeypatch, tmp_path):
    from stepml_core.report.two_path import two_path_not_run
    from stepml_dagster.cli import build_parser
    from stepml_dagster.resources import StepMLSettings

    monkeypatch.delenv("STEPML_TWO_PATH", raising=False)
    assert StepMLSettings().two_path_steps_file() is None
    assert "not run" in "".join(two_path_not_run()) and "--two-path" in "".join(two_path_not_run())
    monkeypatch.setenv("STEPML_TWO_PATH", "1")
    assert StepMLSettings().two_path_steps_file().parts[-3:] == (
        "shared",
        "real",
        "xgboost_round1_test_predictions.csv.gz",
    )
    monkeypatch.setenv("STEPML_TWO_PATH", str(tmp_path / "steps.csv"))
    assert StepMLSettings().two_path_steps_file() == tmp_path / "steps.csv"
    assert StepMLSettings(two_path_steps="off").two_path_steps_file() is None
    assert build_parser().parse_args(["run", "--two-path"]).two_path == "1"
    assert build_parser().parse_args(["run"]).two_path is None


def test_step_times_are_read_plain_or_gzipped_and_a_missing_column_is_named(tmp_path):
    import gzip

    from stepml_core.replay.two_path import read_test_steps

    text = b"experiment_id,step.id,step.duration_us\nr,3,300\nr,1,100\nq,2,50\n"
    (tmp_path / "s.csv").write_bytes(text)
    (tmp_path / "s.csv.gz").write_bytes(gzip.compress(text))
    for name in ("s.csv", "s.csv.gz"):
        steps = read_test_steps(tmp_path / name)
        assert steps["r"][0].tolist() == [1, 3] and steps["r"][1].tolist() == [100.0, 300.0]
    (tmp_path / "bad.csv").write_bytes(b"experiment_id,step.id\nr,1\n")
    with pytest.raises(ValueError, match="step.duration_us"):
        read_test_steps(tmp_path / "bad.csv")


def test_side_by_side_table_reads_the_projects_blis_4a_anchors():
    """BLIS 4a's figures come from the project's copy of its anchors (replay.scores.load_blis4a: *_err_pct)."""
    from stepml_core.replay.scores import load_blis4a
    from stepml_core.replay.two_path import comparison_table

    blis = load_blis4a()
    eid = blis["experiment_id"][0]
    rows = pl.DataFrame(
        {
            "experiment_id": [eid] * 2,
            "variant": ["gpu_path", "two_path"],
            "metric": ["ttft_mean"] * 2,
            "predicted": [1.0, 2.0],
            "observed": [1.0, 1.0],
            "rel_err_pct": [0.0, 100.0],
        }
    )
    t = comparison_table(rows, None, blis)
    assert t.row(0, named=True)["blis_4a"] == pytest.approx(blis["ttft_mean_err_pct"][0])
    assert t.row(0, named=True)["two_path"] == 100.0
