"""Journey events → episodes: when each request ran, from its ``llm_core`` journey events
(docs/trace-format.md §4; the rules are in :mod:`stepml_core.tables.reconstruct`'s docstring, *Episodes*).

An episode is one stay in the running list: admitted at ``SCHEDULED`` (step ``s``), left at a natural finish
(``D + lag``), a preemption (``P − 1``) or an abort (``N``); its prefill completes at ``F``.
"""

from __future__ import annotations

import numpy as np
import polars as pl

# ----------------------------------------------------------------------------- journey → episodes

_TYPE_RANK = {"QUEUED": 0, "SCHEDULED": 1, "PREEMPTED": 2, "FIRST_TOKEN": 3, "FINISHED": 4}
_ABORT_LIKE = ("aborted", "error", "ignored")  # FINISHED at the current counter, outside update_from_output


def _events(journey: pl.DataFrame) -> pl.DataFrame:
    """Journey events sorted by (request, scheduler.step, ts, type rank), with request index ``rid``."""
    need = ["request.id", "event.type", "scheduler.step"]
    missing = [c for c in need if c not in journey.columns]
    if missing:
        raise ValueError(f"journey table lacks columns {missing}")
    opt = {
        "ts.monotonic_ns": pl.Int64,
        "prefill.total_tokens": pl.Int64,
        "prefill.done_tokens": pl.Int64,
        "decode.done_tokens": pl.Int64,
        "decode.max_tokens": pl.Int64,
        "num_preemptions": pl.Int64,
        "schedule.kind": pl.Utf8,
        "finish.status": pl.Utf8,
    }
    j = journey.select(
        pl.col("request.id").cast(pl.Utf8),
        pl.col("event.type").cast(pl.Utf8),
        pl.col("scheduler.step").cast(pl.Int64),
        *[(pl.col(c).cast(t) if c in journey.columns else pl.lit(None, dtype=t)).alias(c) for c, t in opt.items()],
    ).filter(
        pl.col("request.id").is_not_null()
        & pl.col("scheduler.step").is_not_null()
        & pl.col("event.type").is_in(list(_TYPE_RANK))
    )
    j = j.with_columns(_rank=pl.col("event.type").replace_strict(_TYPE_RANK, return_dtype=pl.Int8))
    j = j.unique(subset=["request.id", "event.type", "scheduler.step", "ts.monotonic_ns"], keep="first")
    j = j.sort(["request.id", "scheduler.step", "ts.monotonic_ns", "_rank"], nulls_last=True)
    j = j.with_columns(
        rid=(pl.col("request.id") != pl.col("request.id").shift(1)).fill_null(True).cum_sum().cast(pl.Int64) - 1
    )
    return j.with_columns(
        ep=(pl.col("event.type") == "SCHEDULED").cast(pl.Int32).cum_sum().over("rid"),
        pos=pl.int_range(pl.len()).over("rid"),
        next_done=pl.col("decode.done_tokens").shift(-1).over("rid"),
    )


