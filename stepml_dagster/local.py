"""Local execution: the one orchestrator of `stepml run` and `stepml backfill` (stepml_dagster/cli.py only parses
arguments and maps outcomes to exit codes).

run_study registers a partition per run folder on the study's own instance and runs the four jobs of
definitions.py in order, in-process: experiment_job per partition (in worker processes when asked),
models_job, replay_job per partition with a current request log, study_job. backfill re-runs chosen
partitions the same way. Errors of StepML's own family (stepml_core.errors) are raised, never exited on.

Jobs are passed as JobDefinition objects (PhaseJobs, resolved once from the definitions) and the keys
checked against the partitions definition; a job crosses into a worker process by name only.

Why a run per partition in local.py's own worker processes rather than Dagster's facilities, measured
(`python benchmarks/bench_orchestration.py --order DCAB`: 16 synthetic runs, scale 0.05, seed 0; one
process; 2 cores shared with other engineers at load average 7-17, so ratios only; README, Speed and scale):
* a single-run backfill (experiment_job over the partition range in one run, what BackfillPolicy.single_run
  launches) does not run: an asset body reads one partition (context.partition_key) and the IO manager
  stores one value per run; it failed in 24 s on the first asset. Making it run means a loop over
  partitions in every partitioned asset, and one bad run folder then fails every partition of the range
  (no per-partition failure isolation, by Dagster's design). The most it could save is the in-run
  overhead of the per-partition runs it replaces: Σ (run wall − Σ step durations) = 28.9 s over the
  16 experiment runs (of 372 s of run wall).
* Dagster's daemon (sensors, the queued run coordinator at 2 runs, the default run launcher: a process
  per run; what `stepml ui` runs) keeps the isolation but was slower: partitions 332 s against 245 s
  (1.36x), the same models_job 186 s against 158 s (1.18x: the load), replays 14 of 16 in 307 s against
  16 in 115 s, a sensor tick and a run launch (26-28 s) between phases; not done after 900 s where
  `stepml run --workers 2` took 672 s; peak RSS 2.08 against 1.71 GB.
* `--workers 1` (the same per-partition runs in one process, no hand-rolled workers): 569 s against 672 s
  (0.85x; 0.96x in an earlier run at load 6), 196 against 285 CPU-s, peak RSS 1.14 against 1.71 GB, the
  same metrics.csv and verdict.json. With the cores taken by others the workers buy nothing here; they
  stay the default for a machine whose cores are free (not measured today), and --workers 1 suits a
  shared one.
A fresh worker every PARTITIONS_PER_WORKER partitions keeps the peak memory of a full-size study down
(see _run_partitions).
"""

# long module: the local runner's phases, worker pool and its supervision share one run's state (which partitions are
# done, which worker died)

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import NamedTuple

import dagster as dg

from stepml_core import pipeline
from stepml_core.errors import NoUsableRunsError, StepMLError, UsageError
from stepml_core.progress import PhaseClock, make_progress
from stepml_core.runs.folders import RUN_FOLDER_CONTENTS, find_trace_file

from .workers import start_worker_server

PARTITIONS_PER_WORKER = 4  # `stepml run --workers N`: partitions a worker process runs before it is replaced


def _run_config(verbose: bool = False) -> dict:
    """Dagster's console log: its step-failure tracebacks with --verbose only (errors are one line otherwise)."""
    return {"loggers": {"console": {"config": {"log_level": "WARNING" if verbose else "CRITICAL"}}}}


def run_error(res) -> str | None:
    """The user's error of a failed in-process run, one line: the innermost cause of its first step failure."""
    if res.success:
        return None
    for ev in res.all_events:
        if ev.is_step_failure and ev.event_specific_data is not None and getattr(ev.event_specific_data, "error", None):
            e = ev.event_specific_data.error
            while getattr(e, "cause", None) is not None:  # the user error under Dagster's wrapper
                e = e.cause
            msg = " ".join(line.strip() for line in e.message.strip().splitlines()) or e.cls_name
            head, sep, rest = msg.partition(": ")
            if sep and head.rsplit(".", 1)[-1] == e.cls_name and e.cls_name in _stepml_error_names():
                msg = rest  # our own errors need no class name: their message names file and problem
            return msg
    return "failed (no step error recorded; --verbose shows Dagster's log)"


def _stepml_error_names() -> set[str]:
    todo, names = [StepMLError], set()
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


