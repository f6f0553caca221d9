"""The StepML study called directly on stepml_core, without Dagster: the in-process baseline.

The same functions the assets call (stepml_core.pipeline, one per asset, in the assets' order),
each timed under the asset's name, so bench_study.py can put the Dagster step durations next to
the bare compute of the same work. Nothing is written except the report files of the study phase
(into out_dir).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

from stepml_core import pipeline
from stepml_core.study import h1 as study
from stepml_core.tables.ingest import ingest_run


class Timer(dict):
    @contextmanager
    def __call__(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - t


def bare_partition(folder: Path, data_root: Path, seed: int = 0) -> tuple[dict, dict]:
    """One experiment: the partitioned assets' work. Returns ({asset: value}, {asset: seconds})."""
    from stepml_core.runs.limits import InputLimits

    t = Timer()
    limits = InputLimits.from_env()  # what the settings resource gives the assets when none of its fields is set
    with t("raw_traces"):
        raw = ingest_run(Path(folder), Path(data_root), limits=limits)
        meta = raw["meta"]
    with t("step_tables"):
        tables = pipeline.step_tables(
            meta, raw["steps"], raw["quarantine"], max_quarantine_rows=limits.max_quarantine_rows
        )
        steps = tables.steps
    with t("request_context"):
        ctx = pipeline.request_context(meta, raw["steps"], raw["journey"], raw["snapshots"])
    with t("feature_matrix"):
        fm = pipeline.feature_matrix(meta, steps, ctx, raw["snapshots"])
    with t("split"):
        sp = pipeline.split(meta, steps)
    with t("fitted_models"):
        fitted = study.fit_experiment(study.with_split(fm, sp))
    with t("predictions"):
        pred = study.predict_experiment(study.with_split(fm, sp), fitted)
    with t("metrics"):
        met = study.metrics_from_predictions(pred)
    with t("run_summary"):
        summary = pipeline.run_summary(meta, steps, tables.quarantine, fm)
    with t("ablation"):
        abl = study.feature_group_ablation(study.with_split(fm, sp))
    with t("e2e_fidelity"):
        e2e = pipeline.e2e_fidelity(meta, raw["journey"], ctx, fitted)
    with t("method_checks"):
        checks = pipeline.method_checks(study.with_split(fm, sp), fitted, steps, seed=seed)
    with t("request_log"):
        log = pipeline.request_log(Path(folder))
    # what the study phase reads (the stored values of these assets)
    keep = {
        "feature_matrix": fm,
        "split": sp,
        "metrics": met,
        "predictions": pred,
        "run_summary": summary,
        "ablation": abl,
        "agreement": ctx["agreement"],
        "e2e_fidelity": e2e,
        "step_table": steps,
        "method_checks": checks,
        "fitted_models": fitted,
        "request_log": log,
    }
    return keep, dict(t)


