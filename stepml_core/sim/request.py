"""One request inside the simulated engine (vLLM v1 ``Request``), with the bookkeeping the
incremental scheduler needs. See docs/simulator.md for the state machine.

States: WAITING → PREFILL (admitted; prompt chunks being computed) → DECODE (one token per
step) → DONE; a preempted request goes back to WAITING (recompute) and a request whose last
token is in flight when it is preempted becomes a ZOMBIE until that token's update.
"""

from __future__ import annotations

WAITING, PREFILL, DECODE, DONE, ZOMBIE = 0, 1, 2, 3, 4
EV_QUEUED, EV_SCHEDULED, EV_FIRST_TOKEN, EV_PREEMPTED, EV_FINISHED = 0, 1, 2, 3, 4
# Prefix-cache block keys: space base + id × BLK_STRIDE + block. A request has fewer than BLK_STRIDE blocks (2^24
# blocks = 2^28 tokens; the request log allows 2^20 prompt and 2^20 output tokens) and ids stay below MAX_KEY_ID, so
# keys of different prompts, groups and outputs never meet (a stride of 1,024 blocks let prompts over 16,384 tokens
# run into the next prompt's keys: false cache hits).
BLK_STRIDE = 1 << 24
MAX_KEY_ID = 1 << 28
OUT_BASE, PROMPT_BASE, GROUP_BASE = 0, BLK_STRIDE * MAX_KEY_ID, 2 * BLK_STRIDE * MAX_KEY_ID


class SimRequest:
    """A request: prompt identity (for prefix caching), lengths, scheduler state, emitted events.

    Token counts are tokens; times are seconds on the engine's monotonic clock (``*_s``) or
    nanoseconds (``*_ns``). ``computed`` = tokens in KV (progress index); for a decoder the
    context at step N is ``c0 + (N − s0)`` (``c0`` tokens when its decode began at step ``s0``).
    """

    __slots__ = (
        "idx",
        "prompt_id",
        "group",
        "prompt_len",
        "max_tokens",
        "state",
        "seq",
        "computed",
        "target",
        "blist",
        "nhashed",
        "lazy_out_keys",
        "hit_blk",
        "cached_tokens",
        "first_sched",
        "out_base",
        "F",
        "s0",
        "c0",
        "dver",
        "fver",
        "npre",
        "prefill_hw",
        "events",
        "segments",
        "sched_q",
        "sched_step",
        "computed_before",
        "nshared_blk",
        "prompt_full_blk",
        "finish_status",
        "finish_step",
        "finish_ns",
        "api_arrival",
        "visible",
        "first_token_step",
        "api_abort",
        "client_timeout",
    )

    def __init__(self, idx: int, prompt_id: int, group: int, prompt_len: int, max_tokens: int, nshared_blk: int):
        if not (0 <= idx < MAX_KEY_ID and 0 <= prompt_id < MAX_KEY_ID and 0 <= group < MAX_KEY_ID):
            raise ValueError(f"request {idx}: ids (prompt {prompt_id}, group {group}) outside 0..{MAX_KEY_ID - 1}")
        if prompt_len + max_tokens >= 16 * BLK_STRIDE:
            raise ValueError(f"request {idx}: {prompt_len} + {max_tokens} tokens, over {16 * BLK_STRIDE}")
        self.idx = idx
        self.prompt_id = prompt_id
        self.group = group
        self.prompt_len = prompt_len
        self.max_tokens = max_tokens
        self.state = WAITING
        self.seq = -1  # admission order (preemption frees the most recently admitted)
        self.computed = 0
        self.target = prompt_len  # tokens to compute before decoding (prompt + recomputed output)
        self.blist = []  # KV block ids, in order
        self.nhashed = 0  # full blocks registered in the prefix cache
        # this decode segment's full output blocks are registered only if the request is preempted (engine.py,
        # _allocate_decode_blocks): only the request itself can hit its own output keys
        self.lazy_out_keys = False
        self.hit_blk = 0
        self.cached_tokens = -1  # prefix-cache hit tokens at first admission
        self.first_sched = True
        self.out_base = 0  # output tokens generated before the current decode segment
        self.F = -1  # step whose prefill chunk completed the current segment
        self.s0 = -1  # first decode step of the current segment
        self.c0 = 0
        self.dver = 0  # version counters: stale entries in the step-keyed queues are skipped
        self.fver = 0
        self.npre = 0
        self.prefill_hw = 0
        self.events = []
        self.segments = []  # (F, tokens) per decode segment: token k of a segment is emitted by step F + k
        self.sched_q = 0
        self.sched_step = -1
        self.computed_before = 0
        self.nshared_blk = nshared_blk
        self.prompt_full_blk = prompt_len // 16
        self.finish_status = None
        self.finish_step = -1
        self.finish_ns = -1
        self.api_arrival = 0.0  # s, engine clock: reaches the API server (0.0 = not yet known)
        self.visible = 0.0  # s: enters the engine's WAITING queue
        self.first_token_step = -1
        self.api_abort = 0.0
        self.client_timeout = False

    def key(self, k: int) -> int:
        """Prefix-cache key of block k: shared system prompt per group, then prompt, then own output."""
        if k < self.nshared_blk:
            return GROUP_BASE + self.group * BLK_STRIDE + k
        if k < self.prompt_full_blk:
            return PROMPT_BASE + self.prompt_id * BLK_STRIDE + k
        return OUT_BASE + self.idx * BLK_STRIDE + k
