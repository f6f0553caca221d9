"""Out of sample means out of sample (issue 20), checked over the real multi-LLM study.

For every run X of the 16 real runs that has ground truth, X's ground_truth file is deleted and the request level
of the study (calibrations of every protocol, replays, recommendation, intervals) is run again
(stepml_core.oos_audit): X's out-of-sample rows and intervals must be bit-identical, no model may be out of sample
for X only because X's truth is present, and the recommended model must not move where X's candidates are the same.

The real request logs are cut to their first CUT_S seconds of arrivals (all 4 LLM models × 4 workloads, 14 runs
with ground truth, the runs' own roles and serving limits) and calibrated with fewer bootstrap rows and stage-2
evaluations, so that 15 studies fit in CI; the rules under test read run ids, LLM models, workloads and roles, never
the data size. `python benchmarks/oos_audit.py` runs the same audit on the full-size logs.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from conftest import SHARED_REAL

from stepml_core.oos_audit import audit

pytestmark = pytest.mark.slow  # 15 request-level studies of 16 runs (≈ 6 min on 2 cores)

CUT_S = 120.0


@pytest.fixture(scope="module")
def real_request_study(tmp_path_factory) -> Path:
    if not (SHARED_REAL / "requests").is_dir():
        pytest.skip(f"real request logs not available at {SHARED_REAL / 'requests'}")
    from stepml_core.runs.real_data import assemble_real_runs, cut_request_logs

    tmp = tmp_path_factory.mktemp("real16")
    assemble_real_runs(SHARED_REAL.parent, tmp / "full")
    return cut_request_logs(tmp / "full", tmp / "cut", CUT_S)


def test_deleting_any_runs_ground_truth_moves_none_of_its_out_of_sample_figures(real_request_study, tmp_path):
    table, base = audit(real_request_study, tmp_path, n_boot=4, refine_evals=2)
    scores = base["candidate_scores"]
    assert scores.filter(pl.col("score_runs") > 0)["experiment_id"].n_unique() == 16  # nested scores exist for all
    runs = base["runs"]
    assert runs.height == 16 and runs["llm_model"].n_unique() == 4
    assert table.height == int(runs["ground_truth"].sum()) == 14
    rows = base["replay"]
    lomo = rows.filter(pl.col("step_model") == "requests_lomo")
    assert lomo["experiment_id"].n_unique() == 16  # every LLM model held out once: no target chosen by the data
    failures = table.filter(
        ~pl.col("rows_identical")
        | ~pl.col("scores_identical")
        | (pl.col("candidates_added_by_truth") != "")
        | (pl.col("recommended_same") == False)  # noqa: E712
    )
    assert failures.height == 0, failures.to_dicts()
    # the train runs' truth makes the run-roles models (linear and piecewise) in sample for them: without it, they become
    # candidates
    train = set(runs.filter(pl.col("role") == "train")["experiment_id"])
    kept = set(table.filter(pl.col("recommended_same").is_not_null())["run"])
    assert set(table["run"]) - train <= kept and len(kept) >= 4  # the validate/test runs keep their candidates
    for r in table.iter_rows(named=True):
        added = set(filter(None, r["candidates_added_without_truth"].split(",")))
        assert added <= {"requests_roles", "requests_pw_roles"} and (not added or r["run"] in train), r
