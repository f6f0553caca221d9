"""Validated step table and targets.

`validate_steps` splits raw BATCH_SUMMARY rows into kept rows (which pass
`StepTableSchema`, its plausibility bounds, the run's own bounds from exp-config.yaml and a clock
that never goes backwards) and quarantined rows with file, line and reason, so that
rows in = rows kept + rows quarantined, always.

Targets (µs):
  schedule_us = step.duration_us   (CPU time of the scheduler's schedule() call; the original target)
  cycle_gap_us = (step.ts_start_ns[id+1] − step.ts_start_ns[id]) / 1000, only where step id+1 is
                also sampled; null otherwise.
  cycle_us    = cycle_gap_us where it is an engine cycle (what a simulator advances its clock by),
                null where the cycle rule excludes it; `cycle_excluded` says why:
     idle  — nothing was left to run after step id (running_depth − num_finished ≤ 0 and
             waiting_depth = 0) and the gap is longer than the local median below: the gap
             contains the wait for the next arrival;
     stall — gap > STALL_FACTOR × the median gap of the STALL_WINDOW nearest consecutive pairs
             (centred, in step order): the loop paused for something the batch does not show
             (warm-up, host stall). A local median, not a run-wide fence, so cycles that are
             long because the load is high are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandera.polars as pa
import polars as pl

from stepml_core.tables.schemas import QUARANTINE_COLUMNS, STEP_COLUMNS, StepTableSchema


@dataclass
class ValidatedSteps:
    kept: pl.DataFrame
    quarantine: pl.DataFrame  # columns file, line, kind, reason, excerpt
    rows_in: int

    @property
    def counts(self) -> dict:
        return {"rows_in": self.rows_in, "rows_kept": self.kept.height, "rows_quarantined": self.quarantine.height}


def _excerpt(df: pl.DataFrame) -> pl.Expr:
    return pl.concat_str([pl.lit("step.id="), pl.col("step.id").cast(pl.Utf8).fill_null("null")])


def _quarantine_rows(df: pl.DataFrame, file: str, reason: pl.Expr) -> pl.DataFrame:
    line = pl.col("source_line").cast(pl.Int64) if "source_line" in df.columns else pl.lit(None, pl.Int64)
    return df.select(
        file=pl.lit(file),
        line=line,
        kind=pl.lit("row"),
        reason=reason.cast(pl.Utf8),
        excerpt=_excerpt(df),
        count=pl.lit(1),
    ).cast(QUARANTINE_COLUMNS)


def run_bound_checks(exp_config: dict | None) -> list[tuple[pl.Expr, pl.Expr]]:
    """(row passes, reason) per run-specific bound from exp-config.yaml (the engine's own limits):

    batch.scheduled_tokens <= max_num_batched_tokens (the step's token budget);
    batch.num_prefill_reqs + batch.num_decode_reqs <= max_num_seqs and
    queue.running_depth <= max_num_seqs (the running batch's size limit)."""
    cfg = exp_config or {}
    out = []
    budget, seqs = cfg.get("max_num_batched_tokens"), cfg.get("max_num_seqs")
    if isinstance(budget, int) and not isinstance(budget, bool):
        out.append(
            (
                pl.col("batch.scheduled_tokens") <= budget,
                pl.format(
                    "bound: batch.scheduled_tokens {} > max_num_batched_tokens {} (exp-config.yaml)",
                    pl.col("batch.scheduled_tokens"),
                    pl.lit(budget),
                ),
            )
        )
    if isinstance(seqs, int) and not isinstance(seqs, bool):
        reqs = pl.col("batch.num_prefill_reqs") + pl.col("batch.num_decode_reqs")
        out.append(
            (
                reqs <= seqs,
                pl.format("bound: {} requests in the batch > max_num_seqs {} (exp-config.yaml)", reqs, pl.lit(seqs)),
            )
        )
        out.append(
            (
                pl.col("queue.running_depth") <= seqs,
                pl.format(
                    "bound: queue.running_depth {} > max_num_seqs {} (exp-config.yaml)",
                    pl.col("queue.running_depth"),
                    pl.lit(seqs),
                ),
            )
        )
    return out


def _bounds_and_clock(df: pl.DataFrame, file: str, exp_config: dict | None) -> tuple[pl.DataFrame, list[pl.DataFrame]]:
    """Rows past a run-specific bound, then rows whose step.ts_start_ns is below that of an earlier
    step id (the clock goes backwards: cycle_us would be negative), quarantined; the rest kept."""
    parts = []
    for ok, reason in run_bound_checks(exp_config):
        bad = df.filter(~ok)
        if bad.height:
            parts.append(_quarantine_rows(bad, file, reason))
            df = df.filter(ok)
    df = df.sort("step.id", maintain_order=True)
    prev_max = pl.col("step.ts_start_ns").cum_max().shift(1)
    back = pl.col("step.ts_start_ns") < prev_max
    bad = df.filter(back)
    if bad.height:
        bad = df.with_columns(_prev_max=prev_max).filter(back)
        parts.append(
            _quarantine_rows(
                bad,
                file,
                pl.format(
                    "clock: step.ts_start_ns {} goes backwards (an earlier step id started at {})",
                    pl.col("step.ts_start_ns"),
                    pl.col("_prev_max"),
                ),
            )
        )
        df = df.filter(~back.fill_null(False))
    return df, parts


def validate_steps(raw: pl.DataFrame, file: str, exp_config: dict | None = None) -> ValidatedSteps:
    """Kept rows pass StepTableSchema, the run's exp-config bounds and a forward clock; every other
    row is quarantined with its reason (see run_bound_checks, _bounds_and_clock)."""
    rows_in = raw.height
    df = raw.with_row_index("_row")
    parts = []
    if "parse_issue" in df.columns:
        bad = df.filter(pl.col("parse_issue").is_not_null())
        parts.append(_quarantine_rows(bad, file, pl.lit("parse: ") + pl.col("parse_issue")))
        df = df.filter(pl.col("parse_issue").is_null())
    # duplicate step ids: keep the first occurrence in file order, quarantine the rest
    dup = pl.col("_row").rank("ordinal").over("step.id") > 1
    dups = df.filter(dup & pl.col("step.id").is_not_null())
    if dups.height:
        first = df.group_by("step.id").agg(
            first_line=pl.col("source_line").min() if "source_line" in df.columns else pl.lit(None)
        )
        dups = dups.join(first, on="step.id", how="left")
        parts.append(
            _quarantine_rows(
                dups,
                file,
                pl.format("duplicate step.id {} (first seen at line {})", pl.col("step.id"), pl.col("first_line")),
            )
        )
        df = df.filter(~(dup & pl.col("step.id").is_not_null()))
    try:
        StepTableSchema.validate(df, lazy=True)
    except pa.errors.SchemaErrors as e:
        fc = e.failure_cases
        if "index" not in fc.columns or fc["index"].null_count() == fc.height:
            raise  # a whole-table failure (e.g. wrong dtype): a bug in the reader, not bad data
        why = (
            fc.filter(pl.col("index").is_not_null())
            .with_columns(msg=pl.format("{}: {} (value {})", pl.col("column"), pl.col("check"), pl.col("failure_case")))
            .group_by("index")
            .agg(reason=pl.col("msg").unique().sort().str.join("; "))
        )
        failing = df.with_row_index("index").join(
            why.with_columns(pl.col("index").cast(pl.UInt32)), on="index", how="inner"
        )
        parts.append(_quarantine_rows(failing, file, pl.lit("schema: ") + pl.col("reason")))
        keep_idx = set(range(df.height)) - set(failing["index"].to_list())
        df = df.with_row_index("index").filter(pl.col("index").is_in(sorted(keep_idx))).drop("index")
        StepTableSchema.validate(df)  # what is kept must pass
    df, more = _bounds_and_clock(df, file, exp_config)
    parts += more
    quarantine = pl.concat(parts) if parts else pl.DataFrame(schema=QUARANTINE_COLUMNS)
    kept = df.drop("_row").sort("step.id")
    if "parse_issue" in kept.columns:
        kept = kept.drop("parse_issue")
    assert kept.height + quarantine.height == rows_in
    return ValidatedSteps(kept=kept, quarantine=quarantine, rows_in=rows_in)


STALL_FACTOR, STALL_WINDOW = 2.0, 51


def add_targets(steps: pl.DataFrame) -> pl.DataFrame:
    """Add schedule_us, cycle_gap_us, cycle_excluded and cycle_us (see module docstring) to a kept step table."""
    s = steps.sort("step.id")
    nxt_id = pl.col("step.id").shift(-1)
    nxt_ts = pl.col("step.ts_start_ns").shift(-1)
    s = s.with_columns(
        schedule_us=pl.col("step.duration_us").cast(pl.Float64),
        cycle_gap_us=pl.when(nxt_id == pl.col("step.id") + 1)
        .then((nxt_ts - pl.col("step.ts_start_ns")).cast(pl.Float64) / 1000.0)
        .otherwise(None),
    )
    pairs = s.filter(pl.col("cycle_gap_us").is_not_null()).select(
        "step.id", local_median_us=pl.col("cycle_gap_us").rolling_median(STALL_WINDOW, min_samples=1, center=True)
    )
    idle = ((pl.col("queue.running_depth") - pl.col("batch.num_finished")) <= 0) & (pl.col("queue.waiting_depth") == 0)
    stall = pl.col("cycle_gap_us") > STALL_FACTOR * pl.col("local_median_us")
    return (
        s.join(pairs, on="step.id", how="left")
        .with_columns(
            cycle_excluded=pl.when(pl.col("cycle_gap_us").is_null())
            .then(None)
            .when(idle & (pl.col("cycle_gap_us") > pl.col("local_median_us")))
            .then(pl.lit("idle"))
            .when(stall)
            .then(pl.lit("stall"))
            .otherwise(None)
        )
        .with_columns(cycle_us=pl.when(pl.col("cycle_excluded").is_null()).then(pl.col("cycle_gap_us")).otherwise(None))
        .drop("local_median_us")
    )


def cycle_rule_counts(steps: pl.DataFrame) -> dict:
    """{"pairs": consecutive sampled pairs, "kept": cycles kept, "idle": removed as idle, "stall": removed as stalls}."""
    if "cycle_excluded" not in steps.columns:
        return {"pairs": 0, "kept": 0, "idle": 0, "stall": 0}
    return {
        "pairs": int(steps["cycle_gap_us"].is_not_null().sum()),
        "kept": int(steps["cycle_us"].is_not_null().sum()),
        "idle": int((steps["cycle_excluded"] == "idle").sum()),
        "stall": int((steps["cycle_excluded"] == "stall").sum()),
    }


def cap_quarantine(q: pl.DataFrame, max_rows: int) -> pl.DataFrame:
    """The first max_rows records (file order kept), plus one summary record per kind for the rest
    (``count`` = how many it stands for): sum(count) per kind is always the true number."""
    if "count" not in q.columns:
        q = q.with_columns(count=pl.lit(1, pl.Int64))
    q = q.with_columns(pl.col("count").fill_null(1).cast(pl.Int64))
    if q.height <= max_rows:
        return q
    head, rest = q[:max_rows], q[max_rows:]
    extra = rest.group_by("kind", maintain_order=True).agg(pl.col("count").sum(), pl.col("file").first())
    summary = extra.select(
        file=pl.col("file"),
        line=pl.lit(None, pl.Int64),
        kind=pl.col("kind"),
        reason=pl.format(
            "{} more {} record(s) like the stored ones, not stored (limit max_quarantine_rows = {}; "
            "STEPML_MAX_QUARANTINE_ROWS or settings.max_quarantine_rows)",
            pl.col("count"),
            pl.col("kind"),
            pl.lit(max_rows),
        ),
        excerpt=pl.lit(None, pl.Utf8),
        count=pl.col("count"),
    )
    return pl.concat([head, summary.cast(QUARANTINE_COLUMNS)], how="diagonal_relaxed")


def quarantine_counts(q: pl.DataFrame) -> dict[str, int]:
    """{kind: records} counting summary records by their ``count``."""
    if q.height == 0:
        return {}
    c = pl.col("count").fill_null(1) if "count" in q.columns else pl.lit(1)
    return {k: int(v) for k, v in q.group_by("kind").agg(c.sum()).iter_rows()}


TARGETS = ("schedule_us", "cycle_us")
__all__ = ["ValidatedSteps", "validate_steps", "add_targets", "cycle_rule_counts", "TARGETS", "STEP_COLUMNS"]
