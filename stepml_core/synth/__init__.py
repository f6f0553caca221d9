"""StepML's synthesizer: run folders modelled on the 16 H100 runs of the original study.

Public entry points: :func:`synthesize_runs` (one folder per run, one run per process),
:func:`synthesize_run` (``progress``: e.g. a :class:`stepml_core.progress.Progress`) and the
calibration functions in :mod:`stepml_core.synth.against_real`. Pure Python (numpy), no
Dagster; synthesis reads only the project's data files.
"""

from stepml_core.synth.runner import synthesize_run, synthesize_runs
from stepml_core.synth.spec import SYNTH_VERSION, RunSpec, reference_runs, resolve_run_ids, synthetic_id

__all__ = [
    "synthesize_runs",
    "synthesize_run",
    "SYNTH_VERSION",
    "RunSpec",
    "reference_runs",
    "resolve_run_ids",
    "synthetic_id",
]
