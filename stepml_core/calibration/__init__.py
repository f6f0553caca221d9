"""Calibration: step-time models fitted from request logs alone, with the simulator in the loop
(docs/calibration.md). Not the synthesizer's match to the real runs (that is ``stepml_core.synth.against_real``).

* ``fit`` — one calibration: stage 1 (closed form on the runs' per-request latencies), stage 2 (replay correction).
* ``protocols`` — which runs calibrate which model (run roles, leave one workload / model out), and which runs each
  model may predict; the calibration cache.
"""
