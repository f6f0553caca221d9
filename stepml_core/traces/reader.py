"""Chunks of whole lines, the gzip-inflating thread, the process pool and read_traces: the file read as a
stream and assembled into TraceTables (stepml_core.traces)."""

from __future__ import annotations

import atexit
import hashlib
import os
import queue
import sys
import threading
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from stepml_core.gc_pause import gc_paused
from stepml_core.parallel import process_workers
from stepml_core.runs.folders import open_input
from stepml_core.runs.limits import DEFAULT_LIMITS, InputLimitError, InputLimits
from stepml_core.traces.fast import _fast_chunk
from stepml_core.traces.general import _Sink
from stepml_core.traces.schema import (
    _EMPTY,
    _INTERNAL,
    I64,
    TABLE_SCHEMAS,
    TABLES,
    TraceReadError,
    TraceTables,
    _GzipError,
    _LimitError,
    _merge_counters,
    _new_counters,
)
from stepml_core.traces.templates import _NQSENT, PAD, PAD_BYTES

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


def _process_chunk(
    data: bytes,
    n: int,
    first_line: int,
    unterminated: bool,
    label: str,
    fast: bool = True,
    max_quarantine: int | None = None,
) -> _Part:
    """Parse one chunk of whole lines: ``data[:n]`` followed by ``PAD_BYTES``.

    The last line of the file may be unterminated (``unterminated``). At most ``max_quarantine``
    quarantine records are stored (the rest are counted in ``_Part.not_stored``).
    """
    if len(data) < n + PAD or data[n : n + _NQSENT] != PAD_BYTES[:_NQSENT]:
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
        sink.line(data[starts[i] : ends[i]], first_line + i, unterminated and i == nlines - 1)
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

    def __init__(
        self,
        path: Path,
        fileobj,
        chunk_bytes: int,
        first_chunk_bytes: int | None = None,
        limits: InputLimits = DEFAULT_LIMITS,
    ):
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
                    raise _LimitError(
                        f"{name}: inflates more than {lim.max_inflate_ratio:g}x ({inflated} bytes from "
                        f"{self.bytes_read} compressed; limit {lim.describe('max_inflate_ratio')}): a gzip bomb?"
                    )
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
                    raise _LimitError(
                        f"{self.path.name}: more than {lim.max_trace_bytes} bytes of trace JSON "
                        f"(limit {lim.describe('max_trace_bytes')})"
                    )
                j = b.rfind(b"\n")
                if j < 0:
                    line_len += len(b)
                else:
                    line_len = len(b) - j - 1
                    last_nl = len(pending)
                if line_len > lim.max_line_bytes:
                    raise _LimitError(
                        f"{self.path.name}: a line longer than {lim.max_line_bytes} bytes "
                        f"(limit {lim.describe('max_line_bytes')})"
                    )
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
                n = size - len(tail) - sum(len(x) for x in pending[k + 1 :])
                chunk = b"".join(body + [PAD_BYTES])
                pending[:] = ([tail] if tail else []) + pending[k + 1 :]
                last_nl = -1
                size = sum(len(x) for x in pending)
                if not self._put((chunk, n, False)):
                    return
                first = False
            if size:
                chunk = b"".join(pending + [PAD_BYTES])
                self._put((chunk, size, chunk[size - 1 : size] != b"\n"))
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


@gc_paused()  # a run's records: many small objects, no cycles (stepml_core.gc_pause)
def read_traces(
    path: str | Path,
    *,
    workers: int | None = None,
    fast: bool = True,
    chunk_bytes: int | None = None,
    limits: InputLimits | None = None,
    root: Path | None = None,
) -> TraceTables:
    """Read ``traces.json`` or ``traces.json.gz`` into :class:`TraceTables`.

    ``workers``: processes that parse chunks (None: 1, or 2 for files over 256 MB); the calling
    process inflates and assembles. With ``workers`` > 1 a spawned pool is started once and kept
    (scripts must guard their entry point with ``if __name__ == "__main__":``).
    ``fast=False`` sends every line through the general orjson path (same tables, slower; for
    checks). ``chunk_bytes``: uncompressed bytes per chunk (None: 2 MiB, the first one 1 MiB).
    ``limits``: see :class:`~stepml_core.runs.limits.InputLimits`; ``root``: the data root the file
    must lie in (symlinks out of it are refused).

    Malformed lines and events are quarantined, never raised; a corrupt gzip stream raises
    :class:`TraceReadError`; a truncated one keeps the lines before the damage and adds a ``file``
    quarantine record; a missing file raises FileNotFoundError; a passed limit raises
    :class:`~stepml_core.runs.limits.InputLimitError` naming the file, the line reached and the limit.
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
        record = pl.DataFrame(
            {
                "file": [label],
                "line": [n],
                "kind": ["file"],
                "count": [1],
                "excerpt": [None],
                "reason": [
                    f"truncated gzip stream: {why} (compressed byte {consumed} of {stream.bytes_read}); "
                    f"the {n} line(s) before the damage are kept, the rest of the run is missing"
                ],
            },
            schema=TABLE_SCHEMAS["quarantine"],
        )
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
            raise InputLimitError(
                f"{path.name}: more than {limits.max_unreadable_lines} lines are not OTLP JSON (by line "
                f"{sum(p.counters['lines_total'] for p in parts)}; limit "
                f"{limits.describe('max_unreadable_lines')}): not a trace file?"
            )

    try:
        if workers == 1:
            for chunk, n, unterminated in stream:
                take(_process_chunk(chunk, n, 1, unterminated, label, fast, max(0, cap - stored)))
        else:
            pool = _pool(workers)
            for chunk, n, unterminated in stream:
                pending.append(
                    pool.submit(_process_chunk, chunk, n, 1, unterminated, label, fast, max(0, cap - stored))
                )
                while len(pending) > 2 * workers:
                    take(pending.popleft().result())
            while pending:
                take(pending.popleft().result())
    except _GzipError as e:
        lines = _lines_reached(parts, pending) + e.pending_lines
        raise TraceReadError(
            f"{path.name}: corrupt gzip stream after line {lines} (compressed byte {e.consumed}: {e.reason})"
        ) from None
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
            arrays = [
                pa.concat_arrays([c[name] for c in pieces[t]]) if len(pieces[t]) > 1 else pieces[t][0][name]
                for name in schema
            ]
            df = pl.from_arrow(pa.Table.from_arrays(arrays, names=list(schema)))
            if df.schema != schema:
                df = df.cast(schema)
            if mixed[t]:
                df = df.sort("source_line", maintain_order=True)
        if t == "journey":
            df = df.with_columns(
                pl.when(pl.col("ts.monotonic_ns").is_null())
                .then((pl.col("_ts_monotonic") * 1e9).round().cast(I64, strict=False))
                .otherwise(pl.col("ts.monotonic_ns"))
                .alias("ts.monotonic_ns")
            ).drop("_ts_monotonic")
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
    return pl.DataFrame(
        {
            "file": [file] * len(kinds),
            "line": [None] * len(kinds),
            "kind": kinds,
            "reason": [
                f"{not_stored[k]} more {k} record(s) like the stored ones, not stored "
                f"(limit max_quarantine_rows = {max_rows}; STEPML_MAX_QUARANTINE_ROWS or "
                "settings.max_quarantine_rows)"
                for k in kinds
            ],
            "excerpt": [None] * len(kinds),
            "count": [not_stored[k] for k in kinds],
        },
        schema=TABLE_SCHEMAS["quarantine"],
    )
