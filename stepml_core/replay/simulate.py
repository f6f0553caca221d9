"""Replay a run's real requests through StepML's vLLM simulator and score the latencies (docs/replay.md).

    workload = replay_workload(request_log, run_context, seed=0)
    result = replay(workload, serving_model, seed=0)           # per-request TTFT / E2E, predicted
    rows = score_replay(result.per_request, request_log.table)  # predicted vs observed, per metric

The workload is the run's own load: every request at its recorded arrival time with its prompt
length, the serving limits of the run (``max_num_seqs``, ``max_num_batched_tokens``, KV blocks),
its shared-prefix shape (for prefix caching) and the client timeout. Assumptions are recorded in
``ReplayWorkload.assumptions`` (see :func:`replay_workload`).

A serving model = a clock for the engine (physics, or a step-time model) + the request-level
delays around it: ``ingress_s`` (client send → the engine's WAITING queue) and ``token_delay_s``
(a token leaves the engine → the client sees it). Predicted TTFT = first token's step end +
token delay − arrival; E2E = last token's step end + token delay − arrival; a request without
its last token by its client's limit (:func:`stepml_core.runs.rules.client_limits_s`: 300 s rounded up to the client's
next whole second) failed, as the client decided on the observed side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from stepml_core.gc_pause import gc_paused
from stepml_core.runs.rules import CLIENT_TIMEOUT_S, client_limits_s
from stepml_core.sim.arrivals import FixedArrivals
from stepml_core.sim.engine import EngineCore, SchedulerConfig
from stepml_core.sim.request import SimRequest
from stepml_core.sim.timing import CycleClock

__all__ = ["CLIENT_TIMEOUT_S"]  # re-exported: the constant lives in stepml_core.runs.rules
REPLAY_METRICS = (
    "ttft_mean",
    "ttft_p50",
    "ttft_p90",
    "ttft_p99",
    "e2e_mean",
    "e2e_p50",
    "e2e_p90",
    "e2e_p99",
    "decode_time_per_token_mean",
    "throughput_rps",
    "successes",
)
PER_REQUEST_COLUMNS = {
    "index": pl.Int64,
    "arrival_time_us": pl.Int64,
    "ttft_s": pl.Float64,
    "e2e_s": pl.Float64,
    "success": pl.Boolean,
    "output_tokens": pl.Int64,
}


@dataclass(frozen=True)
class RunContext:
    """What a replay needs to know about the run besides its requests (from the run folder's files)."""

    experiment_id: str
    model: str  # catalogue key
    tp: int
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    kv_blocks_total: int | None = None
    max_model_len: int | None = None  # exp-config.yaml: a longer request is refused (vLLM's API server)
    num_groups: int | None = None  # shared-prefix shape (inference-perf shared_prefix, resolved config)
    prompts_per_group: int | None = None
    system_prompt_len: int | None = None
    output_len: int | None = None
    ignore_eos: bool | None = None
    sources: dict = field(default_factory=dict)  # field -> file it came from


@dataclass
class ReplayWorkload:
    experiment_id: str
    arrival_s: np.ndarray  # s from the first request
    prompt_tokens: np.ndarray
    max_tokens: np.ndarray  # tokens the server generates per request
    prompt_id: np.ndarray
    group: np.ndarray
    nshared_blk: int
    config: SchedulerConfig
    timeout_s: np.ndarray  # per request: the client's limit (s from its send), stepml_core.runs.rules.client_limits_s
    index: np.ndarray
    assumptions: dict


def _impute_prompt_tokens(inp: np.ndarray, rng: np.random.Generator, assumptions: dict) -> np.ndarray:
    """Prompt lengths ≤ 0 (errored requests) drawn from the run's other requests (one rng.choice draw)."""
    missing = inp <= 0
    if missing.any():
        pool = inp[~missing]
        inp = inp.copy()
        inp[missing] = rng.choice(pool, int(missing.sum())) if pool.size else 1
        assumptions["prompt_tokens_imputed"] = int(missing.sum())
    return inp


def _generated_tokens(out: np.ndarray, ctx: RunContext, output_tokens: str, assumptions: dict) -> np.ndarray:
    """Tokens the server generates per request: output_len for all (ignore_eos) or the client's counts, where
    a count ≤ 0 becomes the median of the positive ones (at least 1)."""
    if output_tokens == "server" and ctx.ignore_eos and ctx.output_len:
        assumptions["generated_tokens"] = f"output_len {ctx.output_len} for every request (ignore_eos)"
        return np.full(out.size, int(ctx.output_len), dtype=np.int64)
    gen = np.maximum(out, 1)
    if out.min(initial=1) <= 0:
        gen[out <= 0] = max(1, int(np.median(out[out > 0])) if (out > 0).any() else 1)
    assumptions["generated_tokens"] = "the client's output_tokens"
    return gen


def _prompt_identity(
    inp: np.ndarray, ctx: RunContext, rng: np.random.Generator, assumptions: dict
) -> tuple[np.ndarray, np.ndarray]:
    """(prompt id, group) per request: each prompt length gets its share k = max(1, round(P · count / n)) of the
    P = groups × prompts-per-group prompts, a request one of its length's k uniformly (rng.random), each prompt a
    uniform group (rng.integers), in that draw order."""
    n = inp.size
    groups = max(1, int(ctx.num_groups or 1))
    ppg = max(1, int(ctx.prompts_per_group or 1))
    n_prompts = groups * ppg
    lengths, inverse, counts = np.unique(inp, return_inverse=True, return_counts=True)
    k_len = np.maximum(1, np.rint(n_prompts * counts / max(1, n)).astype(np.int64))
    offset = np.concatenate([[0], np.cumsum(k_len)[:-1]])
    prompt_id = offset[inverse] + (rng.random(n) * k_len[inverse]).astype(np.int64)
    group_of_prompt = rng.integers(0, groups, int(k_len.sum()))
    assumptions["prompt_identity"] = (
        f"{n_prompts} prompts ({groups} groups x {ppg}) spread over {lengths.size} prompt "
        f"lengths; system prompt {ctx.system_prompt_len or 0} tokens shared per group"
    )
    return prompt_id, group_of_prompt[prompt_id]


def _serving_config(ctx: RunContext, default_kv_blocks: int | None, assumptions: dict) -> SchedulerConfig:
    """The run's serving limits (defaults 2048 batched tokens, 128 sequences); its KV blocks are required."""
    kv = ctx.kv_blocks_total or default_kv_blocks
    if not kv:
        raise ValueError(f"{ctx.experiment_id}: the run's KV-cache size (kv_blocks_total_gpu) is unknown")
    cfg = SchedulerConfig(
        max_num_batched_tokens=int(ctx.max_num_batched_tokens or 2048),
        max_num_seqs=int(ctx.max_num_seqs or 128),
        kv_blocks_total=int(kv),
        max_model_len=int(ctx.max_model_len) if ctx.max_model_len else None,
    )
    assumptions["serving"] = {
        "max_num_seqs": cfg.max_num_seqs,
        "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "kv_blocks_total": cfg.kv_blocks_total,
        "from": ctx.sources,
    }
    return cfg


def replay_workload(
    log_table: pl.DataFrame,
    ctx: RunContext,
    *,
    seed: int = 0,
    output_tokens: str = "server",
    default_kv_blocks: int | None = None,
) -> ReplayWorkload:
    """The run's requests as the simulator's workload.

    * generated tokens: with ``ignore_eos`` and a fixed ``output_len`` (inference-perf shared_prefix)
      the server generates exactly output_len tokens for every request — the client's
      ``output_tokens`` is its own re-count of the streamed text (short for the Llama-2-7B runs,
      whose E2E shows full-length generation). ``output_tokens="client"`` uses the logged counts;
    * prompt identity (prefix caching): the workload draws each request's prompt uniformly from
      groups × prompts-per-group prompts that share a system prompt per group; the log does not say
      which, so requests of equal prompt length are spread over that length's share of the prompts
      (same length ⇒ possibly the same prompt; different length ⇒ a different prompt), seeded;
    * errored requests logged with 0 input tokens (client timeouts) get a prompt length drawn from
      the run's other requests (seeded) and the same generated length.
    """
    t = log_table.sort("arrival_time_us", "index")  # the engine takes requests in arrival order
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5E91A7])
    out = t["output_tokens"].to_numpy().astype(np.int64)
    arrival = t["arrival_time_us"].to_numpy().astype(np.float64) * 1e-6
    assumptions: dict = {}
    inp = _impute_prompt_tokens(t["input_tokens"].to_numpy().astype(np.int64), rng, assumptions)
    gen = _generated_tokens(out, ctx, output_tokens, assumptions)
    prompt_id, group = _prompt_identity(inp, ctx, rng, assumptions)
    cfg = _serving_config(ctx, default_kv_blocks, assumptions)
    return ReplayWorkload(
        experiment_id=ctx.experiment_id,
        arrival_s=arrival,
        prompt_tokens=inp,
        max_tokens=gen,
        prompt_id=prompt_id,
        group=group,
        nshared_blk=(int(ctx.system_prompt_len or 0) + 1) // 16,
        config=cfg,
        timeout_s=client_limits_s(arrival),
        index=t["index"].to_numpy(),
        assumptions=assumptions,
    )


