"""Roofline physics of one engine step (docs/features.md §3), per GPU, bf16.

Everything works on batch *aggregates*, so the same formulas serve one batch (Python
scalars) and a whole step table (numpy arrays). Notation for a step with scheduled
requests i (progress index c_i before the step, q_i new tokens), T = Σ q_i tokens,
model with L layers, hidden d, heads H, KV heads H_kv, head dim d_h, TP degree t:

  linear FLOPs     F_lin  = L·2T(A + k·M + R)/t + 2·N_logit·V·d/t      (k = 1 dense)
  attention FLOPs  F_attn = L·(4 H d_h/t)·[Σ_prefill (q c + q(q+1)/2) + Σ_decode (c + 1)]
  weight bytes     W_step = L·b(A + n_eff·M + R)/t + b·V·d/t,  n_eff = E[1-(1-k/E)^T] (MoE)
  KV bytes         KV     = L·b·2(H_kv/t)d_h·(Σ_batch c_i + T)      (read + write)
  arithmetic intensity = (F_lin + F_attn) / (W_step + KV)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stepml_core.catalog import BYTES_PER_KV_ELEMENT, BYTES_PER_PARAM, GpuSpec, ModelSpec


@dataclass(frozen=True)
class PerGpuConstants:
    """Per-GPU constants of a model at TP degree t (docs/features.md §1)."""

    layers: int
    linear_flops_per_token_per_layer: float  # 2(A + kM + R)/t
    weight_bytes_per_layer: float  # b(A + EM + R)/t (all experts resident)
    attn_bytes_per_layer: float  # b·A/t
    expert_bytes_per_layer: float  # b·M/t (one expert)
    router_bytes_per_layer: float  # b·R/t
    kv_bytes_per_token_per_layer: float  # b·2(H_kv/t)d_h
    attn_flops_per_pair_per_layer: float  # 4(H/t)d_h
    lm_head_flops_per_seq: float  # 2Vd/t
    lm_head_bytes: float  # b·V·d/t
    num_experts: int
    experts_per_token: int
    tp: int

    @property
    def weight_bytes_total(self) -> float:
        """Whole-model weights per GPU incl. embedding + LM head (2Vd params)."""
        return self.layers * self.weight_bytes_per_layer + 2 * self.lm_head_bytes


def per_gpu_constants(model: ModelSpec, tp: int) -> PerGpuConstants:
    a, m, r = model.attn_params_per_layer, model.mlp_params_per_expert_per_layer, model.router_params_per_layer
    k, e = model.experts_per_token, model.num_experts
    b = BYTES_PER_PARAM
    return PerGpuConstants(
        layers=model.num_layers,
        linear_flops_per_token_per_layer=2 * (a + k * m + r) / tp,
        weight_bytes_per_layer=b * (a + e * m + r) / tp,
        attn_bytes_per_layer=b * a / tp,
        expert_bytes_per_layer=b * m / tp,
        router_bytes_per_layer=b * r / tp,
        kv_bytes_per_token_per_layer=BYTES_PER_KV_ELEMENT * 2 * (model.num_kv_heads / tp) * model.head_dim,
        attn_flops_per_pair_per_layer=4 * (model.num_attention_heads / tp) * model.head_dim,
        lm_head_flops_per_seq=2 * model.vocab_size * model.hidden_size / tp,
        lm_head_bytes=b * model.vocab_size * model.hidden_size / tp,
        num_experts=e,
        experts_per_token=k,
        tp=tp,
    )


def experts_touched(c: PerGpuConstants, tokens):
    """Expected distinct experts touched by T tokens under uniform top-k routing: E[1-(1-k/E)^T]; 1 dense."""
    tokens = np.asarray(tokens, dtype=float)
    if c.num_experts <= 1:
        return np.ones_like(tokens)
    return c.num_experts * (1.0 - (1.0 - c.experts_per_token / c.num_experts) ** tokens)


def weight_bytes_step(c: PerGpuConstants, tokens):
    """Weight bytes streamed in one step: L·(attn + n_eff·expert + router) + LM head."""
    n_eff = experts_touched(c, tokens)
    per_layer = c.attn_bytes_per_layer + n_eff * c.expert_bytes_per_layer + c.router_bytes_per_layer
    return c.layers * per_layer + c.lm_head_bytes


def linear_flops(c: PerGpuConstants, tokens, n_logit):
    """F_lin = L·T·2(A+kM+R)/t + N_logit·2Vd/t."""
    return (
        c.layers * np.asarray(tokens, float) * c.linear_flops_per_token_per_layer
        + np.asarray(n_logit, float) * c.lm_head_flops_per_seq
    )


def attention_flops(c: PerGpuConstants, attn_pairs):
    """F_attn = L·4(H/t)d_h·pairs, pairs = Σ_prefill (q c + q(q+1)/2) + Σ_decode (c+1)."""
    return c.layers * c.attn_flops_per_pair_per_layer * np.asarray(attn_pairs, float)


def kv_bytes(c: PerGpuConstants, context_tokens_read, tokens_written):
    """KV bytes = L·b·2(H_kv/t)d_h·(Σ c_i + T)."""
    return (
        c.layers
        * c.kv_bytes_per_token_per_layer
        * (np.asarray(context_tokens_read, float) + np.asarray(tokens_written, float))
    )


def roofline_times_us(c: PerGpuConstants, gpu: GpuSpec, flops, bytes_):
    """(T_compute, T_memory) in µs: F/Π and B/β."""
    return np.asarray(flops, float) / gpu.peak_flops * 1e6, np.asarray(
        bytes_, float
    ) / gpu.hbm_bandwidth_bytes_per_s * 1e6
