"""Streaming reader of instrumented-vLLM ``traces.json[.gz]`` (OTLP/JSON lines) into polars tables.

    tables = read_traces("data/experiments/<run>/traces.json.gz")
    tables.steps, tables.snapshots, tables.journey, tables.api, tables.step_spans, tables.quarantine
    tables.counters  # lines_total = lines_blank + lines_ok + lines_quarantined, spans/events, ...

The file is read as a stream of chunks of whole lines (~2 MiB; a background thread inflates the
gzip stream while the previous chunk is parsed). Each line of a chunk takes one of two paths:

* **Fast path** (numpy, no Python objects per value) for lines *exactly* in the compact canonical
  form the OTEL collector writes (docs/trace-format.md §2, §7): fixed key order, no escapes, ``intValue`` as
  strings, the three known span kinds and their event names with their usual attribute lists.
  Every byte of such a line is checked: span heads, events and span tails are matched against
  templates in lock-step over all instances of a chunk (literal bytes compared; the ends of quoted
  values come from the chunk's quote positions, so no scanning), the matched pieces must tile the
  line without gaps or overlaps in a legal order, the glue between them (resource and scope
  headers) must match a small grammar, and every value must parse as the general path would read
  it. Anything else - one odd value, an unknown attribute, another key order, a backslash, raw
  control characters - sends the whole line to ...
* **General path**: ``orjson.loads`` of the line and a walk of the OTLP structure with per-field
  coercion (docs/trace-format.md §2, §6). It is the reference: it writes the ``parse_issue`` texts and
  the quarantine records. On canonical lines both paths give identical tables (tested).

Rows stay in file order. ``workers=2`` parses chunks in a process pool (started once, reused)
while the calling process inflates and assembles; it pays off for large files or when many lines
need the general path.

Value rules (per field, not per value tag): ``intValue`` arrives as a JSON string (bare numbers
accepted); a float field delivered as ``intValue`` is fine; ``"NaN"``/``"Infinity"`` doubles,
integers beyond signed 64 bit and wrong kinds (``stringValue`` for a number) give a null value and
a ``parse_issue``; absent attributes give null (and ``missing attributes: ...`` when required).
Unsupported value kinds (arrays, kvlists, bytes) on known attributes quarantine the event; so do
unknown event names on known span kinds. Malformed lines (invalid JSON or UTF-8, not an OTLP
export, a truncated last line) are quarantined with their line number, with a short escaped
excerpt (``EXCERPT_CHARS``); a corrupt gzip stream raises :class:`TraceReadError`; a truncated one
(the stream ends early: a copy cut short) keeps every line before the damage and records the
truncation as a ``file`` quarantine record.

Limits (:class:`stepml_core.limits.InputLimits`): inflated bytes, gzip inflation ratio, bytes per
line and unreadable lines per file raise :class:`~stepml_core.limits.InputLimitError` naming the
limit; at most ``max_quarantine_rows`` quarantine records are stored, the rest counted in one
summary record per kind (column ``count``). Only a regular file inside ``root`` is read (a FIFO,
directory or symlink out of the data root gets RunMetadataError saying so), and ``TraceTables.read``
fingerprints the bytes actually read (size, sha256, mtime before reading).
"""

from __future__ import annotations

import atexit
import hashlib
import math
import os
import queue
import re
import sys
import threading
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from .errors import StepMLError
from .parallel import process_workers
from .limits import DEFAULT_LIMITS, InputLimitError, InputLimits
from .runs import open_input

__all__ = ["TraceTables", "TraceReadError", "read_traces", "TABLE_SCHEMAS"]

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
    ("step.id", int), ("step.ts_start_ns", int), ("step.ts_end_ns", int), ("step.duration_us", int),
    ("queue.running_depth", int), ("queue.waiting_depth", int), ("batch.num_prefill_reqs", int),
    ("batch.num_decode_reqs", int), ("batch.scheduled_tokens", int), ("batch.prefill_tokens", int),
    ("batch.decode_tokens", int), ("batch.num_finished", int), ("batch.num_preempted", int),
    ("kv.usage_gpu_ratio", float), ("kv.blocks_total_gpu", int), ("kv.blocks_free_gpu", int),
]
SNAPSHOT_ATTRS: list[tuple[str, type]] = [
    ("step.id", int), ("request.id", str), ("request.phase", str), ("request.num_prompt_tokens", int),
    ("request.num_computed_tokens", int), ("request.num_output_tokens", int),
    ("request.num_preemptions", int), ("request.scheduled_tokens_this_step", int),
    ("kv.blocks_allocated_gpu", int), ("kv.blocks_cached_gpu", int), ("request.effective_prompt_len", int),
]
SNAPSHOT_OPTIONAL = {"request.effective_prompt_len"}
# journey event attributes; event.type and ts.monotonic are read for checks / derivation only
JOURNEY_ATTRS: list[tuple[str, type]] = [
    ("event.type", str), ("ts.monotonic", float), ("ts.monotonic_ns", int), ("scheduler.step", int),
    ("phase", str), ("prefill.done_tokens", int), ("prefill.total_tokens", int), ("decode.done_tokens", int),
    ("decode.max_tokens", int), ("num_preemptions", int), ("schedule.kind", str), ("finish.status", str),
]
JOURNEY_REQUIRED = ["scheduler.step", "phase", "prefill.done_tokens", "prefill.total_tokens",
                    "decode.done_tokens", "decode.max_tokens", "num_preemptions"]
JOURNEY_TYPES = ("QUEUED", "SCHEDULED", "FIRST_TOKEN", "PREEMPTED", "FINISHED")
API_ATTRS: list[tuple[str, type]] = [("event.ts.monotonic", float), ("reason", str), ("error", str)]
API_EVENTS = ("ARRIVED", "DEPARTED", "ABORTED", "HANDOFF_TO_CORE", "FIRST_RESPONSE_FROM_CORE")
API_SPAN_ATTRS: list[tuple[str, str, type]] = [  # (attribute, column, type)
    ("gen_ai.request.id", "request.id", str), ("gen_ai.usage.prompt_tokens", "prompt_tokens", int),
    ("gen_ai.request.max_tokens", "max_tokens", int), ("gen_ai.response.model", "model", str),
]
STEP_SPAN_ATTRS = [("scheduler.span_sequence", "span_sequence", int),
                   ("scheduler.step_range_start", "step_range_start", int),
                   ("scheduler.step_range_end", "step_range_end", int),
                   ("scheduler.closure_interval", "closure_interval", int)]

SCOPE_STEP, SCOPE_CORE, SCOPE_API = "vllm.scheduler.step", "vllm.scheduler", "vllm.api"
EV_BATCH, EV_SNAPSHOT = "step.BATCH_SUMMARY", "step.REQUEST_SNAPSHOT"

_PY2PL = {int: I64, float: F64, str: STR}

