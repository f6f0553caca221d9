"""Pandera (polars backend) schemas of StepML's tables; the same schemas validate in tests and assets."""

from __future__ import annotations

import pandera.polars as pa
import polars as pl

from stepml_core.runs.request_log import MAX_KV_BLOCKS  # KV-cache blocks of one engine (16-token blocks: 1.6e10 tokens)

STEP_INT_COLUMNS = [
    "step.id",
    "step.ts_start_ns",
    "step.ts_end_ns",
    "step.duration_us",
    "queue.running_depth",
    "queue.waiting_depth",
    "batch.num_prefill_reqs",
    "batch.num_decode_reqs",
    "batch.scheduled_tokens",
    "batch.prefill_tokens",
    "batch.decode_tokens",
    "batch.num_finished",
    "batch.num_preempted",
    "kv.blocks_total_gpu",
    "kv.blocks_free_gpu",
]
STEP_COLUMNS = STEP_INT_COLUMNS[:13] + ["kv.usage_gpu_ratio"] + STEP_INT_COLUMNS[13:]


# Plausibility bounds (what a step of a serving engine can physically be; values beyond them are
# corrupt or fabricated, and one such row can dominate every pooled least-squares fit). The two real
# H100 runs are orders of magnitude inside every bound. Run-specific bounds from exp-config.yaml
# (tokens within max_num_batched_tokens, requests within max_num_seqs) are applied by
# tables.validate_steps.
NS_PER_HOUR = 3_600 * 10**9
MAX_STEP_ID = 10**12  # a step every 10 µs for 115 days
MAX_CLOCK_NS = (
    4_102_444_800 * 10**9
)  # 2100-01-01 as Unix ns: step clocks (monotonic since boot, or Unix time) read less
MAX_STEP_DURATION_US = 3_600 * 10**6  # one hour: a scheduler call takes µs to ms
MAX_STEP_SPAN_NS = NS_PER_HOUR  # step.ts_end_ns - step.ts_start_ns: one hour
MAX_BATCH_REQUESTS = (
    1 << 20
)  # running / scheduled / finished / preempted requests: vLLM's max_num_seqs bound (exp-config schema)
MAX_WAITING_REQUESTS = 10**8  # requests queued at one instant
MAX_STEP_TOKENS = 1 << 24  # tokens scheduled in one step: the max_num_batched_tokens bound (exp-config schema)

STEP_BOUNDS = {  # column: highest plausible value (lowest: 0, or 1 for step.id and kv.blocks_total_gpu)
    "step.id": MAX_STEP_ID,
    "step.ts_start_ns": MAX_CLOCK_NS,
    "step.ts_end_ns": MAX_CLOCK_NS,
    "step.duration_us": MAX_STEP_DURATION_US,
    "queue.running_depth": MAX_BATCH_REQUESTS,
    "queue.waiting_depth": MAX_WAITING_REQUESTS,
    "batch.num_prefill_reqs": MAX_BATCH_REQUESTS,
    "batch.num_decode_reqs": MAX_BATCH_REQUESTS,
    "batch.scheduled_tokens": MAX_STEP_TOKENS,
    "batch.prefill_tokens": MAX_STEP_TOKENS,
    "batch.decode_tokens": MAX_STEP_TOKENS,
    "batch.num_finished": MAX_BATCH_REQUESTS,
    "batch.num_preempted": MAX_BATCH_REQUESTS,
    "kv.usage_gpu_ratio": 1.0,
    "kv.blocks_total_gpu": MAX_KV_BLOCKS,
    "kv.blocks_free_gpu": MAX_KV_BLOCKS,
}


def _nonneg(alias: str, **kw):
    return pa.Field(alias=alias, ge=0, le=STEP_BOUNDS[alias], nullable=False, **kw)


class StepTableSchema(pa.DataFrameModel):
    """One row per sampled scheduler step (BATCH_SUMMARY), as kept after validation."""

    step_id: int = pa.Field(alias="step.id", ge=1, le=MAX_STEP_ID, unique=True, nullable=False)
    ts_start_ns: int = _nonneg(alias="step.ts_start_ns")
    ts_end_ns: int = _nonneg(alias="step.ts_end_ns")
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
    blocks_total_gpu: int = pa.Field(alias="kv.blocks_total_gpu", ge=1, le=MAX_KV_BLOCKS, nullable=False)
    blocks_free_gpu: int = _nonneg(alias="kv.blocks_free_gpu")

    class Config:
        strict = False  # provenance columns (source_line, span_sequence, ...) ride along
        coerce = False

    @pa.dataframe_check(error="prefill + decode tokens == scheduled tokens")
    def tokens_add_up(cls, data) -> pl.LazyFrame:
        return data.lazyframe.select(
            (pl.col("batch.prefill_tokens") + pl.col("batch.decode_tokens")) == pl.col("batch.scheduled_tokens")
        )

    @pa.dataframe_check(error="kv.blocks_free_gpu <= kv.blocks_total_gpu")
    def free_le_total(cls, data) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("kv.blocks_free_gpu") <= pl.col("kv.blocks_total_gpu"))

    @pa.dataframe_check(error="step.ts_end_ns >= step.ts_start_ns")
    def end_after_start(cls, data) -> pl.LazyFrame:
        return data.lazyframe.select(pl.col("step.ts_end_ns") >= pl.col("step.ts_start_ns"))

    @pa.dataframe_check(error=f"step.ts_end_ns - step.ts_start_ns <= {MAX_STEP_SPAN_NS} (one hour)")
    def span_within_an_hour(cls, data) -> pl.LazyFrame:
        return data.lazyframe.select((pl.col("step.ts_end_ns") - pl.col("step.ts_start_ns")) <= MAX_STEP_SPAN_NS)


class QuarantineSchema(pa.DataFrameModel):
    """Every rejected line, event or row with the file, line and reason."""

    file: str = pa.Field(nullable=False)
    line: int = pa.Field(ge=0, nullable=True)
    kind: str = pa.Field(isin=["line", "event", "row", "file"], nullable=False)  # file: a whole file or its damage
    reason: str = pa.Field(nullable=False)
    excerpt: str = pa.Field(nullable=True)
    count: int = pa.Field(ge=1, nullable=False)  # records this row stands for (>1: a summary of records not stored)

    class Config:
        strict = False


QUARANTINE_COLUMNS = {
    "file": pl.Utf8,
    "line": pl.Int64,
    "kind": pl.Utf8,
    "reason": pl.Utf8,
    "excerpt": pl.Utf8,
    "count": pl.Int64,
}


def empty_quarantine() -> pl.DataFrame:
    return pl.DataFrame(schema=QUARANTINE_COLUMNS)
