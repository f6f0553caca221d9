"""The StepML study called directly on stepml_core, without Dagster: the in-process baseline.

Each function mirrors an asset body in stepml_dagster/assets.py (same calls, same order) and
records its wall time under the asset's name, so bench_study.py can put the Dagster step
durations next to the bare compute of the same work. Nothing is written except the report
files of the study phase (into out_dir).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

import polars as pl

from stepml_core import study
from stepml_core.ingest import ingest_run
from stepml_core.splits import split_table
from stepml_core.tables import add_targets, validate_steps


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
    t = Timer()
    with t("raw_traces"):
        raw = ingest_run(Path(folder), Path(data_root))
    with t("step_tables"):
        v = validate_steps(raw["steps"], raw["meta"]["trace_file"])
        steps = add_targets(v.kept)
        quarantine = pl.concat([raw["quarantine"], v.quarantine], how="diagonal_relaxed")
    with t("request_context"):
        cfg = raw["meta"].get("exp_config") or {}
        ctx = study.request_context(raw, int(cfg.get("max_num_batched_tokens", 2048)))
    m = raw["meta"]
    with t("feature_matrix"):
        fm = study.build_feature_matrix(steps, raw["snapshots"], model=m["model"], tp=m["tp"], experiment_id=m["experiment_id"],
                                        source=m["source"], request_aggregates=study.journey_aggregates(ctx["step_inputs"]),
                                        request_source="journey")
    with t("split"):
        sp = split_table(steps, m["stage_durations_s"])
    with t("fitted_models"):
        fitted = study.fit_experiment(study.with_split(fm, sp))
    with t("predictions"):
        pred = study.predict_experiment(study.with_split(fm, sp), fitted)
    with t("metrics"):
        met = study.metrics_from_predictions(pred)
    with t("run_summary"):
        kv = dict(fm["kv_source"].value_counts().iter_rows())
        summary = {**{k: m[k] for k in ("experiment_id", "source", "stands_for", "model", "tp", "workload", "data_version", "files")},
                   "steps_read": raw["steps"].height, "steps_kept": steps.height,
                   "steps_quarantined": quarantine.filter(pl.col("kind") == "row").height,
                   "lines_quarantined": m["counters"].get("lines_quarantined", 0), "quarantine_rows": quarantine.height,
                   "kv_source": ", ".join(f"{k} {v}" for k, v in sorted(kv.items())), "kv_source_counts": kv}
    with t("ablation"):
        abl = study.feature_group_ablation(study.with_split(fm, sp))
    with t("e2e_fidelity"):
        e2e = study.e2e_fidelity_for_models(raw, ctx, fitted, model=m["model"], tp=m["tp"], experiment_id=m["experiment_id"])
    with t("method_checks"):
        from stepml_core.method_checks import method_checks
        from stepml_core.tables import cycle_rule_counts
        checks = method_checks(study.with_split(fm, sp), fitted, cycle_rule_counts(steps), seed=seed)
    # what the study phase reads (the stored values of these assets)
    keep = {"feature_matrix": fm, "split": sp, "metrics": met, "predictions": pred, "run_summary": summary, "ablation": abl,
            "agreement": ctx["agreement"], "e2e_fidelity": e2e, "step_table": steps, "method_checks": checks}
    return keep, dict(t)


def bare_partition_worker(folder: str, data_root: str, seed: int = 0) -> tuple[str, dict, dict]:
    import os
    import resource
    keep, times = bare_partition(Path(folder), Path(data_root), seed)
    times["_pid"] = os.getpid()
    times["_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return Path(folder).name, keep, times


def bare_study(parts: dict[str, dict], data_root: Path, out_dir: Path, seed: int = 0,
               real_reference_dir: str = "", threads: int = min(2, os.cpu_count() or 1)) -> tuple[dict, dict]:
    """The study assets' work over {experiment: bare_partition values}."""
    from stepml_core.findings import study_findings
    from stepml_core.method_checks import gather
    from stepml_core.report import (calibration_sections, e2e_section, feature_provenance_section, reconstruction_section,
                                    render_report, write_outputs)
    from stepml_core.synth.calibration import calibration_tables

    t = Timer()
    present = sorted(parts)
    mats = {e: study.with_split(parts[e]["feature_matrix"], parts[e]["split"]) for e in present}
    with t("pooled_models"):  # global_models + generalization, one pool of folds, no fold cache (the cold cost)
        pooled = study.fit_study_pooled(mats, seed=seed, threads=threads)
        gm, gen = pooled["global_models"], pooled["generalization"]
    with t("calibration"):
        cal = calibration_tables([parts[e]["run_summary"] for e in present], {e: parts[e]["step_table"] for e in present},
                                 Path(data_root), Path(real_reference_dir) if real_reference_dir else None)
    with t("study_report"):
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        all_metrics = pl.concat([*(parts[e]["metrics"] for e in present), gm["metrics"]], how="diagonal_relaxed")
        all_pred = pl.concat([*(parts[e]["predictions"] for e in present), gm["predictions"]], how="diagonal_relaxed")
        verdict = study.h1_verdict(all_metrics, all_pred, seed=seed)
        g = gen["metrics"]
        abl = pl.concat([parts[e]["ablation"] for e in present], how="diagonal_relaxed")
        checks = gather({e: parts[e]["method_checks"] for e in present}, present, gm["models"])
        findings = study_findings(predictions=all_pred, generalization=gen, ablation=abl, checks=checks, seed=seed)
        verdict["recommendations"] = findings["recommendations"]
        beyond = feature_provenance_section([parts[e]["run_summary"] for e in present], abl)
        beyond += reconstruction_section({e: parts[e]["agreement"] for e in present})
        e2e_parts = [parts[e]["e2e_fidelity"] for e in present]
        summ = [p["summary"] for p in e2e_parts if p["summary"].height]
        per_req = [p["per_request"] for p in e2e_parts if p["per_request"].height]
        beyond += e2e_section(pl.concat(summ, how="diagonal_relaxed") if summ else None,
                              pl.concat(per_req, how="diagonal_relaxed") if per_req else pl.DataFrame(), str(out_dir))
        beyond += calibration_sections(cal["public"], cal["steps"])
        write_outputs(str(out_dir), pl.concat([all_metrics, g], how="diagonal_relaxed") if g.height else all_metrics, verdict)
        render_report(runs=[parts[e]["run_summary"] for e in present], metrics=all_metrics, predictions=all_pred,
                      verdict=verdict, out_dir=str(out_dir), findings=findings, checks=checks, extra_sections=beyond)
    return {"verdict": verdict}, dict(t)