def journey_episodes(
    journey: pl.DataFrame, *, last_step: int | None = None, output_lag: int = 1
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(episodes, requests) from journey events alone: admissions, completion steps where the
    events determine them, last step in the running list. ``last_step``: the run's last step id
    (for requests still running at the end of the trace; default: the largest step seen)."""
    ev = _events(journey)
    if last_step is None:
        last_step = int(ev["scheduler.step"].max() or 0) + output_lag
    req = _request_milestones(ev)
    episodes = _episodes(_episode_events(ev, req), int(last_step), output_lag)
    return episodes, req


def _first_of(kind: str, col: str | pl.Expr) -> pl.Expr:
    """The first value of `col` among a group's events of type `kind`."""
    e = pl.col(col) if isinstance(col, str) else col
    return e.filter(pl.col("event.type") == kind).first()


def _request_milestones(ev: pl.DataFrame) -> pl.DataFrame:
    """One row per request: prompt, max tokens, the step and time of its first QUEUED, SCHEDULED, FIRST_TOKEN and
    FINISHED, finish status, output tokens, preemptions, admissions."""
    T, first_of = pl.col("event.type"), _first_of
    req = (
        ev.group_by("rid")
        .agg(
            pl.col("request.id").first(),
            prompt_len=pl.col("prefill.total_tokens").max(),
            max_tokens=pl.col("decode.max_tokens").max(),
            queued_step=first_of("QUEUED", "scheduler.step"),
            queued_ns=first_of("QUEUED", "ts.monotonic_ns"),
            first_sched_step=first_of("SCHEDULED", "scheduler.step"),
            first_sched_ns=first_of("SCHEDULED", "ts.monotonic_ns"),
            first_token_step=first_of("FIRST_TOKEN", "scheduler.step"),
            first_token_ns=first_of("FIRST_TOKEN", "ts.monotonic_ns"),
            finished_step=first_of("FINISHED", "scheduler.step"),
            finished_ns=first_of("FINISHED", "ts.monotonic_ns"),
            finish_status=first_of("FINISHED", "finish.status"),
            output_tokens=first_of("FINISHED", "decode.done_tokens"),
            num_preemptions=pl.col("num_preemptions").max(),
            n_episodes=(T == "SCHEDULED").sum().cast(pl.Int32),
        )
        .sort("rid")
    )
    return req


def _episode_events(ev: pl.DataFrame, req: pl.DataFrame) -> pl.DataFrame:
    """One row per (request, episode): the SCHEDULED that opened it and the PREEMPTED / FINISHED / FIRST_TOKEN in it."""
    first_of = _first_of
    g = (
        ev.filter(pl.col("ep") >= 1)
        .group_by(["rid", "ep"])
        .agg(
            s=first_of("SCHEDULED", "scheduler.step"),
            ts_s=first_of("SCHEDULED", "ts.monotonic_ns"),
            kind=first_of("SCHEDULED", "schedule.kind"),
            ob=first_of("SCHEDULED", "decode.done_tokens"),
            s_hw=first_of("SCHEDULED", "prefill.done_tokens"),
            p_hw=first_of("PREEMPTED", "prefill.done_tokens"),
            d_hw=first_of("FINISHED", "prefill.done_tokens"),
            ft=first_of("FIRST_TOKEN", "scheduler.step"),
            P=first_of("PREEMPTED", "scheduler.step"),
            p_pos=first_of("PREEMPTED", "pos"),
            p_done=first_of("PREEMPTED", "decode.done_tokens"),
            after_p=first_of("PREEMPTED", "next_done"),
            D=first_of("FINISHED", "scheduler.step"),
            d_pos=first_of("FINISHED", "pos"),
            d_done=first_of("FINISHED", "decode.done_tokens"),
            status=first_of("FINISHED", "finish.status"),
        )
        .sort(["rid", "ep"])
    )
    g = g.join(req.select("rid", "request.id", "prompt_len", "max_tokens"), on="rid", how="left")
    return g


def _episodes(g: pl.DataFrame, last_step: int, output_lag: int) -> pl.DataFrame:
    """Each episode's completion step F (and how it was found), last step in the running list E and how it ended."""

    def arr(c, fill=-1):
        return g[c].fill_null(fill).to_numpy().astype(np.int64)

    s, ob, prompt = arr("s"), np.maximum(arr("ob", 0), 0), arr("prompt_len", 0)
    ft, P, p_pos, p_done, after_p = arr("ft"), arr("P"), arr("p_pos"), arr("p_done"), arr("after_p")
    D, d_pos, d_done = arr("D"), arr("d_pos"), arr("d_done")
    status = g["status"].fill_null("").to_numpy()
    abort_like = np.isin(status, _ABORT_LIKE)
    has_p, has_d = P >= 0, D >= 0
    nat = has_d & ~abort_like & (~has_p | (d_pos < p_pos))
    pre = has_p & (~has_d | (p_pos < d_pos))
    ab = has_d & abort_like & (~has_p | (d_pos < p_pos))
    target = prompt + ob
    n = len(s)
    F = np.full(n, -1, np.int64)
    Fsrc = np.zeros(n, np.int8)
    m = ft >= 0
    F[m], Fsrc[m] = ft[m], 1
    m = (F < 0) & nat & (d_done > ob)
    F[m], Fsrc[m] = (D - (d_done - ob) + 1)[m], 2
    tok_p = np.where(after_p >= 0, after_p - ob, np.where(p_done > ob, p_done - ob + 1, 0))
    m = (F < 0) & pre & (tok_p > 0)
    F[m], Fsrc[m] = (P - tok_p)[m], 3
    incomplete = pre & (after_p >= 0) & (after_p <= ob) & (F < 0)  # certainly not complete before P
    m = (F < 0) & ab & (d_done > ob)
    F[m], Fsrc[m] = (D - (d_done - ob))[m], 4
    E = np.full(n, int(last_step), np.int64)
    E = np.where(nat, D + output_lag, E)
    E = np.where(nat & has_p & (P > D), np.minimum(E, P - 1), E)
    E = np.where(pre, P - 1, E)
    E = np.where(ab, D, E)
    E = np.maximum(E, s)
    bad = (F >= 0) & ((F < s) | (F > E))
    F[bad], Fsrc[bad] = -1, 0
    end_kind = np.where(nat, "finished", np.where(pre, "preempted", np.where(ab, "aborted", "open")))
    # prompt high-water mark at the end of an episode that stopped inside its prompt prefill:
    # prefill.done_tokens = max(earlier mark, hit + chunks) → the hit when the mark moved
    s_hw = arr("s_hw", 0)
    end_hw = np.where(pre, arr("p_hw"), np.where(ab, arr("d_hw"), -1))
    end_hw = np.where((ob == 0) & (end_hw > s_hw) & (end_hw < prompt), end_hw, -1)
    episodes = pl.DataFrame(
        {
            "rid": g["rid"],
            "request.id": g["request.id"],
            "episode": g["ep"].cast(pl.Int32),
            "s": s,
            "ts_s": g["ts_s"],
            "kind": g["kind"],
            "ob": ob,
            "prompt_len": prompt,
            "target": target,
            "F": F,
            "F_source": Fsrc,
            "E": E,
            "end_kind": end_kind,
            "incomplete": incomplete,
            "P": P,
            "end_hw": end_hw,
        }
    )
    return episodes
