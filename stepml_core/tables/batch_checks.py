"""How far a reconstruction agrees with what the trace sampled: per-step aggregates of the reconstructed
batches (:func:`request_aggregates`, the columns of ``features.snapshot_aggregates``), and the comparisons with
REQUEST_SNAPSHOTs (:func:`compare_with_snapshots`) and BATCH_SUMMARY counts (:func:`compare_with_batch_summary`).
"""

from __future__ import annotations

import polars as pl

from stepml_core.features.step_features import snapshot_aggregates

# ----------------------------------------------------------------------------- aggregates and checks


def request_aggregates(batches: pl.DataFrame) -> pl.DataFrame:
    """Per-step aggregates with exactly the columns (and formulas) of
    :func:`features.snapshot_aggregates` (``snap_prefill_tokens`` … ``num_logit_seqs``), from
    reconstructed batches: usable as ``request_aggregates=`` of ``step_table_features``
    (``request_source="journey"``) for every step."""
    return snapshot_aggregates(
        batches.select(
            "step.id",
            "request.id",
            pl.col("progress_index").alias("request.num_computed_tokens"),
            pl.col("new_tokens").alias("request.scheduled_tokens_this_step"),
            pl.col("prompt_len").alias("request.num_prompt_tokens"),
        )
    ).sort("step.id")


def _rate(num: int, den: int) -> float | None:
    return float(num) / den if den else None


def _snapshot_pairs(snapshots: pl.DataFrame) -> pl.DataFrame:
    """(step.id, request.id) of the snapshots with their fields ``s_q, s_c, s_p, s_phase, s_out`` (first row of a
    duplicated pair)."""
    return snapshots.select(
        pl.col("step.id").cast(pl.Int64),
        pl.col("request.id").cast(pl.Utf8),
        s_q=pl.col("request.scheduled_tokens_this_step").cast(pl.Int64),
        s_c=pl.col("request.num_computed_tokens").cast(pl.Int64),
        s_p=pl.col("request.num_prompt_tokens").cast(pl.Int64),
        s_phase=pl.col("request.phase"),
        s_out=pl.col("request.num_output_tokens").cast(pl.Int64),
    ).unique(["step.id", "request.id"], keep="first")


def _incomplete_snapshot_steps(sn: pl.DataFrame, steps: pl.DataFrame | None) -> pl.DataFrame:
    """Snapshot steps whose snapshot count differs from (or has no) ``queue.running_depth`` (``step.id``)."""
    if steps is None or not steps.height:
        return pl.DataFrame(schema={"step.id": pl.Int64})
    cnt = (
        sn.group_by("step.id")
        .len()
        .join(steps.select(pl.col("step.id").cast(pl.Int64), pl.col("queue.running_depth")), on="step.id", how="left")
    )
    return cnt.filter(
        pl.col("queue.running_depth").is_null() | (pl.col("len") != pl.col("queue.running_depth"))
    ).select("step.id")


def _joined_pairs(
    batches: pl.DataFrame, sn: pl.DataFrame, snap_steps: pl.DataFrame, incomplete: pl.DataFrame
) -> pl.DataFrame:
    """Snapshot pairs full-joined with the reconstructed pairs (``r_q, r_c, r_p, r_phase, r_out``) at snapshot
    steps, flagged ``s_sched, r_sched, in_snap, step_incomplete``; reconstruction-only pairs at incomplete steps
    dropped."""
    rb = batches.join(snap_steps, on="step.id", how="semi").select(
        pl.col("step.id").cast(pl.Int64),
        pl.col("request.id").cast(pl.Utf8),
        r_q="new_tokens",
        r_c="progress_index",
        r_p="prompt_len",
        r_phase="phase",
        r_out=(pl.col("num_output_tokens") if "num_output_tokens" in batches.columns else pl.lit(None, dtype=pl.Int64)),
    )
    j = sn.join(rb, on=["step.id", "request.id"], how="full", coalesce=True)
    j = j.with_columns(
        s_sched=pl.col("s_q").fill_null(0) > 0,
        r_sched=pl.col("r_q").is_not_null(),
        in_snap=pl.col("s_q").is_not_null(),
        step_incomplete=pl.col("step.id").is_in(incomplete["step.id"].implode()),
    )
    # reconstruction-only pairs at incomplete snapshot steps are not evidence against it
    return j.filter(pl.col("in_snap") | ~pl.col("step_incomplete"))


