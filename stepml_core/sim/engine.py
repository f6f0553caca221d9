"""Discrete-event model of the vLLM v1 engine core (v0.15.1, async scheduling); docs/simulator.md.

One iteration of the busy loop per scheduler step N, in named phases (methods below):

1. ``_enqueue_arrivals`` / ``_apply_client_aborts``: requests that reached the engine enter
   WAITING (``journey.QUEUED``); client timeouts remove requests (``FINISHED(aborted)``);
   ``_idle`` advances the clock to the next arrival when nothing is running or waiting;
2. ``schedule()`` of step N: ``_allocate_decode_blocks`` (running decoders that need a new
   KV block, preempting the most recently admitted request when none is free),
   ``_continue_prefills`` (unfinished chunked prefills, in running order, under the token
   budget), ``_admit_waiting`` (FCFS with prefix-cache lookup, head-of-line: stop at
   ``max_num_seqs`` running, an empty budget or the first allocation failure; no admission in
   a step that preempted); ``_batch_view`` summarizes the batch;
3. ``_apply_scheduled``: the scheduled chunks are computed; completed prefills start decoding;
4. the clock (``timing.py``) gives the step's GPU time from the batch; ``_update`` processes
   step N−1's output when it is ready (FIRST_TOKEN / FINISHED of N−1, so they happen during
   step N: the one-step lag of async scheduling).

Per-step work is O(1) for decoding requests: Σ context and the step at which each decoder
next needs a block are kept incrementally, and so are the decoders' context statistics (n, Σc, Σc², max, min:
``decode_contexts``) from the first step model that asks for them; per-request lists are built only for step
models that ask for them and for sampled trace records.
"""

# long module: the engine core's step loop and its scheduler are one state machine (vLLM v1's EngineCore.step +
# Scheduler.schedule); split, the hot path would pass its state across modules

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

from stepml_core.errors import StepMLError
from stepml_core.gc_pause import gc_paused
from stepml_core.sim.decode_contexts import DecodeContexts
from stepml_core.sim.kv_cache import BLOCK_TOKENS, BlockPool
from stepml_core.sim.request import (
    BLK_STRIDE,
    DECODE,
    DONE,
    EV_FINISHED,
    EV_FIRST_TOKEN,
    EV_PREEMPTED,
    EV_QUEUED,
    EV_SCHEDULED,
    OUT_BASE,
    PREFILL,
    WAITING,
    ZOMBIE,
    SimRequest,
)


