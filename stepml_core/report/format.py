"""Small formatting helpers shared by the report's sections: numbers, percentages, markdown tables, the words for a comparison's outcome, and the published figures of the original study (data/reference)."""

from __future__ import annotations

import csv

import numpy as np

from stepml_core.paths import REFERENCE_DIR

OUTCOME_WORDS = {
    "clearly_beats": "clearly better",
    "does_not_clearly_beat": "not clearly better",
    "undecided": "undecided",
    "better": "better",
    "not_better": "not clearly better",
}


def published_results() -> dict[str, dict]:
    with open(REFERENCE_DIR / "original_study.csv", newline="") as f:
        return {r["experiment_id"]: r for r in csv.DictReader(f)}


def _fmt(x, nd=2) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    return f"{x:,.{nd}f}"


def _pct(x, nd=2) -> str:
    s = _fmt(x, nd)
    return s if s == "–" else f"{s} %"


def _md_table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _source_words(runs: list[dict]) -> str:
    sources = sorted({r["source"] for r in runs})
    return " and ".join(sources) if sources else "no"
