"""A what-if workload from a description (an inference-perf profile or a few numbers), not from a request log.

    desc = WorkloadDescription.from_profile(profile_yaml_dict)       # or WorkloadDescription(stages=((8.0, 600.0),))
    limits = ServingLimits.of(run_context)                            # or ServingLimits("llama-2-70b", 4, ...)
    workload, ctx = whatif_workload(desc, limits, seed=0)             # replay.simulate.replay(workload, model, ctx)

The requests are drawn by the synthesizer's own workload code (:func:`stepml_core.synth.workload.build_workload`):
inference-perf ``shared_prefix`` data — groups × prompts-per-group distinct prompts, each of ``system + question +
template`` tokens ± 12 (uniform, the synthesizer's spread for a run without transcribed quantiles), a group's prompts
sharing its system prompt (+ BOS) in the prefix cache; every request one of them uniformly; ``output`` tokens
generated per request (``ignore_eos``); constant-rate stages, each a Poisson process conditioned on its
count rate × duration (sorted uniforms); the client's schedule delay and its 300–301 s limit, all seeded.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import numpy as np

from stepml_core.errors import UsageError
from stepml_core.replay.simulate import ReplayWorkload, RunContext
from stepml_core.sim.engine import SchedulerConfig

# inference-perf shared_prefix defaults (its resolved config when the profile names none: the 16 runs' 10 × 10)
DEFAULT_GROUPS = 10
DEFAULT_PROMPTS_PER_GROUP = 10
DEFAULT_MAX_NUM_SEQS = 128  # vLLM's defaults, as replay.simulate uses them
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
# requests one described workload may send (Σ rate × duration): a real run sent ≤ 16,800; 10^6 is 20 h at the real
# runs' highest rate. A typo (--rates 100000: 6·10^7 requests) is refused at once instead of simulating for hours.
MAX_REQUESTS_DEFAULT = 1_000_000


def max_requests() -> int:
    """The limit on Σ rate × duration of a described workload: $STEPML_WHATIF_MAX_REQUESTS, else 10^6."""
    v = os.environ.get("STEPML_WHATIF_MAX_REQUESTS", "").strip()
    try:
        return int(float(v)) if v else MAX_REQUESTS_DEFAULT
    except ValueError:
        raise UsageError(f"STEPML_WHATIF_MAX_REQUESTS={v!r}: not a number") from None


@dataclass(frozen=True)
class WorkloadDescription:
    """What a load generator sends: constant-rate stages ((rate req/s, duration s), ...) and the shared-prefix shape.

    ``template_tokens``: prompt tokens beyond system + question (chat template, BOS, re-tokenisation); a profile
    does not say it, the runs of a study do (:func:`template_tokens_of`)."""

    stages: tuple[tuple[float, float], ...]
    num_groups: int = DEFAULT_GROUPS
    prompts_per_group: int = DEFAULT_PROMPTS_PER_GROUP
    system_prompt_tokens: int = 100
    question_tokens: int = 447
    output_tokens: int = 248
    template_tokens: float = 0.0

    def __post_init__(self):
        if not self.stages:
            raise UsageError("a workload needs at least one load stage (rate, duration)")
        for rate, dur in self.stages:
            if not (math.isfinite(rate) and rate > 0 and math.isfinite(dur) and dur > 0):
                raise UsageError(f"load stage rate {rate} req/s for {dur} s: both must be positive numbers")
        n = sum(rate * dur for rate, dur in self.stages)
        if n > max_requests():
            stages = ", ".join(f"{rate:g} req/s for {dur:g} s" for rate, dur in self.stages)
            raise UsageError(
                f"load {stages}: {n:,.0f} requests, over the limit of {max_requests():,} (STEPML_WHATIF_MAX_REQUESTS); "
                "lower the rate or the duration (--duration-s)"
            )
        for name in ("num_groups", "prompts_per_group", "output_tokens"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.system_prompt_tokens < 0 or self.question_tokens < 1:
            raise UsageError("system prompt tokens must be ≥ 0 and question tokens ≥ 1")

    @property
    def duration_s(self) -> float:
        return float(sum(d for _, d in self.stages))

    @property
    def prompt_tokens_mean(self) -> float:
        return self.system_prompt_tokens + self.question_tokens + self.template_tokens

    def at_rate(self, rate_rps: float, duration_s: float | None = None) -> WorkloadDescription:
        """The same shape at one constant rate for ``duration_s`` (default: the longest stage)."""
        return replace(self, stages=((float(rate_rps), float(duration_s or max(d for _, d in self.stages))),))

    @classmethod
    def from_profile(cls, profile: dict, *, template_tokens: float = 0.0) -> WorkloadDescription:
        """An inference-perf profile (``profile.yaml`` or its resolved ``results/config.yaml``): ``load.stages``
        [{rate, duration}], ``data.shared_prefix`` {num_groups, num_prompts_per_group, system_prompt_len,
        question_len, output_len}. Group counts the profile does not name are inference-perf's 10 × 10 (its
        multi-turn keys ``num_unique_system_prompts``/``num_users_per_system_prompt`` are not what it resolved on
        the 16 runs)."""
        if not isinstance(profile, dict):
            raise UsageError("an inference-perf profile is a mapping with 'load' and 'data' sections")
        load = profile.get("load") or {}
        stages = tuple((float(s["rate"]), float(s["duration"])) for s in (load.get("stages") or []) if s)
        sp = (profile.get("data") or {}).get("shared_prefix") or {}
        if not stages or not sp:
            raise UsageError("the profile needs load.stages (rate, duration) and data.shared_prefix")
        try:
            return cls(
                stages=stages,
                num_groups=int(sp.get("num_groups") or DEFAULT_GROUPS),
                prompts_per_group=int(sp.get("num_prompts_per_group") or DEFAULT_PROMPTS_PER_GROUP),
                system_prompt_tokens=int(sp["system_prompt_len"]),
                question_tokens=int(sp["question_len"]),
                output_tokens=int(sp["output_len"]),
                template_tokens=float(template_tokens),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(
                f"profile data.shared_prefix: {e!r} (system_prompt_len, question_len, output_len)"
            ) from None


def template_tokens_of(prompt_tokens_mean: list[float], descriptions: list[WorkloadDescription]) -> float:
    """Mean over runs of (their mean prompt tokens − system − question): the template tokens a profile does not say."""
    d = [p - (w.system_prompt_tokens + w.question_tokens) for p, w in zip(prompt_tokens_mean, descriptions)]
    return float(np.mean(d)) if d else 0.0


@dataclass(frozen=True)
class ServingLimits:
    """The engine a what-if replays: LLM model (catalogue key), TP and vLLM's limits; KV blocks are required."""

    model: str
    tp: int
    kv_blocks_total: int
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    max_model_len: int | None = None

    @classmethod
    def of(cls, ctx: RunContext) -> ServingLimits:
        if not ctx.kv_blocks_total:
            raise UsageError(f"{ctx.experiment_id}: the run's KV-cache size (kv_blocks_total_gpu) is unknown")
        return cls(
            model=ctx.model,
            tp=int(ctx.tp),
            kv_blocks_total=int(ctx.kv_blocks_total),
            max_num_seqs=int(ctx.max_num_seqs or DEFAULT_MAX_NUM_SEQS),
            max_num_batched_tokens=int(ctx.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS),
            max_model_len=int(ctx.max_model_len) if ctx.max_model_len else None,
        )

    def with_limits(self, max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None) -> ServingLimits:
        return replace(
            self,
            max_num_seqs=int(max_num_seqs or self.max_num_seqs),
            max_num_batched_tokens=int(max_num_batched_tokens or self.max_num_batched_tokens),
        )


