"""Values out of matched lines: the byte ranges the matcher recorded turned into typed Arrow columns (strings
gathered, numbers parsed and checked to be JSON numbers), and a table's columns in schema order.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from stepml_core.traces.schema import _ARROW, _INTERNAL, F64, I64, TABLE_SCHEMAS
from stepml_core.traces.templates import _Scan


def _gather_strings(a: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> pa.Array:
    """The byte ranges [start, start+len) of the chunk as one Arrow large_string array."""
    n = len(starts)
    lens = lens.astype(np.int64)
    offs = np.zeros(n + 1, np.int64)
    np.cumsum(lens, out=offs[1:])
    idx = np.repeat(starts - offs[:-1], lens) + np.arange(offs[-1])
    return pa.Array.from_buffers(pa.large_utf8(), n, [None, pa.py_buffer(offs), pa.py_buffer(a[idx])])


def _json_numbers_ok(s: pa.Array) -> np.ndarray:
    """Which strings of ``s`` (already parsed as finite floats) are JSON numbers
    (-?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?): the float parser also takes '+1', '.5', '5.',
    '01', '1.e3'. Checks first/last characters, leading zeros and the neighbours of '.', 'e', signs."""
    n = len(s)
    if not n:
        return np.zeros(0, bool)
    offs = np.frombuffer(s.buffers()[1], np.int64, n + 1, s.offset * 8)
    buf = np.frombuffer(s.buffers()[2], np.uint8)
    st, en = offs[:-1], offs[1:]
    ok = en > st
    c = np.concatenate([buf, np.zeros(2, np.uint8)])  # room to look one past the end
    dig = (c - 48) < 10
    f0 = c[st]
    neg = f0 == 45
    fd = st + neg  # first digit
    ok &= dig[fd] & (fd < en)
    ok &= ~((c[fd] == 48) & (fd + 1 < en) & dig[fd + 1])  # no leading zeros
    ok &= dig[np.maximum(en - 1, 0)]  # ends with a digit
    special = np.flatnonzero((c == 46) | (c == 101) | (c == 69) | (c == 43) | (c == 45))
    if special.size:
        owner = np.searchsorted(en, special, side="right")  # value that holds each character
        inside = owner < n
        inside[inside] = special[inside] >= st[owner[inside]]
        special, owner = special[inside], owner[inside]
        ch = c[special]
        at_start = special == st[owner]
        prev_dig = dig[special - 1] & ~at_start
        nxt = c[special + 1]
        next_dig = dig[special + 1] & (special + 1 < en[owner])
        is_e = (ch == 101) | (ch == 69)
        is_sign = (ch == 43) | (ch == 45)
        prev_e = ((c[special - 1] == 101) | (c[special - 1] == 69)) & ~at_start
        good = np.where(
            ch == 46,
            prev_dig & next_dig,
            np.where(
                is_e,
                prev_dig & (next_dig | (((nxt == 43) | (nxt == 45)) & (special + 2 < en[owner]) & dig[special + 2])),
                np.where(is_sign, (at_start & (ch == 45)) | (prev_e & next_dig), True),
            ),
        )
        ok[owner[~good]] = False
        # at most one '.', one exponent, and the '.' before the exponent
        dots = np.bincount(owner[ch == 46], minlength=n)
        exps = np.bincount(owner[is_e], minlength=n)
        ok &= (dots <= 1) & (exps <= 1)
        if (dots & exps).any():
            dpos = np.full(n, -1, np.int64)
            dpos[owner[ch == 46]] = special[ch == 46]
            epos = np.full(n, -1, np.int64)
            epos[owner[is_e]] = special[is_e]
            ok &= ~((dpos >= 0) & (epos >= 0) & (dpos > epos))
    return ok


def _parse_numbers(s: pa.Array, typ) -> tuple[np.ndarray, np.ndarray]:
    """Arrow strings -> (values, parsed) with a strict cast; a failing batch is redone per value."""
    try:
        v = pc.cast(s, typ)
        return v.to_numpy(zero_copy_only=False), np.ones(len(s), bool)
    except pa.ArrowInvalid:
        v = pl.from_arrow(s).cast(I64 if typ == pa.int64() else F64, strict=False)
        ok = ~v.is_null().to_numpy()
        return v.fill_null(0).to_numpy(), ok


class _Fields:
    """Values of the matched holes: numbers as numpy arrays, strings as Arrow arrays.

    A hole is *bad* where the general path would not read a clean value from it (overflow, a
    leading '+', leading zeros in a bare number, a double that is not a finite JSON number); the
    lines of bad rows go to the general path.
    """

    def __init__(self, sc: _Scan, sizes: dict[str, int]):
        self.sizes = sizes
        self.bad_rows: dict[str, list] = {}
        self.num: dict[tuple[str, str], list] = {}
        self.txt: dict[tuple[str, str], list] = {}
        by_kind: dict[str, list] = {}
        for fr in sc.frags:
            if fr[0] == "s" and fr[2][0] == "_":  # string checked at line level, value not needed
                continue
            if len(fr[3]):
                by_kind.setdefault(fr[0], []).append(fr)
        a = sc.a
        for kind, frs in by_kind.items():
            starts = np.concatenate([f[4] for f in frs])
            lens = np.concatenate([f[5] for f in frs])
            s = _gather_strings(a, starts, lens)
            bad = None
            if kind == "s":
                vals = s
            elif kind == "n":
                vals, ok = _parse_numbers(s, pa.float64())
                ok &= np.isfinite(vals)
                ok &= _json_numbers_ok(s)
                bad = ~ok
            else:  # quoted integers (i, if) and bare unsigned integers (u)
                vals, ok = _parse_numbers(s, pa.int64())
                first = a[starts]
                if kind == "u":
                    ok &= ((first - 48) < 10) & ~((first == 48) & (lens > 1))
                else:
                    ok &= first != 43  # '+': not an integer to the general path
                if kind == "if":
                    vals = vals.astype(np.float64)
                bad = ~ok
            store = self.txt if kind == "s" else self.num
            off = 0
            for f in frs:
                k = len(f[3])
                if bad is not None:
                    b = bad[off : off + k]
                    if b.any():
                        self.bad_rows.setdefault(f[1], []).append(f[3][b])
                store.setdefault((f[1], f[2]), []).append((f[3], vals[off : off + k]))
                off += k

    def number(self, owner: str, name: str, dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
        """(values, present) over all rows of ``owner``."""
        n = self.sizes[owner]
        vals = np.zeros(n, dtype)
        valid = np.zeros(n, bool)
        for rows, v in self.num.get((owner, name), ()):
            vals[rows] = v
            valid[rows] = True
        return vals, valid

    def text(self, owner: str, name: str) -> pa.Array:
        """A string field over all rows of ``owner`` (null where absent)."""
        n = self.sizes[owner]
        ps = self.txt.get((owner, name))
        if not ps:
            return pa.nulls(n, pa.large_string())
        if len(ps) == 1 and len(ps[0][0]) == n:
            return ps[0][1]
        vals = pa.concat_arrays([p[1] for p in ps])
        idx = np.full(n, -1, np.int64)
        idx[np.concatenate([p[0] for p in ps])] = np.arange(len(vals))
        return vals.take(_nullable_index(idx))


def _nullable_index(idx: np.ndarray) -> pa.Array:
    """An Arrow index array, null where ``idx`` < 0 (take gives null there)."""
    return pa.array(idx, mask=idx < 0) if (idx < 0).any() else pa.array(idx)


def _columns(table: str, cols: dict, n: int) -> dict[str, pa.Array]:
    """A table's columns in schema order as Arrow arrays, from numpy (values, present) pairs,
    numpy arrays or Arrow arrays; absent columns are all null."""
    out = {}
    for c, dt in {**TABLE_SCHEMAS[table], **_INTERNAL.get(table, {})}.items():
        spec = cols.get(c)
        typ = _ARROW[dt]
        if spec is None:
            out[c] = pa.nulls(n, typ)
        elif isinstance(spec, tuple):
            vals, valid = spec
            out[c] = pa.array(vals, typ) if valid.all() else pa.array(vals, typ, mask=~valid)
        elif isinstance(spec, np.ndarray):
            out[c] = pa.array(spec, typ)
        else:
            out[c] = spec if spec.type == typ else spec.cast(typ)
    return out


def _ffill_index(has: np.ndarray) -> np.ndarray:
    """For each position the index of the last True at or before it (-1 if none)."""
    idx = np.where(has, np.arange(len(has)), -1)
    return np.maximum.accumulate(idx) if len(idx) else idx
