"""End to end on the two real H100 runs (../shared/real): Dagster assets, in-process, via the CLI entry point."""

import csv
import gzip
import json
import shutil

import orjson
import polars as pl
import pytest

from stepml_dagster.cli import run_study

PUBLISHED_BLACKBOX = {
    "20260217-203421-llama-2-70b-hf-tp4-codegen": 90.76,
    "20260218-150304-codellama-34b-tp2-general": 151.06,
}
PUBLISHED_RIDGE = {
    "20260217-203421-llama-2-70b-hf-tp4-codegen": 64.33,
    "20260218-150304-codellama-34b-tp2-general": 143.67,
}


@pytest.fixture(scope="module")
def real_study(real_experiments, tmp_path_factory):
    data = tmp_path_factory.mktemp("real_data")
    for d in real_experiments.iterdir():
        shutil.copytree(d, data / d.name)
    out = tmp_path_factory.mktemp("real_out")
    res = run_study(data, out, synth_if_empty=False, quiet=True)
    return res, out


def test_study_succeeds_and_writes_outputs(real_study):
    res, out = real_study
    assert res["study_ok"] and not res["failed"] and len(res["experiments"]) == 2
    for name in (
        "report.md",
        "metrics.csv",
        "verdict.json",
        "mape_by_experiment_schedule_us.png",
        "pred_vs_actual_cycle_us.png",
    ):
        assert (out / name).is_file(), name


def test_metrics_csv_columns_and_sources(real_study):
    _, out = real_study
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "experiment_id",
        "source",
        "target",
        "model",
        "scope",
        "split",
        "n",
        "mape_pct",
        "median_ape_pct",
        "p90_ape_pct",
        "pearson_r",
        "mspe_pct",
    ]
    assert {r["source"] for r in rows} == {"real"}
    assert {r["target"] for r in rows} == {"schedule_us", "cycle_us"}
    assert {r["scope"] for r in rows} == {
        "per_experiment",
        "global",
        "per_model",
        "leave_one_model_out",
        "leave_one_workload_out",
    }


def test_original_recipe_reproduces_published_test_mape(real_study):
    _, out = real_study
    m = pl.read_csv(out / "metrics.csv").filter(
        (pl.col("split") == "test") & (pl.col("scope") == "per_experiment") & (pl.col("target") == "schedule_us")
    )
    for exp, published in PUBLISHED_BLACKBOX.items():
        ours = m.filter((pl.col("experiment_id") == exp) & (pl.col("model") == "blackbox_ols_orig"))["mape_pct"][0]
        assert abs(ours - published) < 0.5, (exp, ours, published)
    for exp, published in PUBLISHED_RIDGE.items():
        ours = m.filter((pl.col("experiment_id") == exp) & (pl.col("model") == "ridge_30f_orig"))["mape_pct"][0]
        assert abs(ours - published) < 0.5, (exp, ours, published)
    n = dict(m.filter(pl.col("model") == "blackbox_ols_orig").select("experiment_id", "n").iter_rows())
    assert n == {"20260217-203421-llama-2-70b-hf-tp4-codegen": 1336, "20260218-150304-codellama-34b-tp2-general": 1488}


def test_report_states_data_targets_and_verdicts(real_study):
    _, out = real_study
    md = (out / "report.md").read_text()
    verdict = json.loads((out / "verdict.json").read_text())
    assert "2 real run(s)" in md
    summary = md[md.index("## Summary") : md.index("## Data")]
    for target in ("schedule_us", "cycle_us"):
        v = verdict["targets"][target]
        assert v["verdict"] in {"supported", "refuted", "inconclusive"} and v["n_experiments"] == 2
        assert f"| `{target}` | **{v['verdict']}** |" in summary
        if v["verdict"] == "supported":  # the threshold and both comparisons, never the threshold alone
            assert v["threshold"] == "below" and all(b["outcome"] == "clearly_beats" for b in v["baselines"].values())
        for b in v["baselines"].values():  # 2 runs: no signed-rank p-value as evidence
            assert b["wilcoxon_p_one_sided"] is None and "run by run" in b["decided_by"]
        if not v["threshold_separates"]:
            assert f"does not separate models on {target}" in summary
    assert "Wilcoxon p =" not in md and "cannot reach p < 0.05" in summary
    assert "What a simulator builder should use" in summary and "Nothing transfers to an unseen model" in summary
    assert "published blackbox" in md and "90.76" in md


def test_method_checks_on_the_real_runs(real_study):
    """Stage mix, split schemes, cycle rule counts and the batch N / N−1 comparison are computed on the real runs and reported."""
    _, out = real_study
    md = (out / "report.md").read_text()
    for e in PUBLISHED_BLACKBOX:
        base = out / "assets" / "method_checks" / e
        align = pl.read_parquet(base / "alignment.parquet")
        assert (
            set(align["alignment"]) == {"N", "N-1", "N and N-1"}
            and align["mape_pct"].null_count() == 0
            and (align["n_test"] > 0).all()
        )
        mix = pl.read_parquet(base / "stage_mix.parquet")
        temporal_test = mix.filter((pl.col("scheme") == "temporal") & (pl.col("block") == "test"))
        assert temporal_test["load_stage"].max() == 1  # the test block is the high-rate stage
        rule = pl.read_parquet(base / "cycle_rule.parquet")
        steps = pl.read_parquet(out / "assets" / "step_table" / f"{e}.parquet")
        assert (rule["removed_idle"] + rule["removed_stall"]).max() == steps["cycle_excluded"].is_not_null().sum()
    for heading in (
        "### Load stages in each block",
        "### The H1 models under three splits",
        "### Cycle rule (`cycle_us`)",
        "### Batch N or batch N−1 for `cycle_us`",
        "### Ridge alpha",
    ):
        assert heading in md, heading


def _count_steps(line: bytes) -> int:
    d = orjson.loads(line)
    return sum(
        ev["name"] == "step.BATCH_SUMMARY"
        for rs in d["resourceSpans"]
        for ss in rs["scopeSpans"]
        for sp in ss["spans"]
        for ev in sp.get("events", [])
    )


def test_truncated_last_line_and_garbage_line_are_quarantined_rest_kept(real_experiments, tmp_path):
    src = real_experiments / "20260217-203421-llama-2-70b-hf-tp4-codegen"
    run = tmp_path / "data" / src.name
    shutil.copytree(src, run)
    lines = gzip.open(run / "traces.json.gz", "rb").read().splitlines()
    total = sum(_count_steps(l) for l in lines)
    lost = _count_steps(lines[-1])
    lines.insert(100, b'{"resourceSpans": [garbage')
    body = b"\n".join(lines[:-1]) + b"\n" + lines[-1][: len(lines[-1]) // 2]  # truncated last line, no newline
    (run / "traces.json.gz").unlink()
    (run / "traces.json").write_bytes(body)
    res = run_study(tmp_path / "data", tmp_path / "out", synth_if_empty=False, quiet=True)
    assert res["study_ok"] and not res["failed"]
    base = tmp_path / "out" / "assets"
    q = pl.read_parquet(base / "quarantine" / f"{src.name}.parquet")
    assert q.height == 2 and set(q["kind"]) == {"line"}
    assert sorted(q["line"].to_list()) == [101, len(lines)]
    steps = pl.read_parquet(base / "step_table" / f"{src.name}.parquet")
    assert steps.height == total - lost
