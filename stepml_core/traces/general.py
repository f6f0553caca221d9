"""General path: orjson + a walk of the OTLP structure with per-field coercion; the reference that writes
the parse_issue texts and quarantine records (stepml_core.traces)."""

from __future__ import annotations

import math
import re

import orjson
import polars as pl
import pyarrow as pa

from stepml_core.traces.schema import (
    _ARROW,
    _EMPTY,
    _INTERNAL,
    API_ATTRS,
    API_EVENTS,
    API_SPAN_ATTRS,
    EV_BATCH,
    EV_SNAPSHOT,
    INT64_MAX,
    INT64_MIN,
    JOURNEY_ATTRS,
    JOURNEY_REQUIRED,
    JOURNEY_TYPES,
    SCOPE_API,
    SCOPE_CORE,
    SCOPE_STEP,
    SNAPSHOT_ATTRS,
    SNAPSHOT_OPTIONAL,
    STEP_ATTRS,
    STEP_SPAN_ATTRS,
    TABLE_SCHEMAS,
    TABLES,
    _excerpt,
    _merge_counters,
    _new_counters,
)

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
        ((kind, x),) = v.items()
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


def _span_kind(scope: str, name) -> str | None:
    """The span kind, "step", "core" or "api", of the three known (scope, span name) pairs, else None."""
    if scope == SCOPE_STEP and isinstance(name, str) and name.startswith("scheduler_steps_"):
        return "step"
    if scope == SCOPE_CORE and name == "llm_core":
        return "core"
    if scope == SCOPE_API and name == "llm_request":
        return "api"
    return None


def _request_span_context(kind: str, sp: dict, sattrs: dict, dropped: int, t0, t1, span_issues: list[str]) -> dict:
    """Context of the events of an ``llm_core`` / ``llm_request`` span: trace and span ids, span times, request id
    (+ the API span attributes, the parent span and dropped events of a core span, the status code of an API
    span); value problems appended to ``span_issues``."""
    ctx = {
        "trace_id": sp.get("traceId"),
        "span_id": sp.get("spanId"),
        "span_start_unix_nano": t0,
        "span_end_unix_nano": t1,
    }
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
    return ctx


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
                    del lst[marks[t] :]
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
        """One span: its attributes and times read (issues collected), a step span's row stored, then its events
        read with the span's context (a span of an unknown kind only has its events counted)."""
        name = sp.get("name")
        kind = _span_kind(scope, name)
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
            ctx = self._step_span(name, sattrs, dropped, len(events), t0, t1, line_no)
        else:
            ctx = _request_span_context(kind, sp, sattrs, dropped, t0, t1, span_issues)
        for ev in events:
            self._event(kind, ev, ctx, span_issues, line_no, cnt)

    def _step_span(self, name: str, sattrs: dict, dropped: int, n_events: int, t0, t1, line_no: int) -> dict:
        """Store a ``scheduler_steps_<n>`` span's row (sequence from its attribute, else from its name); returns the
        context of its events."""
        sv = {}
        for k, col, typ in STEP_SPAN_ATTRS:
            if k in sattrs:
                try:
                    sv[col] = _coerce(k, sattrs[k], typ)[0]
                except _EventReject:
                    sv[col] = None
        seq = sv.get("span_sequence")
        if seq is None and "scheduler.span_sequence" not in sattrs:
            suffix = name[len("scheduler_steps_") :]
            seq = int(suffix) if suffix.isdigit() and len(suffix) < 19 else None
        self._add(
            "step_spans",
            {
                "span_sequence": seq,
                "step_range_start": sv.get("step_range_start"),
                "step_range_end": sv.get("step_range_end"),
                "closure_interval": sv.get("closure_interval"),
                "dropped_events_count": dropped,
                "n_events": n_events,
                "start_unix_nano": t0,
                "end_unix_nano": t1,
                "source_line": line_no,
            },
        )
        return {"span_sequence": seq}

    def _event(self, kind: str, ev: dict, ctx: dict, span_issues: list, line_no: int, cnt: dict) -> None:
        name = ev.get("name")
        if kind == "step":
            table = "steps" if name == EV_BATCH else "snapshots" if name == EV_SNAPSHOT else None
        elif kind == "core":
            table = (
                "journey" if isinstance(name, str) and name[:8] == "journey." and name[8:] in JOURNEY_TYPES else None
            )
        else:
            table = "api" if isinstance(name, str) and name[:4] == "api." and name[4:] in API_EVENTS else None
        if table is None:
            cnt["events_unknown"] += 1
            cnt["events_quarantined"] += 1
            self._quarantine(
                line_no,
                "event",
                f"unknown event name {_short(name) if not isinstance(name, str) else repr(name)}",
                _excerpt(orjson.dumps(ev)),
            )
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
                row = {
                    "event": name[4:],
                    "event.ts.monotonic": vals.get("event.ts.monotonic"),
                    "reason": vals.get("reason"),
                }
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
