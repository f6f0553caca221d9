"""A what-if at another tensor-parallel degree: the calibrated model and the KV cache carried to TP t.

No run of a study changes TP for an LLM model, so a model for TP t ≠ the calibrated TP t0 exists only through the
architecture, as the leave-one-model-out transfer does (stepml_core.calibration.protocols.transfer_params): each
step coefficient keeps its ratio to its physics scale (stepml_core.calibration.fit.arch_prior at t0 and at t),

    β0(t)   = β0(t0)   · W(t)/W(t0)        weights streamed per GPU:  W = 2·params / t / HBM bandwidth
    β_dec(t) = β_dec(t0) · C(t)/C(t0)       compute per token per GPU: C = 2·active params / t / peak FLOP/s
    β_kv(t)  = β_kv(t0)  · K(t)/K(t0)       KV bytes read per token per GPU
    β_pf(t)  = β_pf(t0)  · C(t)/C(t0);  β_h (piecewise) likewise, its break k kept
    β_npf, α0, α1 unchanged (per layer, API and client overheads: TP does not divide them)

so every GPU term scales by t0/t: perfect sharding, no all-reduce growing with t (the calibrated per-step constant
carries the calibrated TP's communication as if it were weight streaming). The parameter draws are carried the same
way (the interval is the calibration's, not the transfer's own error). The leave-one-model-out replays, whose
transfers change TP and architecture together, are the evidence of how far this carries.

**KV cache at TP t.** Per GPU, weights + KV cache fill the same memory at every TP (the non-weight overhead —
activations, CUDA graphs — is taken as constant per GPU): with B = W_bytes(t0) + blocks(t0)·16·kv_bytes(t0),

    blocks(t) = ⌊(B − W_bytes(t)) / (16 · kv_bytes(t))⌋      (kv_bytes: per token per GPU, KV heads sharded t ways)

(B of the four real runs' engines: 75.5–76.1 GB of the H100's 80 GB). A TP whose weights leave no KV cache, or
that does not divide the model's attention and KV heads, is refused with the reason.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace

from stepml_core.calibration.fit import ArchPrior, arch_prior
from stepml_core.calibration.params import PARAM_NAMES, StepParams
from stepml_core.catalog import model_spec
from stepml_core.errors import UsageError
from stepml_core.sim.kv_cache import BLOCK_TOKENS
from stepml_core.whatif.workload import ServingLimits

SCALE_OF = {  # parameter → the architecture scale it keeps its ratio to (None: not divided by TP)
    "b0_us": "weights_floor_us",
    "b_dec_us": "compute_floor_us",
    "b_kv_us": "kv_floor_us",
    "b_pf_us": "compute_floor_us",
    "b_npf_us": None,
    "q0_us": None,
    "q1_us": None,
    "b_hinge_us": "compute_floor_us",
}


def check_tp(model: str, tp: int) -> None:
    """A TP vLLM can run the model at: it divides the attention heads and the KV heads."""
    m = model_spec(model)
    if tp < 1 or m.num_attention_heads % tp or m.num_kv_heads % tp:
        raise UsageError(
            f"TP {tp} for {model}: vLLM shards its {m.num_attention_heads} attention heads and {m.num_kv_heads} KV "
            f"heads evenly; choose a divisor of {math.gcd(m.num_attention_heads, m.num_kv_heads)}"
        )


def kv_budget_bytes(limits: ServingLimits) -> float:
    """B: per GPU, the bytes the calibrated engine gives weights and KV cache (its weights + its KV blocks)."""
    a = arch_prior(limits.model, limits.tp)
    return a.weights_bytes + limits.kv_blocks_total * BLOCK_TOKENS * a.kv_bytes_per_token


def limits_at_tp(limits: ServingLimits, tp: int) -> ServingLimits:
    """The serving limits at TP ``tp``: same max_num_seqs / max_num_batched_tokens / max_model_len, KV blocks from
    the per-GPU budget (module docstring); refused where the weights leave no room for one request's KV cache."""
    check_tp(limits.model, tp)
    if tp == limits.tp:
        return limits
    a = arch_prior(limits.model, tp)
    free = kv_budget_bytes(limits) - a.weights_bytes
    blocks = int(free // (BLOCK_TOKENS * a.kv_bytes_per_token)) if free > 0 else 0
    need = math.ceil((limits.max_model_len or 1) / BLOCK_TOKENS)
    if blocks < need:
        raise UsageError(
            f"TP {tp} for {limits.model}: {a.weights_bytes / 1e9:.1f} GB of weights per GPU leave "
            f"{max(free, 0.0) / 1e9:.1f} GB of the {kv_budget_bytes(limits) / 1e9:.1f} GB per GPU its TP {limits.tp} "
            f"engine gives weights and KV cache: {blocks} KV blocks, fewer than one {limits.max_model_len}-token "
            f"request needs ({need})"
        )
    return replace(limits, tp=int(tp), kv_blocks_total=blocks)


def params_at_tp(p: StepParams, source: ArchPrior, target: ArchPrior) -> StepParams:
    """The calibrated parameters carried from ``source``'s TP to ``target``'s (module docstring)."""
    v = {}
    for name, scale in SCALE_OF.items():
        x = float(getattr(p, name))
        v[name] = x if scale is None else x * float(getattr(target, scale)) / float(getattr(source, scale))
    return replace(p, **v)


def spec_at_tp(spec: dict, limits: ServingLimits, tp: int) -> dict:
    """The replay spec of the calibrated model carried to TP ``tp`` (itself at the calibrated TP): a request-calibrated
    spec (kind ``blis_linear``) only — a study model fitted on step features has no architecture scales."""
    check_tp(limits.model, tp)
    if tp == limits.tp:
        return spec
    if spec.get("kind") != "blis_linear" or "params" not in spec:
        raise UsageError(
            f"TP {tp} for {limits.model}: the model to replay ({spec.get('name')!r}, kind {spec.get('kind')!r}) is not "
            "calibrated in BLIS's terms, so no architecture scale carries it to another TP"
        )
    source, target = arch_prior(limits.model, limits.tp), arch_prior(limits.model, tp)
    p = params_at_tp(StepParams(**spec["params"]), source, target)
    boot = dict(spec.get("bootstrap") or {})
    names = list(boot.get("names") or PARAM_NAMES)
    rows = []
    for r in boot.get("rows") or []:
        q = params_at_tp(StepParams(**dict(zip(names, r))), source, target)
        rows.append([float(getattr(q, n)) for n in names])
    out = {
        **spec,
        "name": spec["name"],
        "doc": p.blis_doc(),
        "params": asdict(p),
        "bootstrap": {**boot, "names": names, "rows": rows},
        "basis": f"{spec.get('basis') or spec['name']}, carried from TP {limits.tp} to TP {tp} through the architecture",
        "calibration": {
            **(spec.get("calibration") or {}),
            "tp_transfer": {"from_tp": int(limits.tp), "to_tp": int(tp), "source_prior": asdict(source)},
        },
    }
    return out


def tp_note(limits: ServingLimits, at: ServingLimits) -> dict:
    """What whatif.json says of one TP: where its model and KV blocks come from."""
    same = at.tp == limits.tp
    return {
        "tp": int(at.tp),
        "kv_blocks_total": int(at.kv_blocks_total),
        "step_model": "as calibrated"
        if same
        else f"carried from TP {limits.tp} through the architecture (stepml_core.whatif.tp; untested on a TP change: "
        "no run of the study changes TP)",
        "kv_blocks_from": "the run's engine"
        if same
        else f"per-GPU budget of weights + KV cache of the TP {limits.tp} engine, "
        f"{kv_budget_bytes(limits) / 1e9:.2f} GB (stepml_core.whatif.tp)",
    }