TABLE_SCHEMAS: dict[str, dict[str, pl.DataType]] = {
    "steps": {**{k: _PY2PL[t] for k, t in STEP_ATTRS}, "event_time_unix_nano": I64, "span_sequence": I64,
              "source_line": I64, "parse_issue": STR},
    "snapshots": {**{k: _PY2PL[t] for k, t in SNAPSHOT_ATTRS}, "event_time_unix_nano": I64,
                  "source_line": I64, "parse_issue": STR},
    "journey": {"request.id": STR, "trace_id": STR, "span_id": STR, "parent_span_id": STR, "event.type": STR,
                "ts.monotonic_ns": I64, "scheduler.step": I64, "phase": STR, "prefill.done_tokens": I64,
                "prefill.total_tokens": I64, "decode.done_tokens": I64, "decode.max_tokens": I64,
                "num_preemptions": I64, "schedule.kind": STR, "finish.status": STR, "event_time_unix_nano": I64,
                "span_start_unix_nano": I64, "span_end_unix_nano": I64, "span_dropped_events": I64,
                "source_line": I64, "parse_issue": STR},
    "api": {"request.id": STR, "trace_id": STR, "span_id": STR, "event": STR, "event.ts.monotonic": F64,
            "reason": STR, "prompt_tokens": I64, "max_tokens": I64, "model": STR, "status_code": I64,
            "event_time_unix_nano": I64, "span_start_unix_nano": I64, "span_end_unix_nano": I64,
            "source_line": I64, "parse_issue": STR},
    "step_spans": {"span_sequence": I64, "step_range_start": I64, "step_range_end": I64, "closure_interval": I64,
                   "dropped_events_count": I64, "n_events": I64, "start_unix_nano": I64, "end_unix_nano": I64,
                   "source_line": I64},
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
    return {"lines_total": 0, "lines_blank": 0, "lines_ok": 0, "lines_quarantined": 0, "spans_by_scope": {},
            "events_by_name": {}, "events_unknown": 0, "events_quarantined": 0, "dropped_events_total": 0,
            "bytes_uncompressed": 0, "lines_fast": 0, "lines_general": 0}


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


# --------------------------------------------------------------------------------------------
# General path: orjson + a walk with per-field coercion
# --------------------------------------------------------------------------------------------

_INT_RE = re.compile(r"-?[0-9]+\Z")
_NUM_RE = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?\Z")
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_SCALAR_KINDS = ("stringValue", "intValue", "doubleValue", "boolValue")


class _LineReject(Exception):
    pass


class _EventReject(Exception):
    pass


def _short(x) -> str:
    r = repr(x)
    return r if len(r) <= 60 else r[:57] + "..."


def _value_kind(key: str, v):
    """(kind, payload) of an OTLP AnyValue; (None, issue) for empty/ambiguous; raises _EventReject."""
    if not isinstance(v, dict):
        raise _EventReject(f"{key}: malformed attribute value {_short(v)}")
    if len(v) == 1:
        (kind, x), = v.items()
    elif not v:
        return None, f"{key}: empty value"
    else:
        return None, f"{key}: several value kinds {sorted(v)}"
    if kind not in _SCALAR_KINDS:
        raise _EventReject(f"{key}: unsupported value kind '{kind}'")
    return kind, x


def _coerce(key: str, v, typ):
    """Coerce one attribute value to the field's type: (value, issue-or-None)."""
    kind, x = _value_kind(key, v)
    if kind is None:
        return None, x
    if typ is int:
        if kind == "intValue" or kind == "doubleValue":
            if isinstance(x, str):
                if kind == "intValue" and _INT_RE.match(x):
                    i = int(x)
                elif kind == "doubleValue" and x in _NONFINITE:
                    return None, f"{key}: non-finite double {x}"
                elif kind == "doubleValue" and _NUM_RE.match(x):
                    f = float(x)
                    if not f.is_integer():
                        return None, f"{key}: expected integer, got doubleValue {_short(x)}"
                    i = int(f)
                else:
                    return None, f"{key}: expected integer, got {kind} {_short(x)}"
            elif isinstance(x, bool) or not isinstance(x, (int, float)):
                return None, f"{key}: expected integer, got {kind} {_short(x)}"
            elif isinstance(x, float):
                if not x.is_integer():
                    return None, f"{key}: expected integer, got {kind} {_short(x)}"
                i = int(x)
            else:
                i = x
            if i < INT64_MIN or i > INT64_MAX:
                return None, f"{key}: integer out of 64-bit range"
            return i, None
        return None, f"{key}: expected integer, got {kind} {_short(x)}"
    if typ is float:
        if kind == "doubleValue":
            if isinstance(x, str):
                if x in _NONFINITE:
                    return None, f"{key}: non-finite double {x}"
                if _NUM_RE.match(x):
                    return float(x), None
                return None, f"{key}: expected double, got doubleValue {_short(x)}"
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                return None, f"{key}: expected double, got doubleValue {_short(x)}"
            return float(x), None
        if kind == "intValue":
            if isinstance(x, str) and _INT_RE.match(x):
                i = int(x)
            elif isinstance(x, int) and not isinstance(x, bool):
                i = x
            else:
                return None, f"{key}: expected double, got intValue {_short(x)}"
            if i < INT64_MIN or i > INT64_MAX:
                return None, f"{key}: integer out of 64-bit range"
            return float(i), None
        return None, f"{key}: expected double, got {kind} {_short(x)}"
    # str
    if kind == "stringValue" and isinstance(x, str):
        return x, None
    return None, f"{key}: expected string, got {kind} {_short(x)}"


def _uint_field(key: str, x, issues: list | None):
    """OTLP fixed fields (timeUnixNano, droppedEventsCount, ...): JSON string or number -> int."""
    if x is None:
        return None
    if isinstance(x, str) and _INT_RE.match(x):
        i = int(x)
    elif isinstance(x, int) and not isinstance(x, bool):
        i = x
    else:
        if issues is not None:
            issues.append(f"{key}: expected integer, got {_short(x)}")
        return None
    if i < INT64_MIN or i > INT64_MAX:
        if issues is not None:
            issues.append(f"{key}: integer out of 64-bit range")
        return None
    return i


def _attr_map(attrs, issues: list) -> dict:
    if attrs is None:
        return {}
    if not isinstance(attrs, list):
        raise _EventReject("attributes is not a list")
    m = {}
    for a in attrs:
        if not isinstance(a, dict) or not isinstance(a.get("key"), str):
            raise _EventReject(f"malformed attribute {_short(a)}")
        k = a["key"]
        if k in m:
            issues.append(f"{k}: duplicate attribute")
        m[k] = a.get("value")
    return m


def _read_attrs(m: dict, spec, issues: list) -> dict:
    out = {}
    for k, typ in spec:
        if k in m:
            val, iss = _coerce(k, m[k], typ)
            out[k] = val
            if iss:
                issues.append(iss)
    return out


class _Sink:
    """Column lists for one chunk's general-path rows, quarantine records and counters."""

    def __init__(self, label: str, max_quarantine: int | None = None):
        self.label = label
        self.cols = {t: {c: [] for c in {**TABLE_SCHEMAS[t], **_INTERNAL.get(t, {})}} for t in TABLES}
        self.quarantine = {c: [] for c in TABLE_SCHEMAS["quarantine"]}
        self.counters = _new_counters()
        self.max_quarantine = max_quarantine  # records stored; the rest counted in not_stored
        self.not_stored: dict[str, int] = {}

    def _add(self, table: str, row: dict) -> None:
        for c, lst in self.cols[table].items():
            lst.append(row.get(c))

    def _quarantine(self, line: int, kind: str, reason: str, excerpt: str) -> None:
        q = self.quarantine
        if self.max_quarantine is not None and len(q["line"]) >= self.max_quarantine:
            self.not_stored[kind] = self.not_stored.get(kind, 0) + 1
            return
        q["count"].append(1)
        q["file"].append(self.label)
        q["line"].append(line)
        q["kind"].append(kind)
        q["reason"].append(reason)
        q["excerpt"].append(excerpt)

    def line(self, raw: bytes, line_no: int, unterminated_last: bool) -> None:
        c = self.counters
        c["lines_total"] += 1
        if not raw.strip():
            c["lines_blank"] += 1
            return
        c["lines_general"] += 1
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            self._reject(line_no, f"invalid UTF-8 at byte {e.start}", raw)
            return
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            msg = str(e)
            if unterminated_last:
                reason = f"truncated JSON at end of file ({msg})"
            else:
                reason = f"invalid JSON: {msg}"
            self._reject(line_no, reason, raw)
            return
        marks = {t: len(next(iter(cols.values()))) for t, cols in self.cols.items()}
        qmark = len(self.quarantine["line"])
        ns_mark = dict(self.not_stored)
        local = _new_counters()
        try:
            self._walk(doc, line_no, local)
        except _LineReject as e:
            for t, cols in self.cols.items():
                for lst in cols.values():
                    del lst[marks[t]:]
            for lst in self.quarantine.values():
                del lst[qmark:]
            self.not_stored = ns_mark
            self._reject(line_no, str(e), raw)
            return
        c["lines_ok"] += 1
        _merge_counters(c, local)

    def _reject(self, line_no: int, reason: str, raw: bytes) -> None:
        self.counters["lines_quarantined"] += 1
        self._quarantine(line_no, "line", reason, _excerpt(raw))

    def _walk(self, doc, line_no: int, cnt: dict) -> None:
        rss = doc.get("resourceSpans") if isinstance(doc, dict) else None
        if not isinstance(rss, list):
            raise _LineReject("not an OTLP export (no resourceSpans)")
        sbs, ebn = cnt["spans_by_scope"], cnt["events_by_name"]
        for i, rs in enumerate(rss):
            if not isinstance(rs, dict):
                raise _LineReject(f"malformed OTLP: resourceSpans[{i}] is not an object")
            sss = rs.get("scopeSpans") or []
            if not isinstance(sss, list):
                raise _LineReject(f"malformed OTLP: resourceSpans[{i}].scopeSpans is not a list")
            for j, ss in enumerate(sss):
                if not isinstance(ss, dict):
                    raise _LineReject(f"malformed OTLP: scopeSpans[{j}] is not an object")
                scope = ss.get("scope") or {}
                sname = scope.get("name", "") if isinstance(scope, dict) else ""
                sname = sname if isinstance(sname, str) else str(sname)
                spans = ss.get("spans") or []
                if not isinstance(spans, list):
                    raise _LineReject(f"malformed OTLP: scope {sname!r} spans is not a list")
                for sp in spans:
                    if not isinstance(sp, dict):
                        raise _LineReject(f"malformed OTLP: a span in scope {sname!r} is not an object")
                    events = sp.get("events") or []
                    if not isinstance(events, list):
                        raise _LineReject(f"malformed OTLP: span {sp.get('name')!r} events is not a list")
                    sbs[sname] = sbs.get(sname, 0) + 1
                    dropped = _uint_field("droppedEventsCount", sp.get("droppedEventsCount"), None) or 0
                    cnt["dropped_events_total"] += dropped
                    for ev in events:
                        if not isinstance(ev, dict):
                            raise _LineReject(f"malformed OTLP: an event of span {sp.get('name')!r} is not an object")
                        n = ev.get("name")
                        n = n if isinstance(n, str) else str(n)
                        ebn[n] = ebn.get(n, 0) + 1
                    self._span(sname, sp, events, dropped, line_no, cnt)

    def _span(self, scope: str, sp: dict, events: list, dropped: int, line_no: int, cnt: dict) -> None:
        name = sp.get("name")
        if scope == SCOPE_STEP and isinstance(name, str) and name.startswith("scheduler_steps_"):
            kind = "step"
        elif scope == SCOPE_CORE and name == "llm_core":
            kind = "core"
        elif scope == SCOPE_API and name == "llm_request":
            kind = "api"
        else:
            kind = None
        span_issues: list[str] = []
        try:
            sattrs = _attr_map(sp.get("attributes"), span_issues)
        except _EventReject as e:
            sattrs = {}
            span_issues.append(f"span attributes: {e}")
        t0 = _uint_field("startTimeUnixNano", sp.get("startTimeUnixNano"), span_issues)
        t1 = _uint_field("endTimeUnixNano", sp.get("endTimeUnixNano"), span_issues)
        if kind is None:
            cnt["events_unknown"] += len(events)
            return
        if kind == "step":
            sv = {}
            for k, col, typ in STEP_SPAN_ATTRS:
                if k in sattrs:
                    try:
                        sv[col] = _coerce(k, sattrs[k], typ)[0]
                    except _EventReject:
                        sv[col] = None
            seq = sv.get("span_sequence")
            if seq is None and "scheduler.span_sequence" not in sattrs:
                suffix = name[len("scheduler_steps_"):]
                seq = int(suffix) if suffix.isdigit() and len(suffix) < 19 else None
            self._add("step_spans", {"span_sequence": seq, "step_range_start": sv.get("step_range_start"),
                                     "step_range_end": sv.get("step_range_end"),
                                     "closure_interval": sv.get("closure_interval"), "dropped_events_count": dropped,
                                     "n_events": len(events), "start_unix_nano": t0, "end_unix_nano": t1,
                                     "source_line": line_no})
            ctx = {"span_sequence": seq}
        else:
            ctx = {"trace_id": sp.get("traceId"), "span_id": sp.get("spanId"),
                   "span_start_unix_nano": t0, "span_end_unix_nano": t1}
            for k in ("trace_id", "span_id"):
                if not isinstance(ctx[k], str):
                    ctx[k] = None
            spec = API_SPAN_ATTRS if kind == "api" else API_SPAN_ATTRS[:1]
            for k, col, typ in spec:
                if k in sattrs:
                    try:
                        val, iss = _coerce(k, sattrs[k], typ)
                    except _EventReject as e:
                        val, iss = None, str(e)
                    ctx[col] = val
                    if iss:
                        span_issues.append(iss)
            if "gen_ai.request.id" not in sattrs:
                span_issues.append("missing span attributes: gen_ai.request.id")
            if kind == "core":
                p = sp.get("parentSpanId")
                ctx["parent_span_id"] = p if isinstance(p, str) and p else None
                ctx["span_dropped_events"] = dropped
            else:
                st = sp.get("status")
                code = st.get("code") if isinstance(st, dict) else None
                if isinstance(code, str):
                    code = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}.get(code, code)
                ctx["status_code"] = _uint_field("status.code", code, span_issues)
        for ev in events:
            self._event(kind, ev, ctx, span_issues, line_no, cnt)

    def _event(self, kind: str, ev: dict, ctx: dict, span_issues: list, line_no: int, cnt: dict) -> None:
        name = ev.get("name")
        if kind == "step":
            table = "steps" if name == EV_BATCH else "snapshots" if name == EV_SNAPSHOT else None
        elif kind == "core":
            table = "journey" if isinstance(name, str) and name[:8] == "journey." and name[8:] in JOURNEY_TYPES else None
        else:
            table = "api" if isinstance(name, str) and name[:4] == "api." and name[4:] in API_EVENTS else None
        if table is None:
            cnt["events_unknown"] += 1
            cnt["events_quarantined"] += 1
            self._quarantine(line_no, "event", f"unknown event name {_short(name) if not isinstance(name, str) else repr(name)}",
                             _excerpt(orjson.dumps(ev)))
            return
        issues: list[str] = []
        try:
            m = _attr_map(ev.get("attributes"), issues)
            if table == "steps":
                row = _read_attrs(m, STEP_ATTRS, issues)
                missing = [k for k, _ in STEP_ATTRS if k not in m]
            elif table == "snapshots":
                row = _read_attrs(m, SNAPSHOT_ATTRS, issues)
                missing = [k for k, _ in SNAPSHOT_ATTRS if k not in m and k not in SNAPSHOT_OPTIONAL]
            elif table == "journey":
                vals = _read_attrs(m, JOURNEY_ATTRS, issues)
                etype = name[8:]
                missing = []
                if "ts.monotonic_ns" not in m and "ts.monotonic" not in m:
                    missing.append("ts.monotonic_ns")
                missing += [k for k in JOURNEY_REQUIRED if k not in m]
                if etype == "SCHEDULED" and "schedule.kind" not in m:
                    missing.append("schedule.kind")
                if etype == "FINISHED" and "finish.status" not in m:
                    missing.append("finish.status")
                at = vals.get("event.type")
                if at is not None and at != etype:
                    issues.append(f"event.type attribute {at!r} differs from event name {name!r}")
                row = {k: vals.get(k) for k, _ in JOURNEY_ATTRS if k not in ("event.type", "ts.monotonic")}
                row["_ts_monotonic"] = vals.get("ts.monotonic")
                row["event.type"] = etype
                row.update(ctx)
            else:
                vals = _read_attrs(m, API_ATTRS, issues)
                missing = [] if "event.ts.monotonic" in m else ["event.ts.monotonic"]
                row = {"event": name[4:], "event.ts.monotonic": vals.get("event.ts.monotonic"),
                       "reason": vals.get("reason")}
                row.update(ctx)
        except _EventReject as e:
            cnt["events_quarantined"] += 1
            self._quarantine(line_no, "event", f"{name}: {e}", _excerpt(orjson.dumps(ev)))
            return
        if table == "steps":
            row["span_sequence"] = ctx["span_sequence"]
        row["event_time_unix_nano"] = _uint_field("timeUnixNano", ev.get("timeUnixNano"), issues)
        if missing:
            issues.append("missing attributes: " + ", ".join(missing))
        if table in ("journey", "api"):
            issues = span_issues + issues
        row["parse_issue"] = "; ".join(issues) if issues else None
        row["source_line"] = line_no
        self._add(table, row)

    def columns(self) -> dict[str, dict]:
        """Per table with rows: its columns as Arrow arrays (schema order and types)."""
        out = {}
        for t, cols in self.cols.items():
            if next(iter(cols.values())):
                schema = {**TABLE_SCHEMAS[t], **_INTERNAL.get(t, {})}
                out[t] = {c: pa.array(cols[c], _ARROW[dt]) for c, dt in schema.items()}
        return out

    def quarantine_frame(self) -> pl.DataFrame:
        if not self.quarantine["line"]:
            return _EMPTY["quarantine"]
        return pl.DataFrame(self.quarantine, schema=TABLE_SCHEMAS["quarantine"])


