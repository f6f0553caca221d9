"""Turn a simulated run into instrumented-vLLM trace spans (docs/trace-format.md §3, §4, §8) and write them.

* step spans ``scheduler_steps_<seq>`` (scope ``vllm.scheduler.step``): rotation every
  ``closure_interval`` schedule() calls if at least one BATCH_SUMMARY was emitted since the
  last check (else the span stays open), final close at shutdown; BATCH_SUMMARY on sampled
  steps (emitted right after ``step.ts_end_ns``), REQUEST_SNAPSHOTs for every running
  request on rich-sampled steps right after it; the SDK's 128-event cap with
  ``droppedEventsCount``;
* per request an ``llm_request`` span (scope ``vllm.api``, API process, kind SERVER) and a
  child ``llm_core`` span (scope ``vllm.scheduler``, engine process, flags 768);
* wall clock = engine monotonic + a constant offset (the run's start time); API-process
  monotonic = the same clock (same host).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..sim.engine import SimResult
from ..sim.request import EV_FINISHED, EV_FIRST_TOKEN, EV_PREEMPTED, EV_QUEUED, EV_SCHEDULED
from ..trace_writer import (
    FLAGS_LOCAL,
    FLAGS_REMOTE_PARENT,
    KIND_INTERNAL,
    KIND_SERVER,
    ExportItem,
    Span,
    batch_exports,
    encode_attrs,
    encode_event,
    export_line,
    merge_exports,
    resource_json,
    write_lines,
)
from .spec import engine_params

SCOPE_STEP, SCOPE_CORE, SCOPE_API = "vllm.scheduler.step", "vllm.scheduler", "vllm.api"
EV_NAMES = {
    EV_QUEUED: "QUEUED",
    EV_SCHEDULED: "SCHEDULED",
    EV_FIRST_TOKEN: "FIRST_TOKEN",
    EV_PREEMPTED: "PREEMPTED",
    EV_FINISHED: "FINISHED",
}

_BS_TMPL = (
    '{"timeUnixNano":"%d","name":"step.BATCH_SUMMARY","attributes":['
    '{"key":"step.id","value":{"intValue":"%d"}},'
    '{"key":"step.ts_start_ns","value":{"intValue":"%d"}},'
    '{"key":"step.ts_end_ns","value":{"intValue":"%d"}},'
    '{"key":"step.duration_us","value":{"intValue":"%d"}},'
    '{"key":"queue.running_depth","value":{"intValue":"%d"}},'
    '{"key":"queue.waiting_depth","value":{"intValue":"%d"}},'
    '{"key":"batch.num_prefill_reqs","value":{"intValue":"%d"}},'
    '{"key":"batch.num_decode_reqs","value":{"intValue":"%d"}},'
    '{"key":"batch.scheduled_tokens","value":{"intValue":"%d"}},'
    '{"key":"batch.prefill_tokens","value":{"intValue":"%d"}},'
    '{"key":"batch.decode_tokens","value":{"intValue":"%d"}},'
    '{"key":"batch.num_finished","value":{"intValue":"%d"}},'
    '{"key":"batch.num_preempted","value":{"intValue":"%d"}},'
    '{"key":"kv.usage_gpu_ratio","value":%s},'
    '{"key":"kv.blocks_total_gpu","value":{"intValue":"%d"}},'
    '{"key":"kv.blocks_free_gpu","value":{"intValue":"%d"}}]}'
)
_SNAP_HEAD = (
    '{"timeUnixNano":"%d","name":"step.REQUEST_SNAPSHOT","attributes":['
    '{"key":"step.id","value":{"intValue":"%d"}},'
    '{"key":"request.id","value":{"stringValue":"%s"}},'
    '{"key":"request.phase","value":{"stringValue":"%s"}},'
    '{"key":"request.num_prompt_tokens","value":{"intValue":"%d"}},'
    '{"key":"request.num_computed_tokens","value":{"intValue":"%d"}},'
    '{"key":"request.num_output_tokens","value":{"intValue":"%d"}},'
    '{"key":"request.num_preemptions","value":{"intValue":"%d"}},'
    '{"key":"request.scheduled_tokens_this_step","value":{"intValue":"%d"}},'
    '{"key":"kv.blocks_allocated_gpu","value":{"intValue":"%d"}},'
    '{"key":"kv.blocks_cached_gpu","value":{"intValue":"%d"}}'
)
_SNAP_EFF = ',{"key":"request.effective_prompt_len","value":{"intValue":"%d"}}]}'
_J_TMPL = (
    '{"timeUnixNano":"%d","name":"journey.%s","attributes":['
    '{"key":"event.type","value":{"stringValue":"%s"}},'
    '{"key":"ts.monotonic","value":{"doubleValue":%s}},'
    '{"key":"ts.monotonic_ns","value":{"intValue":"%d"}},'
    '{"key":"scheduler.step","value":{"intValue":"%d"}},'
    '{"key":"phase","value":{"stringValue":"%s"}},'
    '{"key":"prefill.done_tokens","value":{"intValue":"%d"}},'
    '{"key":"prefill.total_tokens","value":{"intValue":"%d"}},'
    '{"key":"decode.done_tokens","value":{"intValue":"%d"}},'
    '{"key":"decode.max_tokens","value":{"intValue":"%d"}},'
    '{"key":"num_preemptions","value":{"intValue":"%d"}}'
)


def _dbl(x: float) -> str:
    return '{"doubleValue":' + repr(float(x)) + "}" if isinstance(x, float) else '{"intValue":"%d"}' % x


class Ids:
    """Deterministic hex ids from the run's id generator."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def hexes(self, n: int, nbytes: int) -> list[str]:
        b = self.rng.bytes(n * nbytes).hex()
        w = 2 * nbytes
        return [b[i * w : (i + 1) * w] for i in range(n)]