# ---------------------------------------------------------------------------- serving models


class StepServingModel:
    """A step-time model (``step_time_us(batch)``) with BLIS-style request delays: queueing(input_len) µs
    before a request enters WAITING, and a per-token output processing time."""

    def __init__(
        self,
        name: str,
        step_model,
        *,
        queueing_us=None,
        token_delay_us: float = 0.0,
        fitted_on=(),
        llm_model: str | None = None,
        kind: str = "step_model",
        detail: dict | None = None,
        load_delay: dict | None = None,
    ):
        self.name = name
        self.step_model = step_model
        self.queueing_us = queueing_us or (lambda input_len: 0.0)
        self.token_delay_s = float(token_delay_us) * 1e-6
        # the calibration's load-delay stage (docs/calibration.md): a token reaches its client
        # shift_us + per_request_us · (requests in the step that emitted it) later; the engine's run is unchanged
        self.load_delay = load_delay
        self.fitted_on = tuple(fitted_on)
        self.llm_model = llm_model
        self.kind = kind
        self.detail = detail or {}

    def clock(self, ctx: RunContext, rng: np.random.Generator):
        return CycleClock(self.step_model)

    def ingress_s(self, prompt_len: int, api_tokens_per_s: float) -> float:
        return self.queueing_us(prompt_len) * 1e-6


