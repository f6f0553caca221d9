"""The H1 study: fit every step model per run and pooled, score it, and say what the tables mean.

* ``h1`` — models, predictions, metrics per experiment and pooled folds (the generalization study).
* ``verdict`` — the H1 verdict and the model ranking, with the statistics a reviewer needs.
* ``stats`` — paired tests and block-bootstrap intervals on time-ordered test rows.
* ``findings`` — rankings with ties, the recommendation, generalization, as data.
* ``method_checks`` — checks of the study's own method (split, cycle rule, batch alignment).
* ``e2e`` — teacher-forced end-to-end fidelity of a step model (TTFT, decode interval, E2E per request).
"""
