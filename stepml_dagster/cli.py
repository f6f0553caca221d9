"""`stepml` command line: run the study in-process, synthesize runs, backfill partitions.

  stepml run   [--data DIR] [--out DIR]   materialize every experiment partition + the study (no UI)
  stepml synth --out DIR [--runs ID ...] [--scale F] [--seed N]
  stepml backfill [--data DIR] [--out DIR] (--experiment ID ... | --all)
                                          re-materialize those partitions, then the study assets
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from stepml_core.paths import DEFAULT_EXPERIMENTS_DIR, PROJECT_ROOT
from stepml_core.runs import find_trace_file


QUIET_LOGS = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
PARTITIONS_PER_WORKER = 4  # `stepml run --workers N`: partitions a worker process runs before it is replaced


def _ensure_dagster_home() -> Path:
    """DAGSTER_HOME (default: .dagster_home in the project), with a dagster.yaml if it has none."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(PROJECT_ROOT / ".dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text("# StepML default: embedded SQLite storage under DAGSTER_HOME\ntelemetry:\n  enabled: false\n")
    return home


def _materialize_partition(defs, instance, key: str, selection: list | None = None,
                           job: str = "experiment_job") -> tuple[str, bool, float, str | None]:
    from .health import run_tags

    t = time.perf_counter()
    res = defs.resolve_job_def(job).execute_in_process(partition_key=key, instance=instance, raise_on_error=False,
                                                       run_config=QUIET_LOGS, asset_selection=selection, tags=run_tags())
    err = None
    if not res.success:
        for ev in res.all_events:
            if ev.is_failure and ev.event_specific_data is not None and getattr(ev.event_specific_data, "error", None):
                e = ev.event_specific_data.error
                while getattr(e, "cause", None) is not None:  # the user error under Dagster's wrapper
                    e = e.cause
                err = e.message.strip().splitlines()[-1]
    return key, res.success, time.perf_counter() - t, err


def _partition_worker(data_dir: str, out_dir: str, seed: int, job: str, key: str):
    """One partition of a partitioned job in a worker process (same DAGSTER_HOME instance, in-process executor)."""
    import dagster as dg

    from .definitions import build_definitions
    from .resources import StepMLSettings

    defs = build_definitions(StepMLSettings(data_dir=data_dir, out_dir=out_dir, seed=seed))
    try:
        return _materialize_partition(defs, dg.DagsterInstance.get(), key, job=job)
    finally:
        release_freed_memory()


def _run_partitions(defs, instance, settings, keys: list[str], job: str, workers: int, say, *, prefit_last: bool = False):
    """Materialize a partitioned job for each key (in `workers` processes when > 1); returns (failed keys, errors)."""
    failed, errors = [], {}
    if workers == 1 or len(keys) < 2:
        for i, key in enumerate(keys, 1):
            if prefit_last and i == len(keys) and find_trace_file(Path(settings.data_dir) / key):
                # fit the study's pooled folds while its models and scores run
                key, ok, secs, err = _materialize_with_prefit(defs, instance, key, settings)
            else:
                key, ok, secs, err = _materialize_partition(defs, instance, key, job=job)
            release_freed_memory()
            say(f"[{i}/{len(keys)}] {job} {key}: {'ok' if ok else 'FAILED'} ({secs:.1f} s)" + (f"\n   {err}" if err else ""))
            if not ok:
                failed.append(key)
                errors[key] = err
        return failed, errors
    from .health import mark_abandoned_runs
    from .workers import run_in_workers

    # a fresh worker every PARTITIONS_PER_WORKER partitions: a long-lived worker's RSS creeps up (allocators keep
    # freed pages: 4 GB after 24 partitions at 3x the study, 1.4-2.7 GB over its first six), which sets the peak at
    # scale. A worker that dies (OOM killer) fails its partition; the others go on (stepml_dagster/workers.py).
    def died(key, pid, msg):  # its Dagster run stays STARTED otherwise, and study_sensor would wait for it forever
        mark_abandoned_runs(instance, pid=pid, why=f"{key}: {msg}")

    common = (settings.data_dir, settings.out_dir, settings.seed, job)
    for i, (key, res, death) in enumerate(run_in_workers(_partition_worker, common, keys, min(workers, len(keys)),
                                                         PARTITIONS_PER_WORKER, died), 1):
        key, ok, secs, err = res if death is None else (key, False, float("nan"), death)
        say(f"[{i}/{len(keys)}] {job} {key}: {'ok' if ok else 'FAILED'} ({secs:.1f} s)" + (f"\n   {err}" if err else ""))
        if not ok:
            failed.append(key)
            errors[key] = err
    # every worker has exited (and its memory is back) before the next phase starts
    return failed, errors


FEATURE_ASSETS = ["raw_traces", "step_table", "quarantine", "request_context", "feature_matrix", "split"]  # what pooled folds read


