"""What the graph shows is what happens (issue 22, point 4): each run's status is an asset of its own (run_status,
replay_status) with a check that fails while a run is stale or failed; the pre-fit's failure is recorded, not
swallowed; the IO manager is built one way."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import dagster as dg
import pytest

from stepml_core.synth import synthesize_runs
from stepml_dagster.cli import run_study

REAL_IDS = [
    "20260217-203421-llama-2-70b-hf-tp4-codegen",  # its trace is broken: failed
    "20260218-150304-codellama-34b-tp2-general",  # its trace changes, not re-run: stale
    "20260218-135247-mixtral-8x7b-v0-1-tp2-reasoning",  # current throughout
]
RUN_IDS = [f"{r}-synth" for r in REAL_IDS]  # the synthesizer's folder names
SCALE, SEED = 0.02, 7


def _stored(out: Path, asset: str) -> dict:
    return json.loads((out / "assets" / asset / "__all__.json").read_text())


def _check(instance, asset: str, name: str):
    rec = instance.get_latest_asset_check_evaluation_record(dg.AssetCheckKey(dg.AssetKey(asset), name))
    return rec.event.asset_check_evaluation if rec is not None and rec.event is not None else None


@pytest.fixture(scope="module")
def synth_runs(tmp_path_factory) -> list[Path]:
    return synthesize_runs(tmp_path_factory.mktemp("synth"), REAL_IDS, scale=SCALE, seed=SEED, workers=1)


@pytest.fixture(scope="module")
def study(synth_runs, tmp_path_factory):
    """Three synthetic runs (traces, no request logs) studied; then one's trace is corrupted and re-run (it fails),
    another's trace changes and is not re-run (stale), the third stays current."""
    base = tmp_path_factory.mktemp("run_status")
    data, out = base / "data", base / "out"
    for f in synth_runs:
        shutil.copytree(f, data / f.name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(base / "home"))
        first = run_study(data, out, synth_if_empty=False, quiet=True, workers=1)
        assert first["study_ok"] and not first["failed"], first
        instance = dg.DagsterInstance.get()
        before = {
            "run_status": _stored(out, "run_status"),
            "runs_current": _check(instance, "run_status", "runs_current"),
        }
        broken, changed, _ = RUN_IDS
        (data / broken / "traces.json.gz").write_bytes(b"\x1f\x8b\x08 not a gzip stream")
        t = data / changed / "traces.json.gz"
        t.write_bytes(gzip.compress(gzip.decompress(t.read_bytes()) + b"\n"))
        second = run_study(data, out, synth_if_empty=False, quiet=True, workers=1, experiments=[broken])
        yield {"before": before, "second": second, "out": out, "instance": instance, "data": data}


def test_every_run_current_after_a_clean_study(study):
    b = study["before"]
    assert {k: v["status"] for k, v in b["run_status"].items()} == dict.fromkeys(RUN_IDS, "current")
    assert b["runs_current"] is not None and b["runs_current"].passed


def test_a_failed_run_shows_failed_with_its_step_and_error(study):
    broken = RUN_IDS[0]
    assert study["second"]["failed"] == [broken]
    s = _stored(study["out"], "run_status")[broken]
    assert s["status"] == "failed" and s["step"] == "raw_traces" and s["run_id"]
    assert "traces.json.gz" in s["reason"] and "\n" not in s["reason"]


def test_a_changed_run_folder_shows_stale_naming_the_file(study):
    changed = RUN_IDS[1]
    s = _stored(study["out"], "run_status")[changed]
    assert s["status"] == "stale" and "traces.json.gz" in s["reason"] and s["step"] is None


def test_the_check_fails_while_a_run_is_not_current_and_the_study_reads_the_status(study):
    out, instance = study["out"], study["instance"]
    ev = _check(instance, "run_status", "runs_current")
    assert ev is not None and not ev.passed and ev.severity == dg.AssetCheckSeverity.WARN
    named = ev.metadata["runs"].value
    assert named[RUN_IDS[0]].startswith("failed: ") and named[RUN_IDS[1]].startswith("stale: ")
    mat = instance.fetch_materializations(dg.AssetKey("run_status"), limit=1).records[0].asset_materialization
    assert mat.metadata["failed"].value == 1 and mat.metadata["stale"].value == 1 and mat.metadata["current"].value == 1
    # the study read it: both runs left out of the report's results with run_status's reasons
    left = json.loads((out / "verdict.json").read_text())["runs_left_out"]
    status = _stored(out, "run_status")
    assert {k: (v["status"], v["reason"]) for k, v in left.items()} == {
        k: (v["status"], v["reason"]) for k, v in status.items() if v["status"] != "current"
    }
    assert set(left) == set(RUN_IDS[:2])


def test_run_status_is_upstream_of_every_study_asset_that_leaves_runs_out():
    from stepml_dagster.definitions import build_definitions

    graph = build_definitions().resolve_asset_graph()
    for asset in ("global_models", "synthetic_vs_real", "request_calibration", "study_report", "replay_status"):
        assert dg.AssetKey("run_status") in graph.get(dg.AssetKey(asset)).parent_keys, asset
    assert dg.AssetKey("replay_status") in graph.get(dg.AssetKey("replay_fidelity")).parent_keys


def test_a_failed_prefit_is_recorded_on_the_partition_run_not_swallowed(synth_runs, tmp_path, capfd, monkeypatch):
    """The pooled folds' pre-fit (local._materialize_with_prefit) fails when the fold cache cannot be written: the
    partition itself succeeds, and the pre-fit's error is an ERROR event in its run's log and a line on stderr."""
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(synth_runs[0], data / synth_runs[0].name)
    out.mkdir()
    (out / "cache").write_text("a file where the fit caches' folder should be")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    res = run_study(data, out, synth_if_empty=False, quiet=True, workers=1)
    assert synth_runs[0].name not in res["failed"]
    instance = dg.DagsterInstance.get()
    runs = instance.get_runs(dg.RunsFilter(job_name="experiment_job"), limit=1)
    events = instance.all_logs(runs[0].run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
    prefit = [e for e in events if "pre-fit of the study's pooled folds failed" in (e.dagster_event.message or "")]
    assert prefit and prefit[0].level == 40  # logging.ERROR
    assert "pre-fit of the study's pooled folds failed" in capfd.readouterr().err


def test_the_io_manager_is_built_in_one_place():
    root = Path(__file__).resolve().parents[1] / "stepml_dagster"
    built = {p.name for p in root.glob("*.py") if re.search(r"\bParquetIOManager\(", p.read_text())}
    assert built == {"io_manager.py"}, built
