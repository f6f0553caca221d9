"""Report sections: runs left out of the study because their results are not current (failed or stale), and runs
studied on part of their trace (cut short).

A run whose latest materialization failed, or whose run folder changed since it was processed,
may still have results stored from an earlier run. The study never uses them; this section says
which runs are left out and why, so a report never shows an old fit as if it were current.
"""

from __future__ import annotations


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def runs_left_out_section(left_out: dict[str, dict], stored: set[str]) -> list[str]:
    """Markdown lines: one row per run left out ({run: {status: failed|stale, reason}}); [] if none."""
    if not left_out:
        return []
    rows = ["| experiment | status | why | its stored results |", "|---|---|---|---|"]
    for run in sorted(left_out):
        r = left_out[run]
        kept = "from an earlier run: not used" if run in stored else "none"
        rows.append(f"| `{run}` | **{r['status']}** | {_md_cell(r['reason'])} | {kept} |")
    n_failed = sum(r["status"] == "failed" for r in left_out.values())
    n_stale = len(left_out) - n_failed
    return [
        "## Runs left out: failed or stale",
        "",
        f"{n_failed} run(s) failed and {n_stale} run(s) changed since they were processed (stale). None of their "
        "results — stored from earlier runs or not — is used anywhere in this report, `metrics.csv`, `verdict.json` "
        "or the pooled models. Fix the input (the reason names the file) or re-run it to bring it back.",
        "",
        *rows,
        "",
    ]


def runs_read_in_part_section(runs: list[dict]) -> list[str]:
    """Markdown lines: one row per run whose trace was cut short (run_summary's ``read_in_part``); [] if none."""
    cut = [r for r in runs if r.get("read_in_part")]
    if not cut:
        return []
    rows = ["| experiment | what was read |", "|---|---|"]
    rows += [
        f"| `{r['experiment_id']}` | {_md_cell(r['read_in_part'])} |"
        for r in sorted(cut, key=lambda r: r["experiment_id"])
    ]
    return [
        "## Runs studied on part of their trace",
        "",
        f"{len(cut)} run(s) have a trace cut short: StepML keeps the lines before the damage (a `file` record in the "
        "run's quarantine says where) and studies the run on them. Their figures in this report describe those "
        "steps only.",
        "",
        *rows,
        "",
    ]