def _materialize_with_prefit(defs, instance, key: str, settings) -> tuple[str, bool, float, str | None]:
    """One partition in two in-process runs (its feature assets, then the rest) with the study's pooled
    folds fitted in between, in a thread, into the fold cache: the study job then finds them fitted.
    Same assets materialized once each; the cache is content-keyed, so the study's result is the same."""
    import threading

    part = defs.resolve_job_def("experiment_job")
    first = [k for k in part.asset_layer.executable_asset_keys if k.to_user_string() in FEATURE_ASSETS]
    rest = [k for k in part.asset_layer.executable_asset_keys if k.to_user_string() not in FEATURE_ASSETS]
    key, ok, secs1, err = _materialize_partition(defs, instance, key, first)
    if not ok:
        return key, ok, secs1, err
    prefit = threading.Thread(target=prefit_pooled_folds, args=(settings, instance.get_dynamic_partitions("experiment")), daemon=True)
    prefit.start()
    key, ok, secs2, err = _materialize_partition(defs, instance, key, rest)
    prefit.join()
    return key, ok, secs1 + secs2, err


def prefit_pooled_folds(settings, keys: list[str]) -> None:
    """Fill the fold cache from the stored feature matrices and splits: what pooled_models will read."""
    from stepml_core import study

    from .assets import pooled_matrices
    from .io_manager import ParquetIOManager

    if not settings.reuse_fits:
        return
    io = ParquetIOManager(base_dir=str(settings.assets_dir()))
    try:
        matrices = pooled_matrices(settings, io.stored_partitions("feature_matrix", keys), io.stored_partitions("split", keys))
        study.fit_study_pooled(matrices, seed=settings.seed, threads=settings.fit_threads, caches=settings.fold_caches(), score=False)
    except Exception:  # noqa: BLE001 - an optimisation only: pooled_models fits whatever is missing
        pass


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS between partitions (glibc malloc_trim; no-op elsewhere).

    numpy's large temporaries leave the heap fragmented: a worker kept 2.7 GB after four big
    partitions, 1.7 GB with a trim after each (peak 2.78 → 2.37 GB).
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _holding_out_dir_lock(fn):
    """Run fn holding the lock on its out_dir (outlock.py): a second stepml run on the same --out fails at once."""
    import functools

    @functools.wraps(fn)
    def wrapper(data_dir, out_dir, *args, **kw):
        from .outlock import out_dir_lock

        with out_dir_lock(Path(out_dir)):
            return fn(data_dir, out_dir, *args, **kw)
    return wrapper


@_holding_out_dir_lock
def run_study(data_dir: Path, out_dir: Path, *, synth_if_empty: bool = True, seed: int = 0, scale: float = 1.0,
              quiet: bool = False, experiments: list[str] | None = None, workers: int | None = None) -> dict:
    """Register partitions for the run folders under data_dir and materialize everything.

    Each partition runs with Dagster's in-process executor; with workers > 1, independent
    partitions run in that many processes at once (default: the number of cores, at most 2
    — more only adds memory on this kind of machine). The study job runs in-process last.
    """
    _ensure_dagster_home()
    import dagster as dg

    from stepml_core.runs import discover_run_folders, resolve_data_root

    from .definitions import build_definitions
    from .resources import StepMLSettings

    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    root = resolve_data_root(data_dir)
    folders, rejected = discover_run_folders(root)
    if not folders and synth_if_empty:
        say(f"No run folders in {root}: synthesizing the 16 runs modelled on the H100 study (scale {scale}, seed {seed}) ...")
        synthesize(root, None, scale=scale, seed=seed, quiet=quiet)
        folders, rejected = discover_run_folders(root)
    for path, why in rejected:
        say(f"skipped {path}: {why}")
    keys = [f.name for f in folders]
    if experiments:
        keys = [k for k in keys if k in set(experiments)]
    if not keys:
        raise SystemExit(f"stepml run: no run folders to process in {root}")
    from .health import mark_abandoned_runs

    instance = dg.DagsterInstance.get()
    mark_abandoned_runs(instance)  # runs left STARTED by an earlier stepml run that was killed
    new = [k for k in keys if not instance.has_dynamic_partition("experiment", k)]
    if new:
        instance.add_dynamic_partitions("experiment", new)
    settings = StepMLSettings(data_dir=str(root), out_dir=str(out_dir), seed=seed)
    defs = build_definitions(settings)
    t0 = time.perf_counter()
    workers = max(1, min(workers or 1, len(keys)))
    failed, errors = _run_partitions(defs, instance, settings, keys, "experiment_job", workers, say, prefit_last=True)
    release_freed_memory()
    # the study chain: study-level models, then each run's replay (reads them), then the report
    ok_models = defs.resolve_job_def("models_job").execute_in_process(instance=instance, raise_on_error=False,
                                                                      run_config=QUIET_LOGS).success
    say(f"models: {'ok' if ok_models else 'FAILED'}")
    from .io_manager import ParquetIOManager

    with_logs = sorted(ParquetIOManager(base_dir=str(settings.assets_dir())).stored_partitions("request_log", keys))
    if ok_models and with_logs:
        r_failed, r_errors = _run_partitions(defs, instance, settings, with_logs, "replay_job", workers, say)
        failed += [k for k in r_failed if k not in failed]
        errors.update({k: v for k, v in r_errors.items() if k not in errors})
    release_freed_memory()
    res = defs.resolve_job_def("study_job").execute_in_process(instance=instance, raise_on_error=False, run_config=QUIET_LOGS)
    say(f"study: {'ok' if res.success and ok_models else 'FAILED'}; {len(keys) - len(failed)} experiment(s) in "
        f"{time.perf_counter() - t0:.1f} s; outputs in {out_dir}")
    return {"experiments": keys, "failed": failed, "errors": errors, "skipped": {str(p.name): why for p, why in rejected},
            "study_ok": res.success and ok_models, "out_dir": str(out_dir)}


