"""Replay: a run's real requests through StepML's vLLM simulator, with a step model, scored against what the
clients saw.

* ``simulate`` — replay one run's request log with one step-time clock; score TTFT, E2E, successes.
* ``specs`` — the step models a replay can use (as specs) and replaying a run with each of them.
* ``scores`` — replay.csv over all runs, the recommended out-of-sample model, BLIS 4a beside, the report section.
* ``intervals`` — 90 % intervals of a prediction: bootstrap, widened (split conformal), between-run.
* ``coverage`` — how far those intervals' coverage can be read (Clopper–Pearson per regime).
* ``blis_trace`` — a run's workload as BLIS's trace CSV (StepML's imputed prompt identity as token IDs), its
  ``blis run`` command and script; finding and running the BLIS binary.
* ``blis_round_trip`` — the export bundle (model files + each run's trace and script), BLIS's results beside StepML's
  replay of the same file per run, the report's section.
* ``oos_audit`` — the out-of-sample audit: delete a scored run's ground truth, run again, compare.
"""