class PhysicsServingModel:
    """The synthesizer's engine physics (roofline GPU time with noise, empirical schedule() time, host work)
    and its API latencies (data/synth/engine_params.json), seeded. In sample on the 16 reference runs: efficiencies
    tuned on their per-stage TPOT, API terms on their per-stage TTFT, schedule() per-run parameters on each run's own
    test-split schedule() times (replay_models.PHYSICS_BASIS)."""

    kind = "physics"

    def __init__(self, name: str = "physics", *, fitted_on=(), params: dict | None = None):
        from stepml_core.synth.spec import engine_params

        self.name = name
        self.P = params or engine_params()
        self.fitted_on = tuple(fitted_on)
        self.llm_model = None
        self.detail = {}
        api = self.P["api"]
        self.c2a_s = 0.5 * sum(api["client_to_api_ms"]) * 1e-3
        self.token_delay_s = 0.5 * sum(api["engine_to_client_ms"]) * 1e-3
        self._api = api

    def clock(self, ctx: RunContext, rng: np.random.Generator):
        from stepml_core.synth.physics_clock import PhysicsClock
        from stepml_core.synth.schedtime import ScheduleTimeModel
        from stepml_core.synth.spec import real_id_of

        self._ing_base = (
            self._api["api_to_engine_base_ms"] + self.P["models"][ctx.model].get("api_ingress_ms", 0.0)
        ) * 1e-3
        return PhysicsClock(ctx.model, ctx.tp, self.P, rng, ScheduleTimeModel(real_id_of(ctx.experiment_id)))

    def ingress_s(self, prompt_len: int, api_tokens_per_s: float) -> float:
        a = self._api
        return (
            self.c2a_s
            + self._ing_base
            + a["api_to_engine_per_1k_prompt_ms"] * 1e-6 * prompt_len
            + a.get("api_to_engine_per_1k_tokens_per_s_ms", 0.0) * 1e-6 * api_tokens_per_s
        )


