"""The out-of-sample audit: delete a scored run's ground truth, run the request level again, compare.

A figure StepML calls *out of sample* for run X must not move when X's ground truth is gone: no fit, no
model choice, no setting and no threshold may have read it. :func:`audit` checks that claim the direct
way, over a whole study of request logs (every LLM model at once, so cross-model rules — the leave-one-
model-out transfer, the recommendation's scores, the interval's pool — are exercised):

1. :func:`request_level_study` on the data as it is: calibrations of every protocol, every run replayed
   with every request-calibrated model (and the step-trained specs given), replay.csv's rows, the
   recommended model per run, the widened intervals;
2. for each run X with ground truth: the same on a copy of the data root with X's ``ground_truth`` file
   deleted, and per X:

   * ``rows_identical`` — X's ``out_of_sample`` rows (step model, metric, predicted, fitted_on) and interval
     bounds, bit for bit;
   * ``candidates_added_by_truth`` — step models out of sample for X only while X's truth is present
     (must be empty; a ``train`` run's truth legitimately turns the run-roles model *in* sample);
   * ``scores_identical`` — each common candidate's recommendation score (and how many replays made it);
   * ``recommended_same`` — the recommended model, wherever X's out-of-sample candidates are the same.

Calibrations are cached by content (:class:`~stepml_core.calibration.protocols.CalibrationCache`) and replays
memoized by content (run table, context, spec), so each X recomputes only what X's truth fed: the folds
that calibrated on X and the replays of their models.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from stepml_core import pipeline
from stepml_core.calibration import protocols as cp
from stepml_core.replay import specs as rm
from stepml_core.runs.folders import GROUND_TRUTH_FILES, read_run_metadata
from stepml_core.runs.request_log import has_request_log, read_request_log

ROW_KEYS = ("step_model", "metric", "predicted", "fitted_on", "sample")
INTERVAL_KEYS = (
    "step_model",
    "metric",
    "predicted",
    "boot_lo",
    "boot_hi",
    "lo",
    "hi",
    "extrap_q_pct",
    "extrap_n",
    "brun_lo",
    "brun_hi",
    "brun_step_pct",
    "brun_runs",
)


@dataclass
class ReplayMemo:
    """Replays of one (run content, context, spec) computed once: the replay is a pure function of them."""

    values: dict = field(default_factory=dict)
    computed: int = 0
    reused: int = 0

    def replay(self, log, ctx, spec: dict, *, source: str, stands_for: str | None, seed: int) -> dict:
        key = _digest(log.table, ctx, spec, source, stands_for, seed)
        if key in self.values:
            self.reused += 1
        else:
            self.computed += 1
            self.values[key] = rm.replay_run(log, ctx, [spec], source=source, stands_for=stands_for, seed=seed)
        return self.values[key]


def _digest(table: pl.DataFrame, ctx, spec: dict, *extra) -> str:
    h = hashlib.sha256()
    h.update(table.sort("index").hash_rows(seed=0).to_numpy().tobytes())
    h.update(repr(ctx).encode())
    h.update(json.dumps(spec, sort_keys=True, default=str).encode())
    h.update(repr(extra).encode())
    return h.hexdigest()


def request_level_study(
    data_root: Path,
    out_dir: Path,
    *,
    cache_dir: Path,
    memo: ReplayMemo,
    step_specs: list[dict] = (),
    seed: int = 0,
    **calibrate_kw,
) -> dict:
    """The request level of `stepml run` over the run folders under data_root that have a request log: the
    calibrations (request_calibration), each run replayed with its specs (the calibrated ones and `step_specs`;
    not the physics, in sample on every reference run), and replay_fidelity's tables (replay.csv with
    ``recommended``, the widened intervals). ``calibrate_kw`` goes to calibrate() (e.g. n_boot, refine_evals)."""
    data_root = Path(data_root)
    folders = {f.name: f for f in sorted(data_root.iterdir()) if f.is_dir() and has_request_log(f)}
    logs = {e: read_request_log(f) for e, f in folders.items()}
    stored = {e: pipeline.log_as_stored(log) for e, log in logs.items()}
    metas = {e: read_run_metadata(f, data_root=data_root) for e, f in folders.items()}
    infos, load = pipeline.calibration_inputs(metas, stored)
    cal = cp.study_calibration(
        infos, load, seed=seed, cache=cp.CalibrationCache(cache_dir, prune=False), **calibrate_kw
    )
    specs = [*cal["specs"], *step_specs]
    replays = {}
    for e, log in logs.items():
        meta = metas[e]
        ctx = pipeline.replay_context(e, meta, log.header)
        parts = [
            memo.replay(log, ctx, s, source=meta.source, stands_for=meta.stands_for, seed=seed)
            for s in rm.specs_for_run(specs, e, meta.model, meta.stands_for)
        ]
        replays[e] = pipeline.replay_value(rm.merge_replays(parts), meta, log)
    fid = pipeline.replay_fidelity(replays, stored, sorted(replays), out_dir)
    return {**fid, "calibration": cal}


def _rows_of(fid: dict, run: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    rows = fid["replay"].filter((pl.col("experiment_id") == run) & (pl.col("sample") == "out_of_sample"))
    ivs = fid["intervals"].filter(pl.col("experiment_id") == run)
    return rows.select(ROW_KEYS).sort("step_model", "metric"), ivs.select(INTERVAL_KEYS).sort("step_model", "metric")


def _recommended(fid: dict, run: str) -> str | None:
    r = fid["replay"].filter((pl.col("experiment_id") == run) & pl.col("recommended"))
    return r["step_model"][0] if r.height else None


def compare_without_truth(before: dict, after: dict, run: str) -> dict:
    """One audit row: what moved for `run` between the study with its ground truth (before) and without (after)."""
    rb, ib = _rows_of(before, run)
    ra, ia = _rows_of(after, run)
    cb, ca = set(rb["step_model"]), set(ra["step_model"])
    common = sorted(cb & ca)
    same_rows = rb.filter(pl.col("step_model").is_in(common)).equals(ra.filter(pl.col("step_model").is_in(common)))
    same_iv = ib.filter(pl.col("step_model").is_in(common)).equals(ia.filter(pl.col("step_model").is_in(common)))
    rec_b, rec_a = _recommended(before, run), _recommended(after, run)
    sc = [
        f["candidate_scores"]
        .filter((pl.col("experiment_id") == run) & pl.col("step_model").is_in(common))
        .sort("step_model")
        for f in (before, after)
    ]
    return {
        "run": run,
        "out_of_sample_models": ",".join(sorted(cb)),
        "rows_identical": bool(same_rows and same_iv),
        "candidates_added_by_truth": ",".join(sorted(cb - ca)),
        "candidates_added_without_truth": ",".join(sorted(ca - cb)),
        "scores_identical": sc[0].equals(sc[1]),
        "recommended_with_truth": rec_b,
        "recommended_without_truth": rec_a,
        "recommended_same": rec_b == rec_a if cb == ca else None,
    }


def copy_without_truth(data_root: Path, dest: Path, run: str) -> Path:
    """A copy of data_root's request-level files (no traces) with `run`'s ground_truth file(s) deleted."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(data_root, dest, ignore=shutil.ignore_patterns("traces.json*"), symlinks=False)
    for name in GROUND_TRUTH_FILES:
        (dest / run / name).unlink(missing_ok=True)
    return dest


def audit(
    data_root: Path, work_dir: Path, *, runs: list[str] | None = None, progress=None, **study_kw
) -> tuple[pl.DataFrame, dict]:
    """Per run with ground truth (or `runs`): compare_without_truth of the study with and without it. Returns the
    audit table and the study as it is (request_level_study's value). ``study_kw`` go to request_level_study."""
    work_dir = Path(work_dir)
    memo = study_kw.pop("memo", None) or ReplayMemo()
    cache = work_dir / "calibration-cache"
    base = request_level_study(data_root, work_dir / "out", cache_dir=cache, memo=memo, **study_kw)
    scored = sorted(r["experiment_id"] for r in base["runs"].iter_rows(named=True) if r["ground_truth"])
    out = []
    for k, run in enumerate(runs or scored):
        root = copy_without_truth(Path(data_root), work_dir / "without-truth", run)
        after = request_level_study(root, work_dir / "out-without", cache_dir=cache, memo=memo, **study_kw)
        out.append(compare_without_truth(base, after, run))
        if progress:
            progress(k + 1, len(runs or scored), run)
    return pl.DataFrame(out), base
