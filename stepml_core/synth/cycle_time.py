"""Engine cycle time of one vLLM step on H100 (docs/synthesizer.md §3), per GPU.

A roofline sum per layer plus fixed costs:

* linear layers: smooth max of weight streaming W/(η_w·BW) and compute 2·P·T/(η_c·peak)
  (p-norm with p = knee_p, knee near 250–350 tokens); MoE streams the attention weights plus
  the experts touched, E·(1 − (1 − k/E)^T);
* decode attention: Σ context × KV bytes/token/layer at η_kv·BW, with a per-layer floor;
* prefill attention: 4·(H/TP)·d_h·q·(c + q/2) FLOPs per chunk at an efficiency rising with q;
* element-wise traffic (norms, rotary, activation) per token;
* TP all-reduce, 2 per layer: latency + bytes / bus bandwidth;
* LM head (V·d/TP weights) + sampling per sequence;
* non-overlapped host cost on the GPU path per step and per request;
* CUDA graphs: pure-decode batches ≤ 256 tokens run a full graph padded to the next capture
  size; mixed batches ≤ 256 run piecewise graphs (padded, plus attention launches); larger
  batches run eagerly.

All per-token-count terms are precomputed as arrays over T = 0 … max_num_batched_tokens, so
the per-step cost is a few array look-ups and multiplications.
"""

from __future__ import annotations

import bisect

import numpy as np

from stepml_core.catalog import gpu_spec, model_spec
from stepml_core.features.roofline import per_gpu_constants
from stepml_core.synth.spec import engine_params

FULL, PIECEWISE, EAGER = 0, 1, 2


class EnginePhysics:
    def __init__(self, model: str, tp: int, params: dict | None = None):
        P = params or engine_params()
        mp = P["models"][model]
        arch = model_spec(model)
        c = per_gpu_constants(arch, tp)
        g = gpu_spec()
        bw, peak = g.hbm_bandwidth_bytes_per_s, g.peak_flops
        sched = P["scheduler"]
        self.max_tokens = int(sched["max_num_batched_tokens"])
        self.graph_sizes = [int(x) for x in sched["cuda_graph_sizes"]]
        self.max_graph = self.graph_sizes[-1]
        self.layers = L = c.layers
        self.tp = tp
        T = np.arange(self.max_tokens + 1, dtype=np.float64)
        # linear layers
        if c.num_experts > 1:
            touched = c.num_experts * (1.0 - (1.0 - c.experts_per_token / c.num_experts) ** T)
            wbytes = c.attn_bytes_per_layer + c.router_bytes_per_layer + touched * c.expert_bytes_per_layer
        else:
            wbytes = np.full_like(T, c.weight_bytes_per_layer)
        t_mem = wbytes / (mp["eta_weights"] * bw)
        t_cmp = c.linear_flops_per_token_per_layer * T / (mp["eta_compute"] * peak)
        p = float(mp["knee_p"])
        lin = (t_mem**p + t_cmp**p) ** (1.0 / p)
        # element-wise activation traffic
        elem = T * arch.hidden_size * mp["elementwise_bytes_per_token_per_layer"] / 2.0 / (0.7 * bw)
        # all-reduce (2 per layer)
        if tp > 1:
            ar = P["allreduce"][str(tp)]
            allr = 2.0 * (ar["latency_us"] * 1e-6 + T * arch.hidden_size * 2.0 / ar["bandwidth"])
        else:
            allr = np.zeros_like(T)
        per_layer = lin + elem + allr
        self.layer_arr = L * per_layer  # seconds per step for T tokens (all layers, excl. attention)
        self.launch = [x * 1e-6 * L for x in mp["launch_us_per_layer"]]
        # attention
        self.kv_time_per_token = L * c.kv_bytes_per_token_per_layer / (mp["eta_kv"] * bw)
        self.attn_floor = L * mp["attn_floor_us"] * 1e-6
        self.pf_flops_per_pair = L * c.attn_flops_per_pair_per_layer
        self.eta_pf = tuple(mp["eta_prefill_attn"])
        self.peak = peak
        # LM head + sampling
        lm = P["lm_head"]
        self.lm_fixed = c.lm_head_bytes / (mp["eta_weights"] * bw) + lm["fixed_us"] * 1e-6
        self.lm_per_seq = lm["per_seq_us"] * 1e-6 + c.lm_head_flops_per_seq / (mp["eta_compute"] * peak)
        h = P["host"]
        self.host_fixed = h["gpu_side_fixed_us"] * 1e-6
        self.host_per_req = h["gpu_side_per_req_us"] * 1e-6
        self.kv_blocks_total = int(mp["kv_blocks_total"])
        # padded token counts for graphs
        pad = np.arange(self.max_tokens + 1)
        for i in range(1, self.max_graph + 1):
            pad[i] = self.graph_sizes[bisect.bisect_left(self.graph_sizes, i)]
        self.pad = pad.tolist()
        self.layer_list = self.layer_arr.tolist()

    def prefill_attn(self, q: int, c: int) -> float:
        """Seconds of prefill attention for one chunk of q new tokens after c computed ones."""
        lo, hi = self.eta_pf
        eta = lo + (hi - lo) * min(1.0, q / 1024.0)
        return self.pf_flops_per_pair * q * (c + 0.5 * q) / (eta * self.peak) + c * self.kv_time_per_token

    def step_time(self, T: int, n_seq: int, pure_decode: bool, sum_ctx: float, prefill_attn_s: float = 0.0) -> float:
        """Noise-free GPU-path seconds of one step (T scheduled tokens, n_seq scheduled requests)."""
        if T <= 0:
            return self.host_fixed
        if T <= self.max_graph:
            Te = self.pad[T]
            mode = FULL if pure_decode else PIECEWISE
        else:
            Te = T
            mode = EAGER
        attn = sum_ctx * self.kv_time_per_token + prefill_attn_s
        if attn < self.attn_floor:
            attn = self.attn_floor
        return (
            self.layer_list[Te]
            + self.launch[mode]
            + attn
            + self.lm_fixed
            + self.lm_per_seq * n_seq
            + self.host_fixed
            + self.host_per_req * n_seq
        )