# ---------------------------------------------------------------------------- running a replay


@dataclass
class ReplayResult:
    per_request: pl.DataFrame  # PER_REQUEST_COLUMNS
    steps: int
    counters: dict
    sim_seconds: float  # simulated span (first arrival → last update)
    # per request (the per_request table's order): the time of the step that emitted its last token (s; NaN without
    # one). BLIS appends that step once more to a finished request (blis-stepml-format.md §1): its E2E = this E2E + it
    final_step_s: np.ndarray | None = None
    # replay(itl=True): the inter-token latencies of the successful requests as (values s, weights) — every step
    # duration weighted by the tokens it emitted after one of the previous step, and each gap across a preemption
    itl_s: tuple[np.ndarray, np.ndarray] | None = None
    # per request: the requests scheduled in the step whose output carried its first token (0 without one)
    first_step_requests: np.ndarray | None = None


ITL_METRICS = ("itl_p50", "itl_p90", "itl_p99")  # percentiles of inter_token_latencies (s): what-if metrics


def inter_token_latencies(reqs, update_s: np.ndarray, success: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values, weights) of the per-token inter-token latencies of the ``success`` requests: token k of a decode
    segment (F, L) is emitted by step F + k at update_s[F + k − 1], so inside a segment token k ≥ 1 follows its
    predecessor by step F + k's duration (a difference array counts them per step, no per-token loop); the first
    token of a later segment follows the last of the one before by the gap between their steps (a preemption)."""
    U = np.asarray(update_s, dtype=np.float64)
    per_step = np.zeros(U.size + 2, dtype=np.int64)
    gaps = []
    for R, ok in zip(reqs, success):
        if not ok:
            continue
        prev_last = 0
        for F, L in R.segments:
            if L > 1:
                per_step[F + 1] += 1
                per_step[F + L] -= 1
            if prev_last:
                gaps.append(U[F - 1] - U[prev_last - 1])
            prev_last = F + L - 1
    counts = np.cumsum(per_step)[2 : U.size + 1]  # steps 2..S: step s lasted U[s-1] − U[s-2]
    values = np.concatenate([np.diff(U), np.asarray(gaps, dtype=np.float64)])
    weights = np.concatenate([counts.astype(np.float64), np.ones(len(gaps))])
    keep = weights > 0
    return values[keep], weights[keep]


def weighted_percentile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The smallest value whose cumulative weight reaches q % of the total (NaN without weight)."""
    if values.size == 0 or weights.sum() <= 0:
        return float("nan")
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    return float(values[order][min(int(np.searchsorted(cum, q / 100.0 * cum[-1])), values.size - 1)])


