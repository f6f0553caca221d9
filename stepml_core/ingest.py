"""One run folder in: metadata, fingerprints and trace tables out."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .runs import RunMetadata, read_run_metadata


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def run_files(folder: Path) -> list[Path]:
    """The input files of a run folder that StepML reads (traces and metadata)."""
    folder = Path(folder)
    names = ["traces.json", "traces.json.gz", "exp-config.yaml", "profile.yaml", "provenance.json",
             "requests.json", "requests.json.gz", "ground_truth.json", "ground_truth.json.gz"]
    files = [folder / n for n in names if (folder / n).is_file()]
    if (folder / "results").is_dir():
        files += sorted(p for p in (folder / "results").glob("*_lifecycle_metrics.json") if p.is_file())
        if (folder / "results" / "config.yaml").is_file():
            files.append(folder / "results" / "config.yaml")
    return files


def fingerprint(folder: Path, *, with_hash: bool = True) -> list[dict]:
    """[{file, size_bytes, mtime_ns, sha256}] for a run's input files."""
    out = []
    for p in run_files(folder):
        st = p.stat()
        out.append({"file": str(p.relative_to(folder)), "size_bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                    **({"sha256": sha256_file(p)} if with_hash else {})})
    return out


def fingerprint_digest(fp: list[dict]) -> str:
    """One short version string for a run's inputs (content hashes, or size+mtime without them)."""
    h = hashlib.sha256()
    for f in fp:
        h.update(f"{f['file']}:{f['size_bytes']}:{f.get('sha256') or f['mtime_ns']}\n".encode())
    return h.hexdigest()[:16]


def ingest_run(folder: Path, data_root: Path | None = None, workers: int | None = None) -> dict:
    """Read a run folder: {'meta': {...}, 'steps', 'snapshots', 'journey', 'api', 'step_spans', 'quarantine'}."""
    from .traces import read_traces

    meta: RunMetadata = read_run_metadata(Path(folder), data_root=data_root)
    if meta.trace_path is None:
        raise FileNotFoundError(f"{folder}: no traces.json or traces.json.gz")
    tables = read_traces(meta.trace_path, workers=workers)
    fp = fingerprint(meta.folder)
    stages = stage_durations_s(meta)
    return {
        "meta": {**meta.as_record(), "files": fp, "data_version": fingerprint_digest(fp), "counters": tables.counters,
                 "stage_durations_s": stages, "exp_config": meta.exp_config,
                 "summary_available": meta.summary is not None},
        "steps": tables.steps, "snapshots": tables.snapshots, "journey": tables.journey, "api": tables.api,
        "step_spans": tables.step_spans, "quarantine": tables.quarantine,
    }


def stage_durations_s(meta: RunMetadata) -> list[float]:
    """Load-stage durations (s) from profile.yaml's load.stages, else the stage result files."""
    stages = (meta.profile.get("load") or {}).get("stages") if isinstance(meta.profile, dict) else None
    if stages:
        try:
            return [float(s["duration"]) for s in stages]
        except (KeyError, TypeError, ValueError):
            pass
    out = []
    for s in meta.stages:
        d = (s.get("load_summary") or {}).get("send_duration")
        if d:
            out.append(float(d))
    return out
