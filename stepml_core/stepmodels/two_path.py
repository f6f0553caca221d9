"""A two-path step time: engine cycle = max(GPU path(batch), CPU path(engine state)) (docs/cpu_path.md, *Two paths*).

vLLM's engine cycle is the longer of two paths: the GPU computing the batch and the host scheduling it
(``schedule()``, ``step.duration_us`` in the traces). A step model fitted on calm runs' cycles (every calibrated
model) carries their CPU time inside its GPU path; what it cannot carry is the plateau the CPU path reaches in an
overloaded engine, where the running set sits at ``max_num_seqs`` with requests waiting:

    cycle_us(b) = max(gpu_us(b), cpu_us(b)),
    cpu_us(b)   = plateau_us  while saturated, 0 otherwise (the GPU path alone);
    saturated   : entered when b.num_running ≥ cap_frac · max_num_seqs and b.num_waiting ≥ queue_frac · max_num_seqs,
                  held (``hold``) while the running set stays at the cap with anything waiting, left otherwise.

:class:`CpuPath` is the CPU path (stored as JSON in a replay spec's ``cpu_path``); :class:`TwoPathStepTime` wraps
any step-time model (``step_time_us(batch)``) with it. Nothing here is fitted: ``plateau_us`` comes from
``stepml_core.replay.two_path`` (learned from other runs' ``schedule()`` times, never the scored run's).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

DECODE_TERMS = frozenset({"decode_tokens", "num_decode_reqs", "scheduled_tokens"})  # each = the decoders, decode-only


@dataclass(frozen=True)
class CpuPath:
    """cpu_us = ``plateau_us`` while the engine is saturated, else 0. Saturation is entered with the running set at
    the cap (≥ cap_frac · max_num_seqs) and a queue of at least queue_frac · max_num_seqs, and, with ``hold``, kept
    while the running set stays at the cap with anything waiting (the plateau falls only when the running set leaves
    the cap: docs/cpu_path.md). ``basis``: what set the plateau, in words (runs, scaling).

    Why a full queue to enter (queue_frac = 1): entered with 1 waiting, the plateau turned a calm run's brief crowding
    into a runaway (Mixtral ``general``, docs/cpu_path.md, *Two paths*)."""

    plateau_us: float
    cap_frac: float = 0.97
    queue_frac: float = 1.0
    basis: str = ""
    hold: bool = True

    def next_state(self, on: bool, num_running: int, num_waiting: int, max_num_seqs: int) -> bool:
        """Whether the engine is saturated at this step, given whether it was at the previous one."""
        if num_running < self.cap_frac * max_num_seqs:
            return False
        if num_waiting >= self.queue_frac * max_num_seqs:
            return True
        return on and self.hold and num_waiting >= 1

    def saturated_mask(self, running, waiting, max_num_seqs: int) -> list[bool]:
        """next_state over a run's steps in order (the engine starts calm)."""
        on, out = False, []
        for r, w in zip(running, waiting):
            on = self.next_state(on, r, w, max_num_seqs)
            out.append(on)
        return out

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
            hold=bool(d.get("hold", True)),
        )


class TwoPathStepTime:
    """step_time_us(b) = max(gpu.step_time_us(b), plateau_us while saturated (CpuPath.next_state, step by step)).
    ``cpu_bound_steps`` counts the steps where the CPU path was the longer one, ``max_waiting`` the longest queue."""

    def __init__(self, gpu, cpu: CpuPath, max_num_seqs: int, name: str = "two_path"):
        self.gpu = gpu
        self.cpu = cpu
        self.max_num_seqs = int(max_num_seqs)
        self.name = name
        self.cpu_bound_steps = 0
        self.max_waiting = 0
        self._saturated = False

    def step_time_us(self, b) -> float:
        g = self.gpu.step_time_us(b)
        if b.num_waiting > self.max_waiting:
            self.max_waiting = b.num_waiting
        self._saturated = on = self.cpu.next_state(self._saturated, b.num_running, b.num_waiting, self.max_num_seqs)
        c = self.cpu.plateau_us if on else 0.0
        if c > g:
            self.cpu_bound_steps += 1
            return c
        return g