def synthesize(out_dir: Path, runs: list[str] | None, *, scale: float, seed: int, quiet: bool = False) -> list[Path]:
    from stepml_core.synth import synthesize_runs

    progress = None
    if not quiet:
        try:
            from stepml_core.synth import text_progress
            progress = text_progress()
        except ImportError:
            progress = None
    return synthesize_runs(Path(out_dir), runs, scale=scale, seed=seed, progress=progress)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stepml", description="StepML: step-time models of LLM serving engines from vLLM traces.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="materialize the whole study in-process (no UI)")
    r.add_argument("--data", type=Path, default=DEFAULT_EXPERIMENTS_DIR, help="folder of run folders (default: data/experiments)")
    r.add_argument("--out", type=Path, default=PROJECT_ROOT / "out", help="where report.md, metrics.csv, verdict.json go (default: out/)")
    r.add_argument("--no-synth", action="store_true", help="do not synthesize runs when the data folder has none")
    r.add_argument("--scale", type=float, default=1.0, help="duration fraction when synthesizing (default 1.0)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--experiment", action="append", help="only these experiment ids (repeatable)")
    r.add_argument("--workers", type=int, default=None, help="partitions processed in parallel (default: min(2, cores))")
    s = sub.add_parser("synth", help="synthesize run folders modelled on the 16 H100 runs")
    s.add_argument("--out", type=Path, default=DEFAULT_EXPERIMENTS_DIR)
    s.add_argument("--runs", nargs="*", default=None, help="real run ids (or their -synth ids); default all 16")
    s.add_argument("--scale", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("backfill", help="re-materialize chosen experiment partitions, then the study (in-process)")
    b.add_argument("--data", type=Path, default=DEFAULT_EXPERIMENTS_DIR, help="folder of run folders (default: data/experiments)")
    b.add_argument("--out", type=Path, default=PROJECT_ROOT / "out", help="output folder (default: out/)")
    b.add_argument("--experiment", action="append", help="experiment (run folder) id; repeatable")
    b.add_argument("--all", action="store_true", help="every run folder in --data")
    b.add_argument("--seed", type=int, default=0)
    rd = sub.add_parser("real-data", help="assemble the 16 real runs (request logs, metadata, step traces) from ../shared into run folders")
    rd.add_argument("--shared", type=Path, default=PROJECT_ROOT.parent / "shared", help="the shared folder (default: ../shared)")
    rd.add_argument("--out", type=Path, default=PROJECT_ROOT / "data" / "real", help="where the run folders go (default: data/real)")
    rd.add_argument("--runs", nargs="*", default=None, help="only these run ids (default: all)")
    a = ap.parse_args(argv)
    if a.cmd == "real-data":
        from stepml_core.real_data import assemble_real_runs

        folders = assemble_real_runs(a.shared, a.out, a.runs)
        print(f"wrote {len(folders)} real run folder(s) under {a.out}; run the study on them with: stepml run --data {a.out}")
        return 0
    if a.cmd == "backfill":
        from .backfill import backfill
        res = backfill(a.data, a.out, a.experiment, all_=a.all, seed=a.seed)
        return 0 if res["study_ok"] and not res["failed"] else 1
    if a.cmd == "run":
        res = run_study(a.data, a.out, synth_if_empty=not a.no_synth, seed=a.seed, scale=a.scale, experiments=a.experiment,
                        workers=a.workers if a.workers is not None else min(2, os.cpu_count() or 1))
        return 0 if res["study_ok"] and not res["failed"] else 1
    if a.cmd == "synth":
        paths = synthesize(a.out, a.runs, scale=a.scale, seed=a.seed)
        print(f"wrote {len(paths)} run folder(s) under {a.out}")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