# --------------------------------------------------------------------------------------------
# Fast path: numpy template matching on compact canonical lines
# --------------------------------------------------------------------------------------------

PAD = 4096  # bytes after a chunk's data so that window reads of failing matches stay in bounds
_NQSENT = 512  # the padding starts with this many quote characters (sentinels for quote lookups; more
# than the quotes of any template, so a failing match never indexes past them)
PAD_BYTES = b'"' * _NQSENT + b"\0" * (PAD - _NQSENT)


def _lit(b: bytes):
    return ("lit", b)


def _opt(*items):
    return ("opt", list(items))


def _alt(*alternatives):
    return ("alt", [list(a) for a in alternatives])


def _A_I(key: str, col: str | None = None):
    return [_lit(b'{"key":"%s","value":{"intValue":"' % key.encode()), ("i", col or key), _lit(b"}}")]


def _A_S(key: str, col: str | None = None):
    return [_lit(b'{"key":"%s","value":{"stringValue":"' % key.encode()), ("s", col or key), _lit(b"}}")]


def _A_F(key: str, col: str | None = None):
    return [_lit(b'{"key":"%s","value":{' % key.encode()),
            _alt([_lit(b'"doubleValue":'), ("n", col or key)], [_lit(b'"intValue":"'), ("if", col or key)]),
            _lit(b"}}")]


_ATTR_BUILDERS = {int: _A_I, float: _A_F, str: _A_S}


def _attr_list(spec, optional=()):
    items, first = [], True
    for key, typ in spec:
        a = _ATTR_BUILDERS[typ](key)
        if key in optional:
            items.append(_opt(_lit(b","), *a))
        else:
            items += ([] if first else [_lit(b",")]) + a
            first = False
    return items


def _compile(items, follow: bytes | None = None):
    """Merge adjacent literals and annotate the template for the quote-indexed matcher.

    Literals become ("lit", bytes, number of quotes in them). A bare number hole ("u"/"n") gets
    the offset of the first quote in the literal that follows it (its end is then found from the
    quote positions), or None when no quote follows directly (then a window scan finds the end).
    """
    merged = []
    for it in items:
        if it[0] == "lit" and merged and merged[-1][0] == "lit":
            merged[-1] = ("lit", merged[-1][1] + it[1])
        else:
            merged.append(it)
    out = []
    for i, it in enumerate(merged):
        tag = it[0]
        nxt = merged[i + 1][1] if i + 1 < len(merged) and merged[i + 1][0] == "lit" else (
            follow if i + 1 == len(merged) else None)
        if tag == "lit":
            out.append(("lit", it[1], it[1].count(b'"')))
        elif tag == "opt":
            out.append(("opt", _compile(it[1], nxt)))
        elif tag == "alt":
            out.append(("alt", [_compile(x, nxt) for x in it[1]]))
        elif tag in ("u", "n"):
            d = nxt.find(b'"') if nxt is not None else -1
            out.append((tag, it[1], d if d >= 0 else None))
        elif tag == "flag":
            lit, name = it[1]
            out.append(("flag", (lit, name, lit.count(b'"'))))
        else:
            out.append(it)
    return out


_EVENT_PREFIX = b'{"timeUnixNano":"'
_SPAN_PREFIX = b'{"traceId":"'
_EV_HEAD = _compile([("i", "time"), _lit(b',"name":"'), ("s", "_name")])
_EV_BODIES = {
    "bs": _compile([_lit(b',"attributes":[')] + _attr_list(STEP_ATTRS) + [_lit(b"]}"), ("sep", "sep")]),
    "snap": _compile([_lit(b',"attributes":[')] + _attr_list(SNAPSHOT_ATTRS, SNAPSHOT_OPTIONAL)
                     + [_lit(b"]}"), ("sep", "sep")]),
    "journey": _compile([_lit(b',"attributes":[')]
                        + _attr_list(JOURNEY_ATTRS, {"ts.monotonic_ns", "schedule.kind", "finish.status"})
                        + [_lit(b"]}"), ("sep", "sep")]),
    "api": _compile([_lit(b',"attributes":[')] + _attr_list(API_ATTRS, {"reason", "error"})
                    + [_lit(b"]}"), ("sep", "sep")]),
}
_EVENT_NAMES: list[tuple[bytes, str, str]] = (  # (name, body, label)
    [(EV_BATCH.encode(), "bs", EV_BATCH), (EV_SNAPSHOT.encode(), "snap", EV_SNAPSHOT)]
    + [(b"journey." + t.encode(), "journey", "journey." + t) for t in JOURNEY_TYPES]
    + [(b"api." + t.encode(), "api", "api." + t) for t in API_EVENTS])
_SPAN_HEAD = _compile([("s", "trace_id"), _lit(b',"spanId":"'), ("s", "span_id"),
                       _opt(_lit(b',"parentSpanId":"'), ("s", "parent_span_id")),
                       _opt(_lit(b',"flags":'), ("u", "_flags")), _lit(b',"name":"'), ("s", "_name")])
_SPAN_COMMON = [_lit(b',"kind":'), ("u", "_kind"), _lit(b',"startTimeUnixNano":"'), ("i", "start"),
                _lit(b',"endTimeUnixNano":"'), ("i", "end"), _lit(b',"attributes":[')]
_SPAN_BODIES = {
    "step": _compile(_SPAN_COMMON + _A_I("scheduler.span_sequence", "span_sequence") + [_lit(b",")]
                     + _A_I("scheduler.step_range_start", "step_range_start") + [_lit(b",")]
                     + _A_I("scheduler.closure_interval", "closure_interval")
                     + [_opt(_lit(b","), *_A_I("scheduler.step_range_end", "step_range_end")), _lit(b"]"),
                        ("flag", (b',"events":[', "has_events"))]),
    "core": _compile(_SPAN_COMMON + _A_S("gen_ai.request.id", "request.id")
                     + [_lit(b"]"), ("flag", (b',"events":[', "has_events"))]),
    "api": _compile(_SPAN_COMMON + _A_S("gen_ai.request.id", "request.id")
                    + [_opt(_lit(b","), *_A_S("http.route", "_route")),
                       _opt(_lit(b","), *_A_S("gen_ai.response.model", "model")),
                       _opt(_lit(b","), *_A_I("gen_ai.usage.prompt_tokens", "prompt_tokens")),
                       _opt(_lit(b","), *_A_F("gen_ai.request.temperature", "_temperature")),
                       _opt(_lit(b","), *_A_F("gen_ai.request.top_p", "_top_p")),
                       _opt(_lit(b","), *_A_I("gen_ai.request.max_tokens", "max_tokens")),
                       _opt(_lit(b","), *_A_I("gen_ai.request.n", "_n")),
                       _lit(b"]"), ("flag", (b',"events":[', "has_events"))]),
}
_STATUS_SET = [[_lit(b'"code":'), ("u", "status_code"), _lit(b"}")],
               [_lit(b'"message":"'), ("s", "_message"), _opt(_lit(b',"code":'), ("u", "status_code")), _lit(b"}")]]
_SPAN_TAIL = _compile([_alt([_lit(b',"status":{}}')],  # the usual tail, one literal
                            [_lit(b',"droppedEventsCount":'), ("u", "dropped"), _lit(b',"status":{'),
                             _alt([_lit(b"}")], *_STATUS_SET), _lit(b"}")],
                            [_lit(b',"status":{'), _alt(*_STATUS_SET), _lit(b"}")]),
                       ("sep", "sep")])
