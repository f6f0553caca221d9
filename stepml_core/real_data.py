"""Assemble the 16 real runs from ../shared into run folders StepML reads (``stepml real-data``).

For each run in ``<shared>/real/requests/<run id>/``: its request log (``requests.json.gz``, and
``ground_truth.json.gz`` where published), the run's metadata from ``<shared>/reference/experiments/<run id>/``
(``exp-config.yaml``, ``profile.yaml``, inference-perf ``results/``), and, for the runs that have
them, the real step traces of ``<shared>/real/experiments/<run id>/traces.json.gz``. Files are
copied (never linked) into ``<out>/<run id>/``, each folder written under a hidden name and renamed
into place, with a ``provenance.json`` listing where every file came from and its sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path


class RealDataError(ValueError):
    """The shared folder does not hold the real runs where expected."""


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def shared_layout(shared: Path) -> dict[str, Path]:
    shared = Path(shared)
    lay = {
        "requests": shared / "real" / "requests",
        "experiments": shared / "real" / "experiments",
        "reference": shared / "reference" / "experiments",
    }
    if not lay["requests"].is_dir():
        raise RealDataError(
            f"{lay['requests']}: not found (expected the real request logs under <shared>/real/requests)"
        )
    return lay


def assemble_real_runs(shared: Path, out: Path, run_ids: list[str] | None = None) -> list[Path]:
    """Write one run folder per real run under ``out``; returns the folders (sorted by run id)."""
    lay = shared_layout(shared)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = sorted(p.name for p in lay["requests"].iterdir() if p.is_dir() and not p.name.startswith("."))
    if run_ids:
        unknown = sorted(set(run_ids) - set(ids))
        if unknown:
            raise RealDataError(f"not real runs under {lay['requests']}: {', '.join(unknown)}")
        ids = [i for i in ids if i in set(run_ids)]
    folders = []
    for rid in ids:
        files: dict[str, Path] = {}
        for src_dir in (lay["reference"] / rid, lay["experiments"] / rid, lay["requests"] / rid):  # later wins
            if not src_dir.is_dir():
                continue
            for p in sorted(src_dir.rglob("*")):
                if p.is_file() and not p.is_symlink():
                    files[str(p.relative_to(src_dir))] = p
        tmp, final = out / f".{rid}.partial", out / rid
        if tmp.exists():
            shutil.rmtree(tmp)
        prov = {"source": "real", "assembled_by": "stepml real-data", "files": {}}
        for rel, src in sorted(files.items()):
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            prov["files"][rel] = {"from": str(src.relative_to(Path(shared))), "sha256": _sha(dst)}
        (tmp / "provenance.json").write_text(json.dumps(prov, indent=1, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        folders.append(final)
    return folders


def cut_request_logs(src: Path, dst: Path, seconds: float) -> Path:
    """A copy of the run folders under `src` (no step traces) whose request log (``requests.json.gz``) and ground
    truth keep the requests that arrived in the first `seconds`: the same runs, roles and serving limits, smaller
    (for tests and quick audits; tests/test_out_of_sample.py, benchmarks/oos_audit.py). Returns `dst`."""
    import gzip

    dst = Path(dst)
    dst.mkdir(parents=True)
    for f in sorted(p for p in Path(src).iterdir() if p.is_dir() and (p / "requests.json.gz").is_file()):
        d = dst / f.name
        shutil.copytree(f, d, ignore=shutil.ignore_patterns("traces.json*", "ground_truth*", "requests*"))
        doc = json.loads(gzip.decompress((f / "requests.json.gz").read_bytes()))
        doc["requests"] = [r for r in doc["requests"] if r["arrival_time_us"] < seconds * 1e6]
        kept = {r["index"] for r in doc["requests"]}
        (d / "requests.json.gz").write_bytes(gzip.compress(json.dumps(doc).encode()))
        if (f / "ground_truth.json.gz").is_file():
            gt = [
                r for r in json.loads(gzip.decompress((f / "ground_truth.json.gz").read_bytes())) if r["index"] in kept
            ]
            (d / "ground_truth.json.gz").write_bytes(gzip.compress(json.dumps(gt).encode()))
    return dst
