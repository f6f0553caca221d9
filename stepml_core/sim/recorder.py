"""What an instrumented vLLM records about each step (for the synthesizer's traces).

* journey events inside the schedule() window: SCHEDULED / PREEMPTED of step N, spread over
  [ts_start, ts_start + duration];
* BATCH_SUMMARY on a Bernoulli ``step_sample_rate`` of steps, with REQUEST_SNAPSHOT records of
  every running request on a further ``rich_subsample_rate`` of those;
* ``record_all``: per-step feature arrays for fitting the schedule() model (scripts/).
"""

from __future__ import annotations

from stepml_core.sim.request import DECODE, EV_PREEMPTED, EV_SCHEDULED


class TraceRecorder:
    def __init__(self, randomness, *, sample_rate: float, rich_rate: float, record_all: bool = False):
        self.rand = randomness  # timing.StepRandomness: the per-step uniforms of the sampling draws
        self.sample_rate = float(sample_rate)
        self.rich_rate = float(rich_rate)
        self.sampled: list = []
        self.features = (
            {
                k: []
                for k in (
                    "running",
                    "waiting",
                    "prefill_tokens",
                    "prefill_reqs",
                    "finished",
                    "preempted",
                    "scheduled_tokens",
                    "decode_reqs",
                )
            }
            if record_all
            else None
        )

    def on_schedule(self, engine, b, ts0: int, ts1: int, d_ns: int, sched_events: list) -> None:
        N = b.step
        if sched_events:
            k = len(sched_events)
            for j, (R, et, kind) in enumerate(sched_events):
                ens = ts0 + (d_ns * (j + 1)) // (k + 1)
                if et == EV_SCHEDULED:
                    R.events.append(
                        (EV_SCHEDULED, N, ens, 0 if R.out_base == 0 else 1, R.prefill_hw, R.out_base, R.npre, kind)
                    )
                else:
                    R.events.append((EV_PREEMPTED, N, ens, kind[0], R.prefill_hw, kind[1], R.npre, None))
        bi = self.rand.i - 1
        if self.rand.u_samp[bi] < self.sample_rate:
            T, pf = b.scheduled_tokens, b.prefill_tokens
            free, total = b.kv_blocks_free, b.kv_blocks_total
            usage = 1.0 - free / total
            rec_t = (
                N,
                ts0,
                ts1,
                d_ns // 1000,
                b.num_running,
                b.num_waiting,
                b.num_prefill_reqs,
                b.num_scheduled - b.num_prefill_reqs,
                T,
                pf,
                T - pf,
                b.num_finished,
                b.num_preempted,
                usage,
                total,
                free,
            )
            snaps = None
            if self.rand.u_rich[bi] < self.rich_rate:
                snaps = []
                for R in engine.running:
                    if R.state == DECODE:
                        comp = R.c0 + (N - R.s0)
                        k = N - 1 - R.F
                        out = R.out_base + (k if k > 0 else 0)
                    else:
                        comp = R.computed_before if R.sched_step == N else R.computed
                        out = R.out_base
                    sq = 1 if R.state == DECODE else (R.sched_q if R.sched_step == N else 0)
                    eff = R.prompt_len - R.cached_tokens if 0 <= R.cached_tokens < R.prompt_len else None
                    snaps.append(
                        (R.idx, 0 if out == 0 else 1, R.prompt_len, comp, out, R.npre, sq, len(R.blist), R.hit_blk, eff)
                    )
            self.sampled.append((rec_t, snaps))
        f = self.features
        if f is not None:
            f["running"].append(b.num_running)
            f["waiting"].append(b.num_waiting)
            f["prefill_tokens"].append(b.prefill_tokens)
            f["prefill_reqs"].append(b.num_prefill_reqs)
            f["finished"].append(b.num_finished)
            f["preempted"].append(b.num_preempted)
            f["scheduled_tokens"].append(b.scheduled_tokens)
            f["decode_reqs"].append(b.num_scheduled - b.num_prefill_reqs)
