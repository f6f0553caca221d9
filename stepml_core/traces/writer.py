"""Writer of instrumented-vLLM traces: OTLP/JSON lines as an OTEL collector's file exporter
leaves them (docs/trace-format.md §2–§5, §8).

What it reproduces:

* one ``{"resourceSpans":[…]}`` export per line; keys in camelCase; 64-bit integers as
  JSON strings (``intValue``, ``*UnixNano``); floats as ``doubleValue`` numbers (shortest
  round-trip form); ``traceId``/``spanId`` lower-case hex; ``kind``/``flags`` integers;
  ``status`` ``{}``; zero/empty fields omitted (``droppedEventsCount`` only when > 0,
  ``parentSpanId`` only on child spans);
* the attribute type follows the Python runtime type as the OTLP encoder does (bool, str,
  int, float in that order), so an int passed for a float field is written as ``intValue``;
* the 128-event limit per span of the OTEL SDK: the oldest events are dropped and
  ``droppedEventsCount`` counts them (``SpanBuilder``);
* export order: each process (API server, engine core) has its own BatchSpanProcessor;
  a span is queued when it ends and exported with the next flush (every ``flush_s``
  seconds, per process, or as soon as ``max_export_batch`` spans are queued); each export is
  one line with one ``resourceSpans`` entry whose ``scopeSpans`` group the spans by scope.
  Lines are ordered by export time (API and engine lines interleave).

Values are encoded with string templates rather than through dicts: the synthesizer writes
millions of events.
"""

from __future__ import annotations

import gzip
import io
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

MAX_EVENTS_PER_SPAN = 128
KIND_INTERNAL, KIND_SERVER = 1, 2
FLAGS_LOCAL, FLAGS_REMOTE_PARENT = 256, 768

DEFAULT_RESOURCE = (
    ("telemetry.sdk.language", "python"),
    ("telemetry.sdk.name", "opentelemetry"),
    ("telemetry.sdk.version", "1.26.0"),
    ("service.name", "vllm-inference-perf"),
)


def _json_str(s: str) -> str:
    # attribute strings here are ids, names and enum values; escape the two JSON specials anyway
    if not (s.isascii() and s.isprintable()) or '"' in s or "\\" in s:
        import json

        return json.dumps(s)
    return '"' + s + '"'


def encode_value(v) -> str:
    """OTLP AnyValue by Python runtime type (bool, str, int, float)."""
    if isinstance(v, bool):
        return '{"boolValue":' + ("true" if v else "false") + "}"
    if isinstance(v, str):
        return '{"stringValue":' + _json_str(v) + "}"
    if isinstance(v, int):
        return '{"intValue":"' + str(v) + '"}'
    if isinstance(v, float):
        if v != v:
            return '{"doubleValue":"NaN"}'
        if v in (float("inf"), float("-inf")):
            return '{"doubleValue":"' + ("Infinity" if v > 0 else "-Infinity") + '"}'
        return '{"doubleValue":' + repr(v) + "}"
    raise TypeError(f"unsupported attribute value {v!r} ({type(v).__name__})")


def encode_attrs(pairs: Iterable[tuple[str, object]]) -> str:
    """``[{"key":…,"value":…},…]`` for (key, value) pairs; None values are left out."""
    return (
        "[" + ",".join('{"key":"' + k + '","value":' + encode_value(v) + "}" for k, v in pairs if v is not None) + "]"
    )


def encode_event(time_ns: int, name: str, attrs_json: str | None = None) -> str:
    s = '{"timeUnixNano":"' + str(int(time_ns)) + '","name":"' + name + '"'
    if attrs_json and attrs_json != "[]":
        s += ',"attributes":' + attrs_json
    return s + "}"


@dataclass
class Span:
    """One finished span; ``events`` are already-encoded event JSON strings in emission order."""

    trace_id: str
    span_id: str
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attrs_json: str = "[]"
    events: list = field(default_factory=list)
    dropped_events: int = 0
    parent_span_id: str | None = None
    flags: int = FLAGS_LOCAL
    status_json: str = "{}"

    def add_event(self, event_json: str) -> None:
        """Append an event, keeping the newest MAX_EVENTS_PER_SPAN (the SDK drops the oldest)."""
        ev = self.events
        ev.append(event_json)
        if len(ev) > MAX_EVENTS_PER_SPAN:
            del ev[0]
            self.dropped_events += 1

    def to_json(self) -> str:
        s = '{"traceId":"' + self.trace_id + '","spanId":"' + self.span_id + '"'
        if self.parent_span_id:
            s += ',"parentSpanId":"' + self.parent_span_id + '"'
        s += ',"flags":' + str(self.flags) + ',"name":"' + self.name + '","kind":' + str(self.kind)
        s += ',"startTimeUnixNano":"' + str(int(self.start_ns)) + '","endTimeUnixNano":"' + str(int(self.end_ns)) + '"'
        if self.attrs_json and self.attrs_json != "[]":
            s += ',"attributes":' + self.attrs_json
        if self.events:
            s += ',"events":[' + ",".join(self.events) + "]"
        if self.dropped_events:
            s += ',"droppedEventsCount":' + str(self.dropped_events)
        return s + ',"status":' + self.status_json + "}"


