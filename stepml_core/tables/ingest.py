"""One run folder in: metadata, fingerprints and trace tables out.

The fingerprint of a run (``meta["files"]``, digest ``meta["data_version"]``) describes the bytes
the run was computed from: each file is hashed as it is read (size = bytes read, mtime taken
before reading), so a file appended while being read gets a fingerprint that differs from the
file on disk afterwards, and the sensor reads it again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl

from stepml_core.runs.folders import RunMetadata, RunMetadataError, file_record, open_input, read_run_metadata
from stepml_core.runs.limits import InputLimits

INPUT_NAMES = [
    "traces.json",
    "traces.json.gz",
    "exp-config.yaml",
    "profile.yaml",
    "provenance.json",
    "requests.json",
    "requests.json.gz",
    "ground_truth.json",
    "ground_truth.json.gz",
]


def sha256_file(path: Path, chunk: int = 1 << 20, root: Path | None = None) -> str:
    return hash_file(path, chunk, root)[0]


def hash_file(path: Path, chunk: int = 1 << 20, root: Path | None = None, deadline: float | None = None):
    """(sha256 hex, bytes hashed, stat before reading) of a regular file; TimeoutError past deadline (time.monotonic())."""
    import time

    h = hashlib.sha256()
    n = 0
    f, st = open_input(path, root)
    with f:
        while b := f.read(chunk):
            h.update(b)
            n += len(b)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{path}: hashing stopped at the time budget")
    return h.hexdigest(), n, st


def run_files(folder: Path) -> list[Path]:
    """The input files of a run folder that StepML reads (traces and metadata): regular files (or
    symlinks to regular files) inside the folder's parent, the data root."""
    folder = Path(folder)
    files = [folder / n for n in INPUT_NAMES if (folder / n).is_file()]
    results = folder / "results"
    if results.is_dir() and not results.is_symlink():
        files += [p for p in results.glob("*_lifecycle_metrics.json") if p.is_file()]
        if (results / "config.yaml").is_file():
            files.append(results / "config.yaml")
    root = folder.resolve().parent
    files = [p for p in files if not p.is_symlink() or root in p.resolve().parents]
    return sorted(files, key=lambda p: _order(str(p.relative_to(folder))))


def _order(rel: str) -> tuple:
    return (INPUT_NAMES.index(rel), "") if rel in INPUT_NAMES else (len(INPUT_NAMES), rel)


def fingerprint(folder: Path, *, with_hash: bool = True, deadline: float | None = None) -> list[dict]:
    """[{file, size_bytes, mtime_ns, sha256}] for a run's input files (as they are now)."""
    out = []
    for p in run_files(folder):
        if with_hash:
            digest, n, st = hash_file(p, deadline=deadline)
            out.append(
                {"file": str(p.relative_to(folder)), "size_bytes": n, "mtime_ns": st.st_mtime_ns, "sha256": digest}
            )
        else:
            st = p.stat()
            out.append({"file": str(p.relative_to(folder)), "size_bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def fingerprint_digest(fp: list[dict]) -> str:
    """One short version string for a run's inputs (content hashes, or size+mtime without them)."""
    h = hashlib.sha256()
    for f in fp:
        h.update(f"{f['file']}:{f['size_bytes']}:{f.get('sha256') or f['mtime_ns']}\n".encode())
    return h.hexdigest()[:16]


def ingest_run(
    folder: Path, data_root: Path | None = None, workers: int | None = None, limits: InputLimits | None = None
) -> dict:
    """Read a run folder: {'meta': {...}, 'steps', 'snapshots', 'journey', 'api', 'step_spans', 'quarantine'}.

    ``meta["files"]`` fingerprints the bytes read (see the module docstring); optional files that
    could not be used (``RunMetadata.issues``) become ``file`` quarantine records; ``meta["rows"]`` counts
    each table's rows (what a reader of the metadata alone knows of the tables).
    """
    from stepml_core.traces import TABLE_SCHEMAS, read_traces

    folder = Path(folder)
    meta: RunMetadata = read_run_metadata(folder, data_root=data_root, limits=limits)
    if meta.trace_path is None:
        raise RunMetadataError(f"{folder}: no traces.json or traces.json.gz")
    root = Path(data_root) if data_root is not None else folder.parent
    tables = read_traces(meta.trace_path, workers=workers, limits=limits, root=root)
    reads = dict(meta.reads)
    reads[str(meta.trace_path.relative_to(folder))] = {"file": str(meta.trace_path.relative_to(folder)), **tables.read}
    for p in run_files(folder):  # inputs not parsed (e.g. per-request results): hashed as they are now
        rel = str(p.relative_to(folder))
        if rel not in reads:
            try:
                digest, n, st = hash_file(p, root=root)
            except (OSError, RunMetadataError):
                continue
            reads[rel] = file_record(folder, p, st, n, digest)
    fp = [reads[k] for k in sorted(reads, key=_order)]
    quarantine = tables.quarantine
    if meta.issues:
        issues = pl.DataFrame(
            {
                "file": [i["file"] for i in meta.issues],
                "line": [None] * len(meta.issues),
                "kind": ["file"] * len(meta.issues),
                "reason": [i["reason"] for i in meta.issues],
                "excerpt": [None] * len(meta.issues),
                "count": [1] * len(meta.issues),
            },
            schema=TABLE_SCHEMAS["quarantine"],
        )
        quarantine = pl.concat([quarantine, issues])
    stages = stage_durations_s(meta)
    return {
        "meta": {
            **meta.as_record(),
            "files": fp,
            "data_version": fingerprint_digest(fp),
            "counters": tables.counters,
            "stage_durations_s": stages,
            "exp_config": meta.exp_config,
            "summary_available": meta.summary is not None,
            "file_issues": meta.issues,
            "rows": {
                "steps": tables.steps.height,
                "snapshots": tables.snapshots.height,
                "journey": tables.journey.height,
                "api": tables.api.height,
                "step_spans": tables.step_spans.height,
                "quarantine": quarantine.height,
            },
        },
        "steps": tables.steps,
        "snapshots": tables.snapshots,
        "journey": tables.journey,
        "api": tables.api,
        "step_spans": tables.step_spans,
        "quarantine": quarantine,
    }


def _duration_s(x) -> float | None:
    """A stage duration in seconds: a finite number in (0, 30 days], else None."""
    import math

    if isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and 0 < v <= 30 * 86400 else None


def stage_durations_s(meta: RunMetadata) -> list[float]:
    """Load-stage durations (s) from profile.yaml's load.stages, else the stage result files.

    A malformed value (not a number, negative, beyond 30 days) makes that source unusable: the
    split then has no stage boundaries rather than wrong ones."""
    load = meta.profile.get("load") if isinstance(meta.profile, dict) else None
    stages = load.get("stages") if isinstance(load, dict) else None
    if isinstance(stages, list) and stages:
        vals = [_duration_s(s.get("duration")) if isinstance(s, dict) else None for s in stages]
        if all(v is not None for v in vals):
            return vals
    out = []
    for s in meta.stages:
        ls = s.get("load_summary") if isinstance(s, dict) else None
        d = ls.get("send_duration") if isinstance(ls, dict) else None
        if d is None or (not isinstance(d, (dict, list)) and not d):  # absent or zero: no stage there
            continue
        v = _duration_s(d)
        if v is None:
            return []
        out.append(v)
    return out
