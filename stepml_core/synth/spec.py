"""What a synthetic run stands for: the real run's figures from data/reference/runs.csv.

Everything the synthesizer needs about a run comes from the project's own files
(data/reference/runs.csv, data/synth/*.json|csv, data/catalog/*.json); synthesis never
reads ../shared.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache

from stepml_core.catalog import ModelSpec, canonical_model_name, model_spec
from stepml_core.paths import DATA_DIR, REFERENCE_DIR
from stepml_core.runs.folders import RunIdError, parse_run_id

SYNTH_DATA_DIR = DATA_DIR / "synth"
SYNTH_SUFFIX = "-synth"


def synthetic_id(real_id: str) -> str:
    """`<real id>-synth`: same date/time, model slug, TP and workload; never equal to a real id."""
    return real_id if real_id.endswith(SYNTH_SUFFIX) else real_id + SYNTH_SUFFIX


def real_id_of(run_id: str) -> str:
    return run_id[: -len(SYNTH_SUFFIX)] if run_id.endswith(SYNTH_SUFFIX) else run_id


@dataclass(frozen=True)
class RunSpec:
    """One real run's public figures (what the synthetic run is modelled on)."""

    real_id: str
    model_slug: str  # as in the run id (e.g. llama-2-70b-hf)
    model: str  # catalogue key
    tp: int
    workload: str
    stage_rates: tuple[float, ...]
    stage_durations: tuple[float, ...]
    system_prompt_len: int
    question_len: int
    output_len: int
    num_groups: int
    prompts_per_group: int
    num_requests_sent: int
    num_success: int
    num_failed: int
    num_sampled_steps: int
    ttft_mean_s: float
    e2e_mean_s: float
    throughput_requests_per_s: float
    throughput_output_tokens_per_s: float
    prompt_len_mean: float
    output_len_mean: float
    decode_interval_ms: float
    started_at: datetime

    @property
    def synth_id(self) -> str:
        return synthetic_id(self.real_id)

    @property
    def arch(self) -> ModelSpec:
        return model_spec(self.model)

    @property
    def duration_s(self) -> float:
        return float(sum(self.stage_durations))


def _f(x: str) -> float:
    return float(x) if x not in ("", None) else float("nan")


@lru_cache(maxsize=None)
def reference_runs() -> dict[str, RunSpec]:
    """All runs of data/reference/runs.csv by real id (in file order)."""
    out: dict[str, RunSpec] = {}
    with open(REFERENCE_DIR / "runs.csv", newline="") as f:
        for r in csv.DictReader(f):
            rid = parse_run_id(r["experiment_id"])
            out[r["experiment_id"]] = RunSpec(
                real_id=r["experiment_id"],
                model_slug=rid.model_slug,
                model=canonical_model_name(rid.model_slug),
                tp=int(r["tp"]),
                workload=r["workload"],
                stage_rates=tuple(float(x) for x in r["stage_rates_rps"].split(";")),
                stage_durations=tuple(float(x) for x in r["stage_durations_s"].split(";")),
                system_prompt_len=int(r["system_prompt_len"]),
                question_len=int(r["question_len"]),
                output_len=int(r["output_len"]),
                num_groups=int(r["num_groups_resolved"]),
                prompts_per_group=int(r["num_prompts_per_group_resolved"]),
                num_requests_sent=int(r["num_requests_sent"]),
                num_success=int(r["num_success"]),
                num_failed=int(r["num_failed"]),
                num_sampled_steps=int(r["num_sampled_steps"]),
                ttft_mean_s=_f(r["ttft_mean_s"]),
                e2e_mean_s=_f(r["e2e_mean_s"]),
                throughput_requests_per_s=_f(r["throughput_requests_per_s"]),
                throughput_output_tokens_per_s=_f(r["throughput_output_tokens_per_s"]),
                prompt_len_mean=_f(r["prompt_len_mean"]),
                output_len_mean=_f(r["output_len_mean"]),
                decode_interval_ms=_f(r["derived_decode_interval_per_token_ms"]),
                started_at=rid.started_at.replace(tzinfo=timezone.utc),
            )
    return out


def resolve_run_ids(run_ids: list[str] | None) -> list[RunSpec]:
    """Real ids or their synthetic ids -> RunSpecs (None = all 16). Unknown ids raise RunIdError."""
    runs = reference_runs()
    if run_ids is None:
        return list(runs.values())
    out, seen = [], set()
    for rid in run_ids:
        real = real_id_of(str(rid).strip())
        if real not in runs:
            raise RunIdError(
                f"run id {rid!r} is not one of the {len(runs)} reference runs in data/reference/runs.csv "
                f"(nor its '{SYNTH_SUFFIX}' id); known: {', '.join(runs)}"
            )
        if real not in seen:
            seen.add(real)
            out.append(runs[real])
    return out


@lru_cache(maxsize=None)
def client_token_counts() -> dict[str, dict[str, float]]:
    """Transcribed client-side prompt/output token-count quantiles per real run."""
    with open(SYNTH_DATA_DIR / "client_token_counts.csv", newline="") as f:
        return {
            r["experiment_id"]: {k: float(v) for k, v in r.items() if k != "experiment_id"} for r in csv.DictReader(f)
        }


@lru_cache(maxsize=None)
def engine_params() -> dict:
    return json.loads((SYNTH_DATA_DIR / "engine_params.json").read_text())


@lru_cache(maxsize=None)
def schedule_time_model() -> dict:
    p = SYNTH_DATA_DIR / "schedule_time_model.json"
    return json.loads(p.read_text()) if p.is_file() else {}


QUANTILE_KEYS = ("min", "p0.1", "p1", "p5", "p10", "p25", "median", "p75", "p90", "p95", "p99", "p99.9", "max")
QUANTILE_PROBS = (0.0, 0.001, 0.01, 0.05, 0.10, 0.25, 0.50, 0.75, 0.90, 0.95, 0.99, 0.999, 1.0)


def check_run_id(run_id: str) -> None:
    try:
        parse_run_id(run_id)
    except RunIdError:
        raise


# Version of the synthesizer's model (bump when outputs for a given seed change on purpose).
SYNTH_VERSION = "1.0.0"
