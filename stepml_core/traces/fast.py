"""Fast path: numpy template matching on lines in the compact canonical form (stepml_core.traces); gives
the same tables as the general path on those lines (tests/test_traces_reader.py)."""

# long module: the lock-step matcher's stages hand private structures (_Lines, _Events, _Spans, _Chain) along; its
# line templates and value decoding are already their own modules (templates.py, values.py)

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stepml_core.traces.schema import JOURNEY_ATTRS, SNAPSHOT_ATTRS, STEP_ATTRS, _new_counters
from stepml_core.traces.templates import (
    _EV_BODIES,
    _EV_HEAD,
    _EVENT_NAMES,
    _EVENT_PREFIX,
    _SPAN_BODIES,
    _SPAN_HEAD,
    _SPAN_KIND_SCOPE,
    _SPAN_PREFIX,
    _SPAN_TAIL,
    _Cur,
    _joint,
    _Scan,
)
from stepml_core.traces.values import _columns, _ffill_index, _Fields

# instance kinds in the chain check
_H1, _H0, _EC, _EB, _TC, _TB = range(6)
_ALLOW = np.zeros((6, 6), bool)
for _a, _b in [
    (_H1, _EC),
    (_H1, _EB),
    (_H0, _TC),
    (_H0, _TB),
    (_EC, _EC),
    (_EC, _EB),
    (_EB, _TC),
    (_EB, _TB),
    (_TC, _H1),
    (_TC, _H0),
]:
    _ALLOW[_a, _b] = True
_GROUPS = ("bs", "snap", "journey", "api")  # event groups (codes 0..3)
_GROUP_OF_NAME = np.array([_GROUPS.index(g) for _, g, _ in _EVENT_NAMES] + [-1])  # index -1: unknown
_SPAN_KINDS = ("step", "core", "api")  # span kinds (codes 0..2)
_SPAN_OF_GROUP = np.array([0, 0, 1, 2, -9])  # span kind an event group belongs to
_EV_SUFFIX = pa.array([lbl.split(".", 1)[1] for _, _, lbl in _EVENT_NAMES], pa.large_string())  # journey/api type
_SCHEDULED_CODE = [lbl for _, _, lbl in _EVENT_NAMES].index("journey.SCHEDULED")
_FINISHED_CODE = [lbl for _, _, lbl in _EVENT_NAMES].index("journey.FINISHED")


@dataclass(frozen=True)
class _Lines:
    """The chunk being matched: its bytes, each line's [start, end) offsets, the lines eligible for the fast path,
    and ``bad``, the lines found not canonical (set in place by every stage; a bad line goes to the slow path)."""

    data: bytes
    starts: np.ndarray
    ends: np.ndarray
    line_of: Callable[[np.ndarray], np.ndarray]  # byte offsets → line indices
    nlines: int
    eligible: np.ndarray
    bad: np.ndarray
    joint_cache: dict  # glue text → (joint type, scope name), shared across chunks


@dataclass(frozen=True)
class _Events:
    """Event candidates matched: opening position, cursor (``cur.ok``: matched), event-name code (-1 unknown), end
    position, event group (_GROUPS index), ``last`` (the span's last event), and the rows of each group."""

    pos: np.ndarray
    cur: _Cur
    code: np.ndarray
    end: np.ndarray
    grp: np.ndarray
    last: np.ndarray
    groups: dict[str, np.ndarray]

    @property
    def n(self) -> int:
        return len(self.pos)


@dataclass(frozen=True)
class _Spans:
    """Span heads matched: opening position, cursor (``cur.ok``: matched), span kind (_SPAN_KINDS index, -1
    unknown), end of the head, whether events follow, and the rows of each kind."""

    pos: np.ndarray
    cur: _Cur
    kind: np.ndarray
    end: np.ndarray
    has_events: np.ndarray
    groups: dict[str, np.ndarray]

    @property
    def n(self) -> int:
        return len(self.pos)


