"""Discrete-event model of the vLLM v1 engine core (v0.15.1, async scheduling), synth-design §3.

One iteration of the busy loop per scheduler step N:

1. between iterations: new requests enter WAITING (``journey.QUEUED``, scheduler.step = the
   counter), client aborts remove requests (``FINISHED(aborted)``);
2. ``schedule()`` of step N (timed window = step.duration_us): RUNNING first, in list order
   (decodes take 1 token; unfinished chunked prefills continue), then WAITING FCFS with
   prefix-cache lookup, head-of-line: stop at 128 running, on an empty token budget (2048)
   or on the first allocation failure; no admission in a step that preempted. A running
   request that cannot get a KV block preempts the most recently admitted running request
   (recompute: its blocks are freed, it goes to the head of WAITING);
3. launch of step N on the GPU (starts when step N−1 has finished there);
4. wait for step N−1's result, ``update_from_output(N−1)``: FIRST_TOKEN / FINISHED of
   step N−1 (so they are emitted during step N), tokens of N−1 leave for the client.

Hence the one-step lag of async scheduling: a request whose last prompt chunk ran in step F
is scheduled again in F+1 before its first token is known (a 1-token "prefill"), and a
request finishing in step D is still in step D+1's batch.

Engine cycle (ts_start[N+1] − ts_start[N]) = max(GPU path, CPU path): in steady state
the GPU time of the previous batch (EnginePhysics × noise), unless schedule() plus the
host work takes longer (CPU-bound, as in the saturated reasoning runs).

KV cache: ``kv_blocks_total`` blocks of 16 tokens in one LRU free queue (vLLM's
FreeKVCacheBlockQueue): freed blocks go to the tail (a request's last block first),
allocation pops the head and evicts the cached hash it carried. Full blocks are hashed
(prompt blocks by prompt/group so that repeated prompts and shared system prompts hit;
output blocks by request, so only a preempted request itself can reuse them). Lookup in
whole blocks, capped at (tokens − 1).

Per-step work is O(1) for decoding requests: Σ context and the next step at which each
decoder needs a block are kept incrementally; BATCH_SUMMARY / REQUEST_SNAPSHOT records are
built only for sampled steps; random numbers are drawn in blocks.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from .physics import EnginePhysics
from .schedtime import ScheduleTimeModel
from .spec import RunSpec, engine_params
from .workload import Workload

WAITING, PREFILL, DECODE, DONE, ZOMBIE = 0, 1, 2, 3, 4
EV_QUEUED, EV_SCHEDULED, EV_FIRST_TOKEN, EV_PREEMPTED, EV_FINISHED = 0, 1, 2, 3, 4
GROUP_BASE, PROMPT_BASE, OUT_BASE = 1 << 40, 1 << 36, 0
BLK_STRIDE = 1024  # > max blocks per request (4096 / 16)
RNG_BLOCK = 8192


class Req:
    __slots__ = (
        "idx", "prompt_id", "group", "prompt_len", "max_tokens", "state", "seq", "computed", "target",
        "blist", "nhashed", "hit_blk", "cached_tokens", "first_sched", "out_base", "F", "s0", "c0",
        "dver", "fver", "npre", "prefill_hw", "events", "segments", "sched_q", "sched_step",
        "computed_before", "nshared_blk", "prompt_full_blk", "finish_status", "finish_step", "finish_ns",
        "api_arrival", "visible", "first_token_step", "api_abort", "client_timeout",
    )

    def __init__(self, idx, prompt_id, group, prompt_len, max_tokens, nshared_blk):
        self.idx = idx
        self.prompt_id = prompt_id
        self.group = group
        self.prompt_len = prompt_len
        self.max_tokens = max_tokens
        self.state = WAITING
        self.seq = -1
        self.computed = 0
        self.target = prompt_len
        self.blist = []
        self.nhashed = 0
        self.hit_blk = 0
        self.cached_tokens = -1
        self.first_sched = True
        self.out_base = 0
        self.F = -1
        self.s0 = -1
        self.c0 = 0
        self.dver = 0
        self.fver = 0
        self.npre = 0
        self.prefill_hw = 0
        self.events = []
        self.segments = []
        self.sched_q = 0
        self.sched_step = -1
        self.computed_before = 0
        self.nshared_blk = nshared_blk
        self.prompt_full_blk = prompt_len // 16
        self.finish_status = None
        self.finish_step = -1
        self.finish_ns = -1
        self.api_arrival = 0.0
        self.visible = 0.0
        self.first_token_step = -1
        self.api_abort = 0.0
        self.client_timeout = False

    def key(self, k: int) -> int:
        if k < self.nshared_blk:
            return GROUP_BASE + self.group * BLK_STRIDE + k
        if k < self.prompt_full_blk:
            return PROMPT_BASE + self.prompt_id * BLK_STRIDE + k
        return OUT_BASE + self.idx * BLK_STRIDE + k


@dataclass
class SimResult:
    steps: int
    ts_start_ns: list  # per step (index = step id - 1)
    dur_us: list  # per step
    update_s: list  # per step: time its output was processed (monotonic seconds)
    sampled: list  # tuples of the 16 BATCH_SUMMARY values (+ snapshots) for sampled steps
    requests: list  # Req objects in arrival order
    counters: dict = field(default_factory=dict)
    features: dict | None = None  # per-step feature arrays (record_all mode)
    start_abs: list | None = None  # client start of each request, s from run start


class EngineSim:
    def __init__(self, spec: RunSpec, wl: Workload, rng: np.random.Generator, *, mono0: float,
                 sched_model: ScheduleTimeModel | None = None, record_all: bool = False, progress=None,
                 params: dict | None = None):
        P = params or engine_params()
        self.P = P
        self.spec = spec
        self.wl = wl
        self.rng = rng
        self.mono0 = mono0
        sp = P["scheduler"]
        self.budget_max = int(sp["max_num_batched_tokens"])
        self.max_seqs = int(sp["max_num_seqs"])
        self.sample_rate = float(sp["step_sample_rate"])
        self.rich_rate = float(sp["rich_subsample_rate"])
        self.phys = EnginePhysics(spec.model, spec.tp, P)
        self.sched_model = sched_model or ScheduleTimeModel(spec.real_id)
        self.record_all = record_all
        self.progress = progress
        total = self.phys.kv_blocks_total
        self.blocks_total = total
        # block pool: ids 1..total (0 is vLLM's null block)
        self.free_q = OrderedDict.fromkeys(range(1, total + 1))
        self.ref = [0] * (total + 1)
        self.bkey = [None] * (total + 1)
        self.cache = {}
        h = P["host"]
        self.post_fixed = h["post_schedule_fixed_us"] * 1e-6
        self.post_per_req = h["post_schedule_per_req_us"] * 1e-6
        self.upd_fixed = h["update_fixed_us"] * 1e-6
        self.upd_per_req = h["update_per_req_us"] * 1e-6
        self.upd_per_fin = h["update_per_finished_us"] * 1e-6
        self.noise = P["noise"]
        api = P["api"]
        self.ing_base = api["api_to_engine_base_ms"] * 1e-3
        self.ing_per_tok = api["api_to_engine_per_1k_prompt_ms"] * 1e-6
        self.ing_base += P["models"][spec.model].get("api_ingress_ms", 0.0) * 1e-3
        self.ing_per_ktps = api.get("api_to_engine_per_1k_tokens_per_s_ms", 0.0) * 1e-6  # s per (token/s)
        self._blk_i = RNG_BLOCK
        # warm-up: the first eager batch of each token-count bucket early in the run stalls
        # (kernel JIT / autotuning of a new shape); magnitudes per model
        slo, shi = P["models"][spec.model].get("warmup_stall_ms", [0.0, 0.0])
        self._stalls = (rng.uniform(slo, shi, 64) * 1e-3).tolist()
        self._warm_window = float(self.noise.get("warmup_window_s", 0.0))
        self._warm_bucket = int(self.noise.get("warmup_bucket_tokens", 256))

    # ------------------------------------------------------------------ random blocks
    def _refill(self, step0: int):
        n = RNG_BLOCK
        rng = self.rng
        nz = self.noise
        k = np.arange(step0, step0 + n, dtype=np.float64)
        drift = nz["drift_sigma"] * (np.sin(2 * np.pi * k / nz["drift_period_steps"] + self._ph1)
                                     + 0.5 * np.sin(2 * np.pi * k / (nz["drift_period_steps"] * 3.7) + self._ph2)) / 1.118
        mult = np.exp(nz["lognormal_sigma"] * rng.standard_normal(n) + drift)
        add = rng.gamma(nz["gamma_shape"], nz["gamma_mean_us"] * 1e-6 / nz["gamma_shape"], n)
        u = rng.random(n)
        lo, hi = nz["straggler_ms"]
        add += np.where(u < nz["straggler_p"], rng.uniform(lo, hi, n) * 1e-3, 0.0)
        blo, bhi = nz["big_straggler_ms"]
        add += np.where(rng.random(n) < nz["big_straggler_p"], rng.uniform(blo, bhi, n) * 1e-3, 0.0)
        w = int(nz["warmup_steps"])
        if step0 < w:
            j = np.arange(n) + step0
            mult = mult * np.where(j < w, 1.0 + (nz["warmup_factor"] - 1.0) * np.exp(-j / max(1.0, w / 3.0)), 1.0)
        self._mult = mult.tolist()
        self._add = add.tolist()
        self._u_samp = rng.random(n).tolist()
        self._u_rich = rng.random(n).tolist()
        self._u_sub = rng.integers(0, 1000, n).tolist()
        self._u_gate, self._e_fast, self._e_slow = self.sched_model.draw_block(rng, n)
        self._blk_i = 0

    # ------------------------------------------------------------------ KV blocks
    def _free_blocks(self, R: Req):
        fq, ref = self.free_q, self.ref
        for bid in reversed(R.blist):
            r = ref[bid] - 1
            ref[bid] = r
            if r == 0:
                fq[bid] = None
        R.blist = []
        R.nhashed = 0

    def _alloc(self, R: Req, n: int) -> None:
        fq, ref, bkey, cache = self.free_q, self.ref, self.bkey, self.cache
        bl = R.blist
        for _ in range(n):
            bid, _ = fq.popitem(last=False)
            k = bkey[bid]
            if k is not None:
                if cache.get(k) == bid:
                    del cache[k]
                bkey[bid] = None
            ref[bid] = 1
            bl.append(bid)

    def _register(self, R: Req, upto_tokens: int):
        """Hash R's full blocks covering its first `upto_tokens` tokens."""
        nfull = upto_tokens // 16
        if nfull <= R.nhashed:
            return
        cache, bkey, bl = self.cache, self.bkey, R.blist
        for k in range(R.nhashed, min(nfull, len(bl))):
            key = R.key(k)
            if key not in cache:
                bid = bl[k]
                cache[key] = bid
                bkey[bid] = key
        R.nhashed = min(nfull, len(bl))

    def _lookup(self, R: Req, tokens: int):
        """Prefix-cache hit blocks for R's first `tokens` tokens: list of block ids."""
        cache = self.cache
        hits = []
        for k in range((tokens - 1) // 16):
            bid = cache.get(R.key(k))
            if bid is None:
                break
            hits.append(bid)
        return hits

    # ------------------------------------------------------------------ main loop
    def run(self) -> SimResult:
        spec, wl, rng = self.spec, self.wl, self.rng
        phys = self.phys
        sm = self.sched_model
        self._ph1, self._ph2 = rng.uniform(0, 2 * np.pi, 2)
        n_req = len(wl.send_time)
        api = self.P["api"]
        # client -> API server; stage k+1 starts when stage k has completed (inference-perf
        # waits for a stage's requests before the next one), so absolute start times are only
        # known as the run unfolds: rel = start within its stage.
        c2a = (rng.uniform(*api["client_to_api_ms"], n_req) * 1e-3).tolist()
        abort_lag = (rng.uniform(*api["abort_to_engine_ms"], n_req) * 1e-3).tolist()
        stage_of = wl.stage.tolist()
        stage0 = [b[0] for b in wl.stage_bounds]
        rel = [float(wl.start_time[i]) - stage0[stage_of[i]] for i in range(n_req)]
        n_st = len(wl.stage_bounds)
        self.stage_start = [0.0] + [None] * (n_st - 1)
        self.stage_left = [0] * n_st
        for k in stage_of:
            self.stage_left[k] += 1
        glo, ghi = api.get("stage_gap_s", [0.5, 1.5])
        self._stage_gap = rng.uniform(glo, ghi, max(1, n_st)).tolist()
        self.start_abs = [0.0] * n_req  # client start, s from run start (filled when the stage starts)
        nsh = wl.shared_prefix_tokens // 16
        reqs = []
        for i in range(n_req):
            p = int(wl.prompt_id[i])
            R = Req(i, p, p // max(1, spec.prompts_per_group), int(wl.prompt_lens[p]), wl.max_tokens, nsh)
            reqs.append(R)
        self._reqs = reqs
        import heapq
        abort_heap = []  # (engine time of the client abort, idx), pushed when the stage starts
        timeout = wl.timeout_s.tolist()

        def start_stage(k: int):
            s0 = self.stage_start[k]
            for i in stage_idx[k]:
                st = s0 + rel[i]
                self.start_abs[i] = st
                reqs[i].api_arrival = self.mono0 + st + c2a[i]
                reqs[i].api_abort = self.mono0 + st + timeout[i] + c2a[i]
                heapq.heappush(abort_heap, (self.mono0 + st + timeout[i] + c2a[i] + abort_lag[i], i))

        stage_idx = [[] for _ in range(n_st)]
        for i, k in enumerate(stage_of):
            stage_idx[k].append(i)
        start_stage(0)
        self._start_stage = start_stage

        running: list[Req] = []
        waiting: deque[Req] = deque()
        blk_due: dict[int, list] = {}
        fin_due: dict[int, list] = {}
        pf_done: dict[int, list] = {}
        first_dec: dict[int, int] = {}
        prefillers: list[Req] = []  # running requests in PREFILL state, in seq order

        N = 0
        now = reqs[0].api_arrival if n_req else self.mono0
        ts_start_l, dur_l, upd_l = [], [], []
        sampled = []
        n_dec = 0
        A = 0  # Σ (c0 − s0 + 1) over decoders
        seq_counter = 0
        finished_since = 0
        inflight = None  # (step, g_end, n_sched)
        g_end_prev = 0.0
        ai = 0
        last_visible = 0.0
        budget_max, max_seqs = self.budget_max, self.max_seqs
        sample_rate, rich_rate = self.sample_rate, self.rich_rate
        total = self.blocks_total
        free_q = self.free_q
        post_fixed, post_per_req = self.post_fixed, self.post_per_req
        upd_fixed, upd_per_req, upd_per_fin = self.upd_fixed, self.upd_per_req, self.upd_per_fin
        ing_base, ing_per_tok, ing_per_ktps = self.ing_base, self.ing_per_tok, self.ing_per_ktps
        tok_rate = 0.0  # EMA of streamed tokens per second (API-server load)
        last_ts = None
        counters = {"preemptions": 0, "aborts": 0, "aborted_running": 0, "evictions_hits": 0, "empty_steps": 0}
        rec = self.record_all
        feat = {k: [] for k in ("running", "waiting", "prefill_tokens", "prefill_reqs", "finished", "preempted",
                                "scheduled_tokens", "decode_reqs")} if rec else None
        log1p, exp = math.log1p, math.exp
        prog = self.progress
        max_graph = phys.max_graph
        warm_window, warm_bucket, warm_seen = self._warm_window, self._warm_bucket, set()
        t_first = now
        next_prog = 0
        n_done = 0

        def remove_decoder(R: Req, Ncur: int):
            nonlocal n_dec, A
            n_dec -= 1
            A -= R.c0 - R.s0 + 1
            if R.out_base == 0 and R.s0 >= Ncur:
                first_dec[R.s0] = first_dec.get(R.s0, 0) - 1
            R.dver += 1

        def out_now(R: Req, Ncur: int) -> int:
            """Output tokens appended when schedule(Ncur) runs (updates through Ncur-2)."""
            if R.state == DECODE:
                k = Ncur - 1 - R.F
                return R.out_base + (k if k > 0 else 0)
            return R.out_base

        while True:
            # ---------------------------------------------------------- inputs
            while ai < n_req:
                R = reqs[ai]
                if R.api_arrival == 0.0:
                    break
                if R.visible == 0.0:
                    lag = ing_base + ing_per_tok * R.prompt_len + ing_per_ktps * tok_rate
                    v = R.api_arrival + lag
                    R.visible = v if v > last_visible else last_visible + 1e-6
                    last_visible = R.visible
                if R.visible > now:
                    break
                qns = int(now * 1e9)
                R.events.append((EV_QUEUED, N, qns, 0, 0, 0, 0, None))
                waiting.append(R)
                ai += 1
            while abort_heap and abort_heap[0][0] <= now:
                R = reqs[heapq.heappop(abort_heap)[1]]
                st = R.state
                if st == DONE or R.visible == 0.0 or R.visible > now:
                    continue
                counters["aborts"] += 1
                if st == WAITING:
                    waiting.remove(R)
                elif st == ZOMBIE:
                    pass
                else:
                    counters["aborted_running"] += 1
                    running.remove(R)
                    if st == DECODE:
                        out = R.out_base + max(0, N - R.F)
                        if out > R.max_tokens:
                            out = R.max_tokens
                        if out > R.out_base:
                            R.segments.append((R.F, out - R.out_base))
                        R.out_base = out
                        remove_decoder(R, N + 1)
                    else:
                        prefillers.remove(R)
                    self._free_blocks(R)
                R.state = DONE
                R.fver += 1
                ns = int(now * 1e9) + 1000
                R.events.append((EV_FINISHED, N, ns, 0 if R.out_base == 0 else 1, R.prefill_hw, R.out_base, R.npre, "aborted"))
                R.finish_status = "aborted"
                R.finish_step = N
                R.finish_ns = ns
                finished_since += 1
                n_done += 1
                self._done(R, now)
            if not running and not waiting:
                if inflight is not None:
                    s_prev, g_prev, _n = inflight
                    w = g_prev if g_prev > now else now
                    upd_l.append(w)
                    self._update(s_prev, w, pf_done, fin_due, running, prefillers, remove_decoder, counters)
                    finished_since += self._nfin
                    n_done += self._nfin
                    now = w + upd_fixed
                    inflight = None
                    continue
                nxt = []
                if ai < n_req and reqs[ai].api_arrival > 0.0:
                    R = reqs[ai]
                    if R.visible == 0.0:
                        lag = ing_base + ing_per_tok * R.prompt_len
                        v = R.api_arrival + lag
                        R.visible = v if v > last_visible else last_visible + 1e-6
                        last_visible = R.visible
                    nxt.append(R.visible)
                if not nxt:
                    break
                now = max(now, min(nxt))
                continue

            # ---------------------------------------------------------- schedule(N)
            N += 1
            if self._blk_i >= RNG_BLOCK:
                self._refill(N)
            bi = self._blk_i
            self._blk_i = bi + 1
            ts0 = int(now * 1e9)
            n_pre = 0
            sched_events = []  # (R, type, kind)
            # decoders needing a new block this step, in running order
            due = blk_due.pop(N, None)
            if due:
                if len(due) > 1:
                    due.sort(key=lambda e: e[0].seq)
                for R, ver in due:
                    if R.dver != ver or R.state != DECODE:
                        continue
                    while not free_q:
                        V = running.pop()
                        n_pre += 1
                        self._preempt(V, N, remove_decoder, prefillers, waiting, sched_events, counters)
                        if V is R:
                            break
                    if R.state != DECODE:
                        continue
                    self._alloc(R, 1)
                    self._register(R, R.c0 + (N - R.s0))
                    nb = len(R.blist)
                    blk_due.setdefault(R.s0 + 16 * nb - R.c0, []).append((R, R.dver))
            budget = budget_max - n_dec
            pf_tok = 0
            pf_reqs = 0
            dec_extra_tok = 0  # recompute tokens of resumed decode-phase requests
            dec_extra_reqs = 0
            sched_list = None
            completed = None
            if prefillers:
                sched_list = []
                for R in list(prefillers):
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
                        n_pre += 1
                        self._preempt(V, N, remove_decoder, prefillers, waiting, sched_events, counters)
                        if V is R:
                            ok = False
                            break
                    if not ok:
                        continue
                    if need > 0:
                        self._alloc(R, need)
                    R.computed_before = R.computed
                    R.sched_q = q
                    R.sched_step = N
                    budget -= q
                    sched_list.append(R)
            # ---------------------------------------------------------- admissions
            if n_pre == 0 and waiting and budget > 0:
                while waiting and len(running) < max_seqs and budget > 0:
                    R = waiting[0]
                    out = R.out_base
                    target = R.prompt_len + out
                    hits = self._lookup(R, target)
                    h_tok = 16 * len(hits)
                    q = target - h_tok
                    if q > budget:
                        q = budget
                    ref = self.ref
                    touched = 0
                    for b in hits:
                        if ref[b] == 0:
                            touched += 1
                    need = -(-(h_tok + q) // 16) - len(hits)
                    if need + touched > len(free_q):
                        break
                    waiting.popleft()
                    for b in hits:
                        if ref[b] == 0:
                            del free_q[b]
                        ref[b] += 1
                    R.blist = list(hits)
                    R.nhashed = len(hits)
                    R.hit_blk = len(hits)
                    if hits:
                        counters["evictions_hits"] += 1
                    if need > 0:
                        self._alloc(R, need)
                    if R.first_sched:
                        R.cached_tokens = h_tok
                    R.computed = h_tok
                    R.computed_before = h_tok
                    R.target = target
                    R.seq = seq_counter
                    seq_counter += 1
                    R.state = PREFILL
                    R.sched_q = q
                    R.sched_step = N
                    running.append(R)
                    prefillers.append(R)
                    if sched_list is None:
                        sched_list = []
                    sched_list.append(R)
                    sched_events.append((R, EV_SCHEDULED, "FIRST" if R.first_sched else "RESUME"))
                    R.first_sched = False
                    budget -= q
            # ---------------------------------------------------------- batch stats
            fd = first_dec.pop(N, 0)
            sum_ctx = A + n_dec * N
            pf_attn = 0.0
            if sched_list:
                for R in sched_list:
                    q = R.sched_q
                    if R.out_base == 0:
                        pf_tok += q
                        pf_reqs += 1
                    else:
                        dec_extra_tok += q
                        dec_extra_reqs += 1
                    pf_attn += phys.prefill_attn(q, R.computed_before)
            T = n_dec + pf_tok + dec_extra_tok
            n_sched = n_dec + pf_reqs + dec_extra_reqs
            n_running = len(running)
            n_waiting = len(waiting)
            prefill_tokens = pf_tok + fd
            prefill_reqs = pf_reqs + fd
            nfin = finished_since
            # ---------------------------------------------------------- schedule() CPU time
            mf, ms = sm.log_mean(n_running, prefill_tokens, prefill_reqs, nfin, n_pre)
            if self._u_gate[bi] < sm.p_slow(n_running):
                d_us = exp(ms + self._e_slow[bi])
            else:
                d_us = exp(mf + self._e_fast[bi])
            d_us = int(d_us)
            if d_us < 5:
                d_us = 5
            elif d_us > 400000:
                d_us = 400000
            d_ns = d_us * 1000 + self._u_sub[bi]
            ts1 = ts0 + d_ns
            # journey events inside the window
            if sched_events:
                k = len(sched_events)
                for j, (R, et, kind) in enumerate(sched_events):
                    ens = ts0 + (d_ns * (j + 1)) // (k + 1)
                    if et == EV_SCHEDULED:
                        R.events.append((EV_SCHEDULED, N, ens, 0 if R.out_base == 0 else 1, R.prefill_hw,
                                         R.out_base, R.npre, kind))
                    else:
                        R.events.append((EV_PREEMPTED, N, ens, kind[0], R.prefill_hw, kind[1], R.npre, None))
            # ---------------------------------------------------------- sampled records
            if self._u_samp[bi] < sample_rate:
                free = len(free_q)
                usage = 1.0 - free / total
                rec_t = (N, ts0, ts1, d_us, n_running, n_waiting, prefill_reqs, n_sched - prefill_reqs, T,
                         prefill_tokens, T - prefill_tokens, nfin, n_pre, usage, total, free)
                snaps = None
                if self._u_rich[bi] < rich_rate:
                    snaps = []
                    for R in running:
                        if R.state == DECODE:
                            comp = R.c0 + (N - R.s0)
                            k = N - 1 - R.F
                            out = R.out_base + (k if k > 0 else 0)
                            sq = 1
                        else:
                            comp = R.computed_before if R.sched_step == N else R.computed
                            out = R.out_base
                            sq = R.sched_q if R.sched_step == N else 0
                        eff = R.prompt_len - R.cached_tokens if 0 <= R.cached_tokens < R.prompt_len else None
                        snaps.append((R.idx, 0 if out == 0 else 1, R.prompt_len, comp, out, R.npre, sq,
                                      len(R.blist), R.hit_blk, eff))
                sampled.append((rec_t, snaps))
            if rec:
                feat["running"].append(n_running)
                feat["waiting"].append(n_waiting)
                feat["prefill_tokens"].append(prefill_tokens)
                feat["prefill_reqs"].append(prefill_reqs)
                feat["finished"].append(nfin)
                feat["preempted"].append(n_pre)
                feat["scheduled_tokens"].append(T)
                feat["decode_reqs"].append(n_sched - prefill_reqs)
            finished_since = 0
            if last_ts is not None:
                cyc = (ts0 - last_ts) * 1e-9
                if cyc > 0:
                    r_now = n_dec / cyc if cyc > 0.002 else n_dec / 0.002
                    tok_rate += 0.02 * (r_now - tok_rate)
            last_ts = ts0
            ts_start_l.append(ts0)
            dur_l.append(d_us)
            if T == 0:
                counters["empty_steps"] += 1
            # ---------------------------------------------------------- _update_after_schedule
            if sched_list:
                for R in sched_list:
                    if R.state != PREFILL:
                        continue
                    R.computed += R.sched_q
                    if R.out_base == 0:
                        c = R.computed if R.computed < R.prompt_len else R.prompt_len
                        if c > R.prefill_hw:
                            R.prefill_hw = c
                    self._register(R, R.computed)
                    if R.computed >= R.target:
                        if completed is None:
                            completed = []
                        completed.append(R)
            if completed:
                for R in completed:
                    prefillers.remove(R)
                    R.state = DECODE
                    R.F = N
                    R.s0 = N + 1
                    R.c0 = R.target
                    R.dver += 1
                    n_dec += 1
                    A += R.c0 - R.s0 + 1
                    if R.out_base == 0:
                        first_dec[N + 1] = first_dec.get(N + 1, 0) + 1
                    nb = len(R.blist)
                    blk_due.setdefault(R.s0 + 16 * nb - R.c0, []).append((R, R.dver))
                    R.fver += 1
                    fin_due.setdefault(N + (R.max_tokens - R.out_base - 1), []).append((R, R.fver))
                    pf_done.setdefault(N, []).append(R)
            # ---------------------------------------------------------- GPU + CPU timing
            gpu = phys.step_time(T, n_sched, pf_tok + dec_extra_tok == 0, sum_ctx, pf_attn)
            gpu = gpu * self._mult[bi] + self._add[bi]
            if T > max_graph and ts0 * 1e-9 - t_first < warm_window:
                b = T // warm_bucket
                if b not in warm_seen and len(warm_seen) < len(self._stalls):
                    gpu += self._stalls[len(warm_seen)]
                    warm_seen.add(b)
            L = ts1 * 1e-9 + post_fixed + post_per_req * n_sched
            g_start = L if L > g_end_prev else g_end_prev
            g_end = g_start + gpu
            if inflight is not None:
                s_prev, g_prev, n_prev = inflight
                w = g_prev if g_prev > L else L
                upd_l.append(w)
                self._update(s_prev, w, pf_done, fin_due, running, prefillers, remove_decoder, counters)
                finished_since += self._nfin
                n_done += self._nfin
                now = w + upd_fixed + upd_per_req * n_prev + upd_per_fin * self._nfin
            else:
                now = L + upd_fixed
            inflight = (N, g_end, n_sched)
            g_end_prev = g_end
            if prog is not None and ai >= next_prog:
                prog(ai / max(1, n_req))
                next_prog = ai + max(1, n_req // 50)
        self.n_done = n_done
        return SimResult(steps=N, ts_start_ns=ts_start_l, dur_us=dur_l, update_s=upd_l, sampled=sampled,
                         requests=reqs, counters=counters, features=feat,
                         start_abs=self.start_abs)

    # ------------------------------------------------------------------ helpers
    def _preempt(self, V: Req, N: int, remove_decoder, prefillers, waiting, sched_events, counters):
        counters["preemptions"] += 1
        if V.state == DECODE:
            k = N - 1 - V.F
            lag_out = V.out_base + (k if k > 0 else 0)
            out = V.out_base + (N - V.F)
            if out > V.max_tokens:
                out = V.max_tokens
            if out > V.out_base:
                V.segments.append((V.F, out - V.out_base))
            remove_decoder(V, N)
            V.out_base = out
        else:
            lag_out = V.out_base
            prefillers.remove(V)
        self._free_blocks(V)
        V.npre += 1
        V.computed = 0
        sched_events.append((V, EV_PREEMPTED, (0 if lag_out == 0 else 1, lag_out)))
        if V.out_base >= V.max_tokens:
            V.state = ZOMBIE  # its last token is in flight; FINISHED comes with that update
            return
        V.state = WAITING
        V.fver += 1
        waiting.appendleft(V)

    def _update(self, s: int, w: float, pf_done, fin_due, running, prefillers, remove_decoder, counters):
        """update_from_output(s) at time w: FIRST_TOKEN and FINISHED of step s."""
        nfin = 0
        base_ns = int(w * 1e9)
        j = 0
        lst = pf_done.pop(s, None)
        if lst:
            for R in lst:
                if R.state == DECODE and R.F == s and R.out_base == 0 and R.first_token_step < 0:
                    j += 1
                    R.first_token_step = s
                    R.events.append((EV_FIRST_TOKEN, s, base_ns + 15000 * j, 1, R.prompt_len, 1, R.npre, None))
        lst = fin_due.pop(s, None)
        if lst:
            for R, ver in lst:
                if R.fver != ver or R.state == DONE:
                    continue
                if R.state == DECODE:
                    running.remove(R)
                    R.segments.append((R.F, R.max_tokens - R.out_base))
                    remove_decoder(R, s + 2)
                    self._free_blocks(R)
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
                self._done(R, w)
        self._nfin = nfin

    def _done(self, R: Req, t: float):
        """Stage bookkeeping: when a stage's last request is done, the next stage starts."""
        k = int(self.wl.stage[R.idx])
        self.stage_left[k] -= 1
        if self.stage_left[k] == 0 and k + 1 < len(self.stage_left) and self.stage_start[k + 1] is None:
            self.stage_start[k + 1] = (t - self.mono0) + self._stage_gap[k]
            self._start_stage(k + 1)