def replay(
    w: ReplayWorkload, model, ctx: RunContext, *, seed: int = 0, progress=None, itl: bool = False
) -> ReplayResult:
    """Simulate the workload with a serving model; per-request predicted TTFT and E2E (s, client side); with ``itl``
    the inter-token latencies too (:func:`inter_token_latencies`)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x2E91A7])
    nsh = w.nshared_blk
    ids, plen, gen, grp = w.prompt_id.tolist(), w.prompt_tokens.tolist(), w.max_tokens.tolist(), w.group.tolist()
    with gc_paused():  # the requests and the run: millions of small objects, no cycles (stepml_core.gc_pause)
        reqs = [SimRequest(i, ids[i], grp[i], plen[i], gen[i], nsh) for i in range(len(ids))]
        clock = model.clock(ctx, rng)
        arrivals = FixedArrivals(w.arrival_s, w.timeout_s, model.ingress_s)
        sim = EngineCore(reqs, w.config, arrivals, clock, progress=progress).run()
    U = np.asarray(sim.update_s, dtype=np.float64)
    n = len(reqs)
    first = np.fromiter((R.first_token_step for R in reqs), dtype=np.int64, count=n)
    ok = np.fromiter((R.finish_status == "length" for R in reqs), dtype=bool, count=n)
    last = np.fromiter(
        (R.segments[-1][0] + R.segments[-1][1] - 1 if R.segments else -1 for R in reqs), dtype=np.int64, count=n
    )
    start = arrivals.mono0 + w.arrival_s
    nU = np.asarray(sim.update_n, dtype=np.int64) if sim.update_n is not None else np.zeros(U.size, dtype=np.int64)
    n_first = np.where(first > 0, nU[np.maximum(first, 1) - 1], 0) if U.size else np.zeros(n, dtype=np.int64)
    td = np.full(U.size, model.token_delay_s)  # per update: how long after it its tokens reach the clients
    ld = getattr(model, "load_delay", None)
    if ld:
        td += (float(ld["shift_us"]) + float(ld["per_request_us"]) * nU) * 1e-6
    seen = U + td  # per update: when the clients see its tokens
    ttft = np.where(first > 0, seen[np.maximum(first, 1) - 1] - start, np.nan) if U.size else np.full(n, np.nan)
    e2e = np.where(ok & (last > 0), seen[np.maximum(last, 1) - 1] - start, np.nan) if U.size else np.full(n, np.nan)
    final_step = (
        np.where(last > 1, U[np.maximum(last, 2) - 1] - U[np.maximum(last, 2) - 2], np.nan)
        if U.size > 1
        else np.full(n, np.nan)
    )
    success = ok & (e2e <= w.timeout_s)
    refused = np.fromiter((R.finish_status == "refused" for R in reqs), dtype=bool, count=n)
    e2e = np.where(success, e2e, np.where(refused, 0.0, w.timeout_s))  # a refused request is answered at once
    ttft = np.where(success, ttft, np.nan)
    table = pl.DataFrame(
        {
            "index": w.index,
            "arrival_time_us": np.rint(w.arrival_s * 1e6).astype(np.int64),
            "ttft_s": ttft,
            "e2e_s": e2e,
            "success": success,
            "output_tokens": w.max_tokens,
        },
        schema=PER_REQUEST_COLUMNS,
    )
    span = float(U[-1] - arrivals.mono0) if U.size else 0.0
    counters = dict(sim.counters)
    if isinstance(clock, CycleClock):
        counters.update({f"step_time_{k}": v for k, v in clock.clamped.items()})
        if hasattr(clock.model, "cpu_bound_steps"):  # a two-path step time (stepmodels.two_path)
            counters["cpu_bound_steps"] = clock.model.cpu_bound_steps
            counters["max_waiting"] = clock.model.max_waiting
    return ReplayResult(
        per_request=table.with_columns(pl.col("ttft_s").fill_nan(None)),
        steps=sim.steps,
        counters=counters,
        sim_seconds=span,
        final_step_s=final_step,
        itl_s=inter_token_latencies(reqs, U, success) if itl else None,
        first_step_requests=n_first,
    )


# ---------------------------------------------------------------------------- scoring


def latency_summary(
    arrival_s: np.ndarray, ttft_s: np.ndarray, e2e_s: np.ndarray, success: np.ndarray, tokens: np.ndarray
) -> dict[str, float]:
    """Figures over successful requests: TTFT/E2E mean and p50/p90/p99 (s), ``decode_time_per_token_mean`` = mean of
    (E2E − TTFT)/(tokens − 1) with ``tokens`` the tokens the server generated (s), throughput = successes / (last end
    − first start) (1/s), successes (count).

    ``decode_time_per_token_mean`` is not the ``time_per_output_token`` (TPOT) of the real runs' inference-perf
    results, which is ≈ half of it: that inference-perf version timed streamed events, ≈ 2 per token ((E2E − TTFT) /
    TPOT = 495–504 for 247–251 generated tokens, 2,896 for 1,448; its ITL mean equals its TPOT mean), so its TPOT =
    (last event − first event) / (events − 1). Later inference-perf divides (last token − first token) by the
    output tokens − 1 (client re-count by default: short on the Llama-2-7B runs), which differs from this figure by
    the stream's end after the last token and by that count (docs/request-logs.md, *Definitions*)."""
    ok = success.astype(bool)
    out: dict[str, float] = {"successes": float(ok.sum())}
    for name, v in (("ttft", ttft_s[ok]), ("e2e", e2e_s[ok])):
        v = v[np.isfinite(v)]
        out[f"{name}_mean"] = float(v.mean()) if v.size else float("nan")
        for p in (50, 90, 99):
            out[f"{name}_p{p}"] = float(np.percentile(v, p)) if v.size else float("nan")
    di = (e2e_s[ok] - ttft_s[ok]) / np.maximum(tokens[ok] - 1, 1)
    di = di[np.isfinite(di)]
    out["decode_time_per_token_mean"] = float(di.mean()) if di.size else float("nan")
    end = arrival_s + e2e_s
    span = float(np.nanmax(end) - np.min(arrival_s)) if arrival_s.size else 0.0
    out["throughput_rps"] = float(ok.sum() / span) if span > 0 else float("nan")
    return out