@dataclass(frozen=True)
class _Chain:
    """The chain check's instances (span heads, events, span tails) in position order: kind (_H1.._TB), index in
    its source, head mask, scope index named by the joint before a head (-1: none); the span tails (cursor and
    positions) and the scopes named (ids by name, names)."""

    kind: np.ndarray
    src: np.ndarray
    is_head: np.ndarray
    head_scope: np.ndarray
    tails: _Cur
    t_pos: np.ndarray
    scope_ids: dict[str, int]
    scope_names: list[str]

    @property
    def n_tails(self) -> int:
        return len(self.t_pos)


@dataclass(frozen=True)
class _Owners:
    """Who owns what: the scope of every span head (-1: none), each event's and tail's line and span (-1: none),
    each span head's line."""

    scope_of_head: np.ndarray
    ev_line: np.ndarray
    ev_span: np.ndarray
    sp_line: np.ndarray
    t_line: np.ndarray
    t_span: np.ndarray


@dataclass(frozen=True)
class _SpanFields:
    """Per span: events dropped, index of its tail (-1: none), position among the spans of its kind, start and end
    times as (values, present)."""

    dropped: np.ndarray
    tail_idx: np.ndarray
    pos_in_kind: np.ndarray
    start: tuple[np.ndarray, np.ndarray]
    end: tuple[np.ndarray, np.ndarray]


def _fast_chunk(
    data: bytes,
    a: np.ndarray,
    n: int,
    starts: np.ndarray,
    ends: np.ndarray,
    eligible: np.ndarray,
    first_line: int,
    joint_cache: dict,
    n_newlines: int,
):
    """Match canonical lines; returns (verified line mask, tables, counters) for the verified lines."""
    nlines = len(starts)
    bad = ~eligible
    body = a[:n]

    def line_of(p):
        return np.searchsorted(starts, p, side="right") - 1

    lines = _Lines(data, starts, ends, line_of, nlines, eligible, bad, joint_cache)
    ev_pos, ev_qi, sc, sp_pos, sp_qi = _fc_candidates(a, bad, body, data, ends, line_of, n, n_newlines, starts)
    events = _fc_events(ev_pos, ev_qi, sc)
    spans = _fc_spans(sc, sp_pos, sp_qi)
    chain = _fc_chain(lines, sc, events, spans)
    owners = _fc_owners(lines, events, spans, chain)
    fl, good_line = _fc_values(lines, sc, events, spans, chain, owners)
    span_fields = _fc_span_fields(fl, spans, chain, owners)
    tables = _fc_event_tables(events, owners, span_fields, fl, good_line, first_line)
    _fc_step_span_table(events, spans, owners, span_fields, fl, good_line, first_line, tables)
    return _fc_counters(lines, events, spans, chain, owners, span_fields, good_line, tables)


def _fc_candidates(a, bad, body, data, ends, line_of, n, n_newlines, starts):
    """Lines with escapes, control characters or invalid UTF-8 marked bad; the event and span candidates of the rest
    (their quote positions), as a _Scan of the chunk."""
    # escapes (backslash), raw control characters / JSON whitespace, non-ASCII: decided per line
    if not data.isascii() or np.count_nonzero(body < 32) != n_newlines or (body == 92).any():
        odd = body < 32
        odd |= body == 92
        odd |= body >= 128
        pos_odd = np.flatnonzero(odd & (body != 10))
        c = body[pos_odd]
        bad[line_of(pos_odd[c < 128])] = True
        for li in np.unique(line_of(pos_odd[c >= 128])).tolist():
            if not bad[li]:
                try:
                    data[starts[li] : ends[li]].decode("utf-8")
                except UnicodeDecodeError:
                    bad[li] = True
    sc = _Scan(a, n)
    # candidates from the quote positions: the key "timeUnixNano" (12 characters) opens an event,
    # "traceId" (7) a span; the gap between its two quotes is 13 / 8. Their quote index comes free.
    q = sc.q
    d = np.diff(q)
    cand = np.flatnonzero((d == 13) | (d == 8))
    is_ev = d[cand] == 13
    ke, ks = cand[is_ev], cand[~is_ev]
    ke, ks = ke[q[ke] >= 1], ks[q[ks] >= 1]
    ev_pos, sp_pos = q[ke] - 1, q[ks] - 1
    me = sc.eq(ev_pos, _EVENT_PREFIX)
    me[me] = ~bad[line_of(ev_pos[me])]
    ms = sc.eq(sp_pos, _SPAN_PREFIX)
    ms[ms] = ~bad[line_of(sp_pos[ms])]
    ev_pos, ev_qi = ev_pos[me], ke[me] + 3  # the prefix holds 3 quotes
    sp_pos, sp_qi = sp_pos[ms], ks[ms] + 3
    del d, cand
    return ev_pos, ev_qi, sc, sp_pos, sp_qi