def bare_partition_worker(folder: str, data_root: str, seed: int = 0) -> tuple[str, dict, dict]:
    import os
    import resource

    keep, times = bare_partition(Path(folder), Path(data_root), seed)
    times["_pid"] = os.getpid()
    times["_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return Path(folder).name, keep, times


def bare_models(
    parts: dict[str, dict],
    data_root: Path,
    seed: int = 0,
    real_reference_dir: str = "",
    threads: int = min(2, os.cpu_count() or 1),
) -> tuple[dict, dict]:
    """The models phase (models_job): pooled folds (no fold cache: the cold cost), calibration, the calibration from
    request logs (no cache either), replay models."""
    from stepml_core.synth.against_real import synthetic_vs_real_tables

    t = Timer()
    present = sorted(parts)
    mats = {e: study.with_split(parts[e]["feature_matrix"], parts[e]["split"]) for e in present}
    with t("pooled_models"):  # global_models + generalization, one pool of folds
        pooled = study.fit_study_pooled(mats, seed=seed, threads=threads)
    with t("synthetic_vs_real"):
        cal = synthetic_vs_real_tables(
            [parts[e]["run_summary"] for e in present],
            {e: parts[e]["step_table"] for e in present},
            Path(data_root),
            Path(real_reference_dir) if real_reference_dir else None,
        )
    with t("request_calibration"):
        logs = {e: parts[e]["request_log"] for e in sorted(parts) if parts[e].get("request_log") is not None}
        calibrated = pipeline.request_calibration(logs, Path(data_root), seed=seed, workers=threads)
    with t("replay_models"):
        specs = pipeline.replay_models(
            {e: parts[e]["fitted_models"] for e in present},
            {e: parts[e]["run_summary"] for e in present},
            present,
            calibrated["specs"],
        )
    return {**pooled, "synthetic_vs_real": cal, "request_calibration": calibrated, "replay_models": specs}, dict(t)


def bare_replay(
    folder: Path, data_root: Path, stored_log: dict, specs: list, out_dir: Path, seed: int = 0
) -> tuple[dict, float]:
    """One partition of the replay phase (replay_job): (value, seconds)."""
    t = time.perf_counter()
    value, _ = pipeline.replay(
        Path(folder).name, stored_log, specs, data_root=Path(data_root), out_dir=str(out_dir), seed=seed
    )
    return value, time.perf_counter() - t


def bare_replay_worker(folder: str, data_root: str, stored_log: dict, specs: list, out_dir: str, seed: int = 0):
    value, secs = bare_replay(Path(folder), Path(data_root), stored_log, specs, Path(out_dir), seed)
    return Path(folder).name, value, secs


def bare_report(
    parts: dict[str, dict], models: dict, replays: dict[str, dict], out_dir: Path, seed: int = 0
) -> tuple[dict, dict]:
    """The report phase (study_job): replay_fidelity, calibration_fidelity, then study_report (pipeline.assemble_study)."""
    from stepml_core.replay.scores_text import replay_section, replay_summary

    t = Timer()
    present = sorted(parts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with t("replay_fidelity"):
        logs = {e: parts[e]["request_log"] for e in present if parts[e].get("request_log") is not None}
        fid = pipeline.replay_fidelity(replays, logs, sorted(replays), str(out_dir))
        fid = {k: v for k, v in fid.items() if k != "replay_csv"}
    with t("calibration_fidelity"):
        cal_fid = pipeline.calibration_fidelity(
            models["request_calibration"], fid, {e: parts[e]["step_table"] for e in present}, out_dir
        )
    with t("study_report"):
        col = lambda name: {e: parts[e][name] for e in present}  # noqa: E731
        tables = pipeline.StudyTables(
            metrics=col("metrics"),
            predictions=col("predictions"),
            run_summary=col("run_summary"),
            ablation=col("ablation"),
            agreements=col("agreement"),
            e2e_fidelity=col("e2e_fidelity"),
            method_checks=col("method_checks"),
            global_models=models["global_models"],
            generalization=models["generalization"],
            synthetic_vs_real=models["synthetic_vs_real"],
        )
        additions = pipeline.ReportAdditions(
            sections=tuple(replay_section(fid, str(out_dir)) + list(cal_fid["lines"])),
            summary_lines=tuple(replay_summary(fid)),
        )
        verdict = pipeline.assemble_study(present, tables, out_dir=str(out_dir), seed=seed, additions=additions)[
            "verdict"
        ]
    return {"verdict": verdict}, dict(t)


def bare_study(
    parts: dict[str, dict],
    data_root: Path,
    out_dir: Path,
    seed: int = 0,
    real_reference_dir: str = "",
    threads: int = min(2, os.cpu_count() or 1),
) -> tuple[dict, dict]:
    """The three study phases in-process over {experiment: bare_partition values}: models, replays, report."""
    models, times = bare_models(parts, data_root, seed, real_reference_dir, threads)
    replays, t_replay = {}, 0.0
    for e in sorted(parts):
        if parts[e].get("request_log") is not None:
            replays[e], secs = bare_replay(
                Path(data_root) / e, data_root, parts[e]["request_log"], models["replay_models"], Path(out_dir), seed
            )
            t_replay += secs
    out, t_report = bare_report(parts, models, replays, out_dir, seed)
    return out, {**times, "replay": t_replay, **t_report}
