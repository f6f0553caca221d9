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

Limits (:class:`stepml_core.runs.limits.InputLimits`): inflated bytes, gzip inflation ratio, bytes per
line and unreadable lines per file raise :class:`~stepml_core.runs.limits.InputLimitError` naming the
limit; at most ``max_quarantine_rows`` quarantine records are stored, the rest counted in one
summary record per kind (column ``count``). Only a regular file inside ``root`` is read (a FIFO,
directory or symlink out of the data root gets RunMetadataError saying so), and ``TraceTables.read``
fingerprints the bytes actually read (size, sha256, mtime before reading).

Modules, along the reader's own sections: ``schema`` (table schemas, errors, counters), ``general``
(the reference path), ``templates`` (the canonical line templates and their lock-step matcher), ``values``
(matched bytes → typed Arrow columns), ``fast`` (one chunk through the fast path: candidates, tiling, owners,
tables), ``reader`` (chunks, gzip thread, process pool, read_traces and assembly), ``writer`` (the writer the
synthesizer uses: OTLP/JSON lines as the collector writes them).
"""

from stepml_core.traces.reader import quarantine_summary, read_traces
from stepml_core.traces.schema import TABLE_SCHEMAS, TraceReadError, TraceTables
from stepml_core.traces.values import _json_numbers_ok  # noqa: F401 (tests check it directly)

__all__ = ["TraceTables", "TraceReadError", "read_traces", "TABLE_SCHEMAS", "quarantine_summary"]
