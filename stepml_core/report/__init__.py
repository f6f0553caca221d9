"""The study's report: report.md and its figures, written from the pipeline's tables only.

* ``study`` — report.md: the H1 verdict, per-run tables, findings, method checks.
* ``calibration`` — the section on request-calibrated step models.
* ``status`` — runs left out because their results are not current (failed or stale).
* ``plots`` — the report's figures, readable at 16 runs.
"""
