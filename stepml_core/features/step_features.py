"""The seed's 30 step features (docs/features.md §4), for a step table and for one batch.

A step reduces to *aggregates* (token counts, per-request context sums and KV statistics,
`AGGREGATE_FIELDS`); `features_from_aggregates` turns aggregates into the 30 features with
numpy. `step_table_features` computes the aggregates of a whole step table (vectorized, from
journey or snapshot aggregates where they match the step, else BATCH_SUMMARY proxies) and calls
it; `batch_features` (one batch, from per-request records) goes through the independent
plain-Python implementation in `reference_predictor`, and tests check that both agree.

Per-request inputs (docs/features.md §2): progress index c_i (prompt tokens already in KV,
incl. prefix-cache hits, plus output tokens generated) *before* the step, new tokens q_i,
prompt length p_i. Prefill set 𝒫 = {c_i < p_i}, decode set 𝒟 = the rest.

KV statistics are over decode requests' context lengths c_j (0 when 𝒟 = ∅). Where a run
has no per-request records for a step, documented proxies from BATCH_SUMMARY are used
(`kv_source = "proxy_blocks"`):
  kv_mean ≈ (blocks_total − blocks_free)·block_size / max(running_depth, 1)
  kv_max ≈ kv_min ≈ kv_mean, kv_std ≈ 0, kv_sum ≈ kv_mean·n_dc
  decode attention pairs ≈ n_dc·(kv_mean + 1); prefill chunks assumed to start at c = 0
  with q̄ = P/n_pf each; sequences sampling a token ≈ n_dc + n_pf.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import polars as pl

from stepml_core.catalog import GpuSpec, ModelSpec, known_model_names
from stepml_core.features.roofline import (
    attention_flops,
    kv_bytes,
    linear_flops,
    per_gpu_constants,
    roofline_times_us,
    weight_bytes_step,
)

DEFAULT_BLOCK_SIZE = 16

BATCH_TOKEN_FEATURES = ["prefill_tokens", "decode_tokens", "scheduled_tokens", "num_prefill_reqs", "num_decode_reqs"]
KV_FEATURES = ["kv_mean", "kv_max", "kv_min", "kv_std", "kv_sum"]
PHASE_FEATURES = ["prefill_fraction", "decode_fraction", "is_mixed_batch", "is_pure_prefill"]
PHYSICS_FEATURES = [
    "total_flops_estimate",
    "arithmetic_intensity",
    "compute_bound_indicator",
    "prefill_compute_intensity",
    "decode_memory_intensity",
    "attention_flops_ratio",
    "gemm_flops_ratio",
    "active_param_ratio",
]
ARCH_FEATURES = ["model_id", "tp_degree", "is_moe"]  # model_id is one-hot encoded, see model_id_columns()
INTERACTION_FEATURES = [
    "prefill_tokens×decode_tokens",
    "kv_max×num_decode_reqs",
    "arithmetic_intensity×is_moe",
    "prefill_tokens×kv_mean",
    "batch_size×kv_max",
]
FEATURE_GROUPS = {
    "batch_tokens": BATCH_TOKEN_FEATURES,
    "kv_statistics": KV_FEATURES,
    "phase": PHASE_FEATURES,
    "physics": PHYSICS_FEATURES,
    "architecture": ARCH_FEATURES,
    "interactions": INTERACTION_FEATURES,
}
SEED_FEATURES = [f for group in FEATURE_GROUPS.values() for f in group]  # the 30 names
assert len(SEED_FEATURES) == 30


def model_id_columns() -> list[str]:
    """One-hot columns standing for the `model_id` feature: model_id=<catalogue key>."""
    return [f"model_id={m}" for m in known_model_names()]


def feature_columns() -> list[str]:
    """Matrix columns of the 30 features (model_id expanded to its one-hot columns)."""
    cols = []
    for f in SEED_FEATURES:
        cols.extend(model_id_columns() if f == "model_id" else [f])
    return cols


def feature_group_columns(group: str) -> list[str]:
    return [c for f in FEATURE_GROUPS[group] for c in (model_id_columns() if f == "model_id" else [f])]


@dataclass(frozen=True)
class RequestInBatch:
    """One scheduled request in a step: progress index before the step, new tokens, prompt length."""

    progress_index: int
    new_tokens: int
    prompt_len: int


AGGREGATE_FIELDS = [
    "prefill_tokens",
    "decode_tokens",
    "scheduled_tokens",
    "num_prefill_reqs",
    "num_decode_reqs",
    "kv_mean",
    "kv_max",
    "kv_min",
    "kv_std",
    "kv_sum",
    "prefill_attn_pairs",
    "decode_attn_pairs",
    "prefill_context_tokens",
    "decode_context_tokens",
    "num_logit_seqs",
]


def _safe_div(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    out = np.zeros(np.broadcast(a, b).shape)
    np.divide(a, b, out=out, where=b != 0)
    return out


def features_from_aggregates(agg: dict, model: ModelSpec, gpu: GpuSpec, tp: int) -> dict[str, np.ndarray]:
    """The 30 features (model_id one-hot) plus roofline times from batch aggregates (scalars or arrays)."""
    c = per_gpu_constants(model, tp)
    a = {k: np.asarray(agg[k], float) for k in AGGREGATE_FIELDS}
    P, D, S, n_pf, n_dc = (
        a["prefill_tokens"],
        a["decode_tokens"],
        a["scheduled_tokens"],
        a["num_prefill_reqs"],
        a["num_decode_reqs"],
    )
    f_lin = linear_flops(c, S, a["num_logit_seqs"])
    f_attn = attention_flops(c, a["prefill_attn_pairs"] + a["decode_attn_pairs"])
    f_total = f_lin + f_attn
    w = np.where(S > 0, weight_bytes_step(c, S), 0.0)
    kv_b = kv_bytes(c, a["prefill_context_tokens"] + a["decode_context_tokens"], S)
    b_total = w + kv_b
    ai = _safe_div(f_total, b_total)
    f_pf = c.layers * P * c.linear_flops_per_token_per_layer + attention_flops(c, a["prefill_attn_pairs"])
    kv_pf = kv_bytes(c, a["prefill_context_tokens"], P)
    f_dc = (
        c.layers * D * c.linear_flops_per_token_per_layer
        + n_dc * c.lm_head_flops_per_seq
        + attention_flops(c, a["decode_attn_pairs"])
    )
    kv_dc = kv_bytes(c, a["decode_context_tokens"], D)
    is_moe = float(model.is_moe)
    t_c, t_m = roofline_times_us(c, gpu, f_total, b_total)
    out = {
        "prefill_tokens": P,
        "decode_tokens": D,
        "scheduled_tokens": S,
        "num_prefill_reqs": n_pf,
        "num_decode_reqs": n_dc,
        "kv_mean": a["kv_mean"],
        "kv_max": a["kv_max"],
        "kv_min": a["kv_min"],
        "kv_std": a["kv_std"],
        "kv_sum": a["kv_sum"],
        "prefill_fraction": _safe_div(P, S),
        "decode_fraction": _safe_div(D, S),
        "is_mixed_batch": ((n_pf > 0) & (n_dc > 0)).astype(float),
        "is_pure_prefill": ((n_pf > 0) & (n_dc == 0)).astype(float),
        "total_flops_estimate": f_total,
        "arithmetic_intensity": ai,
        "compute_bound_indicator": (ai > gpu.balance_flops_per_byte).astype(float),
        "prefill_compute_intensity": np.where(P > 0, _safe_div(f_pf, w + kv_pf), 0.0),
        "decode_memory_intensity": np.where(D > 0, _safe_div(w + kv_dc, f_dc), 0.0),
        "attention_flops_ratio": _safe_div(f_attn, f_total),
        "gemm_flops_ratio": _safe_div(f_lin, f_total),
        "active_param_ratio": np.full_like(P, model.active_param_ratio),
    }
    for col in model_id_columns():
        out[col] = np.full_like(P, 1.0 if col == f"model_id={model.name}" else 0.0)
    out["tp_degree"] = np.full_like(P, float(tp))
    out["is_moe"] = np.full_like(P, is_moe)
    out["prefill_tokens×decode_tokens"] = P * D
    out["kv_max×num_decode_reqs"] = a["kv_max"] * n_dc
    out["arithmetic_intensity×is_moe"] = ai * is_moe
    out["prefill_tokens×kv_mean"] = P * a["kv_mean"]
    out["batch_size×kv_max"] = (n_pf + n_dc) * a["kv_max"]
    out["t_compute_us"], out["t_memory_us"] = t_c, t_m
    return out


def batch_features(requests: Sequence[RequestInBatch], model: ModelSpec, gpu: GpuSpec, tp: int) -> dict[str, float]:
    """The 30 features of one batch (pure; per-request records in, floats out).

    Plain-Python implementation in `reference_predictor.batch_features`, independent of the
    vectorized path below; tests check that both agree.
    """
    from stepml_core.stepmodels.reference_predictor import batch_features as scalar_features

    batch = [(r.progress_index, r.new_tokens, r.prompt_len) for r in requests]
    return scalar_features(batch, spec_dict(model), gpu_dict(gpu), tp, known_model_names())


def spec_dict(model: ModelSpec) -> dict:
    """A ModelSpec as the plain dict the reference predictor takes."""
    from dataclasses import asdict

    return asdict(model)


def gpu_dict(gpu: GpuSpec) -> dict:
    from dataclasses import asdict

    return asdict(gpu)


# ---------------------------------------------------------------- vectorized ---


def snapshot_aggregates(snapshots: pl.DataFrame) -> pl.DataFrame:
    """Per-step aggregates from REQUEST_SNAPSHOT rows (scheduled requests only)."""
    c, q, p = (
        pl.col("request.num_computed_tokens"),
        pl.col("request.scheduled_tokens_this_step"),
        pl.col("request.num_prompt_tokens"),
    )
    s = snapshots.filter(q > 0).with_columns(
        is_pf=c < p,
        pairs=pl.when(c < p).then(q * c + q * (q + 1) / 2).otherwise(c + 1).cast(pl.Float64),
        completes=(c < p) & (c + q >= p),
    )
    dec_c = pl.col("request.num_computed_tokens").filter(~pl.col("is_pf")).cast(pl.Float64)
    return s.group_by("step.id").agg(
        snap_prefill_tokens=q.filter(pl.col("is_pf")).sum(),
        snap_decode_tokens=q.filter(~pl.col("is_pf")).sum(),
        snap_num_prefill_reqs=pl.col("is_pf").sum(),
        snap_num_decode_reqs=(~pl.col("is_pf")).sum(),
        kv_mean=dec_c.mean(),
        kv_max=dec_c.max(),
        kv_min=dec_c.min(),
        kv_std=dec_c.std(ddof=0),
        kv_sum=dec_c.sum(),
        prefill_attn_pairs=pl.col("pairs").filter(pl.col("is_pf")).sum(),
        decode_attn_pairs=pl.col("pairs").filter(~pl.col("is_pf")).sum(),
        prefill_context_tokens=c.filter(pl.col("is_pf")).sum().cast(pl.Float64),
        decode_context_tokens=dec_c.sum(),
        num_logit_seqs=((~pl.col("is_pf")) | pl.col("completes")).sum(),
    )


def step_table_features(
    steps: pl.DataFrame,
    model: ModelSpec,
    gpu: GpuSpec,
    tp: int,
    *,
    request_aggregates: pl.DataFrame | None = None,
    request_source: str = "snapshot",
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> pl.DataFrame:
    """30 features for every row of a step table (BATCH_SUMMARY columns), vectorized.

    `request_aggregates` (e.g. from `snapshot_aggregates`) gives per-request KV statistics
    and attention terms for the steps it covers, used where its token sums agree with the
    step's `batch.scheduled_tokens`; other rows use the BATCH_SUMMARY proxies. Columns
    `kv_source` ("snapshot"/"journey"/"proxy_blocks") record which was used per row.
    """
    P = pl.col("batch.prefill_tokens").cast(pl.Float64)
    D = pl.col("batch.decode_tokens").cast(pl.Float64)
    n_pf = pl.col("batch.num_prefill_reqs").cast(pl.Float64)
    n_dc = pl.col("batch.num_decode_reqs").cast(pl.Float64)
    used = (pl.col("kv.blocks_total_gpu") - pl.col("kv.blocks_free_gpu")).cast(pl.Float64) * block_size
    proxy_mean = used / pl.max_horizontal(pl.col("queue.running_depth").cast(pl.Float64), pl.lit(1.0))
    q_bar = pl.when(n_pf > 0).then(P / n_pf).otherwise(0.0)
    base = steps.select(
        "step.id",
        prefill_tokens=P,
        decode_tokens=D,
        scheduled_tokens=pl.col("batch.scheduled_tokens").cast(pl.Float64),
        num_prefill_reqs=n_pf,
        num_decode_reqs=n_dc,
        p_kv_mean=pl.when(n_dc > 0).then(proxy_mean).otherwise(0.0),
        p_prefill_attn_pairs=n_pf * q_bar * (q_bar + 1) / 2,
        p_num_logit_seqs=n_dc + n_pf,
    )
    if request_aggregates is not None and request_aggregates.height:
        base = base.join(request_aggregates, on="step.id", how="left")
        ok = (pl.col("snap_prefill_tokens") + pl.col("snap_decode_tokens")) == pl.col("scheduled_tokens")
    else:
        ok = pl.lit(False)
    base = base.with_columns(_use_req=ok.fill_null(False))

    def pick(name, proxy):
        if request_aggregates is not None and name in base.columns:
            return pl.when(pl.col("_use_req")).then(pl.col(name).fill_null(0.0)).otherwise(proxy).alias(name)
        return proxy.alias(name)

    pm = pl.col("p_kv_mean")
    agg = base.select(
        "step.id",
        "prefill_tokens",
        "decode_tokens",
        "scheduled_tokens",
        "num_prefill_reqs",
        "num_decode_reqs",
        pick("kv_mean", pm),
        pick("kv_max", pm),
        pick("kv_min", pm),
        pick("kv_std", pl.lit(0.0)),
        pick("kv_sum", pm * pl.col("num_decode_reqs")),
        pick("prefill_attn_pairs", pl.col("p_prefill_attn_pairs")),
        pick("decode_attn_pairs", pl.col("num_decode_reqs") * (pm + 1)),
        pick("prefill_context_tokens", pl.lit(0.0)),
        pick("decode_context_tokens", pm * pl.col("num_decode_reqs")),
        pick("num_logit_seqs", pl.col("p_num_logit_seqs")),
        kv_source=pl.when(pl.col("_use_req")).then(pl.lit(request_source)).otherwise(pl.lit("proxy_blocks")),
    )
    feats = features_from_aggregates({k: agg[k].cast(pl.Float64).to_numpy() for k in AGGREGATE_FIELDS}, model, gpu, tp)
    return pl.DataFrame({"step.id": agg["step.id"], **feats, "kv_source": agg["kv_source"]})


# ------------------------------------------------- original study (reproduction) ---

ORIGINAL_BALANCE_FLOPS_PER_BYTE = 360.2  # Π / (0.82 β), as the original code used
ORIGINAL_MODEL_CODES = {"codellama-34b": 0, "llama-2-7b": 1, "llama-2-70b": 2, "mixtral-8x7b": 3}
ORIGINAL_FEATURES = [
    "f_prefill_tokens",
    "f_decode_tokens",
    "f_scheduled_tokens",
    "f_num_prefill_reqs",
    "f_num_decode_reqs",
    "f_kv_gpu_usage",
    "f_kv_blocks_used",
    "f_kv_blocks_free",
    "f_running_depth",
    "f_kv_pressure",
    "f_prefill_fraction",
    "f_decode_fraction",
    "f_is_mixed_batch",
    "f_is_pure_prefill",
    "f_total_flops_estimate",
    "f_arithmetic_intensity",
    "f_compute_bound_indicator",
    "f_prefill_compute_intensity",
    "f_decode_memory_intensity",
    "f_attention_flops_ratio",
    "f_gemm_flops_ratio",
    "f_active_param_ratio",
    "f_model_id",
    "f_tp_degree",
    "f_is_moe",
    "f_prefill_x_decode",
    "f_kv_pressure_x_decode_reqs",
    "f_intensity_x_moe",
    "f_prefill_x_kv_usage",
    "f_batch_size_x_kv_pressure",
]


def original_study_features(steps: pl.DataFrame, model: ModelSpec, tp: int) -> pl.DataFrame:
    """The original study's 30 features, reproduced in behaviour (docs/features.md §4), for reproduction only.

    Known flaws kept on purpose: KV proxies, MoE factor k/E, weights of one expert,
    balance 360.2, ordinal model id, attention/GEMM ratio placeholders.
    """
    d, dff = model.hidden_size, model.intermediate_size
    d_kv = model.num_kv_heads * model.head_dim
    a = d * (d + 2 * d_kv) + d * d
    m = 3 * d * dff
    rho = model.experts_per_token / model.num_experts if model.is_moe else 1.0
    lt = model.num_layers / tp
    w0 = lt * 2 * (a + m)
    g = lambda c: pl.col(c).cast(pl.Float64).fill_null(0.0)
    P, D, S, npf, ndc = (
        g("batch.prefill_tokens"),
        g("batch.decode_tokens"),
        g("batch.scheduled_tokens"),
        g("batch.num_prefill_reqs"),
        g("batch.num_decode_reqs"),
    )
    total = pl.col("kv.blocks_total_gpu").cast(pl.Float64).fill_null(1.0)
    free = g("kv.blocks_free_gpu")
    usage = g("kv.usage_gpu_ratio")
    used = total - free
    pressure = used / pl.max_horizontal(total, pl.lit(1.0))
    s1 = pl.max_horizontal(S, pl.lit(1.0))
    flops_per_tok = lt * (2 * a + 2 * rho * m)
    f0 = flops_per_tok * S
    ai = f0 / max(w0, 1)
    is_moe = 1.0 if model.is_moe else 0.0
    return steps.select(
        "step.id",
        f_prefill_tokens=P,
        f_decode_tokens=D,
        f_scheduled_tokens=S,
        f_num_prefill_reqs=npf,
        f_num_decode_reqs=ndc,
        f_kv_gpu_usage=usage,
        f_kv_blocks_used=used,
        f_kv_blocks_free=free,
        f_running_depth=g("queue.running_depth"),
        f_kv_pressure=pressure,
        f_prefill_fraction=P / s1,
        f_decode_fraction=D / s1,
        f_is_mixed_batch=((npf > 0) & (ndc > 0)).cast(pl.Float64),
        f_is_pure_prefill=(ndc == 0).cast(pl.Float64),
        f_total_flops_estimate=f0,
        f_arithmetic_intensity=ai,
        f_compute_bound_indicator=(ai > ORIGINAL_BALANCE_FLOPS_PER_BYTE).cast(pl.Float64),
        f_prefill_compute_intensity=pl.when(P > 0).then(flops_per_tok * P / max(w0, 1)).otherwise(0.0),
        f_decode_memory_intensity=pl.when(D > 0)
        .then(w0 / pl.max_horizontal(flops_per_tok * D, pl.lit(1.0)))
        .otherwise(0.0),
        f_attention_flops_ratio=pl.lit(0.0),
        f_gemm_flops_ratio=pl.lit(1.0),
        f_active_param_ratio=pl.lit(rho),
        f_model_id=pl.lit(float(ORIGINAL_MODEL_CODES.get(model.name, -1))),
        f_tp_degree=pl.lit(float(tp)),
        f_is_moe=pl.lit(is_moe),
        f_prefill_x_decode=P * D,
        f_kv_pressure_x_decode_reqs=pressure * ndc,
        f_intensity_x_moe=ai * is_moe,
        f_prefill_x_kv_usage=P * usage,
        f_batch_size_x_kv_pressure=(npf + ndc) * pressure,
    )


# ------------------------------------------------- batch N−1 alignment (cycle_us) ---

PREV_SUFFIX = "@N-1"


def with_previous_step(fm: pl.DataFrame, cols: Sequence[str], suffix: str = PREV_SUFFIX) -> pl.DataFrame:
    """fm plus, for every row of step id N, the columns `cols` of step N−1 as `<col>@N-1` (null where
    step N−1 was not sampled). Under async scheduling the engine cycle ts_start[N+1] − ts_start[N]
    may end when batch N−1's GPU work does, so cycle(N) can reflect batch N−1 rather than N."""
    prev = fm.select((pl.col("step.id") + 1).alias("step.id"), *[pl.col(c).alias(f"{c}{suffix}") for c in cols])
    return fm.join(prev, on="step.id", how="left")