def two_path_blis_form(gpu_doc: dict, cpu: CpuPath, max_num_seqs: int) -> tuple[dict, list[str]]:
    """BLIS's model file (``step_time_regimes``, first match wins, one-feature conditions) for max(GPU, CPU) where
    the GPU path is one linear ``step_time`` g; (document, what it loses). Regimes, in order:

    1. ``below_cap``: num_decode_reqs < c (c = ⌈cap_frac · max_num_seqs⌉) → g;
    2. ``mixed_at_cap``: prefill_tokens > 0 → g (a prompt chunk makes the GPU path longer; where it is still shorter
       than the plateau, BLIS gives g: lost);
    3. ``gpu_bound_at_cap``: kv_sum ≥ k* → g, k* = the kv_sum where a decode-only batch of c requests costs the plateau
       under g (only when g reads kv_sum);
    4. ``cpu_bound_at_cap``: → the plateau (less the per-request overhead BLIS adds after the regimes).

    Lost: the waiting queue (BLIS's features do not see it: a full running set with nothing waiting gets the plateau
    too); between c and max_num_seqs decoders, g grows by its decode terms while k* is set at c."""
    st = gpu_doc.get("step_time")
    if gpu_doc.get("step_time_regimes") or st is None:
        raise ValueError("two_path_blis_form: the GPU path must be one linear step_time (regimes cannot be nested)")
    if st.get("output_transform"):
        raise ValueError("two_path_blis_form: a transformed (expm1) GPU path has no linear crossing with the plateau")
    coef = dict(st.get("feature_coefficients") or {})
    c = math.ceil(cpu.cap_frac * max_num_seqs)
    per_req = float(gpu_doc.get("step_overhead_per_req_us") or 0.0)
    g = {"model_type": "linear", "intercept": st["intercept"], "feature_coefficients": coef}
    plateau = {
        "model_type": "linear",
        "intercept": cpu.plateau_us,
        "feature_coefficients": {"num_decode_reqs": -per_req, "num_prefill_reqs": -per_req} if per_req else {},
    }
    regimes = [
        {"name": "below_cap", "condition": {"feature": "num_decode_reqs", "op": "<", "value": c}, "model": g},
        {"name": "mixed_at_cap", "condition": {"feature": "prefill_tokens", "op": ">", "value": 0}, "model": g},
    ]
    b_kv = float(coef.get("kv_sum", 0.0))
    lost = ["the waiting queue: BLIS gives the plateau to any step with a full running set"]
    # g of a decode-only batch of c requests, without kv_sum: intercept + c · (decode terms)
    at_c = float(st["intercept"]) + c * sum(float(coef.get(f, 0.0)) for f in sorted(DECODE_TERMS))
    zero_when_decoding = {"prefill_tokens", "num_prefill_reqs", "prefill_sq", "prefill_x_decode"}
    other = sorted(f for f, w in coef.items() if w and f not in DECODE_TERMS | zero_when_decoding | {"kv_sum"})
    if other:
        lost.append(f"decode-only terms {other} of the GPU path are not in the crossing")
    if b_kv > 0:
        k_star = (cpu.plateau_us - at_c) / b_kv
        regimes.append(
            {"name": "gpu_bound_at_cap", "condition": {"feature": "kv_sum", "op": ">=", "value": k_star}, "model": g}
        )
    elif at_c >= cpu.plateau_us:
        regimes.append({"name": "gpu_bound_at_cap", "condition": None, "model": g})
    regimes.append({"name": "cpu_bound_at_cap", "condition": None, "model": plateau})
    if c < max_num_seqs:
        lost.append(f"between {c} and {max_num_seqs} decoders the crossing is set at {c}")
    doc = {k: v for k, v in gpu_doc.items() if k != "step_time"} | {"version": 2, "step_time_regimes": regimes}
    if float(doc.get("step_overhead_us") or 0) > 0:
        lost.append("step_overhead_us clamps the plateau too")
    return doc, lost
