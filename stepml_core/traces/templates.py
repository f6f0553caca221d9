"""Templates of the compact canonical trace lines (stepml_core.traces) and their matcher: each span and event
shape as a compiled sequence of literals and typed values, and the lock-step matching of many instances at once
over a chunk's bytes (:class:`_Scan`: the chunk and its quote positions; :class:`_Cur`: positions being matched).
"""

from __future__ import annotations

import re

import numpy as np

from stepml_core.traces.schema import (
    API_ATTRS,
    API_EVENTS,
    EV_BATCH,
    EV_SNAPSHOT,
    JOURNEY_ATTRS,
    JOURNEY_TYPES,
    SCOPE_API,
    SCOPE_CORE,
    SCOPE_STEP,
    SNAPSHOT_ATTRS,
    SNAPSHOT_OPTIONAL,
    STEP_ATTRS,
)

# --------------------------------------------------------------------------------------------
# Fast path: numpy template matching on compact canonical lines
# --------------------------------------------------------------------------------------------

PAD = 4096  # bytes after a chunk's data so that window reads of failing matches stay in bounds
_NQSENT = 512  # the padding starts with this many quote characters (sentinels for quote lookups; more
# than the quotes of any template, so a failing match never indexes past them)
PAD_BYTES = b'"' * _NQSENT + b"\0" * (PAD - _NQSENT)


def _lit(b: bytes):
    return ("lit", b)


def _opt(*items):
    return ("opt", list(items))


def _alt(*alternatives):
    return ("alt", [list(a) for a in alternatives])


def _A_I(key: str, col: str | None = None):
    return [_lit(b'{"key":"%s","value":{"intValue":"' % key.encode()), ("i", col or key), _lit(b"}}")]


def _A_S(key: str, col: str | None = None):
    return [_lit(b'{"key":"%s","value":{"stringValue":"' % key.encode()), ("s", col or key), _lit(b"}}")]


def _A_F(key: str, col: str | None = None):
    return [
        _lit(b'{"key":"%s","value":{' % key.encode()),
        _alt([_lit(b'"doubleValue":'), ("n", col or key)], [_lit(b'"intValue":"'), ("if", col or key)]),
        _lit(b"}}"),
    ]


_ATTR_BUILDERS = {int: _A_I, float: _A_F, str: _A_S}


def _attr_list(spec, optional=()):
    items, first = [], True
    for key, typ in spec:
        a = _ATTR_BUILDERS[typ](key)
        if key in optional:
            items.append(_opt(_lit(b","), *a))
        else:
            items += ([] if first else [_lit(b",")]) + a
            first = False
    return items


def _compile(items, follow: bytes | None = None):
    """Merge adjacent literals and annotate the template for the quote-indexed matcher.

    Literals become ("lit", bytes, number of quotes in them). A bare number hole ("u"/"n") gets
    the offset of the first quote in the literal that follows it (its end is then found from the
    quote positions), or None when no quote follows directly (then a window scan finds the end).
    """
    merged = []
    for it in items:
        if it[0] == "lit" and merged and merged[-1][0] == "lit":
            merged[-1] = ("lit", merged[-1][1] + it[1])
        else:
            merged.append(it)
    out = []
    for i, it in enumerate(merged):
        tag = it[0]
        nxt = (
            merged[i + 1][1]
            if i + 1 < len(merged) and merged[i + 1][0] == "lit"
            else (follow if i + 1 == len(merged) else None)
        )
        if tag == "lit":
            out.append(("lit", it[1], it[1].count(b'"')))
        elif tag == "opt":
            out.append(("opt", _compile(it[1], nxt)))
        elif tag == "alt":
            out.append(("alt", [_compile(x, nxt) for x in it[1]]))
        elif tag in ("u", "n"):
            d = nxt.find(b'"') if nxt is not None else -1
            out.append((tag, it[1], d if d >= 0 else None))
        elif tag == "flag":
            lit, name = it[1]
            out.append(("flag", (lit, name, lit.count(b'"'))))
        else:
            out.append(it)
    return out


