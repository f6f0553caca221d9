"""The Dagster instance of a study: where it lives, its dagster.yaml, its partition set.

A study is one data folder and one output folder. Its instance (runs, event log, partitions,
sensor cursors) lives in ``<out>/dagster_home`` unless ``DAGSTER_HOME`` is set, so `stepml run`,
`stepml backfill` and `stepml ui` on the same ``--out`` share one instance and the UI lists that
study's runs only. ``deploy/dagster.yaml`` is the one source of the instance settings: it is copied
into an instance that has no dagster.yaml, or one that is an earlier deploy/dagster.yaml unchanged (or the
minimal file older versions wrote); a dagster.yaml the user wrote or edited (PostgreSQL, say) is left alone.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

from stepml_core.errors import UsageError
from stepml_core.paths import PROJECT_ROOT

INSTANCE_CONFIG = PROJECT_ROOT / "deploy" / "dagster.yaml"  # the instance settings, one file
INSTANCE_DIR_NAME = "dagster_home"  # <out>/dagster_home
WORKSPACE_FILE = PROJECT_ROOT / "workspace.yaml"
PARTITIONS_DEF_NAME = "experiment"
# first line of the minimal dagster.yaml `stepml run` wrote before deploy/dagster.yaml was the source
_LEGACY_CONFIG_LINE = "# StepML default: embedded SQLite storage under DAGSTER_HOME"
# sha256 of the earlier versions of deploy/dagster.yaml (d20f88b: Dagster's default SQLite storage)
_EARLIER_CONFIG_SHA256 = frozenset({"6747608a8f19426d213f67984fae1eecf5cfc0194bc86e05fadeb319da2b98af"})


def study_dagster_home(out_dir: Path) -> Path:
    """$DAGSTER_HOME when set, else <out_dir>/dagster_home (absolute)."""
    env = os.environ.get("DAGSTER_HOME")
    return Path(env).resolve() if env else (Path(out_dir) / INSTANCE_DIR_NAME).resolve()


def ensure_instance_config(home: Path) -> Path:
    """Create the instance folder with deploy/dagster.yaml as its dagster.yaml, unless it has one of its own
    (an earlier deploy/dagster.yaml, unchanged, is replaced by the current one)."""
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "dagster.yaml"
    if not cfg.exists():
        shutil.copyfile(INSTANCE_CONFIG, cfg)
        return cfg
    text = cfg.read_bytes()
    if text.decode(errors="replace").startswith(_LEGACY_CONFIG_LINE) or (
        hashlib.sha256(text).hexdigest() in _EARLIER_CONFIG_SHA256
    ):
        shutil.copyfile(INSTANCE_CONFIG, cfg)
    return cfg


@contextmanager
def study_instance_env(out_dir: Path):
    """DAGSTER_HOME set to the study's instance (config written) while the block runs; yields its folder.
    Worker processes started inside the block inherit it."""
    home = study_dagster_home(out_dir)
    ensure_instance_config(home)
    old = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        yield home
    finally:
        if old is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = old


def sync_partitions(instance, keys: list[str], *, add: bool = True) -> tuple[list[str], list[str]]:
    """Make the instance's experiment partitions the given run folders: add the missing ones (if add) and
    delete those whose run folder is not among them (a deleted or moved run). Returns (added, removed)."""
    have = set(instance.get_dynamic_partitions(PARTITIONS_DEF_NAME))
    removed = sorted(have - set(keys))
    for key in removed:
        instance.delete_dynamic_partition(PARTITIONS_DEF_NAME, key)
    added = [k for k in keys if k not in have] if add else []
    if added:
        instance.add_dynamic_partitions(PARTITIONS_DEF_NAME, added)
    return added, removed


def ui_command(data_root: Path, out_dir: Path, *, port: int = 3000) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of `dg dev` (webserver + daemon, 127.0.0.1 only) on the study's instance, serving
    data_root → out_dir. Writes the instance config; refuses a data folder that does not exist."""
    data_root, out_dir = Path(data_root).resolve(), Path(out_dir).resolve()
    if not data_root.is_dir():
        raise UsageError(f"{data_root}: no such folder (give --data the folder of run folders that `stepml run` used)")
    home = study_dagster_home(out_dir)
    ensure_instance_config(home)
    dg_exe = Path(sys.executable).parent / "dg"
    exe = str(dg_exe) if dg_exe.exists() else (shutil.which("dg") or "dg")
    argv = [exe, "dev", "-h", "127.0.0.1", "-p", str(port), "-w", str(WORKSPACE_FILE)]
    env = {**os.environ, "DAGSTER_HOME": str(home), "STEPML_DATA_DIR": str(data_root), "STEPML_OUT_DIR": str(out_dir)}
    return argv, env


def prune_partitions(home: Path, data_root: Path) -> list[str]:
    """Delete the instance's partitions whose run folder is no longer in data_root (before the UI opens)."""
    import dagster as dg

    from stepml_core.runs.folders import discover_run_folders

    old = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        with dg.DagsterInstance.get() as instance:
            return sync_partitions(instance, [f.name for f in discover_run_folders(data_root)[0]], add=False)[1]
    finally:
        if old is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = old
