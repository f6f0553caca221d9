"""The synthesizer's engine: StepML's vLLM v1 simulator (stepml_core.sim) with the physics clock.

The scheduler, KV cache and event loop live in :mod:`stepml_core.sim`; here they are put
together the way a synthetic run needs them: inference-perf's staged arrivals, the roofline
physics clock with noise and the empirical schedule() time, and the trace recorder.
"""

from __future__ import annotations

import numpy as np

from stepml_core.sim.arrivals import StagedArrivals
from stepml_core.sim.engine import EngineCore, SchedulerConfig, SimResult
from stepml_core.sim.recorder import TraceRecorder
from stepml_core.sim.request import SimRequest
from stepml_core.synth.physics_clock import PhysicsClock
from stepml_core.synth.schedtime import ScheduleTimeModel
from stepml_core.synth.spec import RunSpec, engine_params
from stepml_core.synth.workload import Workload

__all__ = ["simulate_synthetic_run", "SimResult"]


def simulate_synthetic_run(
    spec: RunSpec,
    wl: Workload,
    rng: np.random.Generator,
    *,
    mono0: float,
    sched_model: ScheduleTimeModel | None = None,
    record_all: bool = False,
    progress=None,
    params: dict | None = None,
) -> SimResult:
    """Simulate one synthetic run: same spec, workload and generator state → the same result, bit for bit."""
    P = params or engine_params()
    sp = P["scheduler"]
    clock = PhysicsClock(spec.model, spec.tp, P, rng, sched_model or ScheduleTimeModel(spec.real_id))
    arrivals = StagedArrivals(wl, P, spec.model, rng, mono0)
    nsh = wl.shared_prefix_tokens // 16
    ppg = max(1, spec.prompts_per_group)
    reqs = []
    for i in range(len(wl.send_time)):
        p = int(wl.prompt_id[i])
        reqs.append(SimRequest(i, p, p // ppg, int(wl.prompt_lens[p]), wl.max_tokens, nsh))
    cfg = SchedulerConfig(
        max_num_batched_tokens=int(sp["max_num_batched_tokens"]),
        max_num_seqs=int(sp["max_num_seqs"]),
        kv_blocks_total=clock.phys.kv_blocks_total,
    )
    recorder = TraceRecorder(
        clock.rand,
        sample_rate=float(sp["step_sample_rate"]),
        rich_rate=float(sp["rich_subsample_rate"]),
        record_all=record_all,
    )
    return EngineCore(reqs, cfg, arrivals, clock, recorder=recorder, progress=progress).run()
