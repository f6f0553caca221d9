"""The asset checks as pure functions: each evaluates stored data and can fail (tests/test_checks.py makes each fail).

A check returns `CheckOutcome(passed, metadata)`; stepml_dagster turns it into an AssetCheckResult.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandera.polars as pa
import polars as pl

from stepml_core.tables.schemas import StepTableSchema


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    metadata: dict = field(default_factory=dict)


def schema_valid(steps: pl.DataFrame) -> CheckOutcome:
    """The stored step table passes StepTableSchema (every failing check and column counted)."""
    try:
        StepTableSchema.validate(steps, lazy=True)
    except pa.errors.SchemaErrors as e:
        fc = e.failure_cases
        failures = sorted(
            {f"{c}: {k}" for c, k in zip(fc["column"].cast(pl.Utf8).fill_null(""), fc["check"].cast(pl.Utf8))}
        )
        return CheckOutcome(False, {"rows": steps.height, "failure_cases": fc.height, "failures": failures[:20]})
    return CheckOutcome(True, {"rows": steps.height})


def counts_balance(rows_in: int, rows_kept: int, rows_quarantined: int) -> CheckOutcome:
    """Step rows read = rows kept + rows quarantined."""
    return CheckOutcome(
        rows_in == rows_kept + rows_quarantined,
        {"rows_in": rows_in, "rows_kept": rows_kept, "rows_quarantined": rows_quarantined},
    )


def no_unreadable_lines(counters: dict) -> CheckOutcome:
    """Every line of the trace file parsed (the reader's lines_quarantined is 0)."""
    n = int(counters.get("lines_quarantined", 0))
    return CheckOutcome(n == 0, {"lines_quarantined": n, "lines_total": int(counters.get("lines_total", 0))})


def records_balance(logs: dict[str, dict]) -> CheckOutcome:
    """Per stored request log ({partition: value}): records in = rows stored + request quarantine rows stored, and
    ground-truth records in = used + ground-truth quarantine rows stored (kind ground_truth)."""
    counts = {}
    for k, v in logs.items():
        q = v["quarantine"]
        n_truth_q = int((q["kind"] == "ground_truth").sum()) if q.height else 0
        counts[k] = {
            **v["counts"],
            "rows_stored": v["requests"].height,
            "quarantine_rows_stored": q.height - n_truth_q,
            "truth_quarantine_rows_stored": n_truth_q,
        }
    bad = [
        k
        for k, c in counts.items()
        if c["records_in"] != c["rows_stored"] + c["quarantine_rows_stored"]
        or c.get("truth_in", 0) != c.get("truth_used", 0) + c["truth_quarantine_rows_stored"]
    ]
    return CheckOutcome(not bad, {"partitions": counts, "unbalanced": bad})