def _fc_events(ev_pos, ev_qi, sc) -> _Events:
    """Event heads matched, dispatched on the event name, each group's body matched."""
    # ---- events: common head, dispatch on the name, group bodies
    ne = len(ev_pos)
    ce = _Cur(sc, "ev", np.arange(ne), ev_pos + len(_EVENT_PREFIX), qi=ev_qi)
    ce.run(_EV_HEAD)
    ev_code = np.full(ne, -1, np.int64)
    if ne:
        nstart, nlen = sc.frags[-1][4], sc.frags[-1][5]
        for code, (nm, _, _) in enumerate(_EVENT_NAMES):
            rows = np.flatnonzero(nlen == len(nm))
            if rows.size:
                ev_code[rows[sc.eq(nstart[rows], nm)]] = code
    ev_grp = _GROUP_OF_NAME[ev_code]
    ce.ok &= ev_grp >= 0
    groups: dict[str, np.ndarray] = {}
    ev_end = ce.pos.copy()
    ev_last = np.zeros(ne, bool)
    for gi, g in enumerate(_GROUPS):
        rows = np.flatnonzero(ev_grp == gi)
        groups[g] = rows
        if not rows.size:
            continue
        c = _Cur(sc, g, np.arange(len(rows)), ce.pos[rows], ce.ok[rows].copy(), ce.qi[rows])
        c.run(_EV_BODIES[g])
        ce.ok[rows] = c.ok
        ev_end[rows] = c.pos
        ev_last[rows] = c.flags.get("last", np.zeros(len(rows), bool))
    return _Events(ev_pos, ce, ev_code, ev_end, ev_grp, ev_last, groups)


def _fc_spans(sc, sp_pos, sp_qi) -> _Spans:
    """Span heads matched, dispatched on the span name, each kind's body matched."""
    # ---- span heads
    ns = len(sp_pos)
    ch = _Cur(sc, "span", np.arange(ns), sp_pos + len(_SPAN_PREFIX), qi=sp_qi)
    ch.run(_SPAN_HEAD)
    sp_kind = np.full(ns, -1, np.int64)
    if ns:
        name_fr = [f for f in sc.frags if f[1] == "span" and f[2] == "_name"][-1]
        nstart, nlen = name_fr[4], name_fr[5]
        for k, nm, exact in ((0, b"scheduler_steps_", False), (1, b"llm_core", True), (2, b"llm_request", True)):
            rows = np.flatnonzero(nlen == len(nm) if exact else nlen > len(nm))
            if rows.size:
                sp_kind[rows[sc.eq(nstart[rows], nm)]] = k
    ch.ok &= sp_kind >= 0
    sp_end = ch.pos.copy()
    sp_has_ev = np.zeros(ns, bool)
    span_groups: dict[str, np.ndarray] = {}
    for ki, k in enumerate(_SPAN_KINDS):
        rows = np.flatnonzero(sp_kind == ki)
        span_groups[k] = rows
        if not rows.size:
            continue
        c = _Cur(sc, "sp_" + k, np.arange(len(rows)), ch.pos[rows], ch.ok[rows].copy(), ch.qi[rows])
        c.run(_SPAN_BODIES[k])
        ch.ok[rows] = c.ok
        sp_end[rows] = c.pos
        sp_has_ev[rows] = c.flags.get("has_events", np.zeros(len(rows), bool))
    return _Spans(sp_pos, ch, sp_kind, sp_end, sp_has_ev, span_groups)