def compare_with_snapshots(
    batches: pl.DataFrame, snapshots: pl.DataFrame, *, steps: pl.DataFrame | None = None
) -> dict:
    """Agreement of the reconstruction with REQUEST_SNAPSHOTs on every (step, request) pair at a
    snapshot step.

    Pairs: the union of snapshot rows and reconstructed rows at steps that have snapshots.
    ``membership``: scheduled in the snapshot (``scheduled_tokens_this_step > 0``) ⇔ present in
    the reconstruction. On pairs scheduled in both: exact-match rates of ``new_tokens`` vs
    ``scheduled_tokens_this_step``, ``progress_index`` vs ``num_computed_tokens``,
    ``prompt_len`` vs ``num_prompt_tokens``, ``phase`` vs ``request.phase`` and
    ``num_output_tokens``. ``all_fields``: membership agrees and, if scheduled, every field
    matches — over all pairs. With ``steps``, snapshot steps whose snapshot count differs from
    ``queue.running_depth`` (events lost to the 128-event span cap) are reported
    (``incomplete_snapshot_steps``) and their reconstruction-only pairs are not counted.
    """
    sn = _snapshot_pairs(snapshots)
    snap_steps = sn.select("step.id").unique()
    incomplete = _incomplete_snapshot_steps(sn, steps)
    j = _joined_pairs(batches, sn, snap_steps, incomplete)
    both = j.filter(pl.col("s_sched") & pl.col("r_sched"))
    eq = {
        "new_tokens": (both["s_q"] == both["r_q"]),
        "progress_index": (both["s_c"] == both["r_c"]),
        "prompt_len": (both["s_p"] == both["r_p"]),
        "phase": (both["s_phase"] == both["r_phase"]),
        "num_output_tokens": (both["s_out"] == both["r_out"]),
    }
    fields_ok = eq["new_tokens"] & eq["progress_index"] & eq["prompt_len"]
    # prefill work (prompt chunks, recompute after preemption): the pairs that need cache hits
    pf_work = ((both["s_c"] < both["s_p"]) | (both["s_q"] > 1)).fill_null(False)
    n_pairs = j.height
    memb = int((j["s_sched"] == j["r_sched"]).sum())
    n_both = both.height
    all_ok = int(j.filter(~pl.col("s_sched") & ~pl.col("r_sched")).height) + int(fields_ok.fill_null(False).sum())
    out = {
        "snapshot_steps": snap_steps.height,
        "incomplete_snapshot_steps": incomplete.height,
        "pairs": n_pairs,
        "pairs_scheduled_both": n_both,
        "pairs_snapshot_only": int((j["s_sched"] & ~j["r_sched"]).sum()),
        "pairs_reconstruction_only": int((~j["s_sched"] & j["r_sched"]).sum()),
        "pairs_running_unscheduled": int((j["in_snap"] & ~j["s_sched"] & ~j["r_sched"]).sum()),
        "membership": _rate(memb, n_pairs),
        **{k: _rate(int(v.fill_null(False).sum()), n_both) for k, v in eq.items()},
        "all_fields": _rate(all_ok, n_pairs),
        "pairs_prefill_work": int(pf_work.sum()),
        "prefill_work_all_fields": _rate(int((fields_ok.fill_null(False) & pf_work).sum()), int(pf_work.sum())),
    }
    return out


def batch_summary_counts(batches: pl.DataFrame) -> pl.DataFrame:
    """Per-step BATCH_SUMMARY-style counts of reconstructed batches ("prefill" = no output token yet)."""
    pf = pl.col("num_output_tokens") == 0 if "num_output_tokens" in batches.columns else pl.col("phase") == "PREFILL"
    q = pl.col("new_tokens")
    return (
        batches.group_by("step.id")
        .agg(
            **{
                "batch.prefill_tokens": q.filter(pf).sum(),
                "batch.decode_tokens": q.filter(~pf).sum(),
                "batch.scheduled_tokens": q.sum(),
                "batch.num_prefill_reqs": pf.sum().cast(pl.Int64),
                "batch.num_decode_reqs": (~pf).sum().cast(pl.Int64),
            }
        )
        .sort("step.id")
    )


BATCH_COUNT_COLUMNS = [
    "batch.prefill_tokens",
    "batch.decode_tokens",
    "batch.scheduled_tokens",
    "batch.num_prefill_reqs",
    "batch.num_decode_reqs",
]


def compare_with_batch_summary(
    batches: pl.DataFrame, steps: pl.DataFrame, *, counts: pl.DataFrame | None = None
) -> dict:
    """Exact-match rates of per-step token sums and request counts against BATCH_SUMMARY on every
    sampled step (BATCH_SUMMARY labels a request "prefill" while ``num_output_tokens == 0``, so
    the extra 1-token step after the last prompt chunk counts as prefill, and a resumed decode
    request's recompute counts as decode). Steps without reconstructed rows count as zeros. ``counts``:
    batch_summary_counts(batches) where the caller has it already."""
    cnt = batch_summary_counts(batches) if counts is None else counts
    st = steps.select(
        pl.col("step.id").cast(pl.Int64), *[pl.col(c).cast(pl.Int64) for c in BATCH_COUNT_COLUMNS]
    ).unique("step.id", keep="first")
    j = st.join(cnt, on="step.id", how="left", suffix="_r").fill_null(0)
    out: dict = {"steps": j.height}
    ok_all = pl.lit(True)
    for c in BATCH_COUNT_COLUMNS:
        ok = pl.col(c) == pl.col(c + "_r")
        out[c] = _rate(int(j.select(ok.sum()).item()), j.height)
        ok_all = ok_all & ok
    out["all"] = _rate(int(j.select(ok_all.sum()).item()), j.height)
    out["scheduled_tokens_abs_err_mean"] = float(
        j.select((pl.col("batch.scheduled_tokens") - pl.col("batch.scheduled_tokens_r")).abs().mean()).item() or 0.0
    )
    return out