def _run_spec(desc: WorkloadDescription, model: str):
    """The synthesizer's RunSpec for a description: only the fields build_workload reads are figures; the observed
    ones (latencies, counts) are NaN / 0, and the id is not a reference run's (no transcribed quantiles)."""
    from stepml_core.synth.spec import RunSpec

    nan = float("nan")
    return RunSpec(
        real_id="whatif",
        model_slug=model,
        model=model,
        tp=1,
        workload="whatif",
        stage_rates=tuple(r for r, _ in desc.stages),
        stage_durations=tuple(d for _, d in desc.stages),
        system_prompt_len=int(desc.system_prompt_tokens),
        question_len=int(desc.question_tokens),
        output_len=int(desc.output_tokens),
        num_groups=int(desc.num_groups),
        prompts_per_group=int(desc.prompts_per_group),
        num_requests_sent=0,
        num_success=0,
        num_failed=0,
        num_sampled_steps=0,
        ttft_mean_s=nan,
        e2e_mean_s=nan,
        throughput_requests_per_s=nan,
        throughput_output_tokens_per_s=nan,
        prompt_len_mean=float(desc.prompt_tokens_mean),
        output_len_mean=float(desc.output_tokens),
        decode_interval_ms=nan,
        started_at=datetime(1970, 1, 1, tzinfo=timezone.utc),
    )


def whatif_workload(
    desc: WorkloadDescription, limits: ServingLimits, *, seed: int = 0, name: str = "whatif"
) -> tuple[ReplayWorkload, RunContext]:
    """(the simulator's workload, its context) for a description on an engine; same seed → same requests."""
    from stepml_core.synth.workload import build_workload

    wl = build_workload(_run_spec(desc, limits.model), 1.0, np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x3A7F]))
    order = np.argsort(wl.start_time, kind="stable")
    start = wl.start_time[order]
    arrival = start - start[0] if start.size else start
    prompt_id = wl.prompt_id[order].astype(np.int64)
    n = arrival.size
    cfg = SchedulerConfig(
        max_num_batched_tokens=int(limits.max_num_batched_tokens),
        max_num_seqs=int(limits.max_num_seqs),
        kv_blocks_total=int(limits.kv_blocks_total),
        max_model_len=limits.max_model_len,
    )
    ctx = RunContext(
        experiment_id=name,
        model=limits.model,
        tp=int(limits.tp),
        max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
        kv_blocks_total=cfg.kv_blocks_total,
        max_model_len=limits.max_model_len,
        num_groups=desc.num_groups,
        prompts_per_group=desc.prompts_per_group,
        system_prompt_len=desc.system_prompt_tokens,
        output_len=desc.output_tokens,
        ignore_eos=True,
    )
    w = ReplayWorkload(
        experiment_id=name,
        arrival_s=arrival,
        prompt_tokens=wl.prompt_lens[prompt_id].astype(np.int64),
        max_tokens=np.full(n, int(wl.max_tokens), dtype=np.int64),
        prompt_id=prompt_id,
        group=prompt_id // max(1, desc.prompts_per_group),
        nshared_blk=int(wl.shared_prefix_tokens) // 16,
        config=cfg,
        timeout_s=wl.timeout_s[order],
        index=np.arange(n, dtype=np.int64),
        assumptions={
            "workload": f"{n} requests drawn by synth.workload.build_workload (seed {seed})",
            "stages": [list(s) for s in desc.stages],
            "prompt_tokens_mean": desc.prompt_tokens_mean,
        },
    )
    return w, ctx
