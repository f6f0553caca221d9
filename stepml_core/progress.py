"""Progress of a known number of items (runs synthesized, partitions materialized, replays, fits).

On a terminal: one live progress bar (rich), redrawn in place. Otherwise (a log file, a pipe, CI):
one line per finished item and nothing else, so a log holds exactly one line per item.

    from stepml_core.progress import make_progress

    with make_progress(total=16, label="synth") as progress:
        for run in runs:
            ...
            progress.update(run, 0.5)        # optional: part of an unfinished item (moves the bar only)
            progress.advance(run)            # one item finished: "synth [3/16] <run>" when not a terminal
        progress.advance("x: FAILED ...", persist=True)   # also left above the bar on a terminal
        progress.log("a message")            # a line above the bar (a plain line when not a terminal)

``progress.update(item, fraction)`` with ``fraction >= 1`` is ``advance(item)``, so the object can be
passed wherever a ``(item, fraction)`` callback is expected (``synthesize_runs(progress=...)``).
Output goes to ``stream`` (default: standard error); ``tty`` forces one mode (tests).
Safe to call from several threads.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


def make_progress(total: int, label: str, *, stream: TextIO | None = None, tty: bool | None = None) -> "Progress":
    """A Progress over ``total`` items named ``label``: a bar on a terminal, one line per item elsewhere."""
    return Progress(total, label, stream=stream, tty=tty)


class Progress:
    """See the module docstring. Use as a context manager (the bar is drawn between enter and exit)."""

    def __init__(self, total: int, label: str, *, stream: TextIO | None = None, tty: bool | None = None):
        self.total, self.label = max(0, int(total)), label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.done = 0
        self._partial: dict[str, float] = {}
        self._finished: set[str] = set()
        self._lock = threading.Lock()
        self._bar = self._task = None
        self._t0 = time.monotonic()

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "Progress":
        if self.tty:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import (
                Progress as RichProgress,
            )

            console = Console(file=self.stream, force_terminal=True)
            self._bar = RichProgress(
                TextColumn("{task.fields[label]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
                console=console,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("", total=self.total, label=self.label)
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    # ------------------------------------------------------------------ items
    def advance(self, item_label: str, *, persist: bool = False) -> None:
        """One item finished. Not a terminal: prints ``<label> [<done>/<total>] <item_label>``.
        persist: on a terminal, also print that line above the bar (failures)."""
        with self._lock:
            self.done += 1
            self._finished.add(item_label)
            self._partial.pop(item_label, None)
            line = f"{self.label} [{self.done}/{self.total}] {item_label}"
            if self._bar is None:
                self._write(line)
                return
            if persist:
                self._bar.console.print(line, markup=False, highlight=False)
            self._refresh(item_label)

    def update(self, item_label: str, fraction: float) -> None:
        """Part of an unfinished item is done (0..1): moves the bar only. fraction >= 1 finishes the item
        (once: later calls for a finished item are ignored)."""
        if fraction >= 1.0:
            with self._lock:
                finished = item_label in self._finished
            if not finished:
                self.advance(item_label)
            return
        with self._lock:
            if item_label in self._finished:
                return
            self._partial[item_label] = max(0.0, float(fraction))
            if self._bar is not None:
                self._refresh(None)

    __call__ = update  # a (item, fraction) callback

    def log(self, line: str) -> None:
        """A message line: above the bar on a terminal, a plain line otherwise."""
        with self._lock:
            if self._bar is not None:
                self._bar.console.print(line, markup=False, highlight=False)
            else:
                self._write(line)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._t0

    # ------------------------------------------------------------------ internals
    def _refresh(self, item_label: str | None) -> None:
        kw = {"completed": self.done + sum(min(f, 0.999) for f in self._partial.values())}
        if item_label is not None:
            kw["description"] = item_label
        self._bar.update(self._task, **kw)

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()


_REPORTED = {"cpu_s": 0.0, "peak_rss_mb": 0.0}  # processes this one does not wait for (add_reported_usage)


def add_reported_usage(cpu_s: float, peak_rss_mb: float = 0.0) -> None:
    """CPU seconds (and peak RSS) a process that is not this one's waited-for child reports of itself: a worker
    forked from a fork server is the server's child, so neither ``RUSAGE_CHILDREN`` nor ``/usr/bin/time`` sees it."""
    _REPORTED["cpu_s"] += float(cpu_s)
    _REPORTED["peak_rss_mb"] = max(_REPORTED["peak_rss_mb"], float(peak_rss_mb))


class PhaseClock:
    """Wall and CPU seconds per phase of a long command (synth, runs, models, replay, study), and a summary line.

    CPU seconds = user + system of this process and of its waited-for children (their time counts once they have
    exited, which every phase waits for), from ``resource.getrusage``, plus what fork-server workers reported
    (add_reported_usage, after each partition); ``/usr/bin/time`` sees only the first part.

        clock = PhaseClock()
        with clock.phase("synth"):
            ...
        clock.summary()   # "phases (wall s / CPU s): synth 95.1 / 180.4; total 95.1 / 180.4"
    """

    def __init__(self):
        self.phases: dict[str, tuple[float, float]] = {}  # name -> (wall s, CPU s), summed over its entries

    @staticmethod
    def cpu_s() -> float:
        """User + system seconds of this process and its waited-for children so far."""
        import resource

        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime + _REPORTED["cpu_s"]

    def phase(self, name: str):
        import contextlib

        @contextlib.contextmanager
        def timed():
            w0, c0 = time.perf_counter(), self.cpu_s()
            try:
                yield
            finally:
                w, c = self.phases.get(name, (0.0, 0.0))
                self.phases[name] = (w + time.perf_counter() - w0, c + self.cpu_s() - c0)

        return timed()

    def summary(self) -> str:
        parts = [f"{n} {w:.1f} / {c:.1f}" for n, (w, c) in self.phases.items()]
        wall, cpu = sum(w for w, _ in self.phases.values()), sum(c for _, c in self.phases.values())
        rss = _REPORTED["peak_rss_mb"]
        workers = f"; worker peak RSS {rss / 1024:.2f} GB" if rss else ""
        return f"phases (wall s / CPU s): {'; '.join(parts)}; total {wall:.1f} / {cpu:.1f}{workers}"
