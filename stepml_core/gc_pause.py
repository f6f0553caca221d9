"""The cyclic garbage collector paused around allocation-heavy work (a simulation, parsing a run's files).

Python's collector runs every few hundred container allocations, and each full pass walks every live object of the
process; work that builds millions of small objects that never form cycles (requests and their event tuples in the
simulator, the records of a trace or request file) pays for passes that find nothing. Reference counting still frees
everything at once; only cycles wait for the next pass after the block. ``gc_paused()`` is a context manager and a
decorator.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager


@contextmanager
def gc_paused():
    """Python's cyclic garbage collector off for the block (restored after; nesting is fine).

    A simulation allocates millions of small objects (requests, their event tuples, the step-keyed queue entries) and
    frees them by reference counting; none of them forms a cycle. Each allocation burst still triggers the collector,
    whose full passes walk every live object of the process (the simulator's, and the libraries' in a Dagster worker):
    13-25 % of a replay's CPU time (the largest synthetic run's requests_lowo replay, collector on and off in one
    process). Nothing the simulation computes depends on when (or
    whether) the collector runs; cycles made meanwhile are collected at the next pass after the block."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
