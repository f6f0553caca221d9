"""Trace tables: their schemas, the reader's errors, counters and quarantine excerpts (stepml_core.traces)."""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl
import pyarrow as pa

from stepml_core.errors import StepMLError

I64, F64, STR = pl.Int64, pl.Float64, pl.Utf8
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


class TraceReadError(StepMLError, ValueError):
    """The trace file cannot be read at all (corrupt or truncated gzip stream, not gzip, unreadable)."""


class _LimitError(Exception):
    """Raised by the reading thread when a limit is passed; read_traces adds the line reached."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class _GzipError(Exception):
    """Raised by the inflating thread; read_traces turns it into a TraceReadError with the line reached."""

    def __init__(self, consumed: int, reason: str):
        super().__init__(reason)
        self.consumed, self.reason, self.pending_lines = consumed, reason, 0


# --------------------------------------------------------------------------------------------
# Table schemas
# --------------------------------------------------------------------------------------------

STEP_ATTRS: list[tuple[str, type]] = [
    ("step.id", int),
    ("step.ts_start_ns", int),
    ("step.ts_end_ns", int),
    ("step.duration_us", int),
    ("queue.running_depth", int),
    ("queue.waiting_depth", int),
    ("batch.num_prefill_reqs", int),
    ("batch.num_decode_reqs", int),
    ("batch.scheduled_tokens", int),
    ("batch.prefill_tokens", int),
    ("batch.decode_tokens", int),
    ("batch.num_finished", int),
    ("batch.num_preempted", int),
    ("kv.usage_gpu_ratio", float),
    ("kv.blocks_total_gpu", int),
    ("kv.blocks_free_gpu", int),
]
SNAPSHOT_ATTRS: list[tuple[str, type]] = [
    ("step.id", int),
    ("request.id", str),
    ("request.phase", str),
    ("request.num_prompt_tokens", int),
    ("request.num_computed_tokens", int),
    ("request.num_output_tokens", int),
    ("request.num_preemptions", int),
    ("request.scheduled_tokens_this_step", int),
    ("kv.blocks_allocated_gpu", int),
    ("kv.blocks_cached_gpu", int),
    ("request.effective_prompt_len", int),
]
SNAPSHOT_OPTIONAL = {"request.effective_prompt_len"}
# journey event attributes; event.type and ts.monotonic are read for checks / derivation only
JOURNEY_ATTRS: list[tuple[str, type]] = [
    ("event.type", str),
    ("ts.monotonic", float),
    ("ts.monotonic_ns", int),
    ("scheduler.step", int),
    ("phase", str),
    ("prefill.done_tokens", int),
    ("prefill.total_tokens", int),
    ("decode.done_tokens", int),
    ("decode.max_tokens", int),
    ("num_preemptions", int),
    ("schedule.kind", str),
    ("finish.status", str),
]
JOURNEY_REQUIRED = [
    "scheduler.step",
    "phase",
    "prefill.done_tokens",
    "prefill.total_tokens",
    "decode.done_tokens",
    "decode.max_tokens",
    "num_preemptions",
]
JOURNEY_TYPES = ("QUEUED", "SCHEDULED", "FIRST_TOKEN", "PREEMPTED", "FINISHED")
API_ATTRS: list[tuple[str, type]] = [("event.ts.monotonic", float), ("reason", str), ("error", str)]
API_EVENTS = ("ARRIVED", "DEPARTED", "ABORTED", "HANDOFF_TO_CORE", "FIRST_RESPONSE_FROM_CORE")
API_SPAN_ATTRS: list[tuple[str, str, type]] = [  # (attribute, column, type)
    ("gen_ai.request.id", "request.id", str),
    ("gen_ai.usage.prompt_tokens", "prompt_tokens", int),
    ("gen_ai.request.max_tokens", "max_tokens", int),
    ("gen_ai.response.model", "model", str),
]
STEP_SPAN_ATTRS = [
    ("scheduler.span_sequence", "span_sequence", int),
    ("scheduler.step_range_start", "step_range_start", int),
    ("scheduler.step_range_end", "step_range_end", int),
    ("scheduler.closure_interval", "closure_interval", int),
]

SCOPE_STEP, SCOPE_CORE, SCOPE_API = "vllm.scheduler.step", "vllm.scheduler", "vllm.api"
EV_BATCH, EV_SNAPSHOT = "step.BATCH_SUMMARY", "step.REQUEST_SNAPSHOT"

_PY2PL = {int: I64, float: F64, str: STR}

TABLE_SCHEMAS: dict[str, dict[str, pl.DataType]] = {
    "steps": {
        **{k: _PY2PL[t] for k, t in STEP_ATTRS},
        "event_time_unix_nano": I64,
        "span_sequence": I64,
        "source_line": I64,
        "parse_issue": STR,
    },
    "snapshots": {
        **{k: _PY2PL[t] for k, t in SNAPSHOT_ATTRS},
        "event_time_unix_nano": I64,
        "source_line": I64,
        "parse_issue": STR,
    },
    "journey": {
        "request.id": STR,
        "trace_id": STR,
        "span_id": STR,
        "parent_span_id": STR,
        "event.type": STR,
        "ts.monotonic_ns": I64,
        "scheduler.step": I64,
        "phase": STR,
        "prefill.done_tokens": I64,
        "prefill.total_tokens": I64,
        "decode.done_tokens": I64,
        "decode.max_tokens": I64,
        "num_preemptions": I64,
        "schedule.kind": STR,
        "finish.status": STR,
        "event_time_unix_nano": I64,
        "span_start_unix_nano": I64,
        "span_end_unix_nano": I64,
        "span_dropped_events": I64,
        "source_line": I64,
        "parse_issue": STR,
    },
    "api": {
        "request.id": STR,
        "trace_id": STR,
        "span_id": STR,
        "event": STR,
        "event.ts.monotonic": F64,
        "reason": STR,
        "prompt_tokens": I64,
        "max_tokens": I64,
        "model": STR,
        "status_code": I64,
        "event_time_unix_nano": I64,
        "span_start_unix_nano": I64,
        "span_end_unix_nano": I64,
        "source_line": I64,
        "parse_issue": STR,
    },
    "step_spans": {
        "span_sequence": I64,
        "step_range_start": I64,
        "step_range_end": I64,
        "closure_interval": I64,
        "dropped_events_count": I64,
        "n_events": I64,
        "start_unix_nano": I64,
        "end_unix_nano": I64,
        "source_line": I64,
    },
    "quarantine": {"file": STR, "line": I64, "kind": STR, "reason": STR, "excerpt": STR, "count": I64},
}
# internal columns carried until assembly (journey: ts.monotonic for deriving ts.monotonic_ns)
_INTERNAL = {"journey": {"_ts_monotonic": F64}}
TABLES = ("steps", "snapshots", "journey", "api", "step_spans")


def _empty(table: str) -> pl.DataFrame:
    return pl.DataFrame(schema={**TABLE_SCHEMAS[table], **_INTERNAL.get(table, {})})


_EMPTY = {t: _empty(t) for t in TABLE_SCHEMAS}


@dataclass
class TraceTables:
    steps: pl.DataFrame
    snapshots: pl.DataFrame
    journey: pl.DataFrame
    api: pl.DataFrame
    step_spans: pl.DataFrame
    quarantine: pl.DataFrame
    counters: dict = field(default_factory=dict)
    read: dict = field(default_factory=dict)  # the file as read: size_bytes (bytes read), mtime_ns (before), sha256


def _new_counters() -> dict:
    return {
        "lines_total": 0,
        "lines_blank": 0,
        "lines_ok": 0,
        "lines_quarantined": 0,
        "spans_by_scope": {},
        "events_by_name": {},
        "events_unknown": 0,
        "events_quarantined": 0,
        "dropped_events_total": 0,
        "bytes_uncompressed": 0,
        "lines_fast": 0,
        "lines_general": 0,
    }


def _merge_counters(into: dict, c: dict) -> None:
    for k, v in c.items():
        if isinstance(v, dict):
            d = into.setdefault(k, {})
            for kk, vv in v.items():
                d[kk] = d.get(kk, 0) + vv
        else:
            into[k] = into.get(k, 0) + v


EXCERPT_CHARS = 48  # characters of a rejected line or event kept in its quarantine record


def _excerpt(raw: bytes | str, n: int = EXCERPT_CHARS) -> str:
    """The first n characters, escaped: non-ASCII and control characters as \\x.. / \\u.., '...' if cut.
    Never more of a rejected line than that reaches an output."""
    s = raw if isinstance(raw, str) else raw[: n * 4].decode("utf-8", "backslashreplace")
    cut = len(s) > n
    s = s[:n].encode("ascii", "backslashreplace").decode("ascii")
    if not s.isprintable():
        s = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in s)
    return s + ("..." if cut else "")


_ARROW = {I64: pa.int64(), F64: pa.float64(), STR: pa.large_string()}