def score_replay(pred: pl.DataFrame, observed: pl.DataFrame) -> tuple[list[dict], dict]:
    """Predicted vs observed per REPLAY_METRICS (rows with metric, predicted, observed, rel_err_pct) and the
    per-request median APE of TTFT and E2E over requests that succeeded on both sides.

    Observed values are null where the log has no ground truth (the run is predicted, not scored)."""
    p = pred.sort("index")
    o = observed.sort("index").select("index", "observed_has_error", "observed_ttft_s", "observed_e2e_s")
    scored = o["observed_e2e_s"].is_not_null().any()
    if scored:  # only the requests with truth are scored, on both sides (the others were replayed all the same)
        o = o.filter(pl.col("observed_has_error").is_not_null())
        p = p.join(o.select("index"), on="index", how="semi")
    a = p["arrival_time_us"].to_numpy() * 1e-6
    tok = p["output_tokens"].to_numpy()
    pv = latency_summary(a, p["ttft_s"].to_numpy(), p["e2e_s"].to_numpy(), p["success"].to_numpy(), tok)
    ov, per_req = {}, {}
    if scored:
        j = p.join(o, on="index", how="left")
        osucc = (~j["observed_has_error"].fill_null(True)).to_numpy() & j["observed_e2e_s"].is_not_null().to_numpy()
        ov = latency_summary(
            a,
            j["observed_ttft_s"].fill_null(np.nan).to_numpy(),
            j["observed_e2e_s"].fill_null(np.nan).to_numpy(),
            osucc,
            tok,
        )
        both = osucc & p["success"].to_numpy()
        for name in ("ttft", "e2e"):
            pr, ob = j[f"{name}_s"].to_numpy()[both], j[f"observed_{name}_s"].to_numpy()[both]
            ape = np.abs(pr - ob) / ob * 100
            per_req[f"{name}_median_ape_pct"] = float(np.nanmedian(ape)) if ape.size else float("nan")
        per_req["requests_both_succeeded"] = int(both.sum())
    rows = []
    for m in REPLAY_METRICS:
        ob = ov.get(m) if scored else None
        pr = pv[m]
        rel = (pr - ob) / ob * 100 if (ob is not None and np.isfinite(ob) and ob != 0 and np.isfinite(pr)) else None
        rows.append({"metric": m, "predicted": pr, "observed": ob, "rel_err_pct": rel})
    return rows, per_req


