"""What if: capacity answers from a study's calibrated step-time models, for workloads described, not recorded.

* ``workload`` — a workload from a description (an inference-perf profile's load stages and shared-prefix shape,
  or a few numbers), drawn with a seed by the synthesizer's workload code, as the replay simulator's input
  (:class:`WorkloadDescription`, :class:`ServingLimits`, :func:`whatif_workload`).
* ``slo`` — service-level objectives as text (``ttft_p99<2s,e2e_p99<30s``) and whether predicted values meet them.
* ``sweep`` — a sweep of rate × ``max_num_seqs`` × ``max_num_batched_tokens``: each point replayed with the model and
  its parameter draws (predicted, lo, hi per metric), the saturation rate and the largest rate meeting an SLO.
* ``plots`` — percentiles and throughput against the swept value, with interval bands.
* ``check`` — the what-if checked against recorded runs out of sample: each run predicted from its profile alone
  with the model calibrated without its workload, scored against what its clients saw.

Reads a study's values as arguments (specs, run contexts); loading them from a study's folder is the command line's
and the Dagster asset's job (stepml_dagster.whatif_cli, stepml_dagster.whatif_assets).
"""