_EVENT_PREFIX = b'{"timeUnixNano":"'
_SPAN_PREFIX = b'{"traceId":"'
_EV_HEAD = _compile([("i", "time"), _lit(b',"name":"'), ("s", "_name")])
_EV_BODIES = {
    "bs": _compile([_lit(b',"attributes":[')] + _attr_list(STEP_ATTRS) + [_lit(b"]}"), ("sep", "sep")]),
    "snap": _compile(
        [_lit(b',"attributes":[')] + _attr_list(SNAPSHOT_ATTRS, SNAPSHOT_OPTIONAL) + [_lit(b"]}"), ("sep", "sep")]
    ),
    "journey": _compile(
        [_lit(b',"attributes":[')]
        + _attr_list(JOURNEY_ATTRS, {"ts.monotonic_ns", "schedule.kind", "finish.status"})
        + [_lit(b"]}"), ("sep", "sep")]
    ),
    "api": _compile(
        [_lit(b',"attributes":[')] + _attr_list(API_ATTRS, {"reason", "error"}) + [_lit(b"]}"), ("sep", "sep")]
    ),
}
_EVENT_NAMES: list[tuple[bytes, str, str]] = (  # (name, body, label)
    [(EV_BATCH.encode(), "bs", EV_BATCH), (EV_SNAPSHOT.encode(), "snap", EV_SNAPSHOT)]
    + [(b"journey." + t.encode(), "journey", "journey." + t) for t in JOURNEY_TYPES]
    + [(b"api." + t.encode(), "api", "api." + t) for t in API_EVENTS]
)
_SPAN_HEAD = _compile(
    [
        ("s", "trace_id"),
        _lit(b',"spanId":"'),
        ("s", "span_id"),
        _opt(_lit(b',"parentSpanId":"'), ("s", "parent_span_id")),
        _opt(_lit(b',"flags":'), ("u", "_flags")),
        _lit(b',"name":"'),
        ("s", "_name"),
    ]
)
_SPAN_COMMON = [
    _lit(b',"kind":'),
    ("u", "_kind"),
    _lit(b',"startTimeUnixNano":"'),
    ("i", "start"),
    _lit(b',"endTimeUnixNano":"'),
    ("i", "end"),
    _lit(b',"attributes":['),
]
_SPAN_BODIES = {
    "step": _compile(
        _SPAN_COMMON
        + _A_I("scheduler.span_sequence", "span_sequence")
        + [_lit(b",")]
        + _A_I("scheduler.step_range_start", "step_range_start")
        + [_lit(b",")]
        + _A_I("scheduler.closure_interval", "closure_interval")
        + [
            _opt(_lit(b","), *_A_I("scheduler.step_range_end", "step_range_end")),
            _lit(b"]"),
            ("flag", (b',"events":[', "has_events")),
        ]
    ),
    "core": _compile(
        _SPAN_COMMON + _A_S("gen_ai.request.id", "request.id") + [_lit(b"]"), ("flag", (b',"events":[', "has_events"))]
    ),
    "api": _compile(
        _SPAN_COMMON
        + _A_S("gen_ai.request.id", "request.id")
        + [
            _opt(_lit(b","), *_A_S("http.route", "_route")),
            _opt(_lit(b","), *_A_S("gen_ai.response.model", "model")),
            _opt(_lit(b","), *_A_I("gen_ai.usage.prompt_tokens", "prompt_tokens")),
            _opt(_lit(b","), *_A_F("gen_ai.request.temperature", "_temperature")),
            _opt(_lit(b","), *_A_F("gen_ai.request.top_p", "_top_p")),
            _opt(_lit(b","), *_A_I("gen_ai.request.max_tokens", "max_tokens")),
            _opt(_lit(b","), *_A_I("gen_ai.request.n", "_n")),
            _lit(b"]"),
            ("flag", (b',"events":[', "has_events")),
        ]
    ),
}
_STATUS_SET = [
    [_lit(b'"code":'), ("u", "status_code"), _lit(b"}")],
    [_lit(b'"message":"'), ("s", "_message"), _opt(_lit(b',"code":'), ("u", "status_code")), _lit(b"}")],
]
_SPAN_TAIL = _compile(
    [
        _alt(
            [_lit(b',"status":{}}')],  # the usual tail, one literal
            [
                _lit(b',"droppedEventsCount":'),
                ("u", "dropped"),
                _lit(b',"status":{'),
                _alt([_lit(b"}")], *_STATUS_SET),
                _lit(b"}"),
            ],
            [_lit(b',"status":{'), _alt(*_STATUS_SET), _lit(b"}")],
        ),
        ("sep", "sep"),
    ]
)
_SPAN_KIND_SCOPE = {"step": SCOPE_STEP, "core": SCOPE_CORE, "api": SCOPE_API}


