"""Prefix-cache hits of episodes: the evidence from REQUEST_SNAPSHOTs and BATCH_SUMMARY totals, the prior for
the rest, and one pass of the token budget over all episodes (:func:`_chunk_pass`) with the repairs of misfits
(order of preference: :mod:`stepml_core.tables.reconstruct`'s docstring, *Prefix-cache hit*).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

# ----------------------------------------------------------------------------- snapshot evidence

DEFAULT_BLOCK_SIZE = 16


def infer_block_size(snapshots: pl.DataFrame | None, default: int = DEFAULT_BLOCK_SIZE) -> int:
    """KV block size from snapshots: (prompt − effective_prompt_len) / blocks_cached, the mode."""
    if snapshots is None or not snapshots.height or "request.effective_prompt_len" not in snapshots.columns:
        return default
    x = snapshots.filter(
        (pl.col("kv.blocks_cached_gpu") > 0)
        & pl.col("request.effective_prompt_len").is_not_null()
        & (pl.col("request.num_preemptions") == 0)
    ).select(
        bs=(pl.col("request.num_prompt_tokens") - pl.col("request.effective_prompt_len"))
        / pl.col("kv.blocks_cached_gpu")
    )
    x = x.filter((pl.col("bs") == pl.col("bs").round()) & (pl.col("bs") >= 1))
    if not x.height:
        return default
    return int(x["bs"].cast(pl.Int64).mode().sort()[0])


def _snapshot_evidence(episodes: pl.DataFrame, req: pl.DataFrame, snapshots: pl.DataFrame | None, bs: int) -> dict:
    """Per-episode arrays: h from effective_prompt_len / blocks_cached, first in-prefill snapshot (t, c),
    completion step from a decode-phase snapshot."""
    n = episodes.height
    out = {
        "h_eff": np.full(n, -1, np.int64),
        "h_blk": np.full(n, -1, np.int64),
        "tb": np.full(n, -1, np.int64),
        "cb": np.full(n, -1, np.int64),
        "F_snap": np.full(n, -1, np.int64),
    }
    if snapshots is None or not snapshots.height or not n:
        return out
    sn = (
        snapshots.select(
            pl.col("step.id").cast(pl.Int64).alias("t"),
            pl.col("request.id").cast(pl.Utf8),
            pl.col("request.num_computed_tokens").cast(pl.Int64).alias("c"),
            pl.col("kv.blocks_cached_gpu").cast(pl.Int64).alias("blk"),
            (
                pl.col("request.effective_prompt_len").cast(pl.Int64)
                if "request.effective_prompt_len" in snapshots.columns
                else pl.lit(None, dtype=pl.Int64)
            ).alias("eff"),
        )
        .drop_nulls(["t", "request.id"])
        .join(req.select("rid", "request.id"), on="request.id", how="inner")
    )
    if not sn.height:
        return out
    ep = episodes.with_row_index("ei").select("ei", "rid", "s", "E", "F", "target", "episode", "prompt_len")
    sn = (
        sn.sort(["t"])
        .join_asof(ep.sort(["s"]), left_on="t", right_on="s", by="rid", strategy="backward", check_sortedness=False)
        .filter(pl.col("ei").is_not_null() & (pl.col("t") <= pl.col("E")))
    )
    # effective_prompt_len: hit at first scheduling → first episode of the request
    eff = (
        sn.filter(pl.col("eff").is_not_null())
        .group_by("rid")
        .agg(pl.col("eff").first())
        .join(ep.filter(pl.col("episode") == 1).select("ei", "rid", "prompt_len"), on="rid", how="inner")
    )
    if eff.height:
        out["h_eff"][eff["ei"].to_numpy()] = (eff["prompt_len"] - eff["eff"]).to_numpy()
    blk = sn.filter(pl.col("blk").is_not_null()).group_by("ei").agg(pl.col("blk").first())
    if blk.height:
        out["h_blk"][blk["ei"].to_numpy()] = blk["blk"].to_numpy() * bs
    # in-prefill snapshot: c < target (and t <= F when F is known)
    inpf = sn.filter((pl.col("c") < pl.col("target")) & ((pl.col("F") < 0) | (pl.col("t") <= pl.col("F"))))
    inpf = inpf.group_by("ei").agg(pl.col("t").first(), pl.col("c").first())
    if inpf.height:
        idx = inpf["ei"].to_numpy()
        out["tb"][idx], out["cb"][idx] = inpf["t"].to_numpy(), inpf["c"].to_numpy()
    dec = (
        sn.filter(pl.col("c") >= pl.col("target"))
        .group_by("ei")
        .agg(F_snap=(pl.col("t") - 1 - (pl.col("c") - pl.col("target"))).first())
    )
    if dec.height:
        out["F_snap"][dec["ei"].to_numpy()] = dec["F_snap"].to_numpy()
    return out


class _HitPrior:
    """Fallback estimate of a prefix-cache hit from the hits known for other episodes.

    First admissions: the most frequent known first hit among requests with the same prompt
    length, else the median known hit as a fraction of the maximum hit ``bs·⌊(T−1)/bs⌋``.
    Re-admissions after preemption: the most frequent known resume hit among resumes with the
    same prompt length, else the first-admission mode, else the whole prompt (its blocks are
    shared with other requests, so they are likely still cached; how much of the request's
    own output survives depends on eviction and is not predictable from the trace). Rounded down to whole blocks, clipped to the bounds the step's
    budget allows.
    """

    def __init__(
        self, prompt: np.ndarray, target: np.ndarray, hits: np.ndarray, bs: int, resume: np.ndarray | None = None
    ):
        self.bs = bs
        self.prompt, self.target = prompt, target
        n = len(prompt)
        self.resume = np.zeros(n, bool) if resume is None else np.asarray(resume, bool)
        hmax = bs * np.maximum((target - 1) // bs, 0)
        self.hmax = hmax
        ok = (hits >= 0) & (hmax > 0)
        frac = np.where(ok, hits / np.maximum(hmax, 1), 0.0)
        self.by_len: dict[int, int] = {}
        self.frac = 0.0
        first = ok & ~self.resume
        self.by_len = self._modes(prompt[first], hits[first])
        if first.any():
            self.frac = float(np.median(frac[first]))
        self.res_by_len = self._modes(prompt[ok & self.resume], hits[ok & self.resume])

    @staticmethod
    def _modes(p: np.ndarray, h: np.ndarray) -> dict[int, int]:
        """Most frequent hit per prompt length (ties → the larger)."""
        out: dict[int, int] = {}
        if not len(p):
            return out
        order = np.lexsort((h, p))
        p, h = p[order], h[order]
        keys, starts = np.unique(p, return_index=True)
        bounds = list(starts[1:]) + [len(p)]
        for k, a, b in zip(keys.tolist(), starts.tolist(), bounds):
            vals, cnt = np.unique(h[a:b], return_counts=True)
            out[int(k)] = int(vals[np.flatnonzero(cnt == cnt.max())[-1]])
        return out

    def raw(self, e: int) -> int:
        bs, hmax = self.bs, int(self.hmax[e])
        if self.resume[e]:
            h = self.res_by_len.get(int(self.prompt[e]), self.by_len.get(int(self.prompt[e])))
            if h is None or h > hmax:
                h = bs * max((int(self.prompt[e]) - 1) // bs, 0)  # the prompt's blocks are shared, likely still cached
            return int(min(h, hmax))
        h = self.by_len.get(int(self.prompt[e]))
        if h is None or h > hmax:
            h = int(self.frac * hmax) // bs * bs
        return int(h)

    def clip(self, e: int, h: int, lo: int, hi: int) -> int:
        bs, hmax = self.bs, int(self.hmax[e])
        lo_b = -(-max(lo, 0) // bs) * bs
        hi_b = (min(hi, hmax) // bs) * bs
        if lo_b <= hi_b:
            h = min(max(h, lo_b), hi_b)
        elif hi >= 0:
            h = min(h, max(hi, 0))  # no whole-block value fits: keep the chunk consistent
        return int(max(0, min(h, max(hmax, 0))))

    def __call__(self, e: int, lo: int, hi: int) -> int:
        return self.clip(e, self.raw(e), lo, hi)


@dataclass
class _PassInput:
    B: int
    bs: int
    order: list
    s: list
    E: list
    target: list
    incomplete: list
    tb: list
    cb: list
    end_hw: list
    totals: np.ndarray


@dataclass
class _PassResult:
    rows: tuple
    h: list
    hsrc: list
    F: list
    violations: list  # (episode, kind, amount, first step, last step): kind -1 = chunks before too large
    est_at: dict  # step -> episodes whose estimated hit sets their chunk there
    rank: dict
    n_solved: int


def _chunk_pass(
    ctx: _PassInput, used0: np.ndarray, F: list, h: list, hsrc: list, prior: _HitPrior, overrides: dict
) -> _PassResult:
    """Prefill/recompute chunks of every episode in admission order (see the module docstring)."""
    B = ctx.B
    used = used0.copy()
    F, h, hsrc = list(F), list(h), list(hsrc)
    S, EE, TT, INC, TB, CB = ctx.s, ctx.E, ctx.target, ctx.incomplete, ctx.tb, ctx.cb
    adm_at: dict[int, list[int]] = {}
    rank = {}
    for i, e in enumerate(ctx.order):
        adm_at.setdefault(S[e], []).append(e)
        rank[e] = i
    r_t, r_e, r_d, r_q = [], [], [], []  # chunk rows: step, episode, tokens done before, tokens
    viol: list = []
    est_at: dict[int, list[int]] = {}
    n_solved = 0
    for e in ctx.order:
        t, Fe, Ee, Te = S[e], F[e], EE[e], TT[e]
        he, src = h[e], hsrc[e]
        if e in overrides:
            he, src = overrides[e], 5
        done = 0
        last = Fe if Fe >= 0 else Ee
        inc = INC[e]
        while t <= last:
            avail = max(B - int(used[t]), 0)
            if TB[e] == t:  # exact progress seen in a snapshot
                he, src = CB[e] - done, 1
            if inc or (Fe >= 0 and t < Fe):
                q = avail
            elif Fe >= 0:  # the completing step
                lo, hi = Te - done - avail, Te - done - 1
                if he < 0:
                    hh = _hit_from_step_total(ctx, e, t, done, used, adm_at.get(t, []), F, h, overrides)
                    if hh is not None:
                        he, src = hh, 4
                        n_solved += 1
                    if he < 0:
                        he, src = prior(e, lo, hi), 5
                elif src == 5:
                    he = prior.clip(e, he, lo, hi)
                q = Te - he - done
                if src == 5:
                    est_at.setdefault(t, []).append(e)
                elif q < 1:
                    viol.append((e, -1, 1 - q, S[e], t - 1))
                elif q > avail:
                    viol.append((e, 1, q - avail, S[e], t))
                q = max(q, 1)
            else:  # completion step unknown: simulate
                if he < 0:
                    he, src = prior(e, 0, Te - done - 1), 5
                rem = max(Te - he - done, 1)
                q = rem if rem < avail else avail
                if q == rem:
                    F[e] = Fe = last = t
                    if src == 5:
                        est_at.setdefault(t, []).append(e)
                    if Ee > t:
                        used[t + 1 : Ee + 1] += 1
            if q > 0:
                r_t.append(t)
                r_e.append(e)
                r_d.append(done)
                r_q.append(q)
                used[t] += q
                done += q
            t += 1
        if ctx.end_hw[e] >= 0 and Fe < 0:  # stopped inside the prompt: its high-water mark gives the hit
            he, src = ctx.end_hw[e] - done, 6
        if he < 0:  # never needed for a chunk (preempted before completing): still needed for c
            he, src = prior(e, 0, Te - done - 1), 5
        elif inc and src != 5 and done >= Te - he:
            viol.append((e, -1, done - (Te - he - 1), S[e], EE[e]))
        h[e], hsrc[e] = he, src
    return _PassResult((r_t, r_e, r_d, r_q), h, hsrc, F, viol, est_at, rank, n_solved)


def _hit_from_step_total(
    ctx: _PassInput, e: int, t: int, done: int, used: np.ndarray, admitted_at_t: list, F: list, h: list, overrides: dict
) -> int | None:
    """The prefix-cache hit of episode e completing at step t that makes step t's tokens equal BATCH_SUMMARY's
    total (block-aligned, leaving at least one token to compute), when the step was sampled and every episode
    admitted after e at t completes there with a known hit; else None."""
    tot = int(ctx.totals[t]) if t < len(ctx.totals) else -1
    if tot < 0:
        return None
    later = admitted_at_t[admitted_at_t.index(e) + 1 :] if e in admitted_at_t else []
    extra = 0
    for j in later:
        if F[j] != t or h[j] < 0 or ctx.tb[j] >= 0 or j in overrides:
            return None
        extra += ctx.target[j] - h[j]
    qq = tot - int(used[t]) - extra
    hh = ctx.target[e] - done - qq
    return hh if 1 <= qq and 0 <= hh <= ctx.target[e] - 1 and hh % ctx.bs == 0 else None


def _repairs(res: _PassResult, ctx: _PassInput) -> dict:
    """New hits for estimated episodes that explain misfits of reliable ones (one per misfit)."""
    bs = ctx.bs
    new: dict[int, int] = {}
    for e, kind, amount, t0, t1 in res.violations:
        k = -(-int(amount) // bs) * bs
        best = None
        for t in range(t1, t0 - 1, -1):
            for j in res.est_at.get(t, ()):
                if res.rank[j] >= res.rank[e] or j in new:
                    continue
                hj = res.h[j]
                hmax = bs * max((ctx.target[j] - 1) // bs, 0)
                cand = hj - k if kind < 0 else hj + k
                if 0 <= cand <= hmax:
                    best = (j, cand)
                    break
            if best:
                break
        if best:
            new[best[0]] = best[1]
    return new