class PhaseJobs(NamedTuple):
    """The four phase jobs (jobs.JOBS, in run order), resolved once from the definitions."""

    experiment: dg.JobDefinition
    models: dg.JobDefinition
    replay: dg.JobDefinition
    study: dg.JobDefinition

    @classmethod
    def of(cls, defs: dg.Definitions) -> PhaseJobs:
        from .jobs import JOBS

        return cls(*(defs.resolve_job_def(name) for name in JOBS))


def _materialize_partition(
    job: dg.JobDefinition, instance, key: str, selection: list | None = None, verbose: bool = False
) -> tuple[str, bool, float, str | None]:
    from .health import run_tags

    t = time.perf_counter()
    res = job.execute_in_process(
        partition_key=key,
        instance=instance,
        raise_on_error=False,
        run_config=_run_config(verbose),
        asset_selection=selection,
        tags=run_tags(),
    )  # who runs it: a dead worker's run is found and failed
    return key, res.success, time.perf_counter() - t, run_error(res)


def _partition_worker(data_dir: str, out_dir: str, seed: int, job_name: str, verbose: bool, key: str):
    """One partition of a partitioned job in a worker process (same DAGSTER_HOME instance, in-process executor).
    The job crosses the process boundary by name (a JobDefinition does not pickle) and is resolved here."""
    from .definitions import build_definitions
    from .resources import StepMLSettings

    defs = build_definitions(StepMLSettings(data_dir=data_dir, out_dir=out_dir, seed=seed))
    try:
        return _materialize_partition(defs.resolve_job_def(job_name), dg.DagsterInstance.get(), key, verbose=verbose)
    finally:
        release_freed_memory()


def _run_partitions(
    job: dg.JobDefinition,
    instance,
    settings,
    keys: list[str],
    workers: int,
    *,
    label: str,
    quiet: bool = False,
    verbose: bool = False,
    prefit_last: bool = False,
):
    """Materialize a partitioned job for each key (in `workers` processes when > 1); returns (failed keys, errors).
    Progress: a bar on a terminal, one line per partition otherwise; a failure is one line with its error."""
    import io

    failed, errors = [], {}
    with make_progress(len(keys), label, stream=io.StringIO() if quiet else None) as progress:

        def finished(key: str, ok: bool, secs: float, err: str | None) -> None:
            if ok:
                progress.advance(f"{key}: ok ({secs:.1f} s)")
                return
            failed.append(key)
            errors[key] = err
            took = f" ({secs:.1f} s)" if secs == secs else ""  # NaN: its worker died, no time measured
            progress.advance(f"{key}: FAILED{took}: {err}", persist=True)

        if workers == 1 or len(keys) < 2:
            for i, key in enumerate(keys, 1):
                if prefit_last and i == len(keys) and find_trace_file(Path(settings.data_dir) / key):
                    # fit the study's pooled folds while its models and scores run
                    key, ok, secs, err = _materialize_with_prefit(job, instance, key, settings, verbose)
                else:
                    key, ok, secs, err = _materialize_partition(job, instance, key, verbose=verbose)
                release_freed_memory()
                finished(key, ok, secs, err)
            return failed, errors
        from .health import mark_abandoned_runs
        from .workers import run_in_workers

        # a fresh worker every PARTITIONS_PER_WORKER partitions: a long-lived worker's RSS creeps up (allocators keep
        # freed pages: 4 GB after 24 partitions at 3x the study, 1.4-2.7 GB over its first six), which sets the peak at
        # scale. A worker that dies (OOM killer) fails its partition; the others go on (stepml_dagster/workers.py).
        def died(key, pid, msg):  # its Dagster run stays STARTED otherwise, and study_sensor would wait for it forever
            mark_abandoned_runs(instance, pid=pid, why=f"{key}: {msg}")

        common = (settings.data_dir, settings.out_dir, settings.seed, job.name, verbose)
        for key, res, death in run_in_workers(
            _partition_worker,
            common,
            largest_first(settings.data_dir, keys),
            min(workers, len(keys)),
            PARTITIONS_PER_WORKER,
            died,
        ):
            finished(*(res if death is None else (key, False, float("nan"), death)))
        # every worker has exited (and its memory is back) before the next phase starts
    return failed, errors


