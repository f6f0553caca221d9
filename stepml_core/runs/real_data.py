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

from stepml_core.errors import StepMLError


class RealDataError(StepMLError, ValueError):
    """The shared folder does not hold the real runs where expected, --out cannot hold them, or a run folder there
    holds files `stepml real-data` did not write (never deleted: the user moves them)."""


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
            f"--shared {shared}: no folder {lay['requests']} (expected the real request logs under <shared>/real/requests)"
        )
    return lay


def assemble_real_runs(shared: Path, out: Path, run_ids: list[str] | None = None) -> list[Path]:
    """Write one run folder per real run under ``out``; returns the folders (sorted by run id). A run folder already
    there is replaced only if `stepml real-data` wrote it (its provenance.json lists every file in it); otherwise
    RealDataError names the files that are not ours, before anything is written."""
    lay = shared_layout(shared)
    out = Path(out)
    ids = _run_ids(lay, run_ids)
    try:
        if out.exists() and not out.is_dir():
            raise RealDataError(f"--out {out}: not a folder")
        foreign = {rid: _not_ours(out / rid) for rid in ids}
        foreign = {rid: f for rid, f in foreign.items() if f}
        if foreign:
            rid, files = sorted(foreign.items())[0]
            raise RealDataError(
                f"{out / rid}: holds {len(files)} file(s) stepml real-data did not write ({', '.join(files[:3])}"
                f"{', ...' if len(files) > 3 else ''}); move them or choose another --out (nothing was written)"
            )
        out.mkdir(parents=True, exist_ok=True)
        return [_assemble_one(lay, Path(shared), out, rid) for rid in ids]
    except OSError as e:
        raise RealDataError(f"--out {out}: cannot write there ({e.strerror or e}: {e.filename or out})") from None


def _run_ids(lay: dict, run_ids: list[str] | None) -> list[str]:
    try:
        ids = sorted(p.name for p in lay["requests"].iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:
        raise RealDataError(f"{lay['requests']}: cannot be listed ({e.strerror or e})") from None
    if run_ids:
        unknown = sorted(set(run_ids) - set(ids))
        if unknown:
            raise RealDataError(f"--runs: not real runs under {lay['requests']}: {', '.join(unknown)}")
        ids = [i for i in ids if i in set(run_ids)]
    return ids


def _not_ours(folder: Path) -> list[str]:
    """Files in an existing run folder that its provenance.json (written by stepml real-data) does not list."""
    if not os.path.lexists(folder):
        return []
    if folder.is_symlink() or not folder.is_dir():
        return [folder.name]
    present = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir() or p.is_symlink())
    try:
        prov = json.loads((folder / "provenance.json").read_text())
        ours = prov.get("assembled_by") == "stepml real-data"
        listed = set(prov["files"]) | {"provenance.json"} if ours else set()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        listed = set()  # no provenance of ours: every file in it is the user's
    return [f for f in present if f not in listed]


def _assemble_one(lay: dict, shared: Path, out: Path, rid: str) -> Path:
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
        prov["files"][rel] = {"from": str(src.relative_to(shared)), "sha256": _sha(dst)}
    (tmp / "provenance.json").write_text(json.dumps(prov, indent=1, sort_keys=True))
    if final.exists():
        shutil.rmtree(final)  # ours: _not_ours found nothing else in it
    os.replace(tmp, final)
    return final


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