_SPAN_KIND_SCOPE = {"step": SCOPE_STEP, "core": SCOPE_CORE, "api": SCOPE_API}


def _max_quotes(items) -> int:
    """Upper bound of the quotes a template can step over (literals, quoted values, all branches)."""
    n = 0
    for it in items:
        if it[0] == "lit":
            n += it[2]
        elif it[0] in ("i", "if", "s"):
            n += 1
        elif it[0] == "opt":
            n += _max_quotes(it[1])
        elif it[0] == "alt":
            n += max(_max_quotes(x) for x in it[1])
        elif it[0] == "flag":
            n += it[1][2]
    return n


assert 3 + _max_quotes(_EV_HEAD) + max(_max_quotes(t) for t in _EV_BODIES.values()) < _NQSENT
assert 3 + _max_quotes(_SPAN_HEAD) + max(_max_quotes(t) for t in _SPAN_BODIES.values()) < _NQSENT
assert _max_quotes(_SPAN_TAIL) < _NQSENT

# glue between span chains: line start, scope/resource changes, line end (bytes regexes)
_J_S = rb'"[^"\\\x00-\x1f]*"'
_J_NUM = rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
_J_VAL = (rb'\{(?:"stringValue":' + _J_S + rb'|"intValue":(?:"-?[0-9]+"|-?[0-9]+)|"doubleValue":(?:' + _J_NUM
          + rb'|"NaN"|"Infinity"|"-Infinity")|"boolValue":(?:true|false))?\}')
_J_ATTR = rb'\{"key":' + _J_S + rb',"value":' + _J_VAL + rb"\}"
_J_ATTRS = rb"\[(?:" + _J_ATTR + rb"(?:," + _J_ATTR + rb")*)?\]"
_J_RES = (rb'\{"resource":\{(?:"attributes":' + _J_ATTRS + rb'(?:,"droppedAttributesCount":[0-9]+)?'
          rb'|"droppedAttributesCount":[0-9]+)?\},"scopeSpans":\[')
_J_SCOPE = (rb'\{"scope":\{(?:"name":(?P<scope>' + _J_S + rb')(?:,"version":' + _J_S + rb')?|"version":'
            + _J_S + rb')?\},"spans":\[')
_J_CLOSE = rb'(?:,"schemaUrl":' + _J_S + rb")?\}"
_JOINT_RES = {
    "start": re.compile(rb'\{"resourceSpans":\[' + _J_RES + _J_SCOPE),
    "mid": re.compile(_J_CLOSE + rb"(?:,|\]" + _J_CLOSE + rb"," + _J_RES + rb")" + _J_SCOPE),
    "end": re.compile(_J_CLOSE + rb"\]" + _J_CLOSE + rb"\]\}"),
}


def _joint(text: bytes, cache: dict):
    """(type, scope name) of a glue text between span chains, or None."""
    r = cache.get(text)
    if r is None:
        r = (None, None)
        for typ, rx in _JOINT_RES.items():
            m = rx.fullmatch(text)
            if m:
                sc = m.groupdict().get("scope")
                r = (typ, sc[1:-1].decode("utf-8") if sc is not None else "")
                break
        cache[text] = r
    return r


class _Scan:
    """A padded chunk as uint8, its quote positions and cached sliding-window views."""

    def __init__(self, a: np.ndarray, n: int):
        self.a, self.n = a, n
        self.q = np.flatnonzero(a[:n + _NQSENT] == 34)  # ends with the padding's sentinel quotes
        self._views: dict[int, np.ndarray] = {}
        self.frags: list = []  # (kind, owner, field, rows, start, length)

    def win(self, pos: np.ndarray, width: int) -> np.ndarray:
        """Rows of ``width`` bytes starting at ``pos`` (a copy, shape (len(pos), width))."""
        v = self._views.get(width)
        if v is None:
            a = self.a
            v = self._views[width] = np.ndarray((len(a) - width + 1, width), np.uint8, buffer=a, strides=(1, 1))
        return v[pos]

    def eq(self, pos: np.ndarray, lit: bytes) -> np.ndarray:
        L = len(lit)
        if not len(pos):
            return np.zeros(0, bool)
        return self.win(pos, L).view(f"S{L}")[:, 0] == lit


class _Cur:
    """Positions of a set of template instances being matched in lock-step.

    ``pos`` is the byte position, ``qi`` the index (into the chunk's quote positions) of the first
    quote at or after ``pos``; a quoted value therefore ends at ``q[qi]`` without scanning.
    """

    def __init__(self, sc: _Scan, owner: str, rows: np.ndarray, pos: np.ndarray, ok: np.ndarray | None = None,
                 qi: np.ndarray | None = None):
        self.sc, self.owner, self.rows = sc, owner, rows
        self.pos = pos.astype(np.int64, copy=True)
        self.qi = np.searchsorted(sc.q, self.pos) if qi is None else qi.astype(np.int64, copy=True)
        self.ok = np.ones(len(pos), bool) if ok is None else ok
        self.flags: dict[str, np.ndarray] = {}

    def sub(self, m: np.ndarray) -> "_Cur":
        return _Cur(self.sc, self.owner, self.rows[m], self.pos[m], self.ok[m], self.qi[m])

    def merge(self, m: np.ndarray, c: "_Cur") -> None:
        self.pos[m] = c.pos
        self.qi[m] = c.qi
        self.ok[m] = c.ok
        for k, v in c.flags.items():
            f = self.flags.setdefault(k, np.zeros(len(self.pos), v.dtype))
            f[m] = v

    def run(self, items) -> None:
        sc = self.sc
        for it in items:
            if not len(self.pos):
                return
            tag = it[0]
            if tag == "lit":
                self.ok &= sc.eq(self.pos, it[1])
                self.pos += len(it[1])
                if it[2]:
                    self.qi += it[2]
            elif tag in ("i", "if", "s"):  # quoted value: ends at the next quote
                end = sc.q[self.qi]
                self._frag(tag, it[1], self.pos, end - self.pos)  # pos is rebound below, not mutated
                self.pos = end + 1
                self.qi += 1
            elif tag in ("u", "n"):  # bare number
                if it[2] is not None:
                    end = sc.q[self.qi] - it[2]
                    L = end - self.pos
                    self.ok &= (L > 0) & (L <= 32)
                else:
                    L = self._scan_number()
                L = np.clip(L, 0, 32)
                self._frag(tag, it[1], self.pos, L)
                self.pos = self.pos + L
            elif tag == "opt":  # the probe is the block's first literal: matched rows skip it
                probe = it[1][0]
                m = sc.eq(self.pos, probe[1])
                if m.all():  # every row has it: no sub-cursor
                    self._skip(probe)
                    self.run(it[1][1:])
                elif m.any():
                    c = self.sub(m)
                    c._skip(probe)
                    c.run(it[1][1:])
                    self.merge(m, c)
            elif tag == "alt":
                left = None  # rows not matched yet (None: all)
                for alt in it[1]:
                    if left is None:
                        m = sc.eq(self.pos, alt[0][1])
                        if m.all():
                            self._skip(alt[0])
                            self.run(alt[1:])
                            break
                    else:
                        idx = np.flatnonzero(left)
                        if not idx.size:
                            break
                        m = np.zeros(len(self.pos), bool)
                        m[idx[sc.eq(self.pos[idx], alt[0][1])]] = True
                    if m.any():
                        c = self.sub(m)
                        c._skip(alt[0])
                        c.run(alt[1:])
                        self.merge(m, c)
                    left = ~m if left is None else left & ~m
                else:
                    if left is not None:
                        self.ok &= ~left
            elif tag == "flag":
                lit, name, nq = it[1]
                m = sc.eq(self.pos, lit)
                self.pos[m] += len(lit)
                self.qi[m] += nq
                self.flags[name] = m
            elif tag == "sep":
                w = sc.a[self.pos]
                is_last = w == 93  # ']'
                self.ok &= is_last | (w == 44)  # ','
                self.flags["last"] = is_last
                self.pos += 1

    def _skip(self, lit_item) -> None:
        """Advance over a literal already verified (an opt/alt probe)."""
        self.pos += len(lit_item[1])
        self.qi += lit_item[2]

    def _frag(self, kind: str, name: str, start, length) -> None:
        self.sc.frags.append((kind, self.owner, name, self.rows, start, length))

    def _scan_number(self) -> np.ndarray:
        """Length of the run of number characters at pos (for a number not followed by a quote)."""
        W = self.sc.win(self.pos, 33)
        cls = ((W - 48) < 10) | (W == 45) | (W == 43) | (W == 46) | (W == 101) | (W == 69)
        L = cls.argmin(1)
        self.ok &= (L > 0) & ~cls[np.arange(len(W)), L]
        return L