def _fc_chain(lines: _Lines, sc, events: _Events, spans: _Spans) -> _Chain:
    """Span tails matched; the instances must tile each line in a legal order, the glue between them (joints)
    must match the grammar; the scope named by each joint. Lines that fail are marked in ``lines.bad``."""
    ct, t_last, t_pos = _fc_tails(sc, events.cur, spans.cur, events.end, events.last, spans.end, spans.has_events)
    K, SRC, LN, S, E, is_head, first, last, gap = _fc_tiling(
        lines.bad,
        lines.eligible,
        lines.line_of,
        lines.nlines,
        (np.where(spans.has_events, _H1, _H0), spans.pos, spans.end, spans.cur.ok),
        (np.where(events.last, _EB, _EC), events.pos, events.end, events.cur.ok),
        (np.where(t_last, _TB, _TC), t_pos, ct.pos, ct.ok),
    )
    head_scope, scope_ids, scope_names = _fc_joints(
        lines.bad, lines.data, lines.ends, lines.joint_cache, lines.starts, LN, S, E, first, last, gap
    )
    return _Chain(K, SRC, is_head, head_scope, ct, t_pos, scope_ids, scope_names)


def _fc_tails(sc, ce, ch, ev_end, ev_last, sp_end, sp_has_ev):
    """Span tails matched after a last event, or after a span head without events: (cursor, ``last`` flags,
    positions in file order)."""
    t_pos = np.sort(np.concatenate([ev_end[ev_last & ce.ok], sp_end[~sp_has_ev & ch.ok]]))
    nt = len(t_pos)
    ct = _Cur(sc, "tail", np.arange(nt), t_pos)
    ct.run(_SPAN_TAIL)
    return ct, ct.flags.get("last", np.zeros(nt, bool)), t_pos


def _fc_tiling(bad, eligible, line_of, nlines, heads, events, tails):
    """Chain check: span heads, events and span tails, each (instance kind, start, end, matched) in source order,
    sorted by position must tile each line (contiguous, legal successions, a head first and a last tail at the end;
    a gap only between a last tail and the next head). Marks lines ``bad`` in place; returns the instances in
    position order (kind, index in its source, line, start, end, head mask) and the masks first / last of a line
    and gap after."""
    parts = (heads, events, tails)
    kind = np.concatenate([p[0] for p in parts])
    st = np.concatenate([p[1] for p in parts])
    en = np.concatenate([p[2] for p in parts])
    okk = np.concatenate([p[3] for p in parts])
    src = np.concatenate([np.arange(len(p[1])) for p in parts])
    order = np.argsort(st, kind="stable")
    K, S, E, OK, SRC = kind[order], st[order], en[order], okk[order], src[order]
    LN = line_of(S)
    ninst = len(K)
    is_head = K <= _H0
    first = last = gap = None
    if ninst:
        bad[LN[~OK]] = True
        same = LN[1:] == LN[:-1]
        contig = E[:-1] == S[1:]
        gap = same & ~contig & (K[:-1] == _TB) & is_head[1:] & (E[:-1] < S[1:])
        badpair = same & ~(contig & _ALLOW[K[:-1], K[1:]]) & ~gap
        bad[LN[1:][badpair]] = True
        first = np.ones(ninst, bool)
        first[1:] = ~same
        last = np.ones(ninst, bool)
        last[:-1] = ~same
        bad[LN[first & ~is_head]] = True
        bad[LN[last & (K != _TB)]] = True
        has_inst = np.zeros(nlines, bool)
        has_inst[LN] = True
        bad |= ~has_inst & eligible
    else:
        bad |= eligible
    return K, SRC, LN, S, E, is_head, first, last, gap


