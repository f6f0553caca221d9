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

from stepml_core.sim.engine import SimResult
from stepml_core.sim.request import EV_FINISHED, EV_FIRST_TOKEN, EV_PREEMPTED, EV_QUEUED, EV_SCHEDULED
from stepml_core.synth.spec import engine_params
from stepml_core.traces.writer import (
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


def _bs_event(rec: tuple, t_bs: int) -> str:
    """A ``step.BATCH_SUMMARY`` event at wall time ``t_bs`` [ns] from a recorder record (16 fields, field 13 the
    KV usage ratio)."""
    return _BS_TMPL % (t_bs, *rec[:13], _dbl(rec[13]), *rec[14:16])


def _snapshot_events(step_id: int, snaps: list, engine_ids: list[str], t_bs: int) -> list[tuple[int, str]]:
    """(wall time [ns], ``step.REQUEST_SNAPSHOT`` event) per running request, 14 µs apart after the summary."""
    out = []
    t = t_bs
    for idx, ph, plen, comp, out_tok, npre, sq, nb, hb, eff in snaps:
        t += 14000
        e = _SNAP_HEAD % (
            t,
            step_id,
            engine_ids[idx],
            "DECODE" if ph else "PREFILL",
            plen,
            comp,
            out_tok,
            npre,
            sq,
            nb,
            hb,
        )
        out.append((t, e + (_SNAP_EFF % eff if eff is not None else "]}")))
    return out


def _emit_sampled_step(span: Span, rec: tuple, snaps: list | None, engine_ids: list[str], t_bs: int) -> int:
    """Add a sampled step's BATCH_SUMMARY (and its snapshots, if rich-sampled) to ``span``; returns the wall time
    [ns] of the last event added."""
    span.add_event(_bs_event(rec, t_bs))
    if not snaps:
        return t_bs
    events = _snapshot_events(rec[0], snaps, engine_ids, t_bs)
    for _, e in events:
        span.add_event(e)
    return events[-1][0]


def _new_step_span(tids: list[str], sids: list[str], seq: int, start_step: int, start_ns: int) -> Span:
    """The open span ``scheduler_steps_<seq>`` whose step range starts at ``start_step``."""
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


def _close_step_span(sp: Span, seq: int, closure: int, range_end: int, end_ns: int) -> None:
    """Close a step span at ``end_ns`` with its ``scheduler.*`` attributes (step range start … ``range_end``)."""
    sp.end_ns = end_ns
    sp.attrs_json = encode_attrs(
        [
            ("scheduler.span_sequence", seq),
            ("scheduler.step_range_start", sp._range_start),  # type: ignore[attr-defined]
            ("scheduler.closure_interval", closure),
            ("scheduler.step_range_end", range_end),
        ]
    )


def _step_span_counts(spans: list[Span], n_emitted: int) -> dict:
    """Provenance counts: BATCH_SUMMARYs emitted and surviving the 128-event cap, events dropped, spans."""
    dropped = sum(s.dropped_events for s in spans)
    kept = sum(sum(1 for e in s.events if '"step.BATCH_SUMMARY"' in e[:96]) for s in spans)
    return {
        "batch_summaries_emitted": n_emitted,
        "batch_summaries_written": kept,
        "events_dropped": dropped,
        "step_spans": len(spans),
    }


def step_spans(
    sim: SimResult, engine_ids: list[str], wall_off: int, rng: np.random.Generator, ids: Ids, closure: int
) -> tuple[list[Span], dict]:
    """Step spans with their events, plus counts (sampled steps emitted, events dropped).

    Every ``closure`` steps the open span closes at max(end of the step + 40 µs, last event + 5 µs) if a sampled
    step was emitted since the last check; the last one closes at shutdown (end of the last step + 200 µs).
    A BATCH_SUMMARY leaves 3–12 µs after its step's end."""
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

    cur = _new_step_span(tids, sids, seq, 1, ts[0] + wall_off - 2000 if N else wall_off)
    last_ev = 0
    emitted_since = 0
    si = 0
    for c in range(closure, N + closure, closure):
        hi = min(c, N)
        while si < n_s and sampled[si][0][0] <= hi:
            rec, snaps = sampled[si]
            last_ev = _emit_sampled_step(cur, rec, snaps, engine_ids, rec[2] + wall_off + bs_off[si])
            emitted_since += 1
            si += 1
        if c > N:
            break
        if emitted_since:
            end = max(ts_end(c) + wall_off + 40000, last_ev + 5000)
            _close_step_span(cur, seq, closure, c, end)
            spans.append(cur)
            seq += 1
            cur = _new_step_span(tids, sids, seq, c + 1, end + 1000)
            emitted_since = 0
    # shutdown: close the open span
    if N and (cur.events or cur._range_start <= N):  # type: ignore[attr-defined]
        end = max(ts_end(N) + wall_off + 200000, last_ev + 5000)
        _close_step_span(cur, seq, closure, N, max(end, cur.start_ns + 1000))
        spans.append(cur)
    return spans, _step_span_counts(spans, si)


def _journey_event(R, event: tuple, wall_off: int) -> str:
    """A ``journey.<TYPE>`` event of an llm_core span (wall time = engine monotonic + ``wall_off``)."""
    et, step, ns, ph, pdone, ddone, npre, extra = event
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
        return s + ',{"key":"schedule.kind","value":{"stringValue":"%s"}}]}' % extra
    if et == EV_FINISHED:
        return s + ',{"key":"finish.status","value":{"stringValue":"%s"}}]}' % extra
    return s + "]}"


def _core_span(R, trace_id: str, span_id: str, parent_id: str, engine_id: str, wall_off: int) -> Span:
    """The engine-side ``llm_core`` span of a request: first journey event − 3 µs … finish + 6 µs."""
    ev_json = [_journey_event(R, e, wall_off) for e in R.events]
    q_ns = R.events[0][2]
    fin_ns = R.finish_ns if R.finish_ns > 0 else R.events[-1][2]
    core = Span(
        trace_id=trace_id,
        span_id=span_id,
        parent_span_id=parent_id,
        name="llm_core",
        kind=KIND_INTERNAL,
        flags=FLAGS_REMOTE_PARENT,
        start_ns=q_ns - 3000 + wall_off,
        end_ns=fin_ns + 6000 + wall_off,
        attrs_json=encode_attrs([("gen_ai.request.id", engine_id)]),
    )
    for e in ev_json:
        core.add_event(e)
    return core


def _api_terminal_event(R, depart_ns: int, wall_off: int) -> tuple[int, str]:
    """(API-process monotonic end [ns], the ``api.DEPARTED`` event of a completed request, ``depart_ns`` after its
    finish, else ``api.ABORTED`` at the client's abort)."""
    fin_ns = R.finish_ns if R.finish_ns > 0 else R.events[-1][2]
    if R.finish_status == "length" and not R.client_timeout:
        end_mono = fin_ns + depart_ns
        term = encode_event(end_mono + wall_off, "api.DEPARTED", encode_attrs([("event.ts.monotonic", end_mono / 1e9)]))
    else:
        end_mono = int(R.api_abort * 1e9)
        term = encode_event(
            end_mono + wall_off,
            "api.ABORTED",
            encode_attrs([("event.ts.monotonic", end_mono / 1e9), ("reason", "client_disconnect")]),
        )
    return end_mono, term


def _api_span(R, trace_id: str, span_id: str, api_id: str, depart_ns: int, hf_id: str, wall_off: int) -> Span:
    """The API-process ``llm_request`` span of a request: arrival … end + 2 µs, events ARRIVED (+1.2 µs) and
    DEPARTED / ABORTED."""
    arr_ns = int(R.api_arrival * 1e9)
    end_mono, term = _api_terminal_event(R, depart_ns, wall_off)
    api = Span(
        trace_id=trace_id,
        span_id=span_id,
        name="llm_request",
        kind=KIND_SERVER,
        flags=FLAGS_LOCAL,
        start_ns=arr_ns + wall_off,
        end_ns=end_mono + 2000 + wall_off,
        attrs_json=encode_attrs(
            [
                ("gen_ai.request.id", api_id),
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
    return api


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
    """(llm_request spans, llm_core spans) for every request that reached the server; a completed request departs
    the API 150–450 µs after it finished."""
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
        core_spans.append(_core_span(R, tids[i], cids[i], aids[i], engine_ids[i], wall_off))
        api_spans.append(_api_span(R, tids[i], aids[i], api_ids[i], dep[i], hf_id, wall_off))
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