def largest_first(data_dir: str | Path, keys: list[str]) -> list[str]:
    """The partition keys, the biggest run folder first (bytes of its files; equal sizes keep their order). A
    partition's time grows with its run's traces and requests, so with several workers the long ones start first and
    a phase does not end with one worker on a big partition while the other idles (longest processing time first:
    the replays of the 16 synthetic runs take 1-3x one another)."""

    def folder_bytes(key: str) -> int:
        import os

        total = 0
        for top, _, files in os.walk(Path(data_dir) / key):  # symlinked folders are not entered (no cycles)
            for name in files:
                try:
                    total += os.stat(os.path.join(top, name)).st_size
                except OSError:
                    pass
        return total

    size = {k: folder_bytes(k) for k in keys}
    return sorted(keys, key=lambda k: -size[k])


FEATURE_ASSETS = [
    "raw_traces",
    "trace_steps",
    "trace_snapshots",
    "trace_journey",
    "trace_quarantine",
    "trace_spans",  # one step
    "step_table",
    "quarantine",
    "request_context",
    "feature_matrix",
    "split",  # one step (experiment_features)
]  # what pooled folds read: the partition's first run is raw_traces and experiment_features


def _materialize_with_prefit(
    job: dg.JobDefinition, instance, key: str, settings, verbose: bool = False
) -> tuple[str, bool, float, str | None]:
    """One partition in two in-process runs (its feature assets, then the rest) with the study's pooled
    folds fitted in between, in a thread, into the fold cache: the study job then finds them fitted.
    Same assets materialized once each; the cache is content-keyed, so the study's result is the same.
    A failed pre-fit costs only time (pooled_models fits whatever is missing) but is never silent: its error
    is an engine event (ERROR) of the partition's second run, and a warning line on stderr."""
    import threading

    first = [k for k in job.asset_layer.executable_asset_keys if k.to_user_string() in FEATURE_ASSETS]
    rest = [k for k in job.asset_layer.executable_asset_keys if k.to_user_string() not in FEATURE_ASSETS]
    key, ok, secs1, err = _materialize_partition(job, instance, key, first, verbose=verbose)
    if not ok:
        return key, ok, secs1, err
    registered = job.partitions_def.get_partition_keys(dynamic_partitions_store=instance)
    prefit_error: list[BaseException] = []

    def prefit() -> None:
        try:
            prefit_pooled_folds(settings, registered)
        except Exception as e:  # noqa: BLE001 - recorded below, after the join: never swallowed
            prefit_error.append(e)

    thread = threading.Thread(target=prefit, name="prefit-pooled-folds", daemon=True)
    thread.start()
    key, ok, secs2, err = _materialize_partition(job, instance, key, rest, verbose=verbose)
    thread.join()
    if prefit_error:
        report_prefit_failure(instance, job.name, key, prefit_error[0])
    return key, ok, secs1 + secs2, err


def report_prefit_failure(instance, job_name: str, key: str, error: BaseException) -> str:
    """The pre-fit's error as an ERROR engine event of the partition's latest run of `job_name` (what the UI shows in
    that run's log) and a line on stderr. Returns the message."""
    from dagster._core.events import EngineEventData  # not re-exported; the error makes the event an ERROR
    from dagster._utils.error import serializable_error_info_from_exc_info

    from .health import PARTITION_TAG

    msg = (
        f"pre-fit of the study's pooled folds failed ({type(error).__name__}: {error}); "
        "pooled_models fits them in the models phase instead"
    )
    runs = instance.get_runs(dg.RunsFilter(job_name=job_name, tags={PARTITION_TAG: key}), limit=1)
    if runs:
        error_info = serializable_error_info_from_exc_info((type(error), error, error.__traceback__))
        instance.report_engine_event(msg, runs[0], EngineEventData(error=error_info))
    print(f"{key}: warning: {msg}", file=sys.stderr, flush=True)
    return msg


def prefit_pooled_folds(settings, keys: list[str]) -> None:
    """Fill the fold cache from the stored feature matrices and splits: what pooled_models will read."""
    from stepml_core.study import h1 as study

    from .assets import pooled_matrices
    from .io_manager import stored_assets

    if not settings.reuse_fits:
        return
    io = stored_assets(settings)
    matrices = pooled_matrices(
        settings, io.stored_partitions("feature_matrix", keys), io.stored_partitions("split", keys)
    )
    study.fit_study_pooled(
        matrices, seed=settings.seed, threads=settings.fit_threads, caches=settings.fold_caches(), score=False
    )


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