def _fc_joints(bad, data, ends, joint_cache, starts, LN, S, E, first, last, gap):
    """The glue before each line's first head ("start"), between a last tail and the next head ("mid") and after
    the last tail ("end") must match the grammar (else the line is bad); (scope index of each head after a joint,
    else -1; scope ids by name; scope names)."""
    scope_names: list[str] = []
    scope_ids: dict[str, int] = {}
    head_scope = np.full(len(LN), -1, np.int64)
    if first is None:
        return head_scope, scope_ids, scope_names
    for typ, idxs in (("start", np.flatnonzero(first)), ("mid", np.flatnonzero(gap) + 1)):
        for i in idxs.tolist():
            li = LN[i]
            if bad[li]:
                continue
            s0 = starts[li] if typ == "start" else E[i - 1]
            t, sname = _joint(data[s0 : S[i]], joint_cache)
            if t != typ:
                bad[li] = True
                continue
            sid = scope_ids.get(sname)
            if sid is None:
                sid = scope_ids[sname] = len(scope_names)
                scope_names.append(sname)
            head_scope[i] = sid
    for i in np.flatnonzero(last).tolist():
        li = LN[i]
        if not bad[li] and _joint(data[E[i] : ends[li]], joint_cache)[0] != "end":
            bad[li] = True
    return head_scope, scope_ids, scope_names


def _fc_owners(lines: _Lines, events: _Events, spans: _Spans, chain: _Chain) -> _Owners:
    """Scope of every span head, the span that owns each event and tail; heads must fit their scope, events their
    span kind, all on their span's line (else the line is marked in ``lines.bad``)."""
    K, SRC, is_head, head_scope, scope_ids = chain.kind, chain.src, chain.is_head, chain.head_scope, chain.scope_ids
    bad, line_of, ev_grp, ev_pos, sp_kind, sp_pos = (
        lines.bad,
        lines.line_of,
        events.grp,
        events.pos,
        spans.kind,
        spans.pos,
    )
    ne, ns, nt, t_pos = events.n, spans.n, chain.n_tails, chain.t_pos
    # scope of every head: from the joint before it, else from the previous head
    head_pos = np.flatnonzero(is_head)
    hs = head_scope[head_pos]
    ff = _ffill_index(hs >= 0)
    scope_of_head = np.full(ns, -1, np.int64)
    scope_of_head[SRC[head_pos]] = np.where(ff >= 0, hs[np.maximum(ff, 0)], -1)
    # each event / tail belongs to the last head before it
    last_head = _ffill_index(is_head)
    owner = np.where(last_head >= 0, SRC[np.maximum(last_head, 0)], -1)
    ev_span = np.full(ne, -1, np.int64)
    is_ev = (K == _EC) | (K == _EB)
    ev_span[SRC[is_ev]] = owner[is_ev]
    t_span = np.full(nt, -1, np.int64)
    is_t = K >= _TC
    t_span[SRC[is_t]] = owner[is_t]
    # head kinds must fit their scope, event groups their span kind, events/tails their span's line
    sp_line = line_of(sp_pos)
    ev_line = line_of(ev_pos)
    t_line = line_of(t_pos)
    scope_need = np.array([scope_ids.get(_SPAN_KIND_SCOPE[k], -2) for k in _SPAN_KINDS] + [-2])
    bad[sp_line[scope_need[sp_kind] != scope_of_head]] = True
    if ne:
        sp_of = np.maximum(ev_span, 0)
        bad[ev_line[(ev_span < 0) | (sp_kind[sp_of] != _SPAN_OF_GROUP[ev_grp]) | (sp_line[sp_of] != ev_line)]] = True
    if nt:
        bad[t_line[(t_span < 0) | (sp_line[np.maximum(t_span, 0)] != t_line)]] = True
    return _Owners(scope_of_head, ev_line, ev_span, sp_line, t_line, t_span)


