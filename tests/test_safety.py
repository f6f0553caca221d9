"""Safe defaults: YAML safe-loaded, run ids validated before paths/keys, nothing unpickled, UI on 127.0.0.1."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from ops_helpers import open_instance

from stepml_core.runs.folders import RunIdError, RunMetadataError, read_run_metadata
from stepml_dagster.resources import StepMLSettings

REPO = Path(__file__).resolve().parents[1]
RID = "20260101-120000-llama-2-70b-hf-tp4-codegen"


def test_yaml_with_python_object_tag_is_refused_naming_the_file(tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "data" / RID
    run.mkdir(parents=True)
    (run / "traces.json").write_text("{}\n")
    (run / "exp-config.yaml").write_text(f'model: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(RunMetadataError) as e:
        read_run_metadata(run)
    msg = str(e.value)
    assert str(run / "exp-config.yaml") in msg and "not safe/plain YAML" in msg and "python/object" in msg
    assert not marker.exists()


def test_asset_fails_with_the_yaml_error_naming_the_file(tmp_path):
    """The partition with the bad YAML fails in raw_traces with the file named; nothing executes."""
    from stepml_dagster.definitions import build_definitions

    marker = tmp_path / "pwned"
    data = tmp_path / "data"
    run = data / RID
    run.mkdir(parents=True)
    (run / "traces.json").write_text("{}\n")
    (run / "profile.yaml").write_text(f'x: !!python/object/new:os.system ["touch {marker}"]\n')
    (run / "exp-config.yaml").write_text("tensor_parallelism: 4\n")
    defs = build_definitions(StepMLSettings(data_dir=str(data), out_dir=str(tmp_path / "out")))
    with open_instance(tmp_path / "home") as inst:
        inst.add_dynamic_partitions("experiment", [RID])
        res = defs.resolve_job_def("experiment_job").execute_in_process(
            partition_key=RID, instance=inst, raise_on_error=False
        )
    assert not res.success
    (failure,) = [ev for ev in res.all_events if ev.is_step_failure]
    assert failure.step_key == "raw_traces"
    assert str(run / "profile.yaml") in failure.event_specific_data.error.to_string()
    assert not marker.exists()


@pytest.mark.parametrize(
    "bad", ["..", "../etc", "/etc", f"{RID}/../../etc", f"../{RID}", f"{RID}\x00", "", f"{RID} ", RID.upper()]
)
def test_run_folder_rejects_traversal_and_malformed_ids(tmp_path, bad):
    s = StepMLSettings(data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "out"))
    with pytest.raises((RunIdError, RunMetadataError)):
        s.run_folder(bad)


def test_run_folder_rejects_symlink_out_of_the_root_others_unaffected(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "elsewhere" / RID
    outside.mkdir(parents=True)
    data.mkdir()
    good = "20260102-120000-codellama-34b-tp2-general"
    (data / good).mkdir()
    (data / RID).symlink_to(outside, target_is_directory=True)
    s = StepMLSettings(data_dir=str(data), out_dir=str(tmp_path / "out"))
    with pytest.raises(RunMetadataError, match="outside the data root"):
        s.run_folder(RID)
    assert s.run_folder(good) == data / good


def test_nothing_is_unpickled_and_yaml_is_only_safe_loaded():
    """No pickle/joblib/unsafe YAML anywhere in the code that reads the data folder or stored assets."""
    bad = re.compile(
        r"\bimport pickle\b|\bpickle\.loads?\b|\bjoblib\b|read_pickle|allow_pickle\s*=\s*True|"
        r"yaml\.(unsafe_load|full_load|load)\s*\(|yaml\.(Unsafe|Full)?Loader\b|cloudpickle|dill\b"
    )
    hits = []
    for pkg in ("stepml_core", "stepml_dagster"):
        for p in (REPO / pkg).rglob("*.py"):
            for i, line in enumerate(p.read_text().splitlines(), 1):
                if bad.search(line):
                    hits.append(f"{p.relative_to(REPO)}:{i}: {line.strip()}")
    assert not hits, hits


def test_io_manager_is_parquet_json_not_pickle():
    from stepml_dagster.definitions import defs
    from stepml_dagster.io_manager import ParquetIOManager

    assert isinstance(defs.resources["io_manager"], ParquetIOManager)


def test_ui_binds_to_localhost_by_default():
    """`dagster dev` passes no --host unless given one; dagster-webserver's default is 127.0.0.1."""
    from dagster._cli.dev import dev_command
    from dagster_webserver.cli import DEFAULT_WEBSERVER_HOST

    assert DEFAULT_WEBSERVER_HOST == "127.0.0.1"
    host = [p for p in dev_command.params if p.name == "host"][0]
    assert not isinstance(host.default, str)  # unset: dev adds --host only when given one
