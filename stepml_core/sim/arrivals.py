"""When requests reach the engine and when their clients give up (docs/simulator.md).

An arrivals object tells the engine, for every request, ``api_arrival`` (s, engine clock: the
request reaches the API server), the ingress delay until it enters WAITING
(``ingress_s(request, api_tokens_per_s)``), and when a client timeout aborts it (pushed on the
engine's abort heap); ``on_done`` lets it react to finished requests.

* :class:`StagedArrivals` — the synthesizer's inference-perf client: constant-rate stages
  where stage k+1 starts when stage k has completed, client → API latency, API → engine
  ingress that grows with prompt length and the API server's streaming load;
* :class:`FixedArrivals` — replay of a real request log: each request arrives at its recorded
  time; the ingress delay is a function of the prompt length (a step model's queueing time).
"""

from __future__ import annotations

import heapq

import numpy as np


class StagedArrivals:
    """inference-perf stages as the synthesizer models them (stage gaps, API latencies from engine_params.json)."""

    def __init__(self, wl, params: dict, model: str, rng: np.random.Generator, mono0: float):
        api = params["api"]
        n_req = len(wl.send_time)
        self.mono0 = mono0
        self.wl = wl
        self.c2a_s = (rng.uniform(*api["client_to_api_ms"], n_req) * 1e-3).tolist()
        self.abort_lag_s = (rng.uniform(*api["abort_to_engine_ms"], n_req) * 1e-3).tolist()
        self.stage_of = wl.stage.tolist()
        stage0 = [b[0] for b in wl.stage_bounds]
        # client start within its stage: absolute starts are known only as the run unfolds
        self.rel_s = [float(wl.start_time[i]) - stage0[self.stage_of[i]] for i in range(n_req)]
        n_st = len(wl.stage_bounds)
        self.stage_start = [0.0] + [None] * (n_st - 1)
        self.stage_left = [0] * n_st
        for k in self.stage_of:
            self.stage_left[k] += 1
        glo, ghi = api.get("stage_gap_s", [0.5, 1.5])
        self.stage_gap_s = rng.uniform(glo, ghi, max(1, n_st)).tolist()
        self.start_abs = [0.0] * n_req  # client start, s from run start (filled when the stage starts)
        self.stage_idx = [[] for _ in range(n_st)]
        for i, k in enumerate(self.stage_of):
            self.stage_idx[k].append(i)
        self.timeout_s = wl.timeout_s.tolist()
        ing_base = api["api_to_engine_base_ms"] * 1e-3
        ing_base += params["models"][model].get("api_ingress_ms", 0.0) * 1e-3
        self.ing_base_s = ing_base
        self.ing_per_tok_s = api["api_to_engine_per_1k_prompt_ms"] * 1e-6
        self.ing_per_tps_s = api.get("api_to_engine_per_1k_tokens_per_s_ms", 0.0) * 1e-6  # s per (token/s)

    def start(self, engine) -> None:
        self._start_stage(engine, 0)

    def _start_stage(self, engine, k: int) -> None:
        s0 = self.stage_start[k]
        reqs, mono0 = engine.reqs, self.mono0
        for i in self.stage_idx[k]:
            st = s0 + self.rel_s[i]
            self.start_abs[i] = st
            reqs[i].api_arrival = mono0 + st + self.c2a_s[i]
            reqs[i].api_abort = mono0 + st + self.timeout_s[i] + self.c2a_s[i]
            heapq.heappush(engine.abort_heap, (mono0 + st + self.timeout_s[i] + self.c2a_s[i] + self.abort_lag_s[i], i))

    def ingress_s(self, R, api_tokens_per_s: float) -> float:
        return self.ing_base_s + self.ing_per_tok_s * R.prompt_len + self.ing_per_tps_s * api_tokens_per_s

    def on_done(self, engine, R, t: float) -> None:
        """When a stage's last request is done, the next stage starts (after the client's gap)."""
        k = self.stage_of[R.idx]
        self.stage_left[k] -= 1
        if self.stage_left[k] == 0 and k + 1 < len(self.stage_left) and self.stage_start[k + 1] is None:
            self.stage_start[k + 1] = (t - self.mono0) + self.stage_gap_s[k]
            self._start_stage(engine, k + 1)


class FixedArrivals:
    """Recorded arrival times (s from the first request); ingress = ``ingress_s_of(prompt_len, api_tokens_per_s)``;
    a client that has no answer after ``timeout_s`` (per request, or one for all) aborts (the engine learns it
    ``abort_lag_s`` later)."""

    def __init__(
        self, arrival_s: np.ndarray, timeout_s, ingress_s_of, *, mono0: float = 1.0, abort_lag_s: float = 0.001
    ):
        self.arrival_s = np.asarray(arrival_s, dtype=np.float64)
        self.mono0 = float(mono0)  # engine clock at the first arrival (> 0: 0.0 marks 'unknown')
        self.timeout_s = np.broadcast_to(np.asarray(timeout_s, dtype=np.float64), self.arrival_s.shape)
        self.abort_lag_s = float(abort_lag_s)
        self.ingress_of = ingress_s_of

    def start(self, engine) -> None:
        heap, mono0 = engine.abort_heap, self.mono0
        for R, a, to in zip(engine.reqs, self.arrival_s.tolist(), self.timeout_s.tolist()):
            R.api_arrival = mono0 + a
            R.api_abort = mono0 + a + to
            heap.append((mono0 + a + to + self.abort_lag_s, R.idx))
        heapq.heapify(heap)

    def ingress_s(self, R, api_tokens_per_s: float) -> float:
        return self.ingress_of(R.prompt_len, api_tokens_per_s)

    def on_done(self, engine, R, t: float) -> None:
        pass