def _fc_values(lines: _Lines, sc, events: _Events, spans: _Spans, chain: _Chain, owners: _Owners):
    """Values parsed for the rows of lines still in play; a value that does not parse, or an inconsistent journey
    event, marks its line bad. Returns (the fields parsed, the good-line mask)."""
    bad, ce, ch, ct = lines.bad, events.cur, spans.cur, chain.tails
    ev_code, groups, ne, ns, nt = events.code, events.groups, events.n, spans.n, chain.n_tails
    sp_kind, span_groups = spans.kind, spans.groups
    ev_line, sp_line, t_line = owners.ev_line, owners.sp_line, owners.t_line
    # ---- values: only for matched rows of lines still in play (span ids only for journey/api spans)
    keep = {"ev": ce.ok & ~bad[ev_line], "tail": ct.ok & ~bad[t_line]}
    keep_span = ch.ok & ~bad[sp_line]
    keep_ids = keep_span & (sp_kind != 0)
    for g, rows in groups.items():
        keep[g] = keep["ev"][rows]
    for k, rows in span_groups.items():
        keep["sp_" + k] = keep_span[rows]
    frags = []
    for f in sc.frags:
        if f[1] == "span":
            msk = keep_ids if f[2] in ("trace_id", "span_id", "parent_span_id") else keep_span
        else:
            msk = keep[f[1]]
        sel = msk[f[3]]
        frags.append(f if sel.all() else (f[0], f[1], f[2], f[3][sel], f[4][sel], f[5][sel]))
    sc.frags = frags
    sizes = {
        "ev": ne,
        "span": ns,
        "tail": nt,
        **{g: len(r) for g, r in groups.items()},
        **{"sp_" + k: len(r) for k, r in span_groups.items()},
    }
    fl = _Fields(sc, sizes)
    for owner_name, rows_list in fl.bad_rows.items():
        rows = np.concatenate(rows_list)
        if owner_name == "ev":
            bad[ev_line[rows]] = True
        elif owner_name in groups:
            bad[ev_line[groups[owner_name][rows]]] = True
        elif owner_name == "span":
            bad[sp_line[rows]] = True
        elif owner_name.startswith("sp_"):
            bad[sp_line[span_groups[owner_name[3:]][rows]]] = True
        else:
            bad[t_line[rows]] = True
    # journey consistency: event.type attribute = name; SCHEDULED/FINISHED carry their extra attribute
    jrows = groups["journey"]
    if jrows.size:
        codes = ev_code[jrows]
        etype = _EV_SUFFIX.take(pa.array(codes))
        same = pc.fill_null(pc.equal(fl.text("journey", "event.type"), etype), False).to_numpy(zero_copy_only=False)
        no_kind = pc.is_null(fl.text("journey", "schedule.kind")).to_numpy(zero_copy_only=False)
        no_status = pc.is_null(fl.text("journey", "finish.status")).to_numpy(zero_copy_only=False)
        incons = ~same | ((codes == _SCHEDULED_CODE) & no_kind) | ((codes == _FINISHED_CODE) & no_status)
        bad[ev_line[jrows[incons & keep["journey"]]]] = True
    good_line = ~bad
    return fl, good_line


def _take(pair, idx):
    """A (values, present) pair at rows ``idx``."""
    return pair[0][idx], pair[1][idx]


def _span_number(fl, span_groups, ns, name: str):
    """A field of the per-kind span bodies as (values, present) over all spans."""
    vals, valid = np.zeros(ns, np.int64), np.zeros(ns, bool)
    for k, grp in span_groups.items():
        if grp.size:
            v, ok = fl.number("sp_" + k, name)
            vals[grp], valid[grp] = v, ok
    return vals, valid