def _max_quotes(items) -> int:
    """Upper bound of the quotes a template can step over (literals, quoted values, all branches)."""
    n = 0
    for it in items:
        if it[0] == "lit":
            n += it[2]
        elif it[0] in ("i", "if", "s"):
            n += 1
        elif it[0] == "opt":
            n += _max_quotes(it[1])
        elif it[0] == "alt":
            n += max(_max_quotes(x) for x in it[1])
        elif it[0] == "flag":
            n += it[1][2]
    return n


assert 3 + _max_quotes(_EV_HEAD) + max(_max_quotes(t) for t in _EV_BODIES.values()) < _NQSENT
assert 3 + _max_quotes(_SPAN_HEAD) + max(_max_quotes(t) for t in _SPAN_BODIES.values()) < _NQSENT
assert _max_quotes(_SPAN_TAIL) < _NQSENT

# glue between span chains: line start, scope/resource changes, line end (bytes regexes)
_J_S = rb'"[^"\\\x00-\x1f]*"'
_J_NUM = rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
_J_VAL = (
    rb'\{(?:"stringValue":'
    + _J_S
    + rb'|"intValue":(?:"-?[0-9]+"|-?[0-9]+)|"doubleValue":(?:'
    + _J_NUM
    + rb'|"NaN"|"Infinity"|"-Infinity")|"boolValue":(?:true|false))?\}'
)
_J_ATTR = rb'\{"key":' + _J_S + rb',"value":' + _J_VAL + rb"\}"
_J_ATTRS = rb"\[(?:" + _J_ATTR + rb"(?:," + _J_ATTR + rb")*)?\]"
_J_RES = (
    rb'\{"resource":\{(?:"attributes":' + _J_ATTRS + rb'(?:,"droppedAttributesCount":[0-9]+)?'
    rb'|"droppedAttributesCount":[0-9]+)?\},"scopeSpans":\['
)
_J_SCOPE = (
    rb'\{"scope":\{(?:"name":(?P<scope>'
    + _J_S
    + rb')(?:,"version":'
    + _J_S
    + rb')?|"version":'
    + _J_S
    + rb')?\},"spans":\['
)
_J_CLOSE = rb'(?:,"schemaUrl":' + _J_S + rb")?\}"
_JOINT_RES = {
    "start": re.compile(rb'\{"resourceSpans":\[' + _J_RES + _J_SCOPE),
    "mid": re.compile(_J_CLOSE + rb"(?:,|\]" + _J_CLOSE + rb"," + _J_RES + rb")" + _J_SCOPE),
    "end": re.compile(_J_CLOSE + rb"\]" + _J_CLOSE + rb"\]\}"),
}


def _joint(text: bytes, cache: dict):
    """(type, scope name) of a glue text between span chains, or None."""
    r = cache.get(text)
    if r is None:
        r = (None, None)
        for typ, rx in _JOINT_RES.items():
            m = rx.fullmatch(text)
            if m:
                sc = m.groupdict().get("scope")
                r = (typ, sc[1:-1].decode("utf-8") if sc is not None else "")
                break
        cache[text] = r
    return r


class _Scan:
    """A padded chunk as uint8, its quote positions and cached sliding-window views."""

    def __init__(self, a: np.ndarray, n: int):
        self.a, self.n = a, n
        self.q = np.flatnonzero(a[: n + _NQSENT] == 34)  # ends with the padding's sentinel quotes
        self._views: dict[int, np.ndarray] = {}
        self.frags: list = []  # (kind, owner, field, rows, start, length)

    def win(self, pos: np.ndarray, width: int) -> np.ndarray:
        """Rows of ``width`` bytes starting at ``pos`` (a copy, shape (len(pos), width))."""
        v = self._views.get(width)
        if v is None:
            a = self.a
            v = self._views[width] = np.ndarray((len(a) - width + 1, width), np.uint8, buffer=a, strides=(1, 1))
        return v[pos]

    def eq(self, pos: np.ndarray, lit: bytes) -> np.ndarray:
        L = len(lit)
        if not len(pos):
            return np.zeros(0, bool)
        return self.win(pos, L).view(f"S{L}")[:, 0] == lit


