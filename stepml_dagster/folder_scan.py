"""Is a run folder finished being written, and what changed since the last tick: the data-folder scan that
``experiment_sensor`` runs each tick (stepml_dagster/sensors.py has the whole contract: settling, the tick's time
and hash budgets, unreadable entries). Dagster-free: plain paths in, (launches, cursor) out.
"""

from __future__ import annotations

import json
import os
import stat
import time
import zlib
from pathlib import Path

from stepml_core.runs.folders import (
    RunIdError,
    RunMetadataError,
    discover_run_folders,
    find_trace_file,
    resolve_data_root,
)
from stepml_core.tables.ingest import fingerprint, fingerprint_digest

from .resources import StepMLSettings

CURSOR_VERSION = 1


class _OutOfTime(Exception):
    pass


# --------------------------------------------------------------------------------------------
# Is a run folder finished being written?
# --------------------------------------------------------------------------------------------


def trace_file_complete(path: Path, deadline: float | None = None) -> tuple[bool | None, str]:
    """(complete, why not). Plain: ends with a newline. Gzip: every member's stream ends cleanly.
    None: not checked (not a regular file, or the gzip could not be inflated before deadline, time.monotonic())."""
    path = Path(path)
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        return None, f"{path.name} is not a regular file (the run will fail saying what it is)"
    size = st.st_size
    if size == 0:
        return False, f"{path.name} is empty"
    if path.suffix != ".gz":
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                return False, f"{path.name}: last line has no trailing newline (still being written?)"
        return True, ""
    try:
        ended = _gzip_ends_cleanly(path, deadline)
    except zlib.error as e:
        return False, f"{path.name}: gzip stream is corrupt ({e})"
    except _OutOfTime:
        return (
            None,
            f"{path.name}: gzip completeness not checked within the tick's time budget (STEPML_SENSOR_TIME_BUDGET_S)",
        )
    return (True, "") if ended else (False, f"{path.name}: gzip stream does not end cleanly (still being written?)")


def _gzip_ends_cleanly(path: Path, deadline: float | None = None) -> bool:
    """Inflate every gzip member (bounded output per call; discarded); True if the last one ended.
    Raises _OutOfTime past deadline (time.monotonic())."""
    d = zlib.decompressobj(wbits=31)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 18):
            while chunk:
                if d.eof:  # the previous member ended; another one follows
                    d = zlib.decompressobj(wbits=31)
                out = d.decompress(
                    chunk, 1 << 22
                )  # at most 4 MiB out per call: a gzip bomb cannot stall between checks
                if deadline is not None and time.monotonic() > deadline:
                    raise _OutOfTime
                if d.eof:
                    chunk = d.unused_data
                else:
                    chunk = d.unconsumed_tail
                    if not chunk and len(out) == 1 << 22:  # output full with all input taken: drain what zlib holds
                        while len(d.decompress(b"", 1 << 22)) == 1 << 22:
                            if deadline is not None and time.monotonic() > deadline:
                                raise _OutOfTime
    return d.eof


def _quick_state(folder: Path) -> dict:
    """size/mtime of each input file plus the mtimes of the run folder and its results/ folder."""
    state = {f["file"]: [f["size_bytes"], f["mtime_ns"]] for f in fingerprint(folder, with_hash=False)}
    for d in (folder, folder / "results"):
        if d.is_dir():
            state[f"{d.relative_to(folder)}/"] = [0, d.stat().st_mtime_ns]
    return state


def _same_files(fp: list[dict], quick: dict) -> bool:
    files = {k: v for k, v in quick.items() if not k.endswith("/")}
    return {f["file"]: [f["size_bytes"], f["mtime_ns"]] for f in fp} == files


def load_cursor(text: str | None) -> dict:
    try:
        c = json.loads(text) if text else {}
    except json.JSONDecodeError:
        c = {}
    if not isinstance(c, dict) or c.get("v") != CURSOR_VERSION:
        c = {}
    return {
        "v": CURSOR_VERSION,
        "runs": dict(c.get("runs") or {}),
        "pending": dict(c.get("pending") or {}),
        "rejected": list(c.get("rejected") or []),
        "deleted": list(c.get("deleted") or []),
    }