def no_run_folders_message(root: Path, rejected: list[tuple[Path, str]]) -> str:
    """One line: the folder, and what a run folder must be (the --verbose run lists the ignored entries)."""
    where = f"{root}: no such folder" if not root.is_dir() else f"no run folders in {root}"
    ignored = f" ({len(rejected)} other entr{'y' if len(rejected) == 1 else 'ies'} ignored)" if rejected else ""
    return (
        f"{where}{ignored}: a run folder is named YYYYMMDD-HHMMSS-<model>-tp<N>-<workload> and holds "
        f"{RUN_FOLDER_CONTENTS} (`stepml run --synth` writes 16 synthetic runs there)"
    )


def _stored_elsewhere(settings, names: list[str], failed: list[str]) -> bool:
    """Another run of this data folder has stored results: the study must run again, so that its report
    lists the failed runs instead of showing their earlier results as current (issue 11)."""
    from .io_manager import stored_assets

    others = [n for n in names if n not in set(failed)]
    return bool(others) and len(stored_assets(settings).stored_partitions("run_summary", others)) > 0


def _say(quiet: bool):
    def say(msg: str, err: bool = True) -> None:  # diagnostics and progress on stderr, the result line on stdout
        if not quiet:
            print(msg, file=sys.stderr if err else sys.stdout, flush=True)

    return say


def _choose_runs(
    data_dir: Path,
    experiments: list[str] | None,
    *,
    synth_if_empty: bool,
    seed: int,
    scale: float,
    quiet: bool,
    verbose: bool,
    say,
    clock: PhaseClock | None = None,
) -> tuple[Path, list[Path], list, list[str], dict[str, str]]:
    """(data root, run folders, rejected entries, chosen keys, {refused key: why}). Nothing is written before run
    folders are found: with none, synth_if_empty synthesizes the 16 runs into data_dir, otherwise UsageError; a
    chosen run whose metadata has problems is refused (NoUsableRunsError when every one is)."""
    from stepml_core.runs.folders import discover_run_folders, resolve_data_root, run_folder_problems

    root = resolve_data_root(data_dir)
    folders, rejected = discover_run_folders(root)
    if not folders and synth_if_empty:
        say(
            f"No run folders in {root}: synthesizing the 16 runs modelled on the H100 study (scale {scale}, seed {seed}) ..."
        )
        with (clock or PhaseClock()).phase("synth"):
            synthesize(root, None, scale=scale, seed=seed, quiet=quiet)
        folders, rejected = discover_run_folders(root)
    if not folders:
        if verbose:
            for path, why in rejected:
                say(f"ignored {path.name}: {why}")
        raise UsageError(no_run_folders_message(root, rejected))
    for path, why in rejected:
        say(f"skipped {path.name}: {why}")
    keys = [f.name for f in folders]
    if experiments:
        keys = [k for k in keys if k in set(experiments)]
    if not keys:
        raise UsageError(f"none of the chosen experiments is a run folder in {root}")
    refused = {
        k: "; ".join(x.rstrip(".") for x in p) for k in keys if (p := run_folder_problems(root / k, data_root=root))
    }
    for key, why in refused.items():
        say(f"{key}: not run: {why}")
    if len(refused) == len(keys):
        raise NoUsableRunsError(
            f"no usable run in {root}: all {len(keys)} run folder(s) have problems (one line each above); nothing was run"
        )
    return root, folders, rejected, keys, refused


def _study_chain(
    jobs: PhaseJobs,
    instance,
    settings,
    done: list[str],
    workers: int,
    *,
    quiet: bool,
    verbose: bool,
    say,
    clock: PhaseClock | None = None,
) -> tuple[list[str], dict[str, str], bool, str | None]:
    """The study after the partitions: models_job, then replay_job for each run in `done` with a stored request
    log (a run that failed just now keeps an older stored log, not replayed) and for each other run whose stored
    replay was made with other step models than apply to it now (the models changed: its old replay would not be
    current), then study_job. Returns (failed replays, their errors, study ok, study error)."""
    from .io_manager import stored_assets

    clock = clock or PhaseClock()
    with clock.phase("models"):
        res_models = jobs.models.execute_in_process(
            instance=instance, raise_on_error=False, run_config=_run_config(verbose)
        )
    if not res_models.success:
        say(f"models: FAILED: {run_error(res_models)}")
    io = stored_assets(settings)
    with_logs = sorted(
        set(io.stored_partitions("request_log", done)) | set(_replays_behind_models(io, jobs, instance, done))
    )
    failed, errors = [], {}
    if res_models.success and with_logs:
        with clock.phase("replay"):
            failed, errors = _run_partitions(
                jobs.replay, instance, settings, with_logs, workers, label="replay", quiet=quiet, verbose=verbose
            )
    release_freed_memory()
    with clock.phase("study"):
        res = jobs.study.execute_in_process(instance=instance, raise_on_error=False, run_config=_run_config(verbose))
    return failed, errors, res.success and res_models.success, run_error(res_models) or run_error(res)


