"""StepML's simulator of the vLLM v1 engine core: scheduler, KV cache with prefix caching,
async-scheduling event loop, and pluggable clocks (physics for the synthesizer, a step-time
model for replay). Pure Python + numpy; see docs/simulator.md.
"""

from stepml_core.sim.arrivals import FixedArrivals, StagedArrivals
from stepml_core.sim.engine import BatchView, EngineCore, SchedulerConfig, SimResult
from stepml_core.sim.request import SimRequest
from stepml_core.sim.timing import CycleClock

__all__ = [
    "BatchView",
    "CycleClock",
    "EngineCore",
    "FixedArrivals",
    "SchedulerConfig",
    "SimRequest",
    "SimResult",
    "StagedArrivals",
]
