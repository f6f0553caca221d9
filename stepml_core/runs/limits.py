"""Limits on what one run folder may cost to read (bytes, lines, records, YAML nodes).

A run folder is untrusted input: a 65 KB gzip can inflate to gigabytes, one line can be gigabytes
long, a 600-byte YAML file can expand to billions of nodes through aliases. Every limit below has a
default well above what a real run needs (the two real H100 runs: 9-10 MB of trace JSON, 13x gzip
ratio, 234 lines, at most 40 KB per line, 150-byte YAML files) and is set per deployment through
the environment (``STEPML_<NAME>``, e.g. ``STEPML_MAX_TRACE_BYTES=64e9``) or the ``settings``
resource (``StepMLSettings.max_trace_bytes`` ...). A run over a limit fails alone, with an
:class:`InputLimitError` naming the file, the place and the limit; the other runs go on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

from stepml_core.errors import StepMLError

__all__ = ["InputLimits", "InputLimitError", "DEFAULT_LIMITS", "limit_env_name"]


class InputLimitError(StepMLError, ValueError):
    """A run folder passes one of the InputLimits (the message names the limit and how to raise it)."""


@dataclass(frozen=True)
class InputLimits:
    """Per-run input limits (see the README's *Reliability* section for the table)."""

    max_trace_bytes: int = 16 << 30
    """bytes of trace JSON once inflated, per trace file (16 GiB; ~2 KB per sampled step → millions of steps)"""
    max_inflate_ratio: float = 100.0
    """inflated / compressed bytes of a gzip trace, checked once 64 MiB are inflated (real traces: 12-14x; synthetic: 12x)"""
    max_line_bytes: int = 256 << 20
    """bytes in one trace line (256 MiB; one OTLP export per line, real lines are at most tens of KB)"""
    max_unreadable_lines: int = 1_000_000
    """trace lines that are not OTLP JSON before the file is judged not to be a trace file"""
    max_quarantine_rows: int = 10_000
    """quarantine records stored per run; the rest are counted in one summary row per kind"""
    max_metadata_bytes: int = 8 << 20
    """bytes of one metadata file (exp-config.yaml, profile.yaml, provenance.json, results/*.json)"""
    max_yaml_nodes: int = 100_000
    """YAML nodes of one metadata file after expanding aliases (a billion-laughs file has ~10^9)"""
    max_request_bytes: int = 1 << 30
    """bytes of one request log or ground-truth file once inflated (1 GiB; the 16 real logs: at most 2.0 MB,
    inference-perf's per-request files of real runs ~160 MB)"""
    max_request_span_s: float = 24 * 3600.0
    """seconds from a request log's first arrival to its last (a day; the 16 real runs: 20 min; 10^6 requests at the
    real runs' highest rate, 14/s: 20 h). Calibration's request timelines cost memory in proportion (~0.06 GB per
    hour of span; 1.6 GB at a day): one arrival a week late needed ~5 GB"""

    @classmethod
    def from_env(cls, environ: dict | None = None, **overrides) -> "InputLimits":
        """Defaults, replaced by ``STEPML_<NAME>`` environment variables, replaced by non-None overrides."""
        env = os.environ if environ is None else environ
        vals = {}
        for f in fields(cls):
            raw = env.get(limit_env_name(f.name))
            if raw is not None and raw.strip():
                try:
                    v = float(raw)
                except ValueError:
                    raise InputLimitError(f"{limit_env_name(f.name)}={raw!r}: not a number") from None
                vals[f.name] = v if f.type == "float" else int(v)
        vals.update({k: v for k, v in overrides.items() if v is not None})
        out = replace(cls(), **vals)
        for f in fields(out):
            if getattr(out, f.name) <= 0:
                raise InputLimitError(f"{f.name} = {getattr(out, f.name)}: limits must be positive")
        return out

    def describe(self, name: str) -> str:
        """'max_trace_bytes = 17179869184 (STEPML_MAX_TRACE_BYTES or settings.max_trace_bytes)'"""
        v = getattr(self, name)
        shown = f"{v:g}" if isinstance(v, float) else str(v)
        return f"{name} = {shown} ({limit_env_name(name)} or settings.{name})"


def limit_env_name(name: str) -> str:
    return "STEPML_" + name.upper()


DEFAULT_LIMITS = InputLimits()