@dataclass(frozen=True)
class SchedulerConfig:
    """vLLM serving settings that shape the schedule (exp-config.yaml / the request file's config)."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    kv_blocks_total: int = 7300  # usable GPU KV blocks of 16 tokens
    max_model_len: int | None = None  # tokens of prompt + output one request may have (None: the KV cache's)


def _seq_of(entry: tuple) -> int:
    """Admission order of a (request, version) entry of a step-keyed queue."""
    return entry[0].seq


class SimulationStalled(StepMLError, RuntimeError):
    """The engine made no progress for MAX_EMPTY_STEPS steps in a row (work per simulated second unbounded)."""


# A decoder's full output blocks are registered in the prefix cache only when it is preempted, not as each fills
# (_allocate_decode_blocks): their keys are its own (OUT_BASE + id), so only its own resumption can hit them, and a
# request never preempted has none of them in the cache yet. Same hits, same evictions; the cache stays the size of
# the prompts' blocks instead of every output block's (a replay 1.2-1.4x faster). False: registered as they fill.
LAZY_OUTPUT_KEYS = True

# consecutive steps that schedule nothing before the simulation is judged stalled: an empty step happens only while
# a finished step's output is still in flight, so a working engine never makes more than a few in a row
MAX_EMPTY_STEPS = 10_000


class BatchView:
    """The batch schedule() just formed for step ``step``: what a step-time model sees.

    Token and request counts follow the instrumented trace's BATCH_SUMMARY labels (a request's
    first decode step, one step after its last prompt chunk under async scheduling, is counted
    as a 1-token prefill), so models fitted on real traces see the same features here.
    ``decode_context_tokens`` = Σ context over decoding requests; ``chunks`` = (new tokens,
    tokens computed before, prompt length) of each prompt chunk computed in this step.
    """

    __slots__ = (
        "step",
        "scheduled_tokens",
        "num_scheduled",
        "prefill_tokens",
        "decode_tokens",
        "num_prefill_reqs",
        "num_decode_reqs",
        "new_prompt_tokens",
        "pure_decode",
        "decode_context_tokens",
        "chunks",
        "num_running",
        "num_waiting",
        "num_preempted",
        "num_finished",
        "kv_blocks_free",
        "kv_blocks_total",
        "_engine",
    )

    def __init__(self, engine: "EngineCore"):
        self._engine = engine
        self.chunks = ()

    def requests(self) -> list[tuple[int, int, int]]:
        """(progress index before the step, new tokens, prompt length) of every scheduled request."""
        return self._engine.scheduled_requests(self.step)

    def decode_context_stats(self) -> tuple[int, int, int, int, int]:
        """(n, Σc, Σc², max c, min c) over the step's decoders' progress indices (EngineCore.decode_context_stats);
        with ``chunks`` the same batch as requests(), in O(chunks) per step."""
        return self._engine.decode_context_stats(self.step)


@dataclass
class SimResult:
    steps: int
    ts_start_ns: list  # per step (index = step id - 1), engine monotonic clock
    dur_us: list  # per step: schedule() window
    update_s: list  # per step: time its output was processed (engine monotonic s)
    sampled: list  # sampled-step records of the trace recorder (synth), else empty
    requests: list  # SimRequest objects in arrival order
    counters: dict = field(default_factory=dict)
    features: dict | None = None  # per-step feature arrays (trace recorder with record_all)
    start_abs: list | None = None  # client start of each request, s from run start (staged arrivals)
    update_n: list | None = None  # per update_s entry: the requests scheduled in the step whose output it processed


class EngineCore:
    """The scheduler loop. ``arrivals`` says when requests reach the engine and when clients give up;
    ``clock`` turns each batch into time (physics with noise for the synthesizer, a step-time model
    for replay); ``recorder`` (optional) writes sampled trace records."""

    def __init__(
        self, requests: list[SimRequest], config: SchedulerConfig, arrivals, clock, *, recorder=None, progress=None
    ):
        self.reqs = requests
        self.cfg = config
        self.arrivals = arrivals
        self.clock = clock
        self.recorder = recorder
        self.progress = progress
        self.pool = BlockPool(config.kv_blocks_total)
        self.running: list[SimRequest] = []
        self.waiting: deque[SimRequest] = deque()
        self.prefillers: list[SimRequest] = []  # running requests in PREFILL state, in admission order
        self.blk_due: dict[int, list] = {}  # step -> [(decoder, dver)] needing a new block then
        self.fin_due: dict[int, list] = {}  # step -> [(request, fver)] whose last token that step produces
        self.pf_done: dict[int, list] = {}  # step -> requests whose prefill completed in it
        self.first_dec: dict[int, int] = {}  # step -> requests whose first decode it is (labelled prefill)
        self.abort_heap: list = []  # (engine time of the client abort, idx)
        self.n_dec = 0
        self.A = 0  # Σ (c0 − s0 + 1) over decoders: Σ context at step N = A + n_dec·N
        self.decode_contexts: DecodeContexts | None = None  # kept from the first decode_context_stats() on
        self.seq_counter = 0
        self.finished_since = 0
        self.n_done = 0
        self.ai = 0  # next request (arrival order) not yet in WAITING
        self.last_visible = 0.0
        self.tok_rate = 0.0  # EMA of streamed tokens per second (API-server load)
        self.counters = {"preemptions": 0, "aborts": 0, "aborted_running": 0, "evictions_hits": 0, "empty_steps": 0}
        self.empty_run = 0  # steps in a row that scheduled nothing
        kv_tokens = 16 * int(config.kv_blocks_total)
        # vLLM answers a request longer than max_model_len (which it starts only if the KV cache holds it) with an
        # error at once: such a request is refused, never queued (it could never be scheduled)
        self.max_request_tokens = min(kv_tokens, int(config.max_model_len or kv_tokens))
        self.batch = BatchView(self)

    # ------------------------------------------------------------------ the loop
    def run(self) -> SimResult:
        """Step until every request finished (or its client gave up) and the last output was processed (with the
        garbage collector paused: gc_paused)."""
        with gc_paused():
            return self._run()

    def _run(self) -> SimResult:
        n_req = len(self.reqs)
        self.arrivals.start(self)
        now_s = self.reqs[0].api_arrival if n_req else self.arrivals.mono0
        self.clock.start(now_s)
        self.ts_start_ns, self.dur_us, self.update_s, self.update_n = [], [], [], []
        self._inflight = None  # (step, GPU end s, requests scheduled) of the step whose output is pending
        self._gpu_end_prev_s = 0.0
        self._last_ts_ns = None
        N, next_prog = 0, 0
        reqs, heap = self.reqs, self.abort_heap
        enqueue, aborts, schedule, finish = (
            self._enqueue_arrivals,
            self._apply_client_aborts,
            self._schedule,
            self._finish_step,
        )
        while True:
            # the two input phases are called only when they have something to do (the per-step hot path)
            if self.ai < n_req:
                v = reqs[self.ai].visible
                if v == 0.0 or v <= now_s:  # not yet timed (visibility is set on first sight), or due
                    enqueue(now_s, N)
            if heap and heap[0][0] <= now_s:
                aborts(now_s, N)
            if not self.running and not self.waiting:
                now_s = self._idle(now_s)
                if now_s is None:
                    break
                continue
            N += 1
            b = schedule(N, int(now_s * 1e9))
            now_s = finish(N, b)
            if self.progress is not None and self.ai >= next_prog:
                self.progress(self.ai / max(1, n_req))
                next_prog = self.ai + max(1, n_req // 50)
        rec = self.recorder
        return SimResult(
            steps=N,
            ts_start_ns=self.ts_start_ns,
            dur_us=self.dur_us,
            update_s=self.update_s,
            sampled=rec.sampled if rec is not None else [],
            requests=self.reqs,
            counters=self.counters,
            features=rec.features if rec is not None else None,
            start_abs=getattr(self.arrivals, "start_abs", None),
            update_n=self.update_n,
        )

    def _idle(self, now_s: float) -> float | None:
        """Nothing running or waiting: process the last step's output, else jump to the next arrival (None: done)."""
        if self._inflight is not None:  # the last step's output: FIRST_TOKEN / FINISHED
            s_prev, g_prev_s, n_prev = self._inflight
            update_s = g_prev_s if g_prev_s > now_s else now_s
            self.update_s.append(update_s)
            self.update_n.append(n_prev)
            self._update(s_prev, update_s)
            self._inflight = None
            return self.clock.idle_after_update(update_s)
        nxt_s = self._next_visible_s()
        return None if nxt_s is None else max(now_s, nxt_s)

    def _schedule(self, N: int, ts0_ns: int) -> "BatchView":
        """schedule() of step N starting at ts0_ns: decode blocks, prompt chunks, admissions; the batch is computed."""
        self.clock.begin_step(N)
        if self.decode_contexts is not None:
            self.decode_contexts.flush(N)
        self._n_pre = 0
        self._sched_events = []  # (request, event type, kind)
        self._sched_list = None  # requests with a prompt chunk in this step
        if N in self.blk_due:
            self._allocate_decode_blocks(N)
        budget = self.cfg.max_num_batched_tokens - self.n_dec
        if self.prefillers:
            budget = self._continue_prefills(N, budget)
        if self._n_pre == 0 and self.waiting and budget > 0:
            self._admit_waiting(N, budget)
        b = self._batch_view(N)
        window_ns = self.clock.schedule_ns(b)
        self._ts1_ns = ts0_ns + window_ns
        if self.recorder is not None:
            self.recorder.on_schedule(self, b, ts0_ns, self._ts1_ns, window_ns, self._sched_events)
        self.finished_since = 0
        if self._last_ts_ns is not None:  # API-server load: EMA of streamed tokens per second
            cycle_s = (ts0_ns - self._last_ts_ns) * 1e-9
            if cycle_s > 0:
                r_now = self.n_dec / cycle_s if cycle_s > 0.002 else self.n_dec / 0.002
                self.tok_rate += 0.02 * (r_now - self.tok_rate)
        self._last_ts_ns = ts0_ns
        self._ts0_ns = ts0_ns
        self.ts_start_ns.append(ts0_ns)
        self.dur_us.append(window_ns // 1000)
        if b.scheduled_tokens == 0:
            self.counters["empty_steps"] += 1
            self.empty_run += 1
            if self.empty_run > MAX_EMPTY_STEPS:
                raise SimulationStalled(
                    f"the simulated engine scheduled nothing for {self.empty_run} steps in a row at step {N} "
                    f"({len(self.waiting)} waiting, {len(self.running)} running); stopped"
                )
        else:
            self.empty_run = 0
        if self._sched_list:
            self._apply_scheduled(N)
        return b

    def _finish_step(self, N: int, b: "BatchView") -> float:
        """Step N on the GPU after the previous one; step N−1's output is processed meanwhile. Returns when
        schedule(N+1) starts (s)."""
        clock = self.clock
        gpu_s = clock.gpu_s(b, self._ts0_ns)
        launch_s = clock.launch_ready_s(self._ts1_ns, b.num_scheduled)
        gpu_start_s = launch_s if launch_s > self._gpu_end_prev_s else self._gpu_end_prev_s
        gpu_end_s = gpu_start_s + gpu_s
        if self._inflight is not None:
            s_prev, g_prev_s, n_prev = self._inflight
            update_s = g_prev_s if g_prev_s > launch_s else launch_s
            self.update_s.append(update_s)
            self.update_n.append(n_prev)
            nfin = self._update(s_prev, update_s)
            now_s = clock.after_update(update_s, gpu_end_s, n_prev, nfin)
        else:
            now_s = clock.first_launch(launch_s, gpu_end_s)
        self._inflight = (N, gpu_end_s, b.num_scheduled)
        self._gpu_end_prev_s = gpu_end_s
        return now_s

    # ------------------------------------------------------------------ phases: inputs
    def _enqueue_arrivals(self, now_s: float, N: int) -> None:
        """Requests visible to the engine by `now_s` enter WAITING in arrival order."""
        reqs, n_req, arrivals = self.reqs, len(self.reqs), self.arrivals
        while self.ai < n_req:
            R = reqs[self.ai]
            if R.api_arrival == 0.0:
                break
            if R.visible == 0.0:
                v = R.api_arrival + arrivals.ingress_s(R, self.tok_rate)
                R.visible = v if v > self.last_visible else self.last_visible + 1e-6
                self.last_visible = R.visible
            if R.visible > now_s:
                break
            self.ai += 1
            if R.prompt_len + R.max_tokens > self.max_request_tokens:
                self._refuse(R, now_s, N)
                continue
            R.events.append((EV_QUEUED, N, int(now_s * 1e9), 0, 0, 0, 0, None))
            self.waiting.append(R)

    def _refuse(self, R: SimRequest, now_s: float, N: int) -> None:
        """A request that can never fit (prompt + output over max_model_len or the KV cache): FINISHED(refused) at
        once, as vLLM's API server answers it with an error."""
        ns = int(now_s * 1e9)
        R.state = DONE
        R.events.append((EV_FINISHED, N, ns, 0, 0, 0, 0, "refused"))
        R.finish_status = "refused"
        R.finish_step = N
        R.finish_ns = ns
        self.counters["refused"] = self.counters.get("refused", 0) + 1  # only where it happens (synth: never)
        self.n_done += 1
        self.arrivals.on_done(self, R, now_s)

    def _next_visible_s(self) -> float | None:
        """When the next request reaches WAITING (idle engine; ingress at zero API load)."""
        if self.ai < len(self.reqs) and self.reqs[self.ai].api_arrival > 0.0:
            R = self.reqs[self.ai]
            if R.visible == 0.0:
                v = R.api_arrival + self.arrivals.ingress_s(R, 0.0)
                R.visible = v if v > self.last_visible else self.last_visible + 1e-6
                self.last_visible = R.visible
            return R.visible
        return None

    def _apply_client_aborts(self, now_s: float, N: int) -> None:
        """Client timeouts that reached the engine by `now_s`: the request is freed and FINISHED(aborted)."""
        heap, reqs = self.abort_heap, self.reqs
        while heap and heap[0][0] <= now_s:
            R = reqs[heapq.heappop(heap)[1]]
            st = R.state
            if st == DONE or R.visible == 0.0 or R.visible > now_s:
                continue
            self.counters["aborts"] += 1
            if st == WAITING:
                self.waiting.remove(R)
            elif st != ZOMBIE:
                self.counters["aborted_running"] += 1
                self.running.remove(R)
                if st == DECODE:
                    out = R.out_base + max(0, N - R.F)
                    if out > R.max_tokens:
                        out = R.max_tokens
                    if out > R.out_base:
                        R.segments.append((R.F, out - R.out_base))
                    R.out_base = out
                    self._remove_decoder(R, N + 1)
                else:
                    self.prefillers.remove(R)
                self.pool.free(R)
            R.state = DONE
            R.fver += 1
            ns = int(now_s * 1e9) + 1000
            R.events.append(
                (EV_FINISHED, N, ns, 0 if R.out_base == 0 else 1, R.prefill_hw, R.out_base, R.npre, "aborted")
            )
            R.finish_status = "aborted"
            R.finish_step = N
            R.finish_ns = ns
            self.finished_since += 1
            self.n_done += 1
            self.arrivals.on_done(self, R, now_s)

    # ------------------------------------------------------------------ phases: schedule()
    def _allocate_decode_blocks(self, N: int) -> None:
        """Decoders whose next token starts a new KV block get one, in running order (preempting if none is free)."""
        due = self.blk_due.pop(N)
        pool, running, blk_due = self.pool, self.running, self.blk_due
        free_q, bkey, cache, ref = pool.free_q, pool.bkey, pool.cache, pool.ref
        if len(due) > len(free_q):  # someone may be preempted: the most recently admitted first, so in running order
            due.sort(key=_seq_of)  # (with a block for each, the order only relabels which block id each one gets)
        pop_free = free_q.popitem
        for R, ver in due:
            if R.dver != ver or R.state != DECODE:
                continue
            if not free_q:
                while not free_q:
                    V = running.pop()
                    self._n_pre += 1
                    self._preempt(V, N)
                    if V is R:
                        break
                if R.state != DECODE:
                    continue
            # pool.allocate(R, 1) then pool.register(R, context before the step), inlined: the hot path of a replay
            # (kv_cache.BlockPool's two methods are the reference: a change there is a change here)
            bid = pop_free(last=False)[0]
            k = bkey[bid]
            if k is not None:
                if cache.get(k) == bid:
                    del cache[k]
                bkey[bid] = None
            ref[bid] = 1
            bl = R.blist
            bl.append(bid)
            nb = len(bl)
            # full blocks registered now, unless its output blocks are registered if it is preempted (_preempt)
            if not R.lazy_out_keys and (nfull := (R.c0 + (N - R.s0)) // BLOCK_TOKENS) > (j := R.nhashed):
                n = nfull if nfull < nb else nb
                if n == j + 1 and j >= R.prompt_full_blk and j >= R.nshared_blk:  # one output block full: key inlined
                    key = OUT_BASE + R.idx * BLK_STRIDE + j
                    if key not in cache:
                        b = bl[j]
                        cache[key] = b
                        bkey[b] = key
                else:
                    for jj in range(j, n):
                        key = R.key(jj)
                        if key not in cache:
                            b = bl[jj]
                            cache[key] = b
                            bkey[b] = key
                R.nhashed = n
            at = R.s0 + 16 * nb - R.c0
            lst = blk_due.get(at)
            if lst is None:
                blk_due[at] = [(R, R.dver)]
            else:
                lst.append((R, R.dver))

    def _continue_prefills(self, N: int, budget: int) -> int:
        """Unfinished prompt chunks continue in running order under the token budget; returns the budget left."""
        sched_list = self._sched_list = []
        pool, free_q, running = self.pool, self.pool.free_q, self.running
        for R in list(self.prefillers):
            if R.state != PREFILL:
                continue
            if budget <= 0:
                R.sched_q = 0
                R.sched_step = N
                R.computed_before = R.computed
                continue
            q = R.target - R.computed
            if q > budget:
                q = budget
            need = -(-(R.computed + q) // 16) - len(R.blist)
            ok = True
            while need > len(free_q):
                V = running.pop()
                self._n_pre += 1
                self._preempt(V, N)
                if V is R:
                    ok = False
                    break
            if not ok:
                continue
            if need > 0:
                pool.allocate(R, need)
            R.computed_before = R.computed
            R.sched_q = q
            R.sched_step = N
            budget -= q
            sched_list.append(R)
        return budget

    def _admit_waiting(self, N: int, budget: int) -> None:
        """FCFS admission with prefix-cache lookup; head-of-line blocking on the first request that does not fit."""
        waiting, running, pool = self.waiting, self.running, self.pool
        ref, free_q = pool.ref, pool.free_q
        max_seqs = self.cfg.max_num_seqs
        while waiting and len(running) < max_seqs and budget > 0:
            R = waiting[0]
            target = R.prompt_len + R.out_base
            hits = pool.lookup(R, target)
            h_tok = 16 * len(hits)
            q = target - h_tok
            if q > budget:
                q = budget
            touched = 0
            for b in hits:
                if ref[b] == 0:
                    touched += 1
            need = -(-(h_tok + q) // 16) - len(hits)
            if need + touched > len(free_q):
                break
            waiting.popleft()
            pool.take_hits(R, hits)
            R.hit_blk = len(hits)
            if hits:
                self.counters["evictions_hits"] += 1
            if need > 0:
                pool.allocate(R, need)
            if R.first_sched:
                R.cached_tokens = h_tok
            R.computed = h_tok
            R.computed_before = h_tok
            R.target = target
            R.seq = self.seq_counter
            self.seq_counter += 1
            R.state = PREFILL
            R.sched_q = q
            R.sched_step = N
            running.append(R)
            self.prefillers.append(R)
            if self._sched_list is None:
                self._sched_list = []
            self._sched_list.append(R)
            self._sched_events.append((R, EV_SCHEDULED, "FIRST" if R.first_sched else "RESUME"))
            R.first_sched = False
            budget -= q

    def _batch_view(self, N: int) -> BatchView:
        """Token and request counts of step N's batch (BATCH_SUMMARY labels) and its prompt chunks."""
        b = self.batch
        fd = self.first_dec.pop(N, 0)
        pf_tok = pf_reqs = dec_extra_tok = dec_extra_reqs = 0
        chunks = ()
        if self._sched_list:
            chunks = []
            for R in self._sched_list:
                q = R.sched_q
                if R.out_base == 0:
                    pf_tok += q
                    pf_reqs += 1
                else:
                    dec_extra_tok += q
                    dec_extra_reqs += 1
                chunks.append((q, R.computed_before, R.prompt_len))
        n_dec = self.n_dec
        T = n_dec + pf_tok + dec_extra_tok
        n_sched = n_dec + pf_reqs + dec_extra_reqs
        b.step = N
        b.scheduled_tokens = T
        b.num_scheduled = n_sched
        b.prefill_tokens = pf_tok + fd
        b.num_prefill_reqs = pf_reqs + fd
        b.decode_tokens = T - b.prefill_tokens
        b.num_decode_reqs = n_sched - b.num_prefill_reqs
        b.new_prompt_tokens = pf_tok + dec_extra_tok
        b.pure_decode = b.new_prompt_tokens == 0
        b.decode_context_tokens = self.A + n_dec * N
        b.chunks = chunks
        b.num_running = len(self.running)
        b.num_waiting = len(self.waiting)
        b.num_preempted = self._n_pre
        b.num_finished = self.finished_since
        b.kv_blocks_free = len(self.pool.free_q)
        b.kv_blocks_total = self.pool.total
        return b

    def scheduled_requests(self, N: int) -> list[tuple[int, int, int]]:
        """(progress index before step N, new tokens, prompt length) per scheduled request of step N, also after
        step N's prompt chunks were applied (a step model reads it then): a request whose prefill completed in N
        decodes from N+1 on (s0 = N+1), in N it is its prompt chunk."""
        out = []
        for R in self.running:
            if R.state == DECODE and R.s0 <= N:
                out.append((R.c0 + (N - R.s0), 1, R.prompt_len))
            elif R.sched_step == N and R.sched_q > 0:
                out.append((R.computed_before, R.sched_q, R.prompt_len))
        return out

    def decode_context_stats(self, N: int) -> tuple[int, int, int, int, int]:
        """(n, Σc, Σc², max c, min c) over step N's decoders' contexts c (progress index before the step), also
        after step N's prompt chunks were applied; from the first call on kept incrementally (DecodeContexts)."""
        if self.decode_contexts is None:
            self.decode_contexts = DecodeContexts([R for R in self.running if R.state == DECODE], N)
        return self.decode_contexts.stats(N)

    # ------------------------------------------------------------------ phases: after schedule()
    def _apply_scheduled(self, N: int) -> None:
        """The step's prompt chunks are computed; requests whose prefill completes start decoding at N+1."""
        pool = self.pool
        completed = None
        for R in self._sched_list:
            if R.state != PREFILL:
                continue
            R.computed += R.sched_q
            if R.out_base == 0:
                c = R.computed if R.computed < R.prompt_len else R.prompt_len
                if c > R.prefill_hw:
                    R.prefill_hw = c
            pool.register(R, R.computed)
            if R.computed >= R.target:
                if completed is None:
                    completed = []
                completed.append(R)
        if not completed:
            return
        for R in completed:
            self.prefillers.remove(R)
            R.state = DECODE
            R.F = N
            R.s0 = N + 1
            R.c0 = R.target
            R.dver += 1
            # never preempted: none of its output keys is in the cache, and no other request can hit them
            R.lazy_out_keys = LAZY_OUTPUT_KEYS and R.npre == 0 and R.nshared_blk <= R.prompt_full_blk
            self.n_dec += 1
            self.A += R.c0 - R.s0 + 1
            if self.decode_contexts is not None:
                self.decode_contexts.started(R)
            if R.out_base == 0:
                self.first_dec[N + 1] = self.first_dec.get(N + 1, 0) + 1
            nb = len(R.blist)
            self.blk_due.setdefault(R.s0 + 16 * nb - R.c0, []).append((R, R.dver))
            R.fver += 1
            self.fin_due.setdefault(N + (R.max_tokens - R.out_base - 1), []).append((R, R.fver))
            self.pf_done.setdefault(N, []).append(R)

    def _remove_decoder(self, R: SimRequest, Ncur: int) -> None:
        if self.decode_contexts is not None:
            self.decode_contexts.removed(R)
        self.n_dec -= 1
        self.A -= R.c0 - R.s0 + 1
        if R.out_base == 0 and R.s0 >= Ncur:
            self.first_dec[R.s0] = self.first_dec.get(R.s0, 0) - 1
        R.dver += 1

    def _preempt(self, V: SimRequest, N: int) -> None:
        """Recompute preemption: V's blocks are freed and it returns to the head of WAITING."""
        self.counters["preemptions"] += 1
        if V.state == DECODE:
            k = N - 1 - V.F
            lag_out = V.out_base + (k if k > 0 else 0)
            out = V.out_base + (N - V.F)
            if out > V.max_tokens:
                out = V.max_tokens
            if out > V.out_base:
                V.segments.append((V.F, out - V.out_base))
            self._remove_decoder(V, N)
            V.out_base = out
            if V.lazy_out_keys:  # the output blocks full by its last block allocation, as if registered then
                self.pool.register(V, BLOCK_TOKENS * (len(V.blist) - 1))
                V.lazy_out_keys = False
        else:
            lag_out = V.out_base
            self.prefillers.remove(V)
        self.pool.free(V)
        V.npre += 1
        V.computed = 0
        self._sched_events.append((V, EV_PREEMPTED, (0 if lag_out == 0 else 1, lag_out)))
        if V.out_base >= V.max_tokens:
            V.state = ZOMBIE  # its last token is in flight; FINISHED comes with that update
            return
        V.state = WAITING
        V.fver += 1
        self.waiting.appendleft(V)

    def _update(self, s: int, update_s: float) -> int:
        """update_from_output(s) at update_s: FIRST_TOKEN and FINISHED of step s; returns requests finished."""
        nfin = 0
        base_ns = int(update_s * 1e9)
        j = 0
        lst = self.pf_done.pop(s, None)
        if lst:
            for R in lst:
                if R.state == DECODE and R.F == s and R.out_base == 0 and R.first_token_step < 0:
                    j += 1
                    R.first_token_step = s
                    R.events.append((EV_FIRST_TOKEN, s, base_ns + 15000 * j, 1, R.prompt_len, 1, R.npre, None))
        lst = self.fin_due.pop(s, None)
        if lst:
            for R, ver in lst:
                if R.fver != ver or R.state == DONE:
                    continue
                if R.state == DECODE:
                    self.running.remove(R)
                    R.segments.append((R.F, R.max_tokens - R.out_base))
                    self._remove_decoder(R, s + 2)
                    self.pool.free(R)
                elif R.state == WAITING:  # preempted in the extra step
                    continue
                R.out_base = R.max_tokens
                R.state = DONE
                j += 1
                ns = base_ns + 15000 * j
                R.events.append((EV_FINISHED, s, ns, 1, R.prompt_len, R.max_tokens, R.npre, "length"))
                R.finish_status = "length"
                R.finish_step = s
                R.finish_ns = ns
                nfin += 1
                self.arrivals.on_done(self, R, update_s)
        self.finished_since += nfin
        self.n_done += nfin
        return nfin