def _replays_behind_models(io, jobs: PhaseJobs, instance, done: list[str]) -> list[str]:
    """Runs not in `done` whose stored replay was made with other step models than the stored replay_models give them
    now (pipeline.stale_replay_reason); their request logs are as stored."""
    specs = io.stored_value("replay_models")
    if specs is None:
        return []
    keys = [
        k for k in jobs.experiment.partitions_def.get_partition_keys(dynamic_partitions_store=instance) if k not in done
    ]
    replays, logs = io.stored_partitions("replay", keys), io.stored_partitions("request_log", keys)
    return [e for e in replays if e in logs and pipeline.models_behind_reason(e, replays[e], specs)]


def _study_jobs(instance, settings, folder_names: list[str], todo: list[str]) -> PhaseJobs:
    """The study's phase jobs, after marking runs a killed `stepml run` left STARTED as abandoned and syncing the
    instance's experiment partitions to the run folders (every key in `todo` is then a partition)."""
    from .definitions import build_definitions
    from .health import mark_abandoned_runs
    from .instance import sync_partitions

    mark_abandoned_runs(instance)
    sync_partitions(instance, folder_names)
    jobs = PhaseJobs.of(build_definitions(settings))
    registered = set(jobs.experiment.partitions_def.get_partition_keys(dynamic_partitions_store=instance))
    assert set(todo) <= registered, "every chosen run folder is an experiment partition (sync_partitions)"
    return jobs


def _partition_phase(
    jobs: PhaseJobs,
    instance,
    settings,
    folder_names,
    todo,
    refused: dict,
    workers: int,
    *,
    quiet: bool,
    verbose: bool,
    clock: PhaseClock | None = None,
) -> tuple[list[str], dict]:
    """experiment_job over the `todo` partitions (`workers` at once, the pooled-fold prefit last).
    Returns (failed keys, {key: error}), the refused runs first; NoUsableRunsError when no run is usable, here or
    stored from an earlier run."""
    failed, errors = list(refused), dict(refused)
    with (clock or PhaseClock()).phase("runs"):
        f, e = _run_partitions(
            jobs.experiment,
            instance,
            settings,
            todo,
            workers,
            label="runs",
            quiet=quiet,
            verbose=verbose,
            prefit_last=True,
        )
    failed += f
    errors.update(e)
    n = len(todo) + len(refused)
    if len(failed) == n and not _stored_elsewhere(settings, folder_names, failed):
        raise NoUsableRunsError(
            f"no usable run in {settings.data_dir}: all {n} run(s) failed (one line each above); no study was run"
        )
    return failed, errors


def _result_line(study_ok: bool, study_err, n_ok: int, n: int, t0: float, out_dir) -> str:
    return (
        f"study: {'ok' if study_ok else 'FAILED: ' + str(study_err)}; {n_ok} of {n} "
        f"experiment(s) in {time.perf_counter() - t0:.1f} s; outputs in {out_dir}"
    )


