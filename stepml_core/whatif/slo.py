"""Service-level objectives over a what-if's predicted metrics: ``ttft_p99<2s,e2e_p99<30s``.

A term is ``<metric><op><number><unit>``: metric one of the replay metrics or ITL percentiles in seconds or 1/s
(:data:`SLO_METRICS`), op ``<``, ``<=``, ``>``, ``>=``; unit ``s`` or ``ms`` for latencies (none means s),
``rps`` (or none) for ``throughput_rps``. A point meets the SLO when every term holds for its predicted value.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

from stepml_core.errors import UsageError
from stepml_core.replay.simulate import ITL_METRICS, REPLAY_METRICS

LATENCY_METRICS = (*(m for m in REPLAY_METRICS if m not in ("throughput_rps", "successes")), *ITL_METRICS)  # seconds
SLO_METRICS = (*LATENCY_METRICS, "throughput_rps")
_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_TERM = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|>=|<|>)\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-z]*)\s*$")
_UNIT_S = {"": 1.0, "s": 1.0, "ms": 1e-3}


class SLOError(UsageError, ValueError):
    """An SLO text that cannot be read; the message names the term and what is wrong with it."""


@dataclass(frozen=True)
class SLOTerm:
    metric: str
    op: str
    bound: float  # s, or 1/s for throughput_rps

    def holds(self, value: float | None) -> bool:
        """False for a missing or NaN prediction (no successful request: nothing meets a latency bound)."""
        return value is not None and math.isfinite(value) and _OPS[self.op](value, self.bound)

    def __str__(self) -> str:
        unit = "rps" if self.metric == "throughput_rps" else "s"
        return f"{self.metric}{self.op}{self.bound:g}{unit}"


def parse_slo(text: str) -> tuple[SLOTerm, ...]:
    """``'ttft_p99<2s,e2e_p99<30s'`` → its terms; SLOError naming the bad term otherwise."""
    if text is None or not str(text).strip():
        raise SLOError("empty SLO: give terms like 'ttft_p99<2s,e2e_p99<30s'")
    out = []
    for raw in str(text).split(","):
        if not raw.strip():
            raise SLOError(f"SLO {text!r}: an empty term (two commas, or a trailing comma)")
        m = _TERM.match(raw.lower())
        if not m:
            raise SLOError(
                f"SLO term {raw.strip()!r}: not <metric><op><number><unit> (e.g. ttft_p99<2s; op one of <, <=, >, >=)"
            )
        metric, op, num, unit = m.groups()
        if metric not in SLO_METRICS:
            raise SLOError(f"SLO term {raw.strip()!r}: unknown metric {metric!r}; known: {', '.join(SLO_METRICS)}")
        if metric == "throughput_rps":
            if unit not in ("", "rps"):
                raise SLOError(f"SLO term {raw.strip()!r}: throughput is in rps, not {unit!r}")
            bound = float(num)
        else:
            if unit not in _UNIT_S:
                raise SLOError(f"SLO term {raw.strip()!r}: unit {unit!r} is not s or ms")
            bound = float(num) * _UNIT_S[unit]
        out.append(SLOTerm(metric, op, bound))
    return tuple(out)


def meets(terms: tuple[SLOTerm, ...], values: dict[str, float]) -> bool:
    """Every term holds for ``values`` (metric → predicted value)."""
    return all(t.holds(values.get(t.metric)) for t in terms)
