"""Step tables: validated tables of scheduler steps and their targets.

* ``schemas`` — pandera (polars) schemas; the same schemas validate in tests and assets.
* ``reconstruct`` — every step's batch rebuilt from journey events (docs/trace-format.md §4).
* ``steps`` — the validated step table and its two targets (``schedule_us``, ``cycle_us``).
* ``splits`` — the temporal 60/20/20 split by step id within one run, with load stages.
* ``data_checks`` — the checks of stored tables as pure functions (Dagster's asset checks call them).
"""
