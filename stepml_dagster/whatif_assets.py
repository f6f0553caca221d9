"""The what-if asset: capacity sweeps with the study's calibrated models, configured from the launchpad."""

import os

import dagster as dg

from stepml_core import pipeline
from stepml_core.progress import make_progress

from .resources import StepMLSettings


class WhatIfConfig(dg.Config):
    """Run config of the whatif asset (the launchpad's form): every field has a default."""

    models: list[str] = []  # LLM models (catalogue keys); empty: every model with an exportable model
    rates: list[float] = []  # offered rates to sweep (req/s); empty: the profile's stage rates
    max_num_seqs: list[int] = []  # empty: each model's run's own
    max_num_batched_tokens: list[int] = []
    tps: list[int] = []  # tensor-parallel degrees; empty: each model's run's own (others: stepml_core.whatif.tp)
    slo: str = ""  # e.g. "ttft_p99<2s,e2e_p99<30s"
    seed: int = 0
    duration_s: float = 0.0  # seconds of load per point; 0: the profile's longest stage


@dg.asset(
    group_name="whatif",
    description="What if: each LLM model's calibrated model (the one `stepml export` ships) replayed over a sweep of "
    "rate × max_num_seqs × max_num_batched_tokens (× TP, carried through the architecture) for its runs' profile, with intervals from its parameter draws; "
    "the saturation rate and the largest rate meeting an SLO. Files under <out>/whatif/<model>/.",
)
def whatif(
    context: dg.AssetExecutionContext,
    config: WhatIfConfig,
    settings: StepMLSettings,
    replay_fidelity,
    replay_models,
    request_calibration,
    request_log,
) -> dict:
    value = pipeline.whatif(
        replay_fidelity,
        replay_models,
        request_calibration,
        request_log,
        settings.data_root(),
        settings.out_dir_path(),
        models=config.models or None,
        rates=config.rates or None,
        max_num_seqs=config.max_num_seqs or None,
        max_num_batched_tokens=config.max_num_batched_tokens or None,
        tps=config.tps or None,
        slo=config.slo or None,
        seed=config.seed,
        duration_s=config.duration_s or None,
        workers=min(2, os.cpu_count() or 1),
        progress_factory=make_progress,
    )
    context.add_output_metadata(
        {
            "points": value["table"]
            .select("model", "tp", "rate_rps", "max_num_seqs", "max_num_batched_tokens")
            .n_unique()
            if value["table"].height
            else 0,
            "summary": dg.MetadataValue.json(value["summary"]),
        }
    )
    return value


@dg.asset(
    group_name="replay",
    description="What if, checked against the recorded runs (opt-in: `stepml run --whatif-check` or "
    "STEPML_WHATIF_CHECK=1): each run predicted from its profile alone with its leave-one-workload-out model, scored "
    "against its clients, per load stage for `general` runs, and the predicted saturation rate against whether it "
    "saturated; the report's section.",
)
def whatif_check(
    context: dg.AssetExecutionContext, settings: StepMLSettings, request_log, replay_models, replay_fidelity
) -> dict:
    from stepml_core.whatif.check import check_section

    if not settings.whatif_check:
        note = "not run in this study (opt-in: `stepml run --whatif-check`, or `python benchmarks/whatif_check.py --study OUT`)"
        return {"table": None, "saturation": None, "lines": check_section(None, None, set(), {}, note)}
    with make_progress(len(request_log), "whatif check") as bar:
        value = pipeline.whatif_check(
            request_log,
            replay_models,
            replay_fidelity,
            settings.data_root(),
            seed=settings.seed,
            workers=settings.fit_threads,
            progress=bar,
        )
    context.add_output_metadata({"runs": value["saturation"].height, "dagster/row_count": value["table"].height})
    return value


WHATIF_ASSETS = [whatif]
