"""The study's report: report.md and its figures, written from the pipeline's tables only.

* ``study`` — report.md put together (``render_report``): the data, the H1 verdict, the published figures, the appendix.
* ``summary`` — the first screen; ``method`` — the method checks; ``rankings`` — rankings, ablation, generalization;
  ``evidence`` — synthetic vs real, feature provenance, reconstruction, teacher-forced E2E; ``format`` — helpers.
* ``calibration`` — the section on request-calibrated step models.
* ``status`` — runs left out because their results are not current (failed or stale).
* ``plots`` — the report's figures, readable at 16 runs.
"""