def _fc_span_fields(fl, spans: _Spans, chain: _Chain, owners: _Owners) -> _SpanFields:
    """Per span: events dropped and index of its tail (-1: none), position among the spans of its kind, start and
    end times [ns] as (values, present)."""
    ns, nt, span_groups, t_span = spans.n, chain.n_tails, spans.groups, owners.t_span
    sp_dropped = np.zeros(ns, np.int64)
    tail_idx = np.full(ns, -1, np.int64)
    if nt:
        okt = t_span >= 0
        sp_dropped[t_span[okt]] = fl.number("tail", "dropped")[0][okt]
        tail_idx[t_span[okt]] = np.flatnonzero(okt)
    pos_in_kind = np.full(ns, -1, np.int64)
    for grp in span_groups.values():
        pos_in_kind[grp] = np.arange(len(grp))
    sp_start, sp_end_t = _span_number(fl, span_groups, ns, "start"), _span_number(fl, span_groups, ns, "end")
    return _SpanFields(sp_dropped, tail_idx, pos_in_kind, sp_start, sp_end_t)


def _fc_journey_cols(cols: dict, fl, sel, spn, label, sp_dropped) -> None:
    """Adds the journey table's own columns (events ``sel`` of the journey group, spans ``spn``, event type
    ``label``) to ``cols``."""
    isel = pa.array(sel)
    cols["parent_span_id"] = fl.text("span", "parent_span_id").take(pa.array(spn))
    cols["event.type"] = label
    for k, t in JOURNEY_ATTRS:
        if k in ("event.type", "ts.monotonic"):
            continue
        cols[k] = fl.text("journey", k).take(isel) if t is str else _take(fl.number("journey", k), sel)
    cols["_ts_monotonic"] = _take(fl.number("journey", "ts.monotonic", np.float64), sel)
    cols["span_dropped_events"] = sp_dropped[spn]


def _fc_api_cols(cols: dict, fl, sel, spn, pk, tail_idx) -> None:
    """Adds the api table's own columns (events ``sel`` of the api group, spans ``spn`` at positions ``pk`` among
    the llm_request spans; the status code from the span's tail) to ``cols``."""
    cols["event.ts.monotonic"] = _take(fl.number("api", "event.ts.monotonic", np.float64), sel)
    cols["reason"] = fl.text("api", "reason").take(pa.array(sel))
    cols["prompt_tokens"] = _take(fl.number("sp_api", "prompt_tokens"), pk)
    cols["max_tokens"] = _take(fl.number("sp_api", "max_tokens"), pk)
    cols["model"] = fl.text("sp_api", "model").take(pa.array(pk))
    code_vals, code_ok = fl.number("tail", "status_code")
    ti = tail_idx[spn]
    cols["status_code"] = (code_vals[np.maximum(ti, 0)], code_ok[np.maximum(ti, 0)] & (ti >= 0))


def _fc_event_tables(
    events: _Events, owners: _Owners, sf: _SpanFields, fl, good_line: np.ndarray, first_line: int
) -> dict[str, dict]:
    """Column arrays of the event tables (steps, snapshots, journey, api) of the verified lines."""
    ev_code, groups, ev_line, ev_span = events.code, events.groups, owners.ev_line, owners.ev_span
    sp_dropped, tail_idx, pos_in_kind, sp_start, sp_end_t = sf.dropped, sf.tail_idx, sf.pos_in_kind, sf.start, sf.end
    ev_time = fl.number("ev", "time")
    tables: dict[str, dict] = {}
    for g, rows in groups.items():
        sel = np.flatnonzero(good_line[ev_line[rows]])
        if not sel.size:
            continue
        er = rows[sel]
        spn = ev_span[er]
        pk = pos_in_kind[spn]
        cols = {"event_time_unix_nano": _take(ev_time, er), "source_line": first_line + ev_line[er]}
        if g == "bs":
            for k, t in STEP_ATTRS:
                cols[k] = _take(fl.number("bs", k, np.float64 if t is float else np.int64), sel)
            cols["span_sequence"] = _take(fl.number("sp_step", "span_sequence"), pk)
            tables["steps"] = _columns("steps", cols, len(er))
        elif g == "snap":
            for k, t in SNAPSHOT_ATTRS:
                cols[k] = fl.text("snap", k).take(pa.array(sel)) if t is str else _take(fl.number("snap", k), sel)
            tables["snapshots"] = _columns("snapshots", cols, len(er))
        else:
            ispn = pa.array(spn)
            cols.update(
                {
                    "request.id": fl.text("sp_core" if g == "journey" else "sp_api", "request.id").take(pa.array(pk)),
                    "trace_id": fl.text("span", "trace_id").take(ispn),
                    "span_id": fl.text("span", "span_id").take(ispn),
                    "span_start_unix_nano": _take(sp_start, spn),
                    "span_end_unix_nano": _take(sp_end_t, spn),
                }
            )
            label = _EV_SUFFIX.take(pa.array(ev_code[er]))
            if g == "journey":
                _fc_journey_cols(cols, fl, sel, spn, label, sp_dropped)
                tables["journey"] = _columns("journey", cols, len(er))
            else:
                cols["event"] = label
                _fc_api_cols(cols, fl, sel, spn, pk, tail_idx)
                tables["api"] = _columns("api", cols, len(er))
    return tables