def run_study(
    data_dir: Path,
    out_dir: Path,
    *,
    synth_if_empty: bool = True,
    seed: int = 0,
    scale: float = 1.0,
    quiet: bool = False,
    experiments: list[str] | None = None,
    workers: int | None = None,
    verbose: bool = False,
) -> dict:
    """Register partitions for the run folders under data_dir and materialize everything.

    Nothing is written before run folders are found (_choose_runs). Each partition runs with Dagster's
    in-process executor; with workers > 1, independent partitions run in that many processes at once
    (default: the number of cores, at most 2 — more only adds memory on this kind of machine). The
    study chain (_study_chain) runs in-process last, unless no run succeeded (NoUsableRunsError).
    The instance is the study's own (<out_dir>/dagster_home unless DAGSTER_HOME is set, see instance.py),
    its partitions exactly the run folders of data_dir.
    """
    from .instance import study_instance_env
    from .outlock import out_dir_lock
    from .resources import StepMLSettings

    say = _say(quiet)
    clock = PhaseClock()
    if (workers or 1) > 1:
        start_worker_server()  # its imports overlap the synthesis or the scan of the run folders
    root, folders, rejected, keys, refused = _choose_runs(
        data_dir,
        experiments,
        synth_if_empty=synth_if_empty,
        seed=seed,
        scale=scale,
        quiet=quiet,
        verbose=verbose,
        say=say,
        clock=clock,
    )
    todo = [k for k in keys if k not in refused]
    # one stepml run per output folder, taken once the runs are known (nothing written before): a second one fails at once
    with out_dir_lock(Path(out_dir)), study_instance_env(out_dir) as home:
        say(f"Dagster instance: {home}")
        instance = dg.DagsterInstance.get()
        settings = StepMLSettings(data_dir=str(root), out_dir=str(out_dir), seed=seed)
        names = [f.name for f in folders]
        jobs = _study_jobs(instance, settings, names, todo)
        t0 = time.perf_counter()
        workers = max(1, min(workers or 1, len(todo)))
        failed, errors = _partition_phase(
            jobs, instance, settings, names, todo, refused, workers, quiet=quiet, verbose=verbose, clock=clock
        )
        release_freed_memory()
        r_failed, r_errors, study_ok, study_err = _study_chain(
            jobs,
            instance,
            settings,
            [k for k in todo if k not in set(failed)],
            workers,
            quiet=quiet,
            verbose=verbose,
            say=say,
            clock=clock,
        )
        failed += [k for k in r_failed if k not in failed]
        errors.update({k: v for k, v in r_errors.items() if k not in errors})
        say(_result_line(study_ok, study_err, len(keys) - len(failed), len(keys), t0, out_dir), err=False)
        say(clock.summary())
    return {
        "experiments": keys,
        "failed": failed,
        "errors": errors,
        "skipped": {str(p.name): why for p, why in rejected},
        "study_ok": study_ok,
        "study_error": study_err,
        "out_dir": str(out_dir),
        "dagster_home": str(home),
        "phases": dict(clock.phases),
    }


def synthesize(out_dir: Path, runs: list[str] | None, *, scale: float, seed: int, quiet: bool = False) -> list[Path]:
    """Synthesized run folders under out_dir (created), with a progress bar on a terminal, one line per run otherwise."""
    import io

    from stepml_core.synth import resolve_run_ids, synthesize_runs

    n = len(resolve_run_ids(runs))  # unknown ids fail here, before any folder is created
    with make_progress(n, "synth", stream=io.StringIO() if quiet else None) as progress:
        return synthesize_runs(Path(out_dir), runs, scale=scale, seed=seed, progress=progress)


# ------------------------------------------------------------------------- backfill


class BackfillError(UsageError):
    """Bad selection (unknown or invalid experiment ids); raised before anything runs."""


def select_experiments(data_dir: Path, experiments: list[str] | None, *, all_: bool) -> tuple[Path, list[str] | None]:
    """(data root, experiment ids or None for all). Ids must name run folders found in the data root."""
    from stepml_core.runs.folders import discover_run_folders, resolve_data_root

    root = resolve_data_root(Path(data_dir))
    found = sorted(f.name for f in discover_run_folders(root)[0])
    if all_ == bool(experiments):
        raise BackfillError("give --experiment ID (repeatable) or --all")
    if not found:
        raise BackfillError(no_run_folders_message(root, []))
    if all_:
        return root, None
    unknown = [e for e in experiments if e not in found]  # an id is only ever compared, never made a path
    if unknown:
        raise BackfillError(
            f"not a run folder in {root}: {', '.join(map(repr, unknown))}; available: {', '.join(found)}"
        )
    return root, list(dict.fromkeys(experiments))


def backfill(
    data_dir: Path,
    out_dir: Path,
    experiments: list[str] | None = None,
    *,
    all_: bool = False,
    quiet: bool = False,
    seed: int = 0,
    verbose: bool = False,
) -> dict:

    root, chosen = select_experiments(data_dir, experiments, all_=all_)
    return run_study(
        root, Path(out_dir), synth_if_empty=False, quiet=quiet, seed=seed, experiments=chosen, verbose=verbose
    )