# ---------------------------------------------------------------------------- run context


def run_context(
    folder,
    *,
    experiment_id: str,
    model: str,
    tp: int,
    exp_config: dict | None = None,
    profile: dict | None = None,
    header: dict | None = None,
    kv_blocks_from_traces: int | None = None,
) -> RunContext:
    """Serving limits and workload shape of a run, each from the first file that has it:
    the request file's ``config`` header, ``exp-config.yaml``, inference-perf's resolved
    ``results/config.yaml`` (what actually ran), then ``profile.yaml``."""
    from stepml_core.runs.folders import safe_load_yaml

    folder = Path(folder)
    hc = (header or {}).get("config") or {}
    ec = exp_config or {}
    resolved = {}
    rpath = folder / "results" / "config.yaml"
    if rpath.is_file():
        r = safe_load_yaml(rpath)
        resolved = r if isinstance(r, dict) else {}
    sources: dict = {}

    def pick(name, *cands):
        for where, d, key in cands:
            v = d.get(key) if isinstance(d, dict) else None
            if v not in (None, "", 0):
                sources[name] = where
                return v
        return None

    sp_res = ((resolved.get("data") or {}).get("shared_prefix") or {}) if isinstance(resolved.get("data"), dict) else {}
    sp_prof = (
        (((profile or {}).get("data") or {}).get("shared_prefix") or {})
        if isinstance((profile or {}).get("data"), dict)
        else {}
    )
    srv_res, srv_prof = resolved.get("server") or {}, (profile or {}).get("server") or {}
    req_file = "requests.json header"
    return RunContext(
        experiment_id=experiment_id,
        model=model,
        tp=int(pick("tp", (req_file, hc, "tensor_parallelism"), ("exp-config.yaml", ec, "tensor_parallelism")) or tp),
        max_num_seqs=pick("max_num_seqs", (req_file, hc, "max_num_seqs"), ("exp-config.yaml", ec, "max_num_seqs")),
        max_num_batched_tokens=pick(
            "max_num_batched_tokens",
            (req_file, hc, "max_num_batched_tokens"),
            ("exp-config.yaml", ec, "max_num_batched_tokens"),
        ),
        max_model_len=pick("max_model_len", ("exp-config.yaml", ec, "max_model_len")),
        kv_blocks_total=pick(
            "kv_blocks_total",
            (req_file, hc, "kv_blocks_total_gpu"),
            ("traces (kv.blocks_total_gpu)", {"v": kv_blocks_from_traces}, "v"),
        ),
        num_groups=pick(
            "num_groups", ("results/config.yaml", sp_res, "num_groups"), ("profile.yaml", sp_prof, "num_groups")
        ),
        prompts_per_group=pick(
            "prompts_per_group",
            ("results/config.yaml", sp_res, "num_prompts_per_group"),
            ("profile.yaml", sp_prof, "num_prompts_per_group"),
        ),
        system_prompt_len=pick(
            "system_prompt_len",
            ("results/config.yaml", sp_res, "system_prompt_len"),
            ("profile.yaml", sp_prof, "system_prompt_len"),
        ),
        output_len=pick(
            "output_len", ("results/config.yaml", sp_res, "output_len"), ("profile.yaml", sp_prof, "output_len")
        ),
        ignore_eos=bool(
            pick("ignore_eos", ("results/config.yaml", srv_res, "ignore_eos"), ("profile.yaml", srv_prof, "ignore_eos"))
        ),
        sources=sources,
    )