def scan_data_folder(
    settings: StepMLSettings, cursor: dict, *, now: float | None = None, log=None
) -> tuple[list[dict], dict]:
    """One sensor tick without Dagster: ([{run_id, data_version, run_key, new, reason}], new cursor).

    Pure function of the folder and the cursor (testable without a daemon). Stays within
    settings.sensor_limits() (see the module docstring); the new cursor's ``unreadable`` maps run ids that
    could not be read this tick to the reason.
    """
    now = time.time() if now is None else now
    limits = settings.sensor_limits()  # settle time, hashing and time budgets of a tick (the settings resource)
    t_end = time.monotonic() + limits.time_budget_s
    settle = limits.settle_s
    say = log or (lambda level, msg: None)
    runs, pending = dict(cursor["runs"]), dict(cursor["pending"])
    root = resolve_data_root(settings.data_root())
    try:
        folders, rejected = discover_run_folders(root)
    except OSError as e:
        say("warning", f"data folder {root} cannot be listed ({e}); nothing launched this tick")
        return [], {**cursor, "unreadable": {".": str(e)}}
    seen_rejected = set(cursor.get("rejected", []))
    for path, why in rejected:
        if path.name not in seen_rejected:
            say("warning", f"not a run folder, ignored: {why}")
    launches: list[dict] = []
    present = set()
    unreadable: dict[str, str] = {}
    budget, spent = limits.hash_budget_bytes, 0
    examined = 0  # folders hashed this tick
    for folder in folders:
        rid = folder.name
        try:  # validated again by the resource: the same check the assets use
            checked = settings.run_folder(rid)
        except (RunIdError, RunMetadataError) as e:
            say("warning", f"rejected {rid!r}: {e}")
            continue
        if checked.resolve() != folder.resolve():
            say(
                "warning",
                f"{folder}: run folders must sit directly in the data folder {settings.data_root()} "
                f"(set STEPML_DATA_DIR to {root})",
            )
            continue
        present.add(rid)
        try:
            launch = _scan_one(folder, rid, runs, pending, now, settle, t_end, budget, spent, examined, say)
        except (OSError, RunMetadataError) as e:  # unreadable (permissions), vanished mid-scan: skip, report, retry
            unreadable[rid] = f"{type(e).__name__}: {e}"
            say("warning", f"{rid}: skipped this tick, cannot be read ({unreadable[rid]}); retried next tick")
            continue
        if launch is None:
            continue
        if isinstance(launch, int):  # bytes hashed, nothing to launch
            spent += launch
            examined += 1
            continue
        spent += launch.pop("_bytes")
        examined += 1
        launches.append(launch)
    for gone in set(runs) - present:
        say(
            "info",
            f"{gone}: run folder no longer in the data folder; forgotten (its partition is deleted: the study report drops it)",
        )
        runs.pop(gone)
    for gone in set(pending) - present:
        pending.pop(gone)
    new_cursor = {
        "v": CURSOR_VERSION,
        "runs": runs,
        "pending": pending,
        "rejected": sorted(p.name for p, _ in rejected),
        "unreadable": unreadable,
        "deleted": list(cursor.get("deleted", [])),
    }
    return launches, new_cursor


def _why_later(settled: bool, spent_bytes: int, budget_bytes: int, t_end: float) -> str | None:
    """Why a run folder waits for a later tick, or None: still being written, or this tick's hashing or time
    budget used up (keep the tick short: sensor evaluations time out)."""
    if not settled:
        return "files changed since the last tick (still being written?)"
    if spent_bytes >= budget_bytes:
        return "hashing budget of this tick used up"
    if time.monotonic() > t_end:
        return "time budget of this tick used up (STEPML_SENSOR_TIME_BUDGET_S)"
    return None


def _trace_readiness(folder: Path, t_end: float) -> tuple[bool | None, str]:
    """(True, _) a complete trace file; (False, why) none yet or one still being written; (None, why) one the run
    will refuse itself (two trace files, or a link out of the data folder)."""
    try:
        trace = find_trace_file(folder)
    except RunMetadataError as e:  # two trace files: the run refuses itself with this message
        return None, str(e)
    if trace is not None and folder.resolve().parent not in trace.resolve().parents:
        return None, f"{trace.name} leads out of the data folder (the run will refuse it)"
    return trace_file_complete(trace, t_end) if trace else (False, "no trace file")


def _scan_one(
    folder: Path,
    rid: str,
    runs: dict,
    pending: dict,
    now: float,
    settle: float,
    t_end: float,
    budget: int,
    spent: int,
    examined: int,
    say,
):
    """One run folder of a tick: None (nothing to do now), bytes hashed (no launch), or a launch dict (with _bytes)."""
    quick = _quick_state(folder)
    prev = runs.get(rid)
    if prev and _same_files(prev["files"], quick):
        pending.pop(rid, None)
        return None
    newest = max((v[1] for v in quick.values()), default=0) / 1e9
    settled = pending.get(rid) == quick or (now - newest) >= settle
    later = _why_later(settled, spent, budget, t_end)
    if later:
        pending[rid] = quick
        say("info", f"{rid}: {later}; later tick")
        return None
    ok, why = _trace_readiness(folder, t_end)
    if ok is False:
        if (now - newest) < settle:
            pending[rid] = quick
            say("info", f"{rid}: {why}; later tick")
            return None
        say(
            "warning",
            f"{rid}: {why}, but unchanged for {settle:.0f} s: launching (the reader quarantines or reports it)",
        )
    elif ok is None:
        say("warning", f"{rid}: {why}; launching (the run applies its input limits and says what is wrong)")
    try:
        full = fingerprint(folder, deadline=t_end)
    except TimeoutError:
        if examined:  # others took this tick's time: hash it next tick
            pending[rid] = quick
            say("info", f"{rid}: time budget of this tick used up while hashing; later tick")
            return None
        full = fingerprint(folder, with_hash=False)  # too big to hash in one budget: the run hashes what it reads
        say("warning", f"{rid}: too big to hash within STEPML_SENSOR_TIME_BUDGET_S; fingerprinted by size and mtime")
    nbytes = sum(v[0] for v in quick.values()) * 2  # inflate the trace + hash every file
    if not _same_files(full, quick):  # changed while hashing
        pending[rid] = _quick_state(folder)
        return nbytes
    pending.pop(rid, None)
    digest = fingerprint_digest(full)
    history = list(prev.get("history", [])) if prev else []
    runs[rid] = {"version": digest, "files": full, "history": history}
    if prev and prev.get("version") == digest:  # touched, same content
        return nbytes
    run_key = f"{rid}:{digest}" if digest not in history else f"{rid}:{digest}:{len(history)}"
    runs[rid]["history"] = (history + [digest])[-20:]
    return {
        "run_id": rid,
        "data_version": digest,
        "run_key": run_key,
        "new": prev is None,
        "reason": "new run folder" if prev is None else "changed input files",
        "_bytes": nbytes,
    }
