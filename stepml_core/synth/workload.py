"""Workload and load of a synthetic run (docs/synthesizer.md §1), from the real run's public figures.

* inference-perf ``shared_prefix`` data as resolved by the runs: groups × prompts-per-group
  distinct prompts (10 × 10); prompts of a group share a system prompt of
  ``system_prompt_len`` tokens (+ BOS), then a question; total prompt lengths are drawn from
  the real run's client-side prompt-length quantiles (≈ system + question + a few tens of
  template tokens, narrow spread). Each request picks one of the prompts uniformly, so
  prompts repeat and hit the prefix cache.
* fixed output length (``max_tokens`` = nominal output_len, ``ignore_eos``): the server
  always generates max_tokens tokens. The client's *reported* output_tokens is its own
  re-tokenisation of the streamed text (docs/request-logs.md §3); it is drawn from the real run's
  output-length quantiles (this is where the Llama-2-7B runs' ~20 % of short counts, mean
  195–209 of 247–251, come from: their E2E latencies show full-length generation).
* constant-rate stages: the stage's request count rate × duration × scale, arrival times a
  Poisson process conditioned on that count (sorted uniforms).
* client timeout: stepml_core.runs.rules' limit (300 s, rounded up by aiohttp to the client's next whole second), drawn
  uniformly in [300, 301] s per request (the grid's phase is not modelled); ``client_timeout_s`` in the engine
  parameters overrides it (a test's short timeouts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stepml_core.runs.rules import CLIENT_TIMEOUT_S, CLIENT_TIMEOUT_TICK_S
from stepml_core.synth.spec import QUANTILE_KEYS, QUANTILE_PROBS, RunSpec, client_token_counts, engine_params


def quantile_sampler(qvals: dict[str, float], prefix: str, target_mean: float | None = None):
    """Inverse CDF through the transcribed quantile knots (min, p0.1, …, max).

    Within each segment between knots, x = x_i + (x_{i+1} − x_i)·t^γ (t the position of u in
    the segment); γ (one per variable) is chosen so that the distribution's mean equals the
    real run's mean when it is given (straight lines, γ = 1, under-state the mean of the
    skewed output-length distributions); the knots themselves are kept.
    """
    xs = np.array([qvals[f"{prefix}_{k}"] for k in QUANTILE_KEYS], dtype=np.float64)
    ps = np.array(QUANTILE_PROBS, dtype=np.float64)

    def make(gamma: float):
        def draw(u: np.ndarray) -> np.ndarray:
            u = np.clip(np.asarray(u, dtype=np.float64), 0.0, 1.0)
            i = np.clip(np.searchsorted(ps, u, side="right") - 1, 0, len(ps) - 2)
            t = (u - ps[i]) / (ps[i + 1] - ps[i])
            return xs[i] + (xs[i + 1] - xs[i]) * t**gamma

        return draw

    if target_mean is None or not np.isfinite(target_mean):
        return make(1.0)
    grid = (np.arange(20000) + 0.5) / 20000
    lo, hi = np.log(0.05), np.log(20.0)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if make(float(np.exp(mid)))(grid).mean() > target_mean:
            lo = mid  # larger gamma -> smaller values
        else:
            hi = mid
    return make(float(np.exp(0.5 * (lo + hi))))


@dataclass
class Workload:
    prompt_lens: np.ndarray  # per distinct prompt (server = client token count)
    shared_prefix_tokens: int  # BOS + system prompt
    send_time: np.ndarray  # intended send time per request (s from run start)
    start_time: np.ndarray  # actual client start (send + schedule delay)
    stage: np.ndarray  # stage index per request
    prompt_id: np.ndarray
    max_tokens: int
    client_out_tokens: np.ndarray  # client re-tokenised output count (used for successes)
    timeout_s: np.ndarray
    stage_bounds: list[tuple[float, float]]  # (start, duration) per stage, scaled


def build_workload(spec: RunSpec, scale: float, rng: np.random.Generator) -> Workload:
    P = engine_params()["api"]
    n_prompts = spec.num_groups * spec.prompts_per_group
    q = client_token_counts().get(spec.real_id)
    base = spec.system_prompt_len + spec.question_len
    if q is not None:
        u = (np.arange(n_prompts) + rng.random(n_prompts)) / n_prompts
        lens = np.rint(quantile_sampler(q, "prompt_len", spec.prompt_len_mean)(rng.permutation(u))).astype(np.int64)
    else:  # a run without transcribed quantiles: mean offset from runs.csv, ±12 tokens
        off = spec.prompt_len_mean - base if np.isfinite(spec.prompt_len_mean) else 30.0
        lens = np.rint(base + off + rng.uniform(-12, 12, n_prompts)).astype(np.int64)
    lens = np.maximum(lens, spec.system_prompt_len + 2)
    sends, stages, bounds = [], [], []
    t0 = 0.0
    for k, (rate, dur) in enumerate(zip(spec.stage_rates, spec.stage_durations)):
        d = dur * scale
        n = max(1, int(round(rate * d)))
        ts = np.sort(rng.random(n)) * d + t0
        sends.append(ts)
        stages.append(np.full(n, k, dtype=np.int64))
        bounds.append((t0, d))
        t0 += d
    send = np.concatenate(sends) if sends else np.zeros(0)
    stage = np.concatenate(stages) if stages else np.zeros(0, dtype=np.int64)
    n = len(send)
    mu, sd = P["schedule_delay_ms"]
    start = send + rng.normal(mu, sd, n) * 1e-3
    prompt_id = rng.integers(0, n_prompts, n)
    if q is not None:
        outc = np.rint(quantile_sampler(q, "output_len", spec.output_len_mean)(rng.random(n))).astype(np.int64)
    else:
        outc = np.full(n, spec.output_len, dtype=np.int64)
    lo, hi = P.get("client_timeout_s", (CLIENT_TIMEOUT_S, CLIENT_TIMEOUT_S + CLIENT_TIMEOUT_TICK_S))
    timeout = rng.uniform(lo, hi, n)
    return Workload(
        prompt_lens=lens,
        shared_prefix_tokens=spec.system_prompt_len + 1,
        send_time=send,
        start_time=start,
        stage=stage,
        prompt_id=prompt_id,
        max_tokens=spec.output_len,
        client_out_tokens=np.maximum(outc, 0),
        timeout_s=timeout,
        stage_bounds=bounds,
    )
