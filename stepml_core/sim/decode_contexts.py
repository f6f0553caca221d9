"""The decoders' context lengths of a step, kept incrementally (a step model's KV statistics in O(1) per step).

A decoder that started decoding at step s0 from progress c0 has context c = a + N at step N, a = c0 − s0. Over the
decoders of step N (n of them): Σc = Σa + n·N, Σc² = Σa² + 2N·Σa + n·N², max c = max a + N, min c = min a + N.
The sums are Python ints (exact: the same numbers as a loop over the requests); the extremes come from two heaps
with lazy deletion (``alive[a]`` counts the live decoders with that a, a value with none left is no key; a heap top
that is no key is popped).

A request whose prefill completes in step N decodes from N+1 on (s0 = N+1): it waits in ``pending`` until
``flush(N+1)`` at the start of that step's schedule(), so between flushes the set is exactly step N's decoders.
"""

from __future__ import annotations

import heapq


class DecodeContexts:
    """n, Σa, Σa², max a, min a over the decoders of the current step (see the module docstring)."""

    __slots__ = ("n", "sum_a", "sum_a2", "_max_heap", "_min_heap", "_alive", "pending", "flushed_step")

    def __init__(self, decoders, step: int):
        """From the running decoders at step `step` (after its prompt chunks were applied: s0 = step+1 pending)."""
        self.n = self.sum_a = self.sum_a2 = 0
        self._max_heap, self._min_heap, self._alive = [], [], {}
        self.pending = []
        self.flushed_step = step
        for R in decoders:
            if R.s0 <= step:
                self._add(R.c0 - R.s0)
            else:
                self.pending.append(R)

    def _add(self, a: int) -> None:
        self.n += 1
        self.sum_a += a
        self.sum_a2 += a * a
        alive = self._alive
        k = alive.get(a, 0)
        alive[a] = k + 1
        if not k:  # a value not live: pushed (an old entry of it, if one is left, is a harmless duplicate)
            heapq.heappush(self._max_heap, -a)
            heapq.heappush(self._min_heap, a)

    def started(self, R) -> None:
        """R starts decoding at R.s0 (the next step)."""
        self.pending.append(R)

    def flush(self, step: int) -> None:
        """Start of step `step`'s schedule(): decoders that start in it join."""
        for R in self.pending:
            self._add(R.c0 - R.s0)
        self.pending = []
        self.flushed_step = step

    def removed(self, R) -> None:
        """R stops decoding (finished, preempted, aborted); call before R.c0 / R.s0 change."""
        if R.s0 > self.flushed_step:
            self.pending.remove(R)
            return
        a = R.c0 - R.s0
        self.n -= 1
        self.sum_a -= a
        self.sum_a2 -= a * a
        k = self._alive[a] - 1
        if k:
            self._alive[a] = k
        else:
            del self._alive[a]  # its heap entries go when they reach a top

    def stats(self, N: int) -> tuple[int, int, int, int, int]:
        """(n, Σc, Σc², max c, min c) of step N's decoders (max/min 0 without decoders)."""
        n = self.n
        if not n:
            return 0, 0, 0, 0, 0
        alive, hmax, hmin = self._alive, self._max_heap, self._min_heap
        while -hmax[0] not in alive:
            heapq.heappop(hmax)
        while hmin[0] not in alive:
            heapq.heappop(hmin)
        sa = self.sum_a
        return n, sa + n * N, self.sum_a2 + 2 * N * sa + n * N * N, -hmax[0] + N, hmin[0] + N
