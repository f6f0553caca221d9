"""Helpers shared by the operations tests (sensor, backfill, postgres, daemon, browser)."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUN_A = "20260217-203421-llama-2-70b-hf-tp4-codegen"  # the smaller real run
RUN_B = "20260218-150304-codellama-34b-tp2-general"
ARTIFACTS = REPO / "test-artifacts"


def copy_run(src: Path, dst: Path) -> Path:
    """Copy a run folder (keeps mtimes: the sensor sees it as settled) and make it writable."""
    shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)
    return dst


def drop_run(src: Path, data_dir: Path, name: str | None = None) -> Path:
    """Copy into a hidden staging folder, then rename into place (how a landing zone should be fed)."""
    name = name or src.name
    staging = data_dir / f".incoming-{name}"
    copy_run(src, staging)
    final = data_dir / name
    os.rename(staging, final)
    return final


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float, interval: float = 1.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def write_instance_yaml(home: Path, extra: str = "") -> Path:
    home.mkdir(parents=True, exist_ok=True)
    p = home / "dagster.yaml"
    p.write_text("telemetry:\n  enabled: false\n" + extra)
    return p


@contextmanager
def open_instance(home: Path):
    """A persistent DagsterInstance on `home`, disposed afterwards but never entered with `with`.

    dagster 1.13.27: DagsterInstance.__enter__ puts its defs-state storage in a ContextVar that
    __exit__ does not reset, so any later definitions load in the same thread (e.g. run_study in
    another test) fails with "Attempted to resolve undefined DagsterInstance weakref".
    """
    import dagster as dg

    home = Path(home)
    if not (home / "dagster.yaml").exists():
        write_instance_yaml(home)
    inst = dg.DagsterInstance.from_config(str(home))
    try:
        yield inst
    finally:
        inst.dispose()


def assert_opt_in(monkeypatch, env: str, field: str, prop: str, flag: str) -> None:
    """An opt-in study setting is off unless asked: the settings resource's ``field``, else ``env``=1 (which
    `stepml run FLAG` sets); ``prop`` is what the assets read."""
    from stepml_dagster.cli import build_parser
    from stepml_dagster.resources import StepMLSettings

    monkeypatch.delenv(env, raising=False)
    assert getattr(StepMLSettings(), prop) is False
    monkeypatch.setenv(env, "1")
    assert getattr(StepMLSettings(), prop) is True
    assert getattr(StepMLSettings(**{field: False}), prop) is False
    dest = flag.lstrip("-").replace("-", "_")
    assert getattr(build_parser().parse_args(["run", flag]), dest)
    assert not getattr(build_parser().parse_args(["run"]), dest)
