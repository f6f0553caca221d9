"""Pooled folds (global, per model, leave-one-out): threads and the fold cache never change a result."""

from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from stepml_core.pipeline import run_matrix
from stepml_core.study import h1 as study
from stepml_core.synth import synthesize_runs

RUNS = [
    "20260217-155451-llama-2-7b-tp1-codegen",
    "20260217-162547-llama-2-7b-tp1-roleplay",
    "20260218-150304-codellama-34b-tp2-general",
    "20260218-160939-codellama-34b-tp2-reasoning",
]


@pytest.fixture(scope="module")
def matrices(tmp_path_factory) -> dict[str, pl.DataFrame]:
    root = tmp_path_factory.mktemp("pooled")
    out = {}
    for folder in synthesize_runs(root, RUNS, scale=0.04, seed=0, workers=1):
        out[folder.name] = run_matrix(folder, root)
    return out


def _same(a: dict, b: dict):
    for name in study.POOLED_SETS:
        assert a[name]["models"] == b[name]["models"]
        assert_frame_equal(a[name]["metrics"], b[name]["metrics"])
        assert_frame_equal(a[name]["predictions"], b[name]["predictions"])


def test_threads_and_cache_give_the_same_fits(matrices, tmp_path):
    serial = study.fit_study_pooled(matrices, threads=1)
    assert serial["generalization"]["metrics"]["scope"].unique().sort().to_list() == [
        "leave_one_model_out",
        "leave_one_workload_out",
    ]
    assert {s for s in serial["global_models"]["models"]} == {"global", "per_model"}
    _same(serial, study.fit_study_pooled(matrices, threads=2))

    caches = {n: study.FoldCache(tmp_path / n) for n in study.POOLED_SETS}
    cold = study.fit_study_pooled(matrices, threads=2, caches=caches)
    assert all(cold[n]["folds"]["reused"] == 0 for n in study.POOLED_SETS)
    _same(serial, cold)
    warm = study.fit_study_pooled(matrices, threads=2, caches=caches)
    assert all(warm[n]["folds"]["reused"] == warm[n]["folds"]["total"] > 0 for n in study.POOLED_SETS)
    _same(serial, warm)  # read back from JSON: the same coefficients and trees, to the last bit


def test_a_changed_run_refits_exactly_the_folds_that_train_on_it(matrices, tmp_path):
    caches = {n: study.FoldCache(tmp_path / n) for n in study.POOLED_SETS}
    study.fit_study_pooled(matrices, caches=caches)
    changed = "20260218-150304-codellama-34b-tp2-general-synth"
    assert changed in matrices
    edited = {**matrices, changed: matrices[changed].filter(pl.col("step.id") != matrices[changed]["step.id"][0])}
    again = study.fit_study_pooled(edited, threads=2, caches=caches)
    exps = sorted(edited)
    for name, (scopes, _) in study.POOLED_SETS.items():
        untouched = sum(changed not in train for s in scopes for _, train, _ in study.pooled_folds(exps, s))
        assert again[name]["folds"]["reused"] == untouched
        assert 0 < untouched < again[name]["folds"]["total"]
    _same(study.fit_study_pooled(edited), again)  # reused + refitted folds = a fit from scratch


def test_cache_keeps_only_the_current_folds(matrices, tmp_path):
    caches = {n: study.FoldCache(tmp_path / n) for n in study.POOLED_SETS}
    study.fit_study_pooled(matrices, caches=caches)
    fewer = {e: m for e, m in matrices.items() if "roleplay" not in e}
    res = study.fit_study_pooled(fewer, caches=caches)
    for name in study.POOLED_SETS:
        files = sorted(Path(tmp_path / name).glob("*.json"))
        assert len(files) == res[name]["folds"]["total"]
    damaged = sorted((tmp_path / "global_models").glob("*.json"))[0]
    damaged.write_text("{not json")  # a damaged entry is refitted, not trusted
    again = study.fit_study_pooled(fewer, caches=caches)
    assert again["global_models"]["folds"]["reused"] == again["global_models"]["folds"]["total"] - 1
    _same(res, again)
