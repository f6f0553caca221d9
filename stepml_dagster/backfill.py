"""`stepml backfill`: re-materialize chosen experiment partitions and then the study, in-process.

The same machinery as `stepml run` (run_study): partitions are registered if new, each chosen
partition's experiment_job runs in-process against the DAGSTER_HOME instance, then study_job.
Other partitions are not touched; the study assets read their stored values.
"""

from __future__ import annotations

from pathlib import Path

from stepml_core.errors import UsageError


class BackfillError(UsageError):
    """Bad selection (unknown or invalid experiment ids); raised before anything runs."""


def select_experiments(data_dir: Path, experiments: list[str] | None, *, all_: bool) -> tuple[Path, list[str] | None]:
    """(data root, experiment ids or None for all). Ids must name run folders found in the data root."""
    from stepml_core.runs import discover_run_folders, resolve_data_root

    root = resolve_data_root(Path(data_dir))
    found = sorted(f.name for f in discover_run_folders(root)[0])
    if all_ == bool(experiments):
        raise BackfillError("give --experiment ID (repeatable) or --all")
    if not found:
        from .cli import no_run_folders_message
        raise BackfillError(no_run_folders_message(root, []))
    if all_:
        return root, None
    unknown = [e for e in experiments if e not in found]  # an id is only ever compared, never made a path
    if unknown:
        raise BackfillError(f"not a run folder in {root}: {', '.join(map(repr, unknown))}; "
                            f"available: {', '.join(found)}")
    return root, list(dict.fromkeys(experiments))


def backfill(data_dir: Path, out_dir: Path, experiments: list[str] | None = None, *, all_: bool = False,
             quiet: bool = False, seed: int = 0, verbose: bool = False) -> dict:
    from .cli import run_study

    root, chosen = select_experiments(data_dir, experiments, all_=all_)
    return run_study(root, Path(out_dir), synth_if_empty=False, quiet=quiet, seed=seed, experiments=chosen,
                     verbose=verbose)