def request_ids(n: int, ids: Ids) -> tuple[list[str], list[str]]:
    """API ids ``cmpl-<16 hex>`` and engine ids ``cmpl-<16 hex>-0-<8 hex>``."""
    a = ids.hexes(n, 8)
    s = ids.hexes(n, 4)
    api = ["cmpl-" + x for x in a]
    return api, [api[i] + "-0-" + s[i] for i in range(n)]


def step_spans(
    sim: SimResult, engine_ids: list[str], wall_off: int, rng: np.random.Generator, ids: Ids, closure: int
) -> tuple[list[Span], dict]:
    """Step spans with their events, plus counts (sampled steps emitted, events dropped)."""
    ts, dur = sim.ts_start_ns, sim.dur_us
    N = sim.steps
    sampled = sim.sampled
    n_s = len(sampled)
    bs_off = rng.integers(3000, 12000, max(1, n_s)).tolist()
    spans: list[Span] = []
    tids = ids.hexes(N // closure + 2, 16)
    sids = ids.hexes(N // closure + 2, 8)
    seq = 1

    def ts_end(step: int) -> int:
        return ts[step - 1] + dur[step - 1] * 1000

    def new_span(start_step: int, start_ns: int) -> Span:
        sp = Span(
            trace_id=tids[seq - 1],
            span_id=sids[seq - 1],
            name=f"scheduler_steps_{seq}",
            kind=KIND_INTERNAL,
            start_ns=start_ns,
            end_ns=0,
            flags=FLAGS_LOCAL,
        )
        sp._range_start = start_step  # type: ignore[attr-defined]
        return sp

    cur = new_span(1, ts[0] + wall_off - 2000 if N else wall_off)
    last_ev = 0
    emitted_since = 0
    si = 0
    n_bs = 0
    for c in range(closure, N + closure, closure):
        hi = min(c, N)
        while si < n_s and sampled[si][0][0] <= hi:
            rec, snaps = sampled[si]
            t_bs = rec[2] + wall_off + bs_off[si]
            u = rec[13]
            cur.add_event(
                _BS_TMPL
                % (
                    t_bs,
                    rec[0],
                    rec[1],
                    rec[2],
                    rec[3],
                    rec[4],
                    rec[5],
                    rec[6],
                    rec[7],
                    rec[8],
                    rec[9],
                    rec[10],
                    rec[11],
                    rec[12],
                    _dbl(u),
                    rec[14],
                    rec[15],
                )
            )
            n_bs += 1
            if snaps:
                t = t_bs
                for idx, ph, plen, comp, out, npre, sq, nb, hb, eff in snaps:
                    t += 14000
                    e = _SNAP_HEAD % (
                        t,
                        rec[0],
                        engine_ids[idx],
                        "DECODE" if ph else "PREFILL",
                        plen,
                        comp,
                        out,
                        npre,
                        sq,
                        nb,
                        hb,
                    )
                    cur.add_event(e + (_SNAP_EFF % eff if eff is not None else "]}"))
                last_ev = t
            else:
                last_ev = t_bs
            emitted_since += 1
            si += 1
        if c > N:
            break
        if emitted_since:
            end = max(ts_end(c) + wall_off + 40000, last_ev + 5000)
            cur.end_ns = end
            cur.attrs_json = encode_attrs(
                [
                    ("scheduler.span_sequence", seq),
                    ("scheduler.step_range_start", cur._range_start),
                    ("scheduler.closure_interval", closure),
                    ("scheduler.step_range_end", c),
                ]
            )
            spans.append(cur)
            seq += 1
            cur = new_span(c + 1, end + 1000)
            emitted_since = 0
    # shutdown: close the open span
    if N and (cur.events or cur._range_start <= N):
        end = max(ts_end(N) + wall_off + 200000, last_ev + 5000)
        cur.end_ns = max(end, cur.start_ns + 1000)
        cur.attrs_json = encode_attrs(
            [
                ("scheduler.span_sequence", seq),
                ("scheduler.step_range_start", cur._range_start),
                ("scheduler.closure_interval", closure),
                ("scheduler.step_range_end", N),
            ]
        )
        spans.append(cur)
    dropped = sum(s.dropped_events for s in spans)
    # BATCH_SUMMARY events that survived the cap
    kept = sum(sum(1 for e in s.events if '"step.BATCH_SUMMARY"' in e[:96]) for s in spans)
    return spans, {
        "batch_summaries_emitted": n_bs,
        "batch_summaries_written": kept,
        "events_dropped": dropped,
        "step_spans": len(spans),
    }


def journey_spans(
    sim: SimResult,
    api_ids: list[str],
    engine_ids: list[str],
    *,
    hf_id: str,
    wall_off: int,
    rng: np.random.Generator,
    ids: Ids,
) -> tuple[list[Span], list[Span]]:
    """(llm_request spans, llm_core spans) for every request that reached the server."""
    reqs = sim.requests
    n = len(reqs)
    tids = ids.hexes(n, 16)
    aids = ids.hexes(n, 8)
    cids = ids.hexes(n, 8)
    dep = (rng.uniform(150e3, 450e3, n)).astype(np.int64).tolist()
    api_spans, core_spans = [], []
    for R in reqs:
        i = R.idx
        if not R.events:
            continue
        arr_ns = int(R.api_arrival * 1e9)
        ev_json = []
        for et, step, ns, ph, pdone, ddone, npre, extra in R.events:
            name = EV_NAMES[et]
            phase = "WAITING" if et == EV_QUEUED else ("DECODE" if ph else "PREFILL")
            s = _J_TMPL % (
                ns + wall_off,
                name,
                name,
                repr(ns / 1e9),
                ns,
                step,
                phase,
                pdone,
                R.prompt_len,
                ddone,
                R.max_tokens,
                npre,
            )
            if et == EV_SCHEDULED:
                s += ',{"key":"schedule.kind","value":{"stringValue":"%s"}}]}' % extra
            elif et == EV_FINISHED:
                s += ',{"key":"finish.status","value":{"stringValue":"%s"}}]}' % extra
            else:
                s += "]}"
            ev_json.append(s)
        q_ns = R.events[0][2]
        fin_ns = R.finish_ns if R.finish_ns > 0 else R.events[-1][2]
        core = Span(
            trace_id=tids[i],
            span_id=cids[i],
            parent_span_id=aids[i],
            name="llm_core",
            kind=KIND_INTERNAL,
            flags=FLAGS_REMOTE_PARENT,
            start_ns=q_ns - 3000 + wall_off,
            end_ns=fin_ns + 6000 + wall_off,
            attrs_json=encode_attrs([("gen_ai.request.id", engine_ids[i])]),
        )
        for e in ev_json:
            core.add_event(e)
        core_spans.append(core)
        # API side
        if R.finish_status == "length" and not R.client_timeout:
            end_mono = fin_ns + dep[i]
            term = encode_event(
                end_mono + wall_off, "api.DEPARTED", encode_attrs([("event.ts.monotonic", end_mono / 1e9)])
            )
        else:
            end_mono = int(R.api_abort * 1e9)
            term = encode_event(
                end_mono + wall_off,
                "api.ABORTED",
                encode_attrs([("event.ts.monotonic", end_mono / 1e9), ("reason", "client_disconnect")]),
            )
        api = Span(
            trace_id=tids[i],
            span_id=aids[i],
            name="llm_request",
            kind=KIND_SERVER,
            flags=FLAGS_LOCAL,
            start_ns=arr_ns + wall_off,
            end_ns=end_mono + 2000 + wall_off,
            attrs_json=encode_attrs(
                [
                    ("gen_ai.request.id", api_ids[i]),
                    ("http.route", "/v1/completions"),
                    ("gen_ai.response.model", hf_id),
                    ("gen_ai.usage.prompt_tokens", R.prompt_len),
                    ("gen_ai.request.max_tokens", R.max_tokens),
                    ("gen_ai.request.n", 1),
                ]
            ),
        )
        api.add_event(
            encode_event(
                arr_ns + 1200 + wall_off, "api.ARRIVED", encode_attrs([("event.ts.monotonic", (arr_ns + 1200) / 1e9)])
            )
        )
        api.add_event(term)
        api_spans.append(api)
    return api_spans, core_spans


def write_run_traces(
    path: Path, sim: SimResult, *, hf_id: str, wall_off: int, rng: np.random.Generator, compresslevel: int = 3
) -> dict:
    """Write ``traces.json[.gz]`` for a simulated run; returns counts for provenance."""
    P = engine_params()
    sp = P["scheduler"]
    ids = Ids(rng)
    api_ids, engine_ids = request_ids(len(sim.requests), ids)
    steps, counts = step_spans(sim, engine_ids, wall_off, rng, ids, int(sp["closure_interval"]))
    api_spans, core_spans = journey_spans(sim, api_ids, engine_ids, hf_id=hf_id, wall_off=wall_off, rng=rng, ids=ids)
    eng_items = [ExportItem(s.end_ns, SCOPE_STEP, s.to_json(), k) for k, s in enumerate(steps)]
    eng_items += [ExportItem(s.end_ns, SCOPE_CORE, s.to_json(), len(steps) + k) for k, s in enumerate(core_spans)]
    api_items = [ExportItem(s.end_ns, SCOPE_API, s.to_json(), k) for k, s in enumerate(api_spans)]
    ph = rng.integers(0, 5_000_000_000, 2).tolist()
    res = resource_json()
    eng = [(t, export_line(res, items), 1) for t, items in batch_exports(eng_items, phase_ns=ph[0])]
    api = [(t, export_line(res, items), 0) for t, items in batch_exports(api_items, phase_ns=ph[1])]
    lines = merge_exports(eng, api)
    n_lines = write_lines(path, lines, compresslevel=compresslevel)
    counts.update({"lines": n_lines, "llm_core_spans": len(core_spans), "llm_request_spans": len(api_spans)})
    return counts
