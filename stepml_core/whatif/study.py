"""What a what-if takes from a study: the model to replay (the one `stepml export` ships) and the defaults of an LLM
model's runs (profile, serving limits, template tokens)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import polars as pl

from stepml_core.errors import UsageError
from stepml_core.replay.simulate import RunContext
from stepml_core.whatif.workload import ServingLimits, WorkloadDescription, template_tokens_of


@dataclass(frozen=True)
class StudyRun:
    """One run of a study as a what-if sees it: its profile (no latencies), engine, and prompt tokens (an input)."""

    experiment_id: str
    workload: str
    description: WorkloadDescription  # template_tokens 0: the profile alone
    limits: ServingLimits
    prompt_tokens_mean: float  # mean input tokens of its logged requests (> 0)
    requests: int
    filled: tuple[str, ...] = ()  # profile fields filled from its inputs (completed_profile)


def completed_profile(profile: dict, ctx: RunContext, requests: pl.DataFrame) -> tuple[dict, list[str]]:
    """The profile with what it leaves out filled from the run's inputs (never its latencies), and what was filled:
    no ``load.stages`` → one stage at the logged arrivals' mean rate over their span; no ``output_len`` → the
    context's, else the median logged output tokens; no ``system_prompt_len`` → the context's, else 0; no
    ``question_len`` → mean prompt tokens − system prompt (template tokens then 0)."""
    prof = {**profile, "load": dict(profile.get("load") or {}), "data": dict(profile.get("data") or {})}
    sp = dict(prof["data"].get("shared_prefix") or {})
    filled = []
    if not prof["load"].get("stages"):
        a = requests["arrival_time_us"].to_numpy() * 1e-6
        span = float(a.max() - a.min()) if a.size > 1 else 1.0
        prof["load"]["stages"] = [{"rate": a.size / max(span, 1e-6), "duration": max(span, 1e-6)}]
        filled.append("load.stages (logged arrivals)")
    if not sp.get("output_len"):
        out = requests["output_tokens"].to_numpy()
        sp["output_len"] = int(ctx.output_len or (np.median(out[out > 0]) if (out > 0).any() else 1))
        filled.append("output_len")
    if sp.get("system_prompt_len") is None:
        sp["system_prompt_len"] = int(ctx.system_prompt_len or 0)
        filled.append("system_prompt_len")
    if not sp.get("question_len"):
        inp = requests["input_tokens"].to_numpy()
        mean = float(inp[inp > 0].mean()) if (inp > 0).any() else 1.0
        sp["question_len"] = max(1, int(round(mean - sp["system_prompt_len"])))
        filled.append("question_len (logged prompt tokens)")
    prof["data"]["shared_prefix"] = sp
    return prof, filled


def study_run(experiment_id: str, workload: str, profile: dict, ctx: RunContext, requests: pl.DataFrame) -> StudyRun:
    """A run from its profile (``profile.yaml``; what it leaves out from :func:`completed_profile`), its replay
    context (serving limits, the resolved shared-prefix shape, which wins over the profile's) and its request
    table's input tokens."""
    prof, filled = completed_profile(profile or {}, ctx, requests)
    desc = WorkloadDescription.from_profile(prof)
    desc = replace(
        desc,
        num_groups=int(ctx.num_groups or desc.num_groups),
        prompts_per_group=int(ctx.prompts_per_group or desc.prompts_per_group),
    )
    inp = requests["input_tokens"].to_numpy()
    inp = inp[inp > 0]
    return StudyRun(
        experiment_id=experiment_id,
        workload=workload,
        description=desc,
        limits=ServingLimits.of(ctx),
        prompt_tokens_mean=float(inp.mean()) if inp.size else float("nan"),
        requests=int(requests.height),
        filled=tuple(filled),
    )


def template_tokens(runs: list[StudyRun]) -> float:
    """Template tokens (prompt tokens beyond system + question) averaged over these runs (NaN prompt means left out)."""
    ok = [
        r for r in runs if np.isfinite(r.prompt_tokens_mean) and not any(f.startswith("question_len") for f in r.filled)
    ]
    return template_tokens_of([r.prompt_tokens_mean for r in ok], [r.description for r in ok])


def model_defaults(llm: str, runs: list[StudyRun]) -> tuple[WorkloadDescription, ServingLimits, str]:
    """(profile, serving limits, the run they come from) for an LLM model: its run with the most requests (ties: the
    first id), with the template tokens of all its runs."""
    mine = sorted((r for r in runs if r.limits.model == llm), key=lambda r: (-r.requests, r.experiment_id))
    if not mine:
        raise UsageError(f"no run of {llm!r} in the study's request logs; give --profile and the serving limits")
    top = mine[0]
    return replace(top.description, template_tokens=template_tokens(mine)), top.limits, top.experiment_id


def choose_model(
    llm: str,
    replay_rows: pl.DataFrame,
    specs: list[dict],
    shipped: dict,
    llm_of: dict,
    per_llm: dict | None,
    saturated: set | None,
) -> tuple[dict, dict]:
    """(the replay spec, what was chosen) of the model `stepml export` ships for ``llm``
    (stepml_core.stepmodels.blis.choose_exports): for a request-calibrated recommendation the calibration on all
    the model's runs with ground truth (``requests_all``, with its parameter draws)."""
    from stepml_core.stepmodels.blis import choose_exports

    chosen = choose_exports(replay_rows, specs, shipped, llm_of, per_llm, saturated).get(llm)
    if chosen is None:
        known = sorted({m for m in llm_of.values() if m})
        raise UsageError(f"no exportable model for {llm!r} in the study (LLM models: {', '.join(known) or 'none'})")
    name = chosen["step_model"]
    spec = next(
        (s for s in [shipped.get(llm) or {}, *specs] if s.get("name") == name and s.get("doc") == chosen["doc"]), None
    )
    if spec is None:
        raise UsageError(f"{llm}: the chosen model {name!r} is not among the study's stored models")
    info = {k: chosen.get(k) for k in ("step_model", "recommended", "fitted_on", "protocol", "note")}
    info["draws"] = len((spec.get("bootstrap") or {}).get("rows") or [])
    return spec, info
