"""KV-cache blocks with prefix caching, as vLLM v1's BlockPool / FreeKVCacheBlockQueue.

``total_blocks`` blocks of 16 tokens (ids 1..total; 0 is vLLM's null block) in one LRU free
queue: freed blocks go to the tail (a request's last block first), allocation pops the head
and evicts the cached hash it carried. Full blocks are hashed when computed; a lookup hits
whole blocks from the start of the prompt, capped at (tokens − 1).
"""

from __future__ import annotations

from collections import OrderedDict

from stepml_core.sim.request import BLK_STRIDE, GROUP_BASE, OUT_BASE, PROMPT_BASE, SimRequest

BLOCK_TOKENS = 16


class BlockPool:
    __slots__ = ("total", "free_q", "ref", "bkey", "cache")

    def __init__(self, total_blocks: int):
        self.total = int(total_blocks)
        self.free_q = OrderedDict.fromkeys(range(1, self.total + 1))
        self.ref = [0] * (self.total + 1)
        self.bkey = [None] * (self.total + 1)
        self.cache = {}

    def free(self, R: SimRequest) -> None:
        """Release R's blocks (cached content stays reusable until the block is reallocated)."""
        fq, ref = self.free_q, self.ref
        for bid in reversed(R.blist):
            r = ref[bid] - 1
            ref[bid] = r
            if r == 0:
                fq[bid] = None
        R.blist = []
        R.nhashed = 0

    def allocate(self, R: SimRequest, n: int) -> None:
        """Append n fresh blocks to R (the caller checked that n are free)."""
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

    def register(self, R: SimRequest, upto_tokens: int) -> None:
        """Hash R's full blocks covering its first `upto_tokens` tokens."""
        nfull = upto_tokens // BLOCK_TOKENS
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

    def lookup(self, R: SimRequest, tokens: int) -> list[int]:
        """Prefix-cache hit blocks for R's first `tokens` tokens (whole blocks, at most tokens − 1)."""
        get = self.cache.get
        hits: list[int] = []
        n = (tokens - 1) // BLOCK_TOKENS
        # R.key(k) by span: shared system-prompt blocks [0, a), the prompt's own blocks [a, b), its output blocks
        # [b, n); each span's keys looked up at once, the hits kept up to the first miss
        a = min(R.nshared_blk, n)
        b = max(a, min(R.prompt_full_blk, n))
        for base, lo, hi in (
            (GROUP_BASE + R.group * BLK_STRIDE, 0, a),
            (PROMPT_BASE + R.prompt_id * BLK_STRIDE, a, b),
            (OUT_BASE + R.idx * BLK_STRIDE, b, n),
        ):
            if lo >= hi:
                continue
            found = list(map(get, range(base + lo, base + hi)))
            if None in found:
                hits += found[: found.index(None)]
                return hits
            hits += found
        return hits

    def take_hits(self, R: SimRequest, hits: list[int]) -> None:
        """R starts with the hit blocks (ref-counted; a free cached block leaves the free queue)."""
        fq, ref = self.free_q, self.ref
        for b in hits:
            if ref[b] == 0:
                del fq[b]
            ref[b] += 1
        R.blist = list(hits)
        R.nhashed = len(hits)

    @property
    def free_blocks(self) -> int:
        return len(self.free_q)
