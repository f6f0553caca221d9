"""`stepml` command line: run the study in-process, synthesize runs, backfill partitions, open the UI.
Arguments only: the execution is stepml_dagster/local.py (run_study, backfill, synthesize).

  stepml run   [--data DIR] [--out DIR] [--synth]   materialize every experiment partition + the study (no UI)
  stepml synth --out DIR [--runs ID ...] [--scale F] [--seed N]
  stepml backfill [--data DIR] [--out DIR] (--experiment ID ... | --all)
                                          re-materialize those partitions, then the study assets
  stepml ui    [--data DIR] [--out DIR] [--port N]  Dagster UI + daemon on the study's instance
  stepml real-data [--shared DIR] [--out DIR]       assemble the 16 real runs from ../shared into run folders
  stepml export --format blis|stepml [--study OUT] --out DIR
                                          the recommended step-time model per LLM model (stepml_dagster/export_cli.py)
  stepml whatif --model M --rates 2,4,8,16 [--study OUT] --out DIR [--slo 'ttft_p99<2s'] ...
                                          capacity sweep with the calibrated model (stepml_dagster/whatif_cli.py)

Library code raises StepMLError (stepml_core.errors) and never exits; main() alone maps outcomes to
exit codes: 0 done; 1 the study ran but a run or the study failed; 2 refused before anything ran
(usage, no run folders, no usable run). Errors print one line; --verbose adds the tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from stepml_core.errors import StepMLError
from stepml_core.paths import DEFAULT_EXPERIMENTS_DIR, PROJECT_ROOT
from stepml_core.runs.folders import RUN_FOLDER_CONTENTS

from .local import backfill, run_study, synthesize


def _is_default(path: Path | None, default: Path) -> bool:
    return path is None or Path(path).resolve() == default.resolve()


def build_parser() -> argparse.ArgumentParser:
    """The `stepml` parser: one sub-command per verb, each sharing --verbose."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", help="tracebacks and Dagster's log with errors (default: one line each)"
    )
    ap = argparse.ArgumentParser(
        prog="stepml",
        description="StepML: step-time models of LLM serving engines from vLLM traces.",
        epilog="Exit codes: 0 done; 1 the study ran but a run or the study failed; "
        "2 refused before anything ran (nothing written).",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_run(sub, common)
    _add_synth(sub, common)
    _add_backfill(sub, common)
    _add_ui(sub, common)
    _add_real_data(sub, common)
    from . import export_cli  # `stepml export` (its own module)

    export_cli.add_parser(sub, parents=[common])
    from . import whatif_cli  # `stepml whatif` (its own module)

    whatif_cli.add_parser(sub, parents=[common])
    return ap


def _add_run(sub, common) -> None:
    r = sub.add_parser(
        "run",
        parents=[common],
        help="materialize the whole study in-process (no UI)",
        description="Materialize every run folder of --data as an experiment partition, then the study, "
        "in-process; outputs in --out, the Dagster instance in --out/dagster_home (unless "
        "DAGSTER_HOME is set). When the data folder has no run folders: the project's default "
        "folder (data/experiments) gets the 16 synthetic runs; any other folder is refused with "
        f"exit code 2 and nothing written, unless --synth is given. A run folder holds "
        f"{RUN_FOLDER_CONTENTS}.",
    )
    r.add_argument("--data", type=Path, default=None, help="folder of run folders (default: data/experiments)")
    r.add_argument(
        "--out",
        type=Path,
        default=PROJECT_ROOT / "out",
        help="where report.md, metrics.csv, verdict.json go (default: out/)",
    )
    r.add_argument(
        "--synth",
        action="store_true",
        help="if --data has no run folders, synthesize the 16 runs into it (creating it)",
    )
    r.add_argument("--no-synth", action="store_true", help="never synthesize, not even into the default data folder")
    r.add_argument("--scale", type=float, default=1.0, help="duration fraction when synthesizing (default 1.0)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument(
        "--piecewise-decode",
        action="store_true",
        help="also calibrate the piecewise decode form (a bend in the per-decoder cost; BLIS step_time_regimes) "
        "and replay it beside the linear one; same as STEPML_PIECEWISE_DECODE=1 (docs/calibration.md)",
    )
    r.add_argument(
        "--load-delay",
        action="store_true",
        help="calibrate with the load-delay stage (a client-visible delay per request in a token's step, fitted on "
        "the calibration runs; StepML's replay only, BLIS's file cannot carry it); same as STEPML_LOAD_DELAY=1 "
        "(docs/calibration.md)",
    )
    r.add_argument(
        "--blis",
        nargs="?",
        const="auto",
        default=None,
        metavar="PATH",
        help="also write each run's BLIS trace and command under OUT/blis and run them in BLIS (PATH, else "
        "../shared/tools/blis/blis, else `blis` on PATH); the report compares BLIS with StepML's replay; same as "
        "STEPML_BLIS=auto|PATH",
    )
    r.add_argument(
        "--whatif-check",
        action="store_true",
        help="also predict every run from its profile alone with its leave-one-workload-out model and score it "
        "(report section; same as STEPML_WHATIF_CHECK=1; docs/whatif.md)",
    )
    r.add_argument(
        "--two-path",
        nargs="?",
        const="1",
        default=None,
        metavar="STEPS",
        help="also replay every run with two paths, cycle = max(GPU path, CPU path learned from the other runs' "
        "test-split schedule() times in STEPS, default ../shared/real/xgboost_round1_test_predictions.csv.gz) "
        "(report section; same as STEPML_TWO_PATH=1|STEPS; docs/cpu_path.md)",
    )
    r.add_argument("--experiment", action="append", help="only these experiment ids (repeatable)")
    r.add_argument(
        "--workers", type=int, default=None, help="partitions processed in parallel (default: min(2, cores))"
    )


def _add_synth(sub, common) -> None:
    s = sub.add_parser("synth", parents=[common], help="synthesize run folders modelled on the 16 H100 runs")
    s.add_argument(
        "--out", type=Path, default=DEFAULT_EXPERIMENTS_DIR, help="where the run folders go (default: data/experiments)"
    )
    s.add_argument("--runs", nargs="*", default=None, help="real run ids (or their -synth ids); default all 16")
    s.add_argument("--scale", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)


def _add_backfill(sub, common) -> None:
    b = sub.add_parser(
        "backfill", parents=[common], help="re-materialize chosen experiment partitions, then the study (in-process)"
    )
    b.add_argument(
        "--data", type=Path, default=DEFAULT_EXPERIMENTS_DIR, help="folder of run folders (default: data/experiments)"
    )
    b.add_argument("--out", type=Path, default=PROJECT_ROOT / "out", help="output folder (default: out/)")
    b.add_argument("--experiment", action="append", help="experiment (run folder) id; repeatable")
    b.add_argument("--all", action="store_true", help="every run folder in --data")
    b.add_argument("--seed", type=int, default=0)


def _add_ui(sub, common) -> None:
    u = sub.add_parser(
        "ui",
        parents=[common],
        help="Dagster UI + daemon (dg dev) on the instance of `stepml run` with the same --out",
        description="Start `dg dev` (webserver and daemon, on 127.0.0.1) on the study's instance "
        "(--out/dagster_home unless DAGSTER_HOME is set), serving --data → --out: the UI lists "
        "that study's runs only. Give the same --data/--out as to `stepml run`.",
    )
    u.add_argument(
        "--data", type=Path, default=DEFAULT_EXPERIMENTS_DIR, help="folder of run folders (default: data/experiments)"
    )
    u.add_argument("--out", type=Path, default=PROJECT_ROOT / "out", help="output folder (default: out/)")
    u.add_argument("--port", type=int, default=3000)


def _add_real_data(sub, common) -> None:
    rd = sub.add_parser(
        "real-data",
        parents=[common],
        help="assemble the 16 real runs (request logs, metadata, step traces) from ../shared into run folders",
    )
    rd.add_argument(
        "--shared", type=Path, default=PROJECT_ROOT.parent / "shared", help="the shared folder (default: ../shared)"
    )
    rd.add_argument(
        "--out", type=Path, default=PROJECT_ROOT / "data" / "real", help="where the run folders go (default: data/real)"
    )
    rd.add_argument("--runs", nargs="*", default=None, help="only these run ids (default: all)")


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return _dispatch(a)
    except StepMLError as e:
        if a.verbose:
            import traceback

            traceback.print_exc()
        print(f"stepml {a.cmd}: {e}", file=sys.stderr, flush=True)
        return 2


def _dispatch(a) -> int:
    if a.cmd == "export":
        from . import export_cli

        return export_cli.run(a)
    if a.cmd == "whatif":
        from . import whatif_cli

        return whatif_cli.run(a)
    if a.cmd == "real-data":
        from stepml_core.runs.real_data import assemble_real_runs

        folders = assemble_real_runs(a.shared, a.out, a.runs)
        print(
            f"wrote {len(folders)} real run folder(s) under {a.out}; run the study on them with: stepml run --data {a.out}"
        )
        return 0
    if a.cmd == "backfill":
        res = backfill(a.data, a.out, a.experiment, all_=a.all, seed=a.seed, verbose=a.verbose)
        return 0 if res["study_ok"] and not res["failed"] else 1
    if a.cmd == "run":
        if a.blis:  # read by the blis_round_trip asset (stepml_core.replay.blis_trace.study_blis)
            os.environ["STEPML_BLIS"] = a.blis
        if a.whatif_check:  # read by StepMLSettings.whatif_check
            os.environ["STEPML_WHATIF_CHECK"] = "1"
        if a.two_path:  # read by StepMLSettings.two_path_steps_file
            os.environ["STEPML_TWO_PATH"] = a.two_path
        if a.piecewise_decode:  # read by StepMLSettings.piecewise_decode, here and in the partition workers
            os.environ["STEPML_PIECEWISE_DECODE"] = "1"
        if a.load_delay:  # read by StepMLSettings.load_delay, here and in the partition workers
            os.environ["STEPML_LOAD_DELAY"] = "1"
        synth = not a.no_synth and (a.synth or _is_default(a.data, DEFAULT_EXPERIMENTS_DIR))
        res = run_study(
            a.data or DEFAULT_EXPERIMENTS_DIR,
            a.out,
            synth_if_empty=synth,
            seed=a.seed,
            scale=a.scale,
            experiments=a.experiment,
            verbose=a.verbose,
            workers=a.workers if a.workers is not None else min(2, os.cpu_count() or 1),
        )
        ui = (
            "stepml ui"
            + ("" if _is_default(a.data, DEFAULT_EXPERIMENTS_DIR) else f" --data {a.data}")
            + ("" if _is_default(a.out, PROJECT_ROOT / "out") else f" --out {a.out}")
        )
        print(f"browse this study's runs in the Dagster UI: {ui}", flush=True)
        return 0 if res["study_ok"] and not res["failed"] else 1
    if a.cmd == "synth":
        paths = synthesize(a.out, a.runs, scale=a.scale, seed=a.seed)
        print(f"wrote {len(paths)} run folder(s) under {a.out}")
        return 0
    if a.cmd == "ui":
        from .instance import prune_partitions, ui_command

        argv, env = ui_command(a.data, a.out, port=a.port)
        prune_partitions(Path(env["DAGSTER_HOME"]), Path(env["STEPML_DATA_DIR"]))
        print(
            f"Dagster instance: {env['DAGSTER_HOME']}; data: {env['STEPML_DATA_DIR']}; outputs: {env['STEPML_OUT_DIR']}\n"
            f"UI on http://127.0.0.1:{a.port} ({' '.join(argv)})",
            flush=True,
        )
        os.execve(argv[0], argv, env)
    return 2


if __name__ == "__main__":
    sys.exit(main())