def _gather_strings(a: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> pa.Array:
    """The byte ranges [start, start+len) of the chunk as one Arrow large_string array."""
    n = len(starts)
    lens = lens.astype(np.int64)
    offs = np.zeros(n + 1, np.int64)
    np.cumsum(lens, out=offs[1:])
    idx = np.repeat(starts - offs[:-1], lens) + np.arange(offs[-1])
    return pa.Array.from_buffers(pa.large_utf8(), n, [None, pa.py_buffer(offs), pa.py_buffer(a[idx])])


def _json_numbers_ok(s: pa.Array) -> np.ndarray:
    """Which strings of ``s`` (already parsed as finite floats) are JSON numbers
    (-?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?): the float parser also takes '+1', '.5', '5.',
    '01', '1.e3'. Checks first/last characters, leading zeros and the neighbours of '.', 'e', signs."""
    n = len(s)
    if not n:
        return np.zeros(0, bool)
    offs = np.frombuffer(s.buffers()[1], np.int64, n + 1, s.offset * 8)
    buf = np.frombuffer(s.buffers()[2], np.uint8)
    st, en = offs[:-1], offs[1:]
    ok = en > st
    c = np.concatenate([buf, np.zeros(2, np.uint8)])  # room to look one past the end
    dig = (c - 48) < 10
    f0 = c[st]
    neg = f0 == 45
    fd = st + neg  # first digit
    ok &= dig[fd] & (fd < en)
    ok &= ~((c[fd] == 48) & (fd + 1 < en) & dig[fd + 1])  # no leading zeros
    ok &= dig[np.maximum(en - 1, 0)]  # ends with a digit
    special = np.flatnonzero((c == 46) | (c == 101) | (c == 69) | (c == 43) | (c == 45))
    if special.size:
        owner = np.searchsorted(en, special, side="right")  # value that holds each character
        inside = owner < n
        inside[inside] = special[inside] >= st[owner[inside]]
        special, owner = special[inside], owner[inside]
        ch = c[special]
        at_start = special == st[owner]
        prev_dig = dig[special - 1] & ~at_start
        nxt = c[special + 1]
        next_dig = dig[special + 1] & (special + 1 < en[owner])
        is_e = (ch == 101) | (ch == 69)
        is_sign = (ch == 43) | (ch == 45)
        prev_e = ((c[special - 1] == 101) | (c[special - 1] == 69)) & ~at_start
        good = np.where(ch == 46, prev_dig & next_dig,
                        np.where(is_e, prev_dig & (next_dig | (((nxt == 43) | (nxt == 45)) & (special + 2 < en[owner])
                                                              & dig[special + 2])),
                                 np.where(is_sign, (at_start & (ch == 45)) | (prev_e & next_dig), True)))
        ok[owner[~good]] = False
        # at most one '.', one exponent, and the '.' before the exponent
        dots = np.bincount(owner[ch == 46], minlength=n)
        exps = np.bincount(owner[is_e], minlength=n)
        ok &= (dots <= 1) & (exps <= 1)
        if (dots & exps).any():
            dpos = np.full(n, -1, np.int64)
            dpos[owner[ch == 46]] = special[ch == 46]
            epos = np.full(n, -1, np.int64)
            epos[owner[is_e]] = special[is_e]
            ok &= ~((dpos >= 0) & (epos >= 0) & (dpos > epos))
    return ok
_ARROW = {I64: pa.int64(), F64: pa.float64(), STR: pa.large_string()}


def _parse_numbers(s: pa.Array, typ) -> tuple[np.ndarray, np.ndarray]:
    """Arrow strings -> (values, parsed) with a strict cast; a failing batch is redone per value."""
    try:
        v = pc.cast(s, typ)
        return v.to_numpy(zero_copy_only=False), np.ones(len(s), bool)
    except pa.ArrowInvalid:
        v = pl.from_arrow(s).cast(I64 if typ == pa.int64() else F64, strict=False)
        ok = ~v.is_null().to_numpy()
        return v.fill_null(0).to_numpy(), ok


class _Fields:
    """Values of the matched holes: numbers as numpy arrays, strings as Arrow arrays.

    A hole is *bad* where the general path would not read a clean value from it (overflow, a
    leading '+', leading zeros in a bare number, a double that is not a finite JSON number); the
    lines of bad rows go to the general path.
    """

    def __init__(self, sc: _Scan, sizes: dict[str, int]):
        self.sizes = sizes
        self.bad_rows: dict[str, list] = {}
        self.num: dict[tuple[str, str], list] = {}
        self.txt: dict[tuple[str, str], list] = {}
        by_kind: dict[str, list] = {}
        for fr in sc.frags:
            if fr[0] == "s" and fr[2][0] == "_":  # string checked at line level, value not needed
                continue
            if len(fr[3]):
                by_kind.setdefault(fr[0], []).append(fr)
        a = sc.a
        for kind, frs in by_kind.items():
            starts = np.concatenate([f[4] for f in frs])
            lens = np.concatenate([f[5] for f in frs])
            s = _gather_strings(a, starts, lens)
            bad = None
            if kind == "s":
                vals = s
            elif kind == "n":
                vals, ok = _parse_numbers(s, pa.float64())
                ok &= np.isfinite(vals)
                ok &= _json_numbers_ok(s)
                bad = ~ok
            else:  # quoted integers (i, if) and bare unsigned integers (u)
                vals, ok = _parse_numbers(s, pa.int64())
                first = a[starts]
                if kind == "u":
                    ok &= ((first - 48) < 10) & ~((first == 48) & (lens > 1))
                else:
                    ok &= first != 43  # '+': not an integer to the general path
                if kind == "if":
                    vals = vals.astype(np.float64)
                bad = ~ok
            store = self.txt if kind == "s" else self.num
            off = 0
            for f in frs:
                k = len(f[3])
                if bad is not None:
                    b = bad[off:off + k]
                    if b.any():
                        self.bad_rows.setdefault(f[1], []).append(f[3][b])
                store.setdefault((f[1], f[2]), []).append((f[3], vals[off:off + k]))
                off += k

    def number(self, owner: str, name: str, dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
        """(values, present) over all rows of ``owner``."""
        n = self.sizes[owner]
        vals = np.zeros(n, dtype)
        valid = np.zeros(n, bool)
        for rows, v in self.num.get((owner, name), ()):
            vals[rows] = v
            valid[rows] = True
        return vals, valid

    def text(self, owner: str, name: str) -> pa.Array:
        """A string field over all rows of ``owner`` (null where absent)."""
        n = self.sizes[owner]
        ps = self.txt.get((owner, name))
        if not ps:
            return pa.nulls(n, pa.large_string())
        if len(ps) == 1 and len(ps[0][0]) == n:
            return ps[0][1]
        vals = pa.concat_arrays([p[1] for p in ps])
        idx = np.full(n, -1, np.int64)
        idx[np.concatenate([p[0] for p in ps])] = np.arange(len(vals))
        return vals.take(_nullable_index(idx))


def _nullable_index(idx: np.ndarray) -> pa.Array:
    """An Arrow index array, null where ``idx`` < 0 (take gives null there)."""
    return pa.array(idx, mask=idx < 0) if (idx < 0).any() else pa.array(idx)


def _columns(table: str, cols: dict, n: int) -> dict[str, pa.Array]:
    """A table's columns in schema order as Arrow arrays, from numpy (values, present) pairs,
    numpy arrays or Arrow arrays; absent columns are all null."""
    out = {}
    for c, dt in {**TABLE_SCHEMAS[table], **_INTERNAL.get(table, {})}.items():
        spec = cols.get(c)
        typ = _ARROW[dt]
        if spec is None:
            out[c] = pa.nulls(n, typ)
        elif isinstance(spec, tuple):
            vals, valid = spec
            out[c] = pa.array(vals, typ) if valid.all() else pa.array(vals, typ, mask=~valid)
        elif isinstance(spec, np.ndarray):
            out[c] = pa.array(spec, typ)
        else:
            out[c] = spec if spec.type == typ else spec.cast(typ)
    return out


def _ffill_index(has: np.ndarray) -> np.ndarray:
    """For each position the index of the last True at or before it (-1 if none)."""
    idx = np.where(has, np.arange(len(has)), -1)
    return np.maximum.accumulate(idx) if len(idx) else idx


# instance kinds in the chain check
_H1, _H0, _EC, _EB, _TC, _TB = range(6)
_ALLOW = np.zeros((6, 6), bool)
for _a, _b in [(_H1, _EC), (_H1, _EB), (_H0, _TC), (_H0, _TB), (_EC, _EC), (_EC, _EB), (_EB, _TC), (_EB, _TB),
               (_TC, _H1), (_TC, _H0)]:
    _ALLOW[_a, _b] = True
_GROUPS = ("bs", "snap", "journey", "api")  # event groups (codes 0..3)
_GROUP_OF_NAME = np.array([_GROUPS.index(g) for _, g, _ in _EVENT_NAMES] + [-1])  # index -1: unknown
_SPAN_KINDS = ("step", "core", "api")  # span kinds (codes 0..2)
_SPAN_OF_GROUP = np.array([0, 0, 1, 2, -9])  # span kind an event group belongs to
_EV_SUFFIX = pa.array([lbl.split(".", 1)[1] for _, _, lbl in _EVENT_NAMES], pa.large_string())  # journey/api type
_SCHEDULED_CODE = [lbl for _, _, lbl in _EVENT_NAMES].index("journey.SCHEDULED")
_FINISHED_CODE = [lbl for _, _, lbl in _EVENT_NAMES].index("journey.FINISHED")


def _fast_chunk(data: bytes, a: np.ndarray, n: int, starts: np.ndarray, ends: np.ndarray,
                eligible: np.ndarray, first_line: int, joint_cache: dict, n_newlines: int):
    """Match canonical lines; returns (verified line mask, tables, counters) for the verified lines."""
    nlines = len(starts)
    bad = ~eligible
    body = a[:n]

    def line_of(p):
        return np.searchsorted(starts, p, side="right") - 1

    # escapes (backslash), raw control characters / JSON whitespace, non-ASCII: decided per line
    if not data.isascii() or np.count_nonzero(body < 32) != n_newlines or (body == 92).any():
        odd = body < 32
        odd |= body == 92
        odd |= body >= 128
        pos_odd = np.flatnonzero(odd & (body != 10))
        c = body[pos_odd]
        bad[line_of(pos_odd[c < 128])] = True
        for li in np.unique(line_of(pos_odd[c >= 128])).tolist():
            if not bad[li]:
                try:
                    data[starts[li]:ends[li]].decode("utf-8")
                except UnicodeDecodeError:
                    bad[li] = True
    sc = _Scan(a, n)
    # candidates from the quote positions: the key "timeUnixNano" (12 characters) opens an event,
    # "traceId" (7) a span; the gap between its two quotes is 13 / 8. Their quote index comes free.
    q = sc.q
    d = np.diff(q)
    cand = np.flatnonzero((d == 13) | (d == 8))
    is_ev = d[cand] == 13
    ke, ks = cand[is_ev], cand[~is_ev]
    ke, ks = ke[q[ke] >= 1], ks[q[ks] >= 1]
    ev_pos, sp_pos = q[ke] - 1, q[ks] - 1
    me = sc.eq(ev_pos, _EVENT_PREFIX)
    me[me] = ~bad[line_of(ev_pos[me])]
    ms = sc.eq(sp_pos, _SPAN_PREFIX)
    ms[ms] = ~bad[line_of(sp_pos[ms])]
    ev_pos, ev_qi = ev_pos[me], ke[me] + 3  # the prefix holds 3 quotes
    sp_pos, sp_qi = sp_pos[ms], ks[ms] + 3
    del d, cand

    # ---- events: common head, dispatch on the name, group bodies
    ne = len(ev_pos)
    ce = _Cur(sc, "ev", np.arange(ne), ev_pos + len(_EVENT_PREFIX), qi=ev_qi)
    ce.run(_EV_HEAD)
    ev_code = np.full(ne, -1, np.int64)
    if ne:
        nstart, nlen = sc.frags[-1][4], sc.frags[-1][5]
        for code, (nm, _, _) in enumerate(_EVENT_NAMES):
            rows = np.flatnonzero(nlen == len(nm))
            if rows.size:
                ev_code[rows[sc.eq(nstart[rows], nm)]] = code
    ev_grp = _GROUP_OF_NAME[ev_code]
    ce.ok &= ev_grp >= 0
    groups: dict[str, np.ndarray] = {}
    ev_end = ce.pos.copy()
    ev_last = np.zeros(ne, bool)
    for gi, g in enumerate(_GROUPS):
        rows = np.flatnonzero(ev_grp == gi)
        groups[g] = rows
        if not rows.size:
            continue
        c = _Cur(sc, g, np.arange(len(rows)), ce.pos[rows], ce.ok[rows].copy(), ce.qi[rows])
        c.run(_EV_BODIES[g])
        ce.ok[rows] = c.ok
        ev_end[rows] = c.pos
        ev_last[rows] = c.flags.get("last", np.zeros(len(rows), bool))

    # ---- span heads
    ns = len(sp_pos)
    ch = _Cur(sc, "span", np.arange(ns), sp_pos + len(_SPAN_PREFIX), qi=sp_qi)
    ch.run(_SPAN_HEAD)
    sp_kind = np.full(ns, -1, np.int64)
    if ns:
        name_fr = [f for f in sc.frags if f[1] == "span" and f[2] == "_name"][-1]
        nstart, nlen = name_fr[4], name_fr[5]
        for k, nm, exact in ((0, b"scheduler_steps_", False), (1, b"llm_core", True), (2, b"llm_request", True)):
            rows = np.flatnonzero(nlen == len(nm) if exact else nlen > len(nm))
            if rows.size:
                sp_kind[rows[sc.eq(nstart[rows], nm)]] = k
    ch.ok &= sp_kind >= 0
    sp_end = ch.pos.copy()
    sp_has_ev = np.zeros(ns, bool)
    span_groups: dict[str, np.ndarray] = {}
    for ki, k in enumerate(_SPAN_KINDS):
        rows = np.flatnonzero(sp_kind == ki)
        span_groups[k] = rows
        if not rows.size:
            continue
        c = _Cur(sc, "sp_" + k, np.arange(len(rows)), ch.pos[rows], ch.ok[rows].copy(), ch.qi[rows])
        c.run(_SPAN_BODIES[k])
        ch.ok[rows] = c.ok
        sp_end[rows] = c.pos
        sp_has_ev[rows] = c.flags.get("has_events", np.zeros(len(rows), bool))

    # ---- span tails: after a last event, or after a head without events
    t_pos = np.sort(np.concatenate([ev_end[ev_last & ce.ok], sp_end[~sp_has_ev & ch.ok]]))
    nt = len(t_pos)
    ct = _Cur(sc, "tail", np.arange(nt), t_pos)
    ct.run(_SPAN_TAIL)
    t_last = ct.flags.get("last", np.zeros(nt, bool))

    # ---- chain check: instances must tile each line in a legal order
    kind = np.concatenate([np.where(sp_has_ev, _H1, _H0), np.where(ev_last, _EB, _EC), np.where(t_last, _TB, _TC)])
    st = np.concatenate([sp_pos, ev_pos, t_pos])
    en = np.concatenate([sp_end, ev_end, ct.pos])
    okk = np.concatenate([ch.ok, ce.ok, ct.ok])
    src = np.concatenate([np.arange(ns), np.arange(ne), np.arange(nt)])
    order = np.argsort(st, kind="stable")
    K, S, E, OK, SRC = kind[order], st[order], en[order], okk[order], src[order]
    LN = line_of(S)
    ninst = len(K)
    is_head = K <= _H0
    if ninst:
        bad[LN[~OK]] = True
        same = LN[1:] == LN[:-1]
        contig = E[:-1] == S[1:]
        gap = same & ~contig & (K[:-1] == _TB) & is_head[1:] & (E[:-1] < S[1:])
        badpair = same & ~(contig & _ALLOW[K[:-1], K[1:]]) & ~gap
        bad[LN[1:][badpair]] = True
        first = np.ones(ninst, bool)
        first[1:] = ~same
        last = np.ones(ninst, bool)
        last[:-1] = ~same
        bad[LN[first & ~is_head]] = True
        bad[LN[last & (K != _TB)]] = True
        has_inst = np.zeros(nlines, bool)
        has_inst[LN] = True
        bad |= ~has_inst & eligible
    else:
        bad |= eligible
    # joints (glue) and the scopes of the span heads that follow them
    scope_names: list[str] = []
    scope_ids: dict[str, int] = {}
    head_scope = np.full(ninst, -1, np.int64)
    if ninst:
        for typ, idxs in (("start", np.flatnonzero(first)), ("mid", np.flatnonzero(gap) + 1)):
            for i in idxs.tolist():
                li = LN[i]
                if bad[li]:
                    continue
                s0 = starts[li] if typ == "start" else E[i - 1]
                t, sname = _joint(data[s0:S[i]], joint_cache)
                if t != typ:
                    bad[li] = True
                    continue
                sid = scope_ids.get(sname)
                if sid is None:
                    sid = scope_ids[sname] = len(scope_names)
                    scope_names.append(sname)
                head_scope[i] = sid
        for i in np.flatnonzero(last).tolist():
            li = LN[i]
            if not bad[li] and _joint(data[E[i]:ends[li]], joint_cache)[0] != "end":
                bad[li] = True
    # scope of every head: from the joint before it, else from the previous head
    head_pos = np.flatnonzero(is_head)
    hs = head_scope[head_pos]
    ff = _ffill_index(hs >= 0)
    scope_of_head = np.full(ns, -1, np.int64)
    scope_of_head[SRC[head_pos]] = np.where(ff >= 0, hs[np.maximum(ff, 0)], -1)
    # each event / tail belongs to the last head before it
    last_head = _ffill_index(is_head)
    owner = np.where(last_head >= 0, SRC[np.maximum(last_head, 0)], -1)
    ev_span = np.full(ne, -1, np.int64)
    is_ev = (K == _EC) | (K == _EB)
    ev_span[SRC[is_ev]] = owner[is_ev]
    t_span = np.full(nt, -1, np.int64)
    is_t = K >= _TC
    t_span[SRC[is_t]] = owner[is_t]
    # head kinds must fit their scope, event groups their span kind, events/tails their span's line
    sp_line = line_of(sp_pos)
    ev_line = line_of(ev_pos)
    t_line = line_of(t_pos)
    scope_need = np.array([scope_ids.get(_SPAN_KIND_SCOPE[k], -2) for k in _SPAN_KINDS] + [-2])
    bad[sp_line[scope_need[sp_kind] != scope_of_head]] = True
    if ne:
        sp_of = np.maximum(ev_span, 0)
        bad[ev_line[(ev_span < 0) | (sp_kind[sp_of] != _SPAN_OF_GROUP[ev_grp]) | (sp_line[sp_of] != ev_line)]] = True
    if nt:
        bad[t_line[(t_span < 0) | (sp_line[np.maximum(t_span, 0)] != t_line)]] = True

    # ---- values: only for matched rows of lines still in play (span ids only for journey/api spans)
    keep = {"ev": ce.ok & ~bad[ev_line], "tail": ct.ok & ~bad[t_line]}
    keep_span = ch.ok & ~bad[sp_line]
    keep_ids = keep_span & (sp_kind != 0)
    for g, rows in groups.items():
        keep[g] = keep["ev"][rows]
    for k, rows in span_groups.items():
        keep["sp_" + k] = keep_span[rows]
    frags = []
    for f in sc.frags:
        if f[1] == "span":
            msk = keep_ids if f[2] in ("trace_id", "span_id", "parent_span_id") else keep_span
        else:
            msk = keep[f[1]]
        sel = msk[f[3]]
        frags.append(f if sel.all() else (f[0], f[1], f[2], f[3][sel], f[4][sel], f[5][sel]))
    sc.frags = frags
    sizes = {"ev": ne, "span": ns, "tail": nt, **{g: len(r) for g, r in groups.items()},
             **{"sp_" + k: len(r) for k, r in span_groups.items()}}
    fl = _Fields(sc, sizes)
    for owner_name, rows_list in fl.bad_rows.items():
        rows = np.concatenate(rows_list)
        if owner_name == "ev":
            bad[ev_line[rows]] = True
        elif owner_name in groups:
            bad[ev_line[groups[owner_name][rows]]] = True
        elif owner_name == "span":
            bad[sp_line[rows]] = True
        elif owner_name.startswith("sp_"):
            bad[sp_line[span_groups[owner_name[3:]][rows]]] = True
        else:
            bad[t_line[rows]] = True
    # journey consistency: event.type attribute = name; SCHEDULED/FINISHED carry their extra attribute
    jrows = groups["journey"]
    if jrows.size:
        codes = ev_code[jrows]
        etype = _EV_SUFFIX.take(pa.array(codes))
        same = pc.fill_null(pc.equal(fl.text("journey", "event.type"), etype), False).to_numpy(zero_copy_only=False)
        no_kind = pc.is_null(fl.text("journey", "schedule.kind")).to_numpy(zero_copy_only=False)
        no_status = pc.is_null(fl.text("journey", "finish.status")).to_numpy(zero_copy_only=False)
        incons = ~same | ((codes == _SCHEDULED_CODE) & no_kind) | ((codes == _FINISHED_CODE) & no_status)
        bad[ev_line[jrows[incons & keep["journey"]]]] = True
    good_line = ~bad

    # ---- tables of the verified lines
    sp_dropped = np.zeros(ns, np.int64)
    tail_idx = np.full(ns, -1, np.int64)
    if nt:
        okt = t_span >= 0
        sp_dropped[t_span[okt]] = fl.number("tail", "dropped")[0][okt]
        tail_idx[t_span[okt]] = np.flatnonzero(okt)
    ev_time = fl.number("ev", "time")
    pos_in_kind = np.full(ns, -1, np.int64)
    for k, grp in span_groups.items():
        pos_in_kind[grp] = np.arange(len(grp))

    def take(pair, idx):
        return pair[0][idx], pair[1][idx]

    def span_number(name: str):
        """A field of the per-kind span bodies as (values, present) over all spans."""
        vals, valid = np.zeros(ns, np.int64), np.zeros(ns, bool)
        for k, grp in span_groups.items():
            if grp.size:
                v, ok = fl.number("sp_" + k, name)
                vals[grp], valid[grp] = v, ok
        return vals, valid

    sp_start, sp_end_t = span_number("start"), span_number("end")

    tables: dict[str, dict] = {}
    for g, rows in groups.items():
        sel = np.flatnonzero(good_line[ev_line[rows]])
        if not sel.size:
            continue
        er = rows[sel]
        spn = ev_span[er]
        pk = pos_in_kind[spn]
        cols = {"event_time_unix_nano": take(ev_time, er), "source_line": first_line + ev_line[er]}
        if g == "bs":
            for k, t in STEP_ATTRS:
                cols[k] = take(fl.number("bs", k, np.float64 if t is float else np.int64), sel)
            cols["span_sequence"] = take(fl.number("sp_step", "span_sequence"), pk)
            tables["steps"] = _columns("steps", cols, len(er))
        elif g == "snap":
            for k, t in SNAPSHOT_ATTRS:
                cols[k] = fl.text("snap", k).take(pa.array(sel)) if t is str else take(fl.number("snap", k), sel)
            tables["snapshots"] = _columns("snapshots", cols, len(er))
        else:
            kind_owner = "sp_core" if g == "journey" else "sp_api"
            ispn = pa.array(spn)
            cols.update({"request.id": fl.text(kind_owner, "request.id").take(pa.array(pk)),
                         "trace_id": fl.text("span", "trace_id").take(ispn),
                         "span_id": fl.text("span", "span_id").take(ispn),
                         "span_start_unix_nano": take(sp_start, spn),
                         "span_end_unix_nano": take(sp_end_t, spn)})
            label = _EV_SUFFIX.take(pa.array(ev_code[er]))
            isel = pa.array(sel)
            if g == "journey":
                cols["parent_span_id"] = fl.text("span", "parent_span_id").take(ispn)
                cols["event.type"] = label
                for k, t in JOURNEY_ATTRS:
                    if k in ("event.type", "ts.monotonic"):
                        continue
                    cols[k] = fl.text("journey", k).take(isel) if t is str else take(fl.number("journey", k), sel)
                cols["_ts_monotonic"] = take(fl.number("journey", "ts.monotonic", np.float64), sel)
                cols["span_dropped_events"] = sp_dropped[spn]
                tables["journey"] = _columns("journey", cols, len(er))
            else:
                cols["event"] = label
                cols["event.ts.monotonic"] = take(fl.number("api", "event.ts.monotonic", np.float64), sel)
                cols["reason"] = fl.text("api", "reason").take(isel)
                cols["prompt_tokens"] = take(fl.number("sp_api", "prompt_tokens"), pk)
                cols["max_tokens"] = take(fl.number("sp_api", "max_tokens"), pk)
                cols["model"] = fl.text("sp_api", "model").take(pa.array(pk))
                code_vals, code_ok = fl.number("tail", "status_code")
                ti = tail_idx[spn]
                cols["status_code"] = (code_vals[np.maximum(ti, 0)], code_ok[np.maximum(ti, 0)] & (ti >= 0))
                tables["api"] = _columns("api", cols, len(er))
    rows = span_groups["step"]
    sel = np.flatnonzero(good_line[sp_line[rows]]) if rows.size else rows
    if sel.size:
        sr = rows[sel]
        counted = (ev_span >= 0) & good_line[ev_line] if ne else np.zeros(0, bool)
        n_ev = np.bincount(ev_span[counted], minlength=ns).astype(np.int64)
        cols = {c: take(fl.number("sp_step", c), sel)
                for c in ("span_sequence", "step_range_start", "step_range_end", "closure_interval")}
        cols.update({"dropped_events_count": sp_dropped[sr], "n_events": n_ev[sr],
                     "start_unix_nano": take(sp_start, sr), "end_unix_nano": take(sp_end_t, sr),
                     "source_line": first_line + sp_line[sr]})
        tables["step_spans"] = _columns("step_spans", cols, len(sr))

    # ---- counters over verified lines
    cnt = _new_counters()
    if ns:
        sg = good_line[sp_line]
        ids, counts = np.unique(scope_of_head[sg], return_counts=True)
        cnt["spans_by_scope"] = {scope_names[i]: int(c) for i, c in zip(ids.tolist(), counts.tolist())}
        cnt["dropped_events_total"] = int(sp_dropped[sg].sum())
    if ne:
        ids, counts = np.unique(ev_code[good_line[ev_line]], return_counts=True)
        cnt["events_by_name"] = {_EVENT_NAMES[i][2]: int(c) for i, c in zip(ids.tolist(), counts.tolist())}
    return good_line & eligible, tables, cnt


# --------------------------------------------------------------------------------------------
# Chunks
# --------------------------------------------------------------------------------------------

_MALLOC_TUNED = False


def _tune_malloc() -> None:
    """Keep freed heap memory for reuse (glibc): the fast path allocates many short-lived arrays of
    a few hundred KB to a few MB; with the default thresholds each one is a fresh mmap whose pages
    the kernel must fault in and zero again (about a fifth of the parse time). Raises the mmap
    threshold to 32 MiB and the trim threshold to 128 MiB, once per process; the process then
    keeps up to 128 MiB of freed memory. Set STEPML_MALLOC_TUNING=0 to leave malloc alone."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    if os.environ.get("STEPML_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version"):
            libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
            libc.mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


@dataclass
class _Part:
    tables: dict
    quarantine: pl.DataFrame
    counters: dict
    not_stored: dict = field(default_factory=dict)  # quarantine records counted but not stored, per kind


def _pad(data: bytes) -> bytes:
    return data + PAD_BYTES


def _process_chunk(data: bytes, n: int, first_line: int, unterminated: bool, label: str, fast: bool = True,
                   max_quarantine: int | None = None) -> _Part:
    """Parse one chunk of whole lines: ``data[:n]`` followed by ``PAD_BYTES``.

    The last line of the file may be unterminated (``unterminated``). At most ``max_quarantine``
    quarantine records are stored (the rest are counted in ``_Part.not_stored``).
    """
    if len(data) < n + PAD or data[n:n + _NQSENT] != PAD_BYTES[:_NQSENT]:
        raise ValueError("chunk is not padded with PAD_BYTES")
    _tune_malloc()
    a = np.frombuffer(data, np.uint8)
    nl = np.flatnonzero(a[:n] == 10)
    starts = np.concatenate(([0], nl + 1)).astype(np.int64)
    ends = np.concatenate((nl, [n])).astype(np.int64)
    if not unterminated:  # data ends with a newline: no line after it
        starts, ends = starts[:-1], ends[:-1]
    nlines = len(starts)
    blank = (ends - starts) == 0
    sink = _Sink(label, max_quarantine)
    general = ~blank
    tables: dict[str, dict] = {}
    fast_counters = _new_counters()
    if fast and nlines:
        verified, tables, fast_counters = _fast_chunk(data, a, n, starts, ends, ~blank, first_line, {}, len(nl))
        general &= ~verified
        fast_counters["lines_ok"] = fast_counters["lines_fast"] = int(verified.sum())
        fast_counters["lines_total"] = int(verified.sum())
    for i in np.flatnonzero(general).tolist():
        sink.line(data[starts[i]:ends[i]], first_line + i, unterminated and i == nlines - 1)
    c = sink.counters
    nb = int(blank.sum())
    c["lines_total"] += nb
    c["lines_blank"] += nb
    _merge_counters(c, fast_counters)
    gen = sink.columns()
    out = {}  # table -> list of column dicts (fast rows, general rows); assembly merges them
    for t in TABLES:
        out[t] = [x for x in (tables.get(t), gen.get(t)) if x]
    return _Part(out, sink.quarantine_frame(), c, sink.not_stored)


_GZ_MAGIC = b"\x1f\x8b"


class _ChunkStream:
    """Read (and inflate) a trace file in a background thread; yield chunks of whole lines in order.

    Hashes every byte it reads (``sha256``, ``bytes_read``), applies the limits on inflated bytes,
    inflation ratio and line length, and keeps the lines before a truncated gzip stream
    (``truncated`` = (compressed bytes consumed, reason)).
    """

    RATIO_FLOOR_BYTES = 64 << 20  # the inflation ratio is judged once this many bytes are inflated

    def __init__(self, path: Path, fileobj, chunk_bytes: int, first_chunk_bytes: int | None = None,
                 limits: InputLimits = DEFAULT_LIMITS):
        self.path, self.f, self.chunk_bytes = path, fileobj, chunk_bytes
        self.first_chunk_bytes = first_chunk_bytes or chunk_bytes
        self.limits = limits
        self.bytes_uncompressed = 0
        self.bytes_read = 0
        self.sha256 = hashlib.sha256()
        self.truncated: tuple[int, str] | None = None
        self._q: queue.Queue = queue.Queue(maxsize=3)
        self._stop = threading.Event()

    def _read(self, n: int) -> bytes:
        b = self.f.read(n)
        self.sha256.update(b)
        self.bytes_read += len(b)
        return b

    def _blocks(self):
        name = self.path.name
        f = self.f
        head = f.read(2)
        f.seek(0)
        gz = head == _GZ_MAGIC
        if not gz and name.endswith(".gz") and head:
            raise TraceReadError(f"{name}: not a gzip file (no gzip header)")
        if not gz:
            while b := self._read(self.chunk_bytes):
                yield b
            return
        d = zlib.decompressobj(wbits=31)
        consumed = 0
        out_max = 1 << 20
        lim = self.limits
        while True:
            cb = self._read(1 << 18)
            if not cb:
                break
            while True:
                try:
                    out = d.decompress(cb, out_max)
                except zlib.error as e:
                    raise _GzipError(consumed, str(e)) from None
                inflated = self.bytes_uncompressed + len(out)
                if inflated > self.RATIO_FLOOR_BYTES and inflated > lim.max_inflate_ratio * max(1, self.bytes_read):
                    raise _LimitError(f"{name}: inflates more than {lim.max_inflate_ratio:g}x ({inflated} bytes from "
                                      f"{self.bytes_read} compressed; limit {lim.describe('max_inflate_ratio')}): a gzip bomb?")
                if d.eof:
                    rest = d.unused_data
                    consumed += len(cb) - len(rest)
                    if out:
                        yield out
                    if rest and rest.strip(b"\x00"):
                        if rest[:2] != _GZ_MAGIC and len(rest) >= 2:
                            raise _GzipError(consumed, "trailing bytes that are not a gzip member")
                        d = zlib.decompressobj(wbits=31)  # concatenated gzip members
                        cb = rest
                        continue
                    break
                tail = d.unconsumed_tail
                consumed += len(cb) - len(tail)
                if out:
                    yield out
                if not tail and len(out) < out_max:
                    break
                cb = tail
        if not d.eof:  # a copy cut short: keep what was inflated, record the damage
            self.truncated = (consumed, "compressed data ends before the end of the stream")

    def _produce(self):
        lim = self.limits
        try:
            pending: list[bytes] = []
            size = 0
            last_nl = -1  # index in pending of the last piece holding a newline (pieces before a cut have none)
            line_len = 0  # bytes since the last newline
            self._pending = pending
            first = True  # a small first chunk: parsing starts while the rest is inflated
            for b in self._blocks():
                self.bytes_uncompressed += len(b)
                if self.bytes_uncompressed > lim.max_trace_bytes:
                    raise _LimitError(f"{self.path.name}: more than {lim.max_trace_bytes} bytes of trace JSON "
                                      f"(limit {lim.describe('max_trace_bytes')})")
                j = b.rfind(b"\n")
                if j < 0:
                    line_len += len(b)
                else:
                    line_len = len(b) - j - 1
                    last_nl = len(pending)
                if line_len > lim.max_line_bytes:
                    raise _LimitError(f"{self.path.name}: a line longer than {lim.max_line_bytes} bytes "
                                      f"(limit {lim.describe('max_line_bytes')})")
                pending.append(b)
                size += len(b)
                if size < (self.first_chunk_bytes if first else self.chunk_bytes) or last_nl < 0:
                    continue  # not enough yet, or no newline yet (a line longer than the chunk size)
                # cut after the last newline, one join with padding
                k = last_nl
                piece = pending[k]
                cut = piece.rfind(b"\n") + 1
                head, tail = (piece, b"") if cut == len(piece) else (piece[:cut], piece[cut:])
                body = pending[:k] + [head]
                n = size - len(tail) - sum(len(x) for x in pending[k + 1:])
                chunk = b"".join(body + [PAD_BYTES])
                pending[:] = ([tail] if tail else []) + pending[k + 1:]
                last_nl = -1
                size = sum(len(x) for x in pending)
                if not self._put((chunk, n, False)):
                    return
                first = False
            if size:
                chunk = b"".join(pending + [PAD_BYTES])
                self._put((chunk, size, chunk[size - 1:size] != b"\n"))
            self._put(None)
        except _GzipError as e:  # the consumer adds the lines it has seen
            e.pending_lines = sum(p.count(b"\n") for p in self._pending)
            self._put(e)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self._put(e)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        t = threading.Thread(target=self._produce, name="stepml-trace-reader", daemon=True)
        t.start()
        try:
            while True:
                item = self._q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._stop.set()
            t.join()


_POOL = None
_POOL_SIZE = 0
_POOL_LOCK = threading.Lock()


def _pool(workers: int):
    global _POOL, _POOL_SIZE
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE != workers:
            if _POOL is not None:
                _POOL.shutdown(cancel_futures=True)
            _POOL = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
            _POOL_SIZE = workers
        return _POOL


@atexit.register
def _shutdown_pool() -> None:
    global _POOL
    if _POOL is not None:
        _POOL.shutdown(cancel_futures=True)
        _POOL = None


def _estimate_uncompressed(f, size: int) -> int:
    """Uncompressed size of an open trace file: its size, or for gzip the ISIZE trailer (size mod 2**32 of the last member)."""
    if size < 18:
        return size
    f.seek(0)
    if f.read(2) != _GZ_MAGIC:
        f.seek(0)
        return size
    f.seek(-4, os.SEEK_END)
    isize = int.from_bytes(f.read(4), "little")
    f.seek(0)
    return max(isize, size * 4)  # ISIZE wraps at 4 GiB; JSON compresses at least 4x


def _auto_workers(est: int) -> int:
    """Worker processes when the caller does not say: one below 256 MB uncompressed (the fast path
    parses faster than gzip inflates plus IPC would gain, and a pool costs ~1 s to start), else 2."""
    if (os.cpu_count() or 1) < 2:
        return 1
    return 2 if est >= (256 << 20) else 1


def read_traces(path: str | Path, *, workers: int | None = None, fast: bool = True,
                chunk_bytes: int | None = None, limits: InputLimits | None = None, root: Path | None = None) -> TraceTables:
    """Read ``traces.json`` or ``traces.json.gz`` into :class:`TraceTables`.

    ``workers``: processes that parse chunks (None: 1, or 2 for files over 256 MB); the calling
    process inflates and assembles. With ``workers`` > 1 a spawned pool is started once and kept
    (scripts must guard their entry point with ``if __name__ == "__main__":``).
    ``fast=False`` sends every line through the general orjson path (same tables, slower; for
    checks). ``chunk_bytes``: uncompressed bytes per chunk (None: 2 MiB, the first one 1 MiB).
    ``limits``: see :class:`~stepml_core.limits.InputLimits`; ``root``: the data root the file
    must lie in (symlinks out of it are refused).

    Malformed lines and events are quarantined, never raised; a corrupt gzip stream raises
    :class:`TraceReadError`; a truncated one keeps the lines before the damage and adds a ``file``
    quarantine record; a missing file raises FileNotFoundError; a passed limit raises
    :class:`~stepml_core.limits.InputLimitError` naming the file, the line reached and the limit.
    """
    path = Path(path)
    label = str(path)
    limits = limits or DEFAULT_LIMITS
    if not os.path.lexists(path):
        raise FileNotFoundError(f"{path}: no such trace file")
    f, st = open_input(path, root)
    with f:
        est = _estimate_uncompressed(f, st.st_size)
        workers = process_workers(_auto_workers(est) if workers is None else max(1, int(workers)))
        first_chunk = None
        if chunk_bytes is None:  # ~2 MiB: the parse's working set stays in cache; a 1 MiB first chunk
            chunk_bytes = 2 << 20  # starts parsing while the rest is inflated
            first_chunk = 1 << 20
        stream = _ChunkStream(path, f, max(1 << 12, int(chunk_bytes)), first_chunk, limits)
        parts = _read_parts(stream, path, label, workers, fast, limits)
    tables = _assemble(parts, stream.bytes_uncompressed, limits.max_quarantine_rows, label)
    tables.read = {"size_bytes": stream.bytes_read, "mtime_ns": st.st_mtime_ns, "sha256": stream.sha256.hexdigest()}
    if stream.truncated is not None:
        consumed, why = stream.truncated
        n = tables.counters["lines_total"]
        tables.counters["gzip_truncated"] = 1
        record = pl.DataFrame({"file": [label], "line": [n], "kind": ["file"], "count": [1], "excerpt": [None],
                               "reason": [f"truncated gzip stream: {why} (compressed byte {consumed} of {stream.bytes_read}); "
                                          f"the {n} line(s) before the damage are kept, the rest of the run is missing"]},
                              schema=TABLE_SCHEMAS["quarantine"])
        tables.quarantine = pl.concat([tables.quarantine, record])
    return tables


def _lines_reached(parts: list, pending: deque) -> int:
    while pending:  # chunks already handed out count towards the line reached
        parts.append(pending.popleft().result())
    return sum(p.counters["lines_total"] for p in parts)


def _read_parts(stream: _ChunkStream, path: Path, label: str, workers: int, fast: bool, limits: InputLimits) -> list:
    """Parse the stream's chunks (in this process or the pool), checking the unreadable-lines limit."""
    parts: list[_Part] = []
    pending: deque = deque()
    cap = limits.max_quarantine_rows
    stored = 0

    def take(part: _Part) -> None:
        nonlocal stored
        parts.append(part)
        stored += part.quarantine.height
        bad = sum(p.counters["lines_quarantined"] for p in parts)
        if bad > limits.max_unreadable_lines:
            raise InputLimitError(f"{path.name}: more than {limits.max_unreadable_lines} lines are not OTLP JSON (by line "
                                  f"{sum(p.counters['lines_total'] for p in parts)}; limit "
                                  f"{limits.describe('max_unreadable_lines')}): not a trace file?")

    try:
        if workers == 1:
            for chunk, n, unterminated in stream:
                take(_process_chunk(chunk, n, 1, unterminated, label, fast, max(0, cap - stored)))
        else:
            pool = _pool(workers)
            for chunk, n, unterminated in stream:
                pending.append(pool.submit(_process_chunk, chunk, n, 1, unterminated, label, fast, max(0, cap - stored)))
                while len(pending) > 2 * workers:
                    take(pending.popleft().result())
            while pending:
                take(pending.popleft().result())
    except _GzipError as e:
        lines = _lines_reached(parts, pending) + e.pending_lines
        raise TraceReadError(f"{path.name}: corrupt gzip stream after line {lines} "
                             f"(compressed byte {e.consumed}: {e.reason})") from None
    except _LimitError as e:
        lines = _lines_reached(parts, pending)
        raise InputLimitError(f"{path}: {e.message.split(': ', 1)[1]}; stopped after line {lines}") from None
    finally:
        for fut in pending:
            fut.cancel()
    return parts


def _assemble(parts: list[_Part], nbytes: int, max_quarantine: int | None = None, label: str = "") -> TraceTables:
    counters = _new_counters()
    for p in parts:
        _merge_counters(counters, p.counters)
    counters["bytes_uncompressed"] = nbytes
    # chunks were parsed with line numbers from 1: shift them by the lines of the chunks before
    pieces: dict[str, list] = {t: [] for t in TABLES}
    mixed = {t: False for t in TABLES}
    quarantine = []
    offset = 0
    for p in parts:
        for t in TABLES:
            batches = p.tables[t]
            mixed[t] |= len(batches) > 1  # fast and general rows of one chunk: sort by line
            for cols in batches:
                if offset:
                    cols = {**cols, "source_line": pc.add(cols["source_line"], offset)}
                pieces[t].append(cols)
        if p.quarantine.height:
            quarantine.append(p.quarantine.with_columns(pl.col("line") + offset) if offset else p.quarantine)
        offset += p.counters["lines_total"]
    out = {}
    for t in TABLES:
        schema = {**TABLE_SCHEMAS[t], **_INTERNAL.get(t, {})}
        if not pieces[t]:
            df = _EMPTY[t]
        else:
            arrays = [pa.concat_arrays([c[name] for c in pieces[t]]) if len(pieces[t]) > 1 else pieces[t][0][name]
                      for name in schema]
            df = pl.from_arrow(pa.Table.from_arrays(arrays, names=list(schema)))
            if df.schema != schema:
                df = df.cast(schema)
            if mixed[t]:
                df = df.sort("source_line", maintain_order=True)
        if t == "journey":
            df = df.with_columns(
                pl.when(pl.col("ts.monotonic_ns").is_null())
                .then((pl.col("_ts_monotonic") * 1e9).round().cast(I64, strict=False))
                .otherwise(pl.col("ts.monotonic_ns")).alias("ts.monotonic_ns")).drop("_ts_monotonic")
        out[t] = df
    q = pl.concat(quarantine) if quarantine else _EMPTY["quarantine"]
    not_stored: dict[str, int] = {}
    for p in parts:
        for k, v in p.not_stored.items():
            not_stored[k] = not_stored.get(k, 0) + v
    if max_quarantine is not None and q.height > max_quarantine:
        for k, v in q[max_quarantine:].group_by("kind").len().iter_rows():
            not_stored[k] = not_stored.get(k, 0) + v
        q = q[:max_quarantine]
    if not_stored:
        q = pl.concat([q, quarantine_summary(label, not_stored, max_quarantine)])
    out["quarantine"] = q
    return TraceTables(**out, counters=counters)


def quarantine_summary(file: str, not_stored: dict[str, int], max_rows: int | None) -> pl.DataFrame:
    """One record per kind standing for ``count`` quarantine records that were counted but not stored."""
    kinds = sorted(not_stored)
    return pl.DataFrame({"file": [file] * len(kinds), "line": [None] * len(kinds), "kind": kinds,
                         "reason": [f"{not_stored[k]} more {k} record(s) like the stored ones, not stored "
                                    f"(limit max_quarantine_rows = {max_rows}; STEPML_MAX_QUARANTINE_ROWS or "
                                    "settings.max_quarantine_rows)" for k in kinds],
                         "excerpt": [None] * len(kinds), "count": [not_stored[k] for k in kinds]},
                        schema=TABLE_SCHEMAS["quarantine"])
