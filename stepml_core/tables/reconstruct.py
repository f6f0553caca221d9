"""Every scheduler step's batch, reconstructed from journey events (docs/trace-format.md §4).

For **every** step id (sampled or not) the reconstruction gives the scheduled requests with,
per request, its progress index ``c`` (= ``num_computed_tokens`` before the step), the tokens
scheduled for it ``q`` and its prompt length. It uses only what a real trace carries: the
``llm_core`` journey events (the backbone), REQUEST_SNAPSHOTs (only for prefix-cache hits,
which journey events do not carry) and BATCH_SUMMARY token totals (only to solve a cache hit
that no snapshot gives). The scheduler model is vLLM v1's (v0.15.1, async scheduling):

* **Episodes.** A request is running from each admission (``SCHEDULED``, kind FIRST or RESUME,
  step ``s``) until it leaves the running list: natural finish at ``D`` (``FINISHED``,
  ``scheduler.step = D``) → still in step ``D + lag``'s batch (the async one-step lag: the
  finish is only known in ``update_from_output(D)``, after ``schedule(D+1)``); preemption at
  ``P`` → last in ``P − 1``; abort at counter ``N`` → last in ``N``. ``lag`` = ``output_lag``
  (1 for async scheduling, 0 for the synchronous loop).
* **Prefill / recompute** of episode k: target ``T = prompt + o`` tokens (``o`` =
  ``decode.done_tokens`` on its SCHEDULED event: tokens to recompute after a decode-phase
  preemption), starting from the prefix-cache hit ``h`` (``num_computed_tokens`` at
  admission). It completes at step ``F``: ``FIRST_TOKEN.scheduler.step`` when present, else
  from token counts (natural finish: ``F = D − (done − o) + 1``; preemption: ``F = P − (o' − o)``
  with ``o'`` the next event's ``decode.done_tokens``; abort: ``F = N − (done − o)``).
* **Token budget** per step (``max_num_batched_tokens``, running requests first): every
  decode-phase request takes 1 token; the rest goes to prefill chunks in running order
  (admission order: step, then SCHEDULED time stamp), each taking ``min(remaining, budget)``.
  So a prefill step before ``F`` gets the whole remaining budget and the chunk at ``F`` is
  ``T − h − (chunks before)``; only the last chunk (and the progress index) needs ``h``.
* **Decode** steps ``F+1 … end``: ``c = T + (t − F − 1)``, ``q = 1`` (intervals are arithmetic
  ranges, built with numpy). With lag 1, step ``F+1`` is the extra 1-token step before the
  first token is known, labelled "PREFILL" by BATCH_SUMMARY (``num_output_tokens == 0``).

Prefix-cache hit ``h`` of an episode (``episodes.h_source``), in order of preference:

1. ``snapshot_computed``: a snapshot of the request at a step inside the episode's prefill:
   ``h = num_computed_tokens − chunks before that step`` (exact by definition);
2. ``prefill_done_tokens``: an episode that stopped inside its prompt (preempted/aborted
   mid-prefill) moved the prompt high-water mark ``prefill.done_tokens`` to ``h + chunks``;
3. ``effective_prompt_len`` (first admission only): ``h = prompt − effective_prompt_len`` from
   any snapshot of the request (the hit at *first* scheduling);
4. ``blocks_cached``: ``kv.blocks_cached_gpu × block_size`` from a snapshot during the
   episode (assumption: the count refers to the latest admission — what the synthesizer
   does; block size inferred from snapshots where ``prompt − effective_prompt_len =
   blocks_cached × bs``, default 16);
5. ``batch_summary``: the completing step is sampled and this chunk is its only unknown:
   ``chunk = batch.scheduled_tokens − (decodes + other chunks)``, accepted when ``h`` comes
   out a multiple of the block size in ``[0, T − 1]``;
6. ``estimate`` (:class:`_HitPrior`): the most frequent known hit of first admissions with
   the same prompt length (else the median known fraction of the maximum hit
   ``bs·⌊(T−1)/bs⌋``; 0 when nothing is known); for re-admissions the most frequent known
   resume hit for that prompt length, else the whole prompt. Rounded to blocks and clipped
   to the range the step's budget allows. A reliable hit whose last chunk then does not fit
   its step (``< 1`` or over the budget) moves the misfit onto an estimated hit sharing those
   steps, and the pass is repeated (``repair_rounds``).

Limits. Only the last prefill chunk and the progress index of prefill rows depend on ``h``;
decode rows never do. Without snapshots (and without sampled BATCH_SUMMARY at the
completing step) hits are unknown and assumed from the prior (0 when nothing at all is
known — the training repo's assumption). How much of a preempted request's own KV survives
until its resume depends on eviction and is not in the trace: resume hits without a
snapshot are the main error source under KV pressure. Requests without journey events
(journey sampling < 1) are invisible; their tokens make the budget of the others smaller
than reconstructed.

Entry points: :func:`reconstruct` (batches + episodes + per-request table + diagnostics),
:func:`reconstruct_batches` (the batches only), :func:`reconstruct_run`. Its parts: ``tables.journeys``
(journey events → episodes), ``tables.prefix_hits`` (cache hits and the budget pass), ``tables.batch_checks``
(per-step aggregates, comparisons with snapshots and BATCH_SUMMARY).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from stepml_core.tables.journeys import journey_episodes
from stepml_core.tables.prefix_hits import (
    _chunk_pass,
    _HitPrior,
    _PassInput,
    _PassResult,
    _repairs,
    _snapshot_evidence,
    infer_block_size,
)

__all__ = [
    "Reconstruction",
    "reconstruct",
    "reconstruct_batches",
    "reconstruct_run",
    "DEFAULT_MAX_NUM_BATCHED_TOKENS",
]


DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048

# codes of episodes.F_source / h_source
F_SOURCES = ("unknown", "first_token", "finished", "preempted", "aborted", "snapshot", "simulated")
# "simulated": the events leave the completion step open; it is where the chunks reach the target
H_SOURCES = (
    "unknown",
    "snapshot_computed",
    "effective_prompt_len",
    "blocks_cached",
    "batch_summary",
    "estimate",
    "prefill_done_tokens",
)

BATCH_SCHEMA = {
    "step.id": pl.Int64,
    "request.id": pl.Utf8,
    "progress_index": pl.Int64,
    "new_tokens": pl.Int64,
    "prompt_len": pl.Int64,
    "phase": pl.Utf8,
    "num_output_tokens": pl.Int64,
    "episode": pl.Int32,
}


@dataclass
class Reconstruction:
    """Result of :func:`reconstruct`.

    * ``batches``: one row per scheduled (step, request): ``step.id, request.id,
      progress_index, new_tokens, prompt_len, phase`` (BATCH_SUMMARY's label: "PREFILL" while
      ``num_output_tokens == 0``), ``num_output_tokens`` (as a snapshot would show it) and
      ``episode`` (1 = first admission, 2… = resumes); sorted by step, then running order.
    * ``episodes``: one row per admission: ``s`` (admission step), ``F`` (prefill/recompute
      completion step, null if it never completed), ``E`` (last step in the running list),
      ``target``, ``hit`` (prefix-cache hit tokens), ``h_source``, ``F_source``, ``end_kind``.
    * ``requests``: one row per request with its journey milestones (steps and monotonic ns).
    * ``diagnostics``: counts (sources of hits and completion steps, inconsistencies).
    """

    batches: pl.DataFrame
    episodes: pl.DataFrame
    requests: pl.DataFrame
    diagnostics: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- the reconstruction


def _step_totals(steps: pl.DataFrame | None, size: int) -> np.ndarray:
    tot = np.full(size, -1, np.int64)
    if steps is None or not steps.height or "batch.scheduled_tokens" not in steps.columns:
        return tot
    s = steps.select(pl.col("step.id").cast(pl.Int64), pl.col("batch.scheduled_tokens").cast(pl.Int64)).drop_nulls()
    s = s.filter((pl.col("step.id") >= 0) & (pl.col("step.id") < size)).unique("step.id", keep="first")
    tot[s["step.id"].to_numpy()] = s["batch.scheduled_tokens"].to_numpy()
    return tot


def reconstruct(
    journey: pl.DataFrame,
    *,
    steps: pl.DataFrame | None = None,
    snapshots: pl.DataFrame | None = None,
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
    block_size: int | None = None,
    output_lag: int = 1,
    last_step: int | None = None,
    repair_rounds: int = 6,
) -> Reconstruction:
    """Reconstruct every step's batch from journey events (see the module docstring).

    ``steps`` (BATCH_SUMMARY rows) and ``snapshots`` (REQUEST_SNAPSHOT rows) are optional
    sources of prefix-cache hits; ``block_size`` defaults to the one inferred from snapshots
    (else 16); ``output_lag`` = 1 for async scheduling (vLLM v0.15.1 default), 0 for sync.
    """
    B = int(max_num_batched_tokens)
    last_step = _default_last_step(journey, steps, last_step, output_lag)
    episodes, req = journey_episodes(journey, last_step=last_step, output_lag=output_lag)
    bs = int(block_size) if block_size else infer_block_size(snapshots)
    diag: dict = {
        "requests": req.height,
        "episodes": episodes.height,
        "block_size": bs,
        "max_num_batched_tokens": B,
        "output_lag": output_lag,
    }
    if episodes.height == 0:
        empty = pl.DataFrame(schema=BATCH_SCHEMA)
        return Reconstruction(empty, episodes, req, diag)
    return _solve(episodes, req, steps, snapshots, B, bs, last_step, output_lag, repair_rounds, diag)


def _default_last_step(
    journey: pl.DataFrame, steps: pl.DataFrame | None, last_step: int | None, output_lag: int
) -> int | None:
    """``last_step`` if given, else max(last BATCH_SUMMARY step id, last journey step + ``output_lag``) when there
    are BATCH_SUMMARY rows, else None."""
    if last_step is None and steps is not None and steps.height:
        last_step = int(steps["step.id"].max())
        jmax = journey["scheduler.step"].max() if journey.height else None
        if jmax is not None:
            last_step = max(last_step, int(jmax) + output_lag)
    return last_step


def _solve(
    episodes: pl.DataFrame,
    req: pl.DataFrame,
    steps: pl.DataFrame | None,
    snapshots: pl.DataFrame | None,
    B: int,
    bs: int,
    last_step: int | None,
    output_lag: int,
    repair_rounds: int,
    diag: dict,
) -> Reconstruction:
    """Completion steps and hits known from snapshots, the chunk passes (with repairs), then the batches."""
    s = episodes["s"].to_numpy().copy()
    E = episodes["E"].to_numpy().copy()
    F = episodes["F"].to_numpy().copy()
    Fsrc = episodes["F_source"].to_numpy().copy()
    target = episodes["target"].to_numpy()
    prompt = episodes["prompt_len"].to_numpy()
    first_ep = (episodes["episode"] == 1).to_numpy()
    incomplete = episodes["incomplete"].to_numpy()
    ev = _snapshot_evidence(episodes, req, snapshots, bs)
    # completion step from a decode-phase snapshot where the events leave it open
    m = (F < 0) & ~incomplete & (ev["F_snap"] >= s) & (ev["F_snap"] <= E)
    F[m], Fsrc[m] = ev["F_snap"][m], 5

    h, hsrc = _snapshot_hits(ev, first_ep)
    # an in-prefill snapshot is exact: it overrides (resolved in the pass below)
    tb, cb = ev["tb"], ev["cb"]
    prior = _HitPrior(prompt, target, np.where(tb >= 0, -1, h), bs, resume=~first_ep)

    size = int(max(E.max(), s.max(), (last_step or 0))) + 3
    totals = _step_totals(steps, size)
    # decode rows of episodes with a known completion step: [F+1, E]
    used0 = _decode_rows_per_step(F, E, size)
    ctx, order = _pass_input(episodes, B, bs, s, E, target, incomplete, tb, cb, totals)
    res, overrides, n_rep = _passes(ctx, used0, F, h, hsrc, prior, prompt, target, first_ep, bs, repair_rounds)
    diag["repair_passes"] = n_rep
    diag["repaired_hits"] = len(overrides)
    return _assemble(episodes, req, res, Fsrc, E, order, output_lag, diag)


def _pass_input(
    episodes: pl.DataFrame,
    B: int,
    bs: int,
    s: np.ndarray,
    E: np.ndarray,
    target: np.ndarray,
    incomplete: np.ndarray,
    tb: np.ndarray,
    cb: np.ndarray,
    totals: np.ndarray,
) -> tuple[_PassInput, np.ndarray]:
    """(the chunk passes' input, the admission order = running order: step, then SCHEDULED time stamp)."""
    n = episodes.height
    ts_s = episodes["ts_s"].fill_null(0).to_numpy()
    order = np.lexsort((np.arange(n), ts_s, s))
    ctx = _PassInput(
        B=B,
        bs=bs,
        order=order.tolist(),
        s=s.tolist(),
        E=E.tolist(),
        target=target.tolist(),
        incomplete=incomplete.tolist(),
        tb=tb.tolist(),
        cb=cb.tolist(),
        end_hw=episodes["end_hw"].to_list(),
        totals=totals,
    )
    return ctx, order


def _assemble(
    episodes: pl.DataFrame,
    req: pl.DataFrame,
    res: _PassResult,
    Fsrc: np.ndarray,
    E: np.ndarray,
    order: np.ndarray,
    output_lag: int,
    diag: dict,
) -> Reconstruction:
    """The batches of the last pass, the episodes with their completion step, hit and sources, and the counts."""
    r_step, r_ep, r_done, r_q = res.rows
    n_solved, n_incons = res.n_solved, len(res.violations)
    h = np.asarray(res.h, np.int64)
    hsrc = np.asarray(res.hsrc, np.int8)
    F = np.asarray(res.F, np.int64)
    Fsrc = np.where((Fsrc == 0) & (F >= 0), 6, Fsrc).astype(np.int8)

    batches = _batch_rows(episodes, (r_step, r_ep, r_done, r_q), F, E, h, order, output_lag)
    episodes = episodes.with_columns(
        F=pl.Series(F).replace(-1, None),
        F_source=pl.Series([F_SOURCES[i] for i in Fsrc.tolist()], dtype=pl.Utf8),
        hit=pl.Series(h).replace(-1, None),
        h_source=pl.Series([H_SOURCES[i] for i in hsrc.tolist()], dtype=pl.Utf8),
    )
    diag.update(
        {
            "rows": batches.height,
            "prefill_rows": len(r_step),
            "decode_rows": batches.height - len(r_step),
            "h_source": _counts(H_SOURCES[i] for i in hsrc.tolist()),
            "F_source": _counts(F_SOURCES[i] for i in Fsrc.tolist()),
            "hits_solved_from_batch_summary": n_solved,
            "inconsistent_last_chunks": n_incons,
        }
    )
    return Reconstruction(batches, episodes, req, diag)


def _snapshot_hits(ev: dict, first_ep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(prefix-cache hit per episode, its source): a first episode's effective prompt length, else cached blocks."""
    n = len(first_ep)
    h = np.full(n, -1, np.int64)
    hsrc = np.zeros(n, np.int8)
    m = first_ep & (ev["h_eff"] >= 0)
    h[m], hsrc[m] = ev["h_eff"][m], 2
    m = (h < 0) & (ev["h_blk"] >= 0)
    h[m], hsrc[m] = ev["h_blk"][m], 3
    return h, hsrc


def _decode_rows_per_step(F: np.ndarray, E: np.ndarray, size: int) -> np.ndarray:
    """Decode requests per step id 0 … size−1 of the episodes with a known completion step (rows F+1 … E)."""
    used0 = np.zeros(size + 1, np.int64)
    known = (F >= 0) & (E > F)
    np.add.at(used0, F[known] + 1, 1)
    np.add.at(used0, E[known] + 1, -1)
    return np.cumsum(used0)[:size]


def _passes(
    ctx: _PassInput,
    used0: np.ndarray,
    F: np.ndarray,
    h: np.ndarray,
    hsrc: np.ndarray,
    prior: _HitPrior,
    prompt: np.ndarray,
    target: np.ndarray,
    first_ep: np.ndarray,
    bs: int,
    repair_rounds: int,
):
    """(last pass result, repaired hits {episode: hit}, repair passes run)."""
    # pass 1, then again with a prior that includes the hits solved from BATCH_SUMMARY, then
    # repairs: a reliable hit whose last chunk does not fit moves the misfit onto an estimated
    # hit of an episode that shares its steps (at most `repair_rounds` passes)
    res = _chunk_pass(ctx, used0, F.tolist(), h.tolist(), hsrc.tolist(), prior, {})
    hk = np.asarray(res.h, np.int64)
    hs = np.asarray(res.hsrc, np.int8)
    rel = (hs >= 1) & (hs != 5)
    if ((hs == 4) | (hs == 6)).any():
        prior = _HitPrior(prompt, target, np.where(rel, hk, -1), bs, resume=~first_ep)
        res = _chunk_pass(ctx, used0, F.tolist(), h.tolist(), hsrc.tolist(), prior, {})
    overrides: dict[int, int] = {}
    n_rep = 0
    for _ in range(repair_rounds):
        new = _repairs(res, ctx)
        if not new:
            break
        overrides.update(new)
        n_rep += 1
        res = _chunk_pass(ctx, used0, F.tolist(), h.tolist(), hsrc.tolist(), prior, overrides)
    return res, overrides, n_rep


def _batch_rows(
    episodes: pl.DataFrame,
    chunk_rows: tuple,
    F: np.ndarray,
    E: np.ndarray,
    h: np.ndarray,
    order: np.ndarray,
    output_lag: int,
) -> pl.DataFrame:
    """The batches table (BATCH_SCHEMA): the passes' prefill/recompute chunks and every decode step F+1 … E of each
    episode, in step order then running order."""
    r_step, r_ep, r_done, r_q = chunk_rows
    n = episodes.height
    target, prompt, ob = episodes["target"].to_numpy(), episodes["prompt_len"].to_numpy(), episodes["ob"].to_numpy()
    # prefill / recompute rows
    pe = np.asarray(r_ep, np.int64)
    pf_step = np.asarray(r_step, np.int64)
    pf_c = h[pe] + np.asarray(r_done, np.int64)
    pf_q = np.asarray(r_q, np.int64)
    pf_out = ob[pe]
    # decode rows: F+1 .. E
    dk = np.flatnonzero((F >= 0) & (E > F))
    lens = (E[dk] - F[dk]).astype(np.int64)
    de = np.repeat(dk, lens)
    off = np.arange(lens.sum(), dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)  # 0..len-1
    d_step = F[de] + 1 + off
    d_c = target[de] + off
    d_out = ob[de] + np.maximum(off + 1 - output_lag, 0)
    ep_all = np.concatenate([pe, de])
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    step_all = np.concatenate([pf_step, d_step])
    srt = np.argsort(
        step_all * max(n, 1) + rank[ep_all], kind="stable"
    )  # = lexsort((rank, step)), 2.4x faster on one int key
    ep_all, step_all = ep_all[srt], step_all[srt]
    out_all = np.concatenate([pf_out, d_out])[srt]
    ids = episodes["request.id"]
    return (
        pl.DataFrame(
            {
                "step.id": step_all,
                "request.id": ids.gather(ep_all),
                "progress_index": np.concatenate([pf_c, d_c])[srt],
                "new_tokens": np.concatenate([pf_q, np.ones(len(de), np.int64)])[srt],
                "prompt_len": prompt[ep_all],
                "num_output_tokens": out_all,
                "episode": episodes["episode"].to_numpy()[ep_all].astype(np.int32),
            }
        )
        .with_columns(  # a polars expression: 4 M numpy strings would take 0.4 s to convert
            phase=pl.when(pl.col("num_output_tokens") == 0).then(pl.lit("PREFILL")).otherwise(pl.lit("DECODE"))
        )
        .select(
            "step.id",
            "request.id",
            "progress_index",
            "new_tokens",
            "prompt_len",
            "phase",
            "num_output_tokens",
            "episode",
        )
    )


def _counts(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for k in items:
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items()))


def reconstruct_batches(
    journey: pl.DataFrame,
    *,
    steps: pl.DataFrame | None = None,
    snapshots: pl.DataFrame | None = None,
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
) -> pl.DataFrame:
    """One row per scheduled (step.id, request.id): ``step.id, request.id, progress_index,
    new_tokens, prompt_len, phase`` (+ ``num_output_tokens``, ``episode``), for every step."""
    return reconstruct(journey, steps=steps, snapshots=snapshots, max_num_batched_tokens=max_num_batched_tokens).batches


def reconstruct_run(folder: str | Path, *, tables=None, **kw) -> tuple[Reconstruction, object]:
    """Read a run folder (traces + exp-config.yaml's max_num_batched_tokens) and reconstruct it.
    Returns (reconstruction, TraceTables)."""
    from stepml_core.runs.folders import find_trace_file, safe_load_yaml
    from stepml_core.traces import read_traces

    folder = Path(folder)
    if tables is None:
        tp = find_trace_file(folder)
        if tp is None:
            raise FileNotFoundError(f"{folder}: no traces.json[.gz]")
        tables = read_traces(tp)
    cfg = folder / "exp-config.yaml"
    B = DEFAULT_MAX_NUM_BATCHED_TOKENS
    if cfg.is_file():
        B = int((safe_load_yaml(cfg) or {}).get("max_num_batched_tokens") or B)
    kw.setdefault("max_num_batched_tokens", B)
    return reconstruct(tables.journey, steps=tables.steps, snapshots=tables.snapshots, **kw), tables