def _fc_step_span_table(
    events: _Events,
    spans: _Spans,
    owners: _Owners,
    sf: _SpanFields,
    fl,
    good_line: np.ndarray,
    first_line: int,
    tables: dict,
) -> None:
    """The step_spans table of the verified lines, added to ``tables``."""
    ne, ns, span_groups = events.n, spans.n, spans.groups
    ev_line, ev_span, sp_line = owners.ev_line, owners.ev_span, owners.sp_line
    sp_dropped, sp_start, sp_end_t = sf.dropped, sf.start, sf.end
    rows = span_groups["step"]
    sel = np.flatnonzero(good_line[sp_line[rows]]) if rows.size else rows
    if sel.size:
        sr = rows[sel]
        counted = (ev_span >= 0) & good_line[ev_line] if ne else np.zeros(0, bool)
        n_ev = np.bincount(ev_span[counted], minlength=ns).astype(np.int64)
        cols = {
            c: _take(fl.number("sp_step", c), sel)
            for c in ("span_sequence", "step_range_start", "step_range_end", "closure_interval")
        }
        cols.update(
            {
                "dropped_events_count": sp_dropped[sr],
                "n_events": n_ev[sr],
                "start_unix_nano": _take(sp_start, sr),
                "end_unix_nano": _take(sp_end_t, sr),
                "source_line": first_line + sp_line[sr],
            }
        )
        tables["step_spans"] = _columns("step_spans", cols, len(sr))


def _fc_counters(
    lines: _Lines,
    events: _Events,
    spans: _Spans,
    chain: _Chain,
    owners: _Owners,
    sf: _SpanFields,
    good_line: np.ndarray,
    tables: dict,
):
    """Spans per scope, dropped events and events per name over the verified lines: (verified line mask, tables,
    counters)."""
    eligible, ev_code, ne, ns, scope_names = lines.eligible, events.code, events.n, spans.n, chain.scope_names
    ev_line, sp_line, scope_of_head, sp_dropped = owners.ev_line, owners.sp_line, owners.scope_of_head, sf.dropped
    # ---- counters over verified lines
    cnt = _new_counters()
    if ns:
        sg = good_line[sp_line]
        ids, counts = np.unique(scope_of_head[sg], return_counts=True)
        cnt["spans_by_scope"] = {scope_names[i]: int(c) for i, c in zip(ids.tolist(), counts.tolist())}
        cnt["dropped_events_total"] = int(sp_dropped[sg].sum())
    if ne:
        ids, counts = np.unique(ev_code[good_line[ev_line]], return_counts=True)
        cnt["events_by_name"] = {_EVENT_NAMES[i][2]: int(c) for i, c in zip(ids.tolist(), counts.tolist())}
    return good_line & eligible, tables, cnt