class CappedEvents:
    """An event list with the SDK's 128-event cap, for spans built incrementally."""

    __slots__ = ("events", "dropped")

    def __init__(self):
        self.events: deque = deque(maxlen=MAX_EVENTS_PER_SPAN)
        self.dropped = 0

    def append(self, ev: str) -> None:
        if len(self.events) == MAX_EVENTS_PER_SPAN:
            self.dropped += 1
        self.events.append(ev)


def resource_json(resource: Iterable[tuple[str, object]] = DEFAULT_RESOURCE) -> str:
    return '{"attributes":' + encode_attrs(resource) + "}"


@dataclass
class ExportItem:
    """A finished span of one process, ready for export."""

    end_ns: int  # wall-clock end (when it enters the processor's queue)
    scope: str
    span_json: str
    order: int = 0  # tie-breaker for equal end times


def batch_exports(
    items: list[ExportItem], *, flush_s: float = 5.0, max_export_batch: int = 512, phase_ns: int = 0
) -> list[tuple[int, list[ExportItem]]]:
    """Group one process's spans into exports as a BatchSpanProcessor would.

    Spans are queued at their end time; the worker exports everything queued at each
    ``flush_s`` tick (ticks at ``phase_ns + k·flush_s``), or at once when the queue reaches
    ``max_export_batch``. Returns [(export time ns, items)] in time order.
    """
    items = sorted(items, key=lambda it: (it.end_ns, it.order))
    out: list[tuple[int, list[ExportItem]]] = []
    period = int(flush_s * 1e9)
    cur: list[ExportItem] = []
    tick = None
    for it in items:
        if tick is None:
            k = (it.end_ns - phase_ns) // period + 1
            tick = phase_ns + k * period
        while it.end_ns >= tick:
            if cur:
                out.append((tick, cur))
                cur = []
            k = (it.end_ns - phase_ns) // period + 1
            tick = phase_ns + k * period
        cur.append(it)
        if len(cur) >= max_export_batch:
            out.append((it.end_ns, cur))
            cur = []
    if cur:
        out.append((tick if tick is not None else 0, cur))
    return out


def export_line(resource: str, items: list[ExportItem]) -> str:
    """One export request as one JSON line: the items grouped by scope (first-seen order)."""
    scopes: dict[str, list[str]] = {}
    for it in items:
        scopes.setdefault(it.scope, []).append(it.span_json)
    ss = ",".join('{"scope":{"name":"' + sc + '"},"spans":[' + ",".join(sp) + "]}" for sc, sp in scopes.items())
    return '{"resourceSpans":[{"resource":' + resource + ',"scopeSpans":[' + ss + "]}]}"


def merge_exports(*per_process: list[tuple[int, str, int]]) -> list[str]:
    """Merge (export time, line, process order) lists of several processes by export time."""
    allx = [x for lst in per_process for x in lst]
    allx.sort(key=lambda x: (x[0], x[2]))
    return [x[1] for x in allx]


def open_trace_output(path: Path, *, compresslevel: int = 3):
    """A binary writer for traces.json[.gz]; gzip with mtime 0 and no file name (reproducible bytes)."""
    path = Path(path)
    raw = open(path, "wb")
    if path.suffix == ".gz":
        gz = gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=compresslevel, mtime=0)
        return _Closing(gz, raw)
    return _Closing(raw, None)


class _Closing(io.RawIOBase):
    def __init__(self, inner, outer):
        self.inner, self.outer = inner, outer

    def write(self, b):
        return self.inner.write(b)

    def close(self):
        try:
            self.inner.close()
        finally:
            if self.outer is not None:
                self.outer.close()
        super().close()


def write_lines(path: Path, lines: Iterable[str], *, compresslevel: int = 3) -> int:
    """Write JSON lines (each followed by a newline); returns the number of lines."""
    n = 0
    f = open_trace_output(path, compresslevel=compresslevel)
    try:
        buf = []
        size = 0
        for line in lines:
            buf.append(line)
            size += len(line)
            n += 1
            if size > (8 << 20):
                f.write(("\n".join(buf) + "\n").encode())
                buf, size = [], 0
        if buf:
            f.write(("\n".join(buf) + "\n").encode())
    finally:
        f.close()
    return n
