"""What a failed request and a saturated run are: one definition each (docs/request-logs.md §5). The client limit:
the replay's simulator (the observed side takes the client's own verdict, ``has_error``); the synthesizer draws its
limits uniformly from the same 1-s window (stepml_core.synth.workload). Saturation: the calibration,
the replay scores and report, the synthesizer's calibration table and the export.

**Client timeout.** inference-perf's client (aiohttp, ``ClientTimeout(total=300)``) gives every request
CLIENT_TIMEOUT_S from its send; aiohttp rounds a deadline above 5 s up to the next whole second of the client's
event-loop clock (``ceil_timeout``), so a request fails when its last token has not arrived by the first tick of
that 1-s grid at or after send + 300 s: its limit is 300 s plus 0–1 s. On the real runs every errored request ends
within a few ms of one 1-s grid per run (E2E 300.0–301.0 s), and four CodeLlama reasoning successes end at
300.1–300.4 s, each before its tick. The grid's phase is not in the request log (only the ground truth's
aborts show it), so a replay puts the ticks at whole seconds from the run's first arrival: the same 0–1 s
spread of limits, not the same limit per request.

**Saturated run.** A run whose clients saw a failure, or whose successful requests waited on average more than
SATURATED_TTFT_S for their first token: a queue that outlives a request. On the 16 real runs the two regimes are
far apart (mean TTFT 0.03–0.10 s, or 103–120 s with client timeouts in all four reasoning runs).
"""

from __future__ import annotations

import math

import numpy as np

CLIENT_TIMEOUT_S = 300.0  # inference-perf's aiohttp ClientTimeout(total=300)
CLIENT_TIMEOUT_TICK_S = 1.0  # aiohttp rounds a deadline above 5 s up to the next whole second of its loop clock
SATURATED_TTFT_S = 5.0  # mean TTFT of the successful requests above which a run is saturated


def client_limits_s(arrival_s: np.ndarray, phase_s: float = 0.0) -> np.ndarray:
    """Per request, the E2E (s from its send) at which the client gives up: the first tick of the client's 1-s grid
    (ticks at ``phase_s`` + whole seconds of the arrival clock) at or after send + CLIENT_TIMEOUT_S."""
    a = np.asarray(arrival_s, dtype=np.float64)
    tick = CLIENT_TIMEOUT_TICK_S
    deadline = np.ceil((a + CLIENT_TIMEOUT_S - phase_s) / tick) * tick + phase_s
    return deadline - a


def is_saturated(failed: int | None, ttft_mean_s: float | None) -> bool:
    """A run with a failed request, or whose successful requests' mean TTFT exceeds SATURATED_TTFT_S. ``failed``
    None: not known (a table without request counts), only the TTFT clause is applied."""
    if failed:
        return True
    return ttft_mean_s is not None and math.isfinite(ttft_mean_s) and ttft_mean_s > SATURATED_TTFT_S
