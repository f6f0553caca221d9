"""Pandera (polars backend) schemas of StepML's tables; the same schemas validate in tests and assets."""

from __future__ import annotations

import polars as pl
import pandera.polars as pa

STEP_INT_COLUMNS = [
    "step.id", "step.ts_start_ns", "step.ts_end_ns", "step.duration_us", "queue.running_depth", "queue.waiting_depth",
    "batch.num_prefill_reqs", "batch.num_decode_reqs", "batch.scheduled_tokens", "batch.prefill_tokens",
    "batch.decode_tokens", "batch.num_finished", "batch.num_preempted", "kv.blocks_total_gpu", "kv.blocks_free_gpu",
]
STEP_COLUMNS = STEP_INT_COLUMNS[:13] + ["kv.usage_gpu_ratio"] + STEP_INT_COLUMNS[13:]


def _nonneg(**kw):
    return pa.Field(ge=0, nullable=False, **kw)


class StepTableSchema(pa.DataFrameModel):
    """One row per sampled scheduler step (BATCH_SUMMARY), as kept after validation."""

    step_id: int = pa.Field(alias="step.id", ge=1, unique=True, nullable=False)
    ts_start_ns: int = pa.Field(alias="step.ts_start_ns", ge=0, nullable=False)
    ts_end_ns: int = pa.Field(alias="step.ts_end_ns", ge=0, nullable=False)
    duration_us: int = _nonneg(alias="step.duration_us")
    running_depth: int = _nonneg(alias="queue.running_depth")
    waiting_depth: int = _nonneg(alias="queue.waiting_depth")
    num_prefill_reqs: int = _nonneg(alias="batch.num_prefill_reqs")
    num_decode_reqs: int = _nonneg(alias="batch.num_decode_reqs")
    scheduled_tokens: int = _nonneg(alias="batch.scheduled_tokens")
    prefill_tokens: int = _nonneg(alias="batch.prefill_tokens")
    decode_tokens: int = _nonneg(alias="batch.decode_tokens")
    num_finished: int = _nonneg(alias="batch.num_finished")
    num_preempted: int = _nonneg(alias="batch.num_preempted")
    usage_gpu_ratio: float = pa.Field(alias="kv.usage_gpu_ratio", ge=0.0, le=1.0, nullable=False)
    blocks_total_gpu: int = pa.Field(alias="kv.blocks_total_gpu", ge=1, nullable=False)
    blocks_free_gpu: int = _nonneg(alias="kv.blocks_free_gpu")

    class Config:
        strict = False  # provenance columns (source_line, span_sequence, ...) ride along
        coerce = False

    @pa.dataframe_check(error="prefill + decode tokens == scheduled tokens")
    def tokens_add_up(cls, data) -> pl.LazyFrame:
        return data.lazyframe.select(
            (pl.col("batch.prefill_tokens") + pl.col("batch.decode_tokens")) == pl.col("batch.scheduled_tokens"))

    @pa.dataframe_check(error="kv.blocks_free_gpu <= kv.blocks_total_gpu")
    def free_le_total(cls, data) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("kv.blocks_free_gpu") <= pl.col("kv.blocks_total_gpu"))

    @pa.dataframe_check(error="step.ts_end_ns >= step.ts_start_ns")
    def end_after_start(cls, data) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("step.ts_end_ns") >= pl.col("step.ts_start_ns"))


class QuarantineSchema(pa.DataFrameModel):
    """Every rejected line, event or row with the file, line and reason."""

    file: str = pa.Field(nullable=False)
    line: int = pa.Field(ge=0, nullable=True)
    kind: str = pa.Field(isin=["line", "event", "row"], nullable=False)
    reason: str = pa.Field(nullable=False)
    excerpt: str = pa.Field(nullable=True)

    class Config:
        strict = False


QUARANTINE_COLUMNS = {"file": pl.Utf8, "line": pl.Int64, "kind": pl.Utf8, "reason": pl.Utf8, "excerpt": pl.Utf8}


def empty_quarantine() -> pl.DataFrame:
    return pl.DataFrame(schema=QUARANTINE_COLUMNS)
