"""A two-path step time: engine cycle = max(GPU path(batch), CPU path(engine state)) (docs/cpu_path.md, *Two paths*).

vLLM's engine cycle is the longer of two paths: the GPU computing the batch and the host scheduling it
(``schedule()``, ``step.duration_us`` in the traces). A step model fitted on calm runs' cycles (every calibrated
model) carries their CPU time inside its GPU path; what it cannot carry is the plateau the CPU path reaches in an
overloaded engine, where the running set sits at ``max_num_seqs`` with requests waiting:

    cycle_us(b) = max(gpu_us(b), cpu_us(b)),
    cpu_us(b)   = plateau_us  if b.num_running ≥ cap_frac · max_num_seqs and b.num_waiting ≥ queue_frac · max_num_seqs,
                  0           otherwise (the GPU path alone).

:class:`CpuPath` is the CPU path (stored as JSON in a replay spec's ``cpu_path``); :class:`TwoPathStepTime` wraps
any step-time model (``step_time_us(batch)``) with it. Nothing here is fitted: ``plateau_us`` comes from
``stepml_core.replay.two_path`` (learned from other runs' ``schedule()`` times, never the scored run's).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class CpuPath:
    """cpu_us = ``plateau_us`` while the engine is saturated (running ≥ cap_frac · max_num_seqs and waiting ≥
    queue_frac · max_num_seqs: a full running set and at least ``queue_frac`` of one more waiting), else 0.
    ``basis``: what set the plateau, in words (runs, scaling).

    ``queue_frac`` = 1 by default, set before any replay: with a queue of a few requests (1 waiting) the step function
    turned a calm run's brief crowding into a runaway (Mixtral ``general``, docs/cpu_path.md)."""

    plateau_us: float
    cap_frac: float = 0.97
    queue_frac: float = 1.0
    basis: str = ""

    def saturated(self, num_running: int, num_waiting: int, max_num_seqs: int) -> bool:
        return num_running >= self.cap_frac * max_num_seqs and num_waiting >= self.queue_frac * max_num_seqs

    def cpu_us(self, num_running: int, num_waiting: int, max_num_seqs: int) -> float:
        return self.plateau_us if self.saturated(num_running, num_waiting, max_num_seqs) else 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> CpuPath:
        plateau = float(d["plateau_us"])
        if not plateau >= 0:
            raise ValueError(f"cpu_path.plateau_us must be a number >= 0, got {d['plateau_us']!r}")
        return cls(
            plateau_us=plateau,
            cap_frac=float(d.get("cap_frac", 0.97)),
            queue_frac=float(d.get("queue_frac", 1.0)),
            basis=str(d.get("basis", "")),
        )


class TwoPathStepTime:
    """step_time_us(b) = max(gpu.step_time_us(b), cpu.cpu_us(b.num_running, b.num_waiting, max_num_seqs)).
    ``cpu_bound_steps`` counts the steps where the CPU path was the longer one, ``max_waiting`` the longest queue."""

    def __init__(self, gpu, cpu: CpuPath, max_num_seqs: int, name: str = "two_path"):
        self.gpu = gpu
        self.cpu = cpu
        self.max_num_seqs = int(max_num_seqs)
        self.name = name
        self.cpu_bound_steps = 0
        self.max_waiting = 0

    def step_time_us(self, b) -> float:
        g = self.gpu.step_time_us(b)
        if b.num_waiting > self.max_waiting:
            self.max_waiting = b.num_waiting
        c = self.cpu.cpu_us(b.num_running, b.num_waiting, self.max_num_seqs)
        if c > g:
            self.cpu_bound_steps += 1
            return c
        return g