class _Cur:
    """Positions of a set of template instances being matched in lock-step.

    ``pos`` is the byte position, ``qi`` the index (into the chunk's quote positions) of the first
    quote at or after ``pos``; a quoted value therefore ends at ``q[qi]`` without scanning.
    """

    def __init__(
        self,
        sc: _Scan,
        owner: str,
        rows: np.ndarray,
        pos: np.ndarray,
        ok: np.ndarray | None = None,
        qi: np.ndarray | None = None,
    ):
        self.sc, self.owner, self.rows = sc, owner, rows
        self.pos = pos.astype(np.int64, copy=True)
        self.qi = np.searchsorted(sc.q, self.pos) if qi is None else qi.astype(np.int64, copy=True)
        self.ok = np.ones(len(pos), bool) if ok is None else ok
        self.flags: dict[str, np.ndarray] = {}

    def sub(self, m: np.ndarray) -> "_Cur":
        return _Cur(self.sc, self.owner, self.rows[m], self.pos[m], self.ok[m], self.qi[m])

    def merge(self, m: np.ndarray, c: "_Cur") -> None:
        self.pos[m] = c.pos
        self.qi[m] = c.qi
        self.ok[m] = c.ok
        for k, v in c.flags.items():
            f = self.flags.setdefault(k, np.zeros(len(self.pos), v.dtype))
            f[m] = v

    def run(self, items) -> None:
        sc = self.sc
        for it in items:
            if not len(self.pos):
                return
            tag = it[0]
            if tag == "lit":
                self.ok &= sc.eq(self.pos, it[1])
                self.pos += len(it[1])
                if it[2]:
                    self.qi += it[2]
            elif tag in ("i", "if", "s"):  # quoted value: ends at the next quote
                end = sc.q[self.qi]
                self._frag(tag, it[1], self.pos, end - self.pos)  # pos is rebound below, not mutated
                self.pos = end + 1
                self.qi += 1
            elif tag in ("u", "n"):  # bare number
                if it[2] is not None:
                    end = sc.q[self.qi] - it[2]
                    L = end - self.pos
                    self.ok &= (L > 0) & (L <= 32)
                else:
                    L = self._scan_number()
                L = np.clip(L, 0, 32)
                self._frag(tag, it[1], self.pos, L)
                self.pos = self.pos + L
            elif tag == "opt":  # the probe is the block's first literal: matched rows skip it
                probe = it[1][0]
                m = sc.eq(self.pos, probe[1])
                if m.all():  # every row has it: no sub-cursor
                    self._skip(probe)
                    self.run(it[1][1:])
                elif m.any():
                    c = self.sub(m)
                    c._skip(probe)
                    c.run(it[1][1:])
                    self.merge(m, c)
            elif tag == "alt":
                left = None  # rows not matched yet (None: all)
                for alt in it[1]:
                    if left is None:
                        m = sc.eq(self.pos, alt[0][1])
                        if m.all():
                            self._skip(alt[0])
                            self.run(alt[1:])
                            break
                    else:
                        idx = np.flatnonzero(left)
                        if not idx.size:
                            break
                        m = np.zeros(len(self.pos), bool)
                        m[idx[sc.eq(self.pos[idx], alt[0][1])]] = True
                    if m.any():
                        c = self.sub(m)
                        c._skip(alt[0])
                        c.run(alt[1:])
                        self.merge(m, c)
                    left = ~m if left is None else left & ~m
                else:
                    if left is not None:
                        self.ok &= ~left
            elif tag == "flag":
                lit, name, nq = it[1]
                m = sc.eq(self.pos, lit)
                self.pos[m] += len(lit)
                self.qi[m] += nq
                self.flags[name] = m
            elif tag == "sep":
                w = sc.a[self.pos]
                is_last = w == 93  # ']'
                self.ok &= is_last | (w == 44)  # ','
                self.flags["last"] = is_last
                self.pos += 1

    def _skip(self, lit_item) -> None:
        """Advance over a literal already verified (an opt/alt probe)."""
        self.pos += len(lit_item[1])
        self.qi += lit_item[2]

    def _frag(self, kind: str, name: str, start, length) -> None:
        self.sc.frags.append((kind, self.owner, name, self.rows, start, length))

    def _scan_number(self) -> np.ndarray:
        """Length of the run of number characters at pos (for a number not followed by a quote)."""
        W = self.sc.win(self.pos, 33)
        cls = ((W - 48) < 10) | (W == 45) | (W == 43) | (W == 46) | (W == 101) | (W == 69)
        L = cls.argmin(1)
        self.ok &= (L > 0) & ~cls[np.arange(len(W)), L]
        return L
