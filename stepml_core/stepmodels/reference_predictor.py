"""Dependency-light reference step-time predictor for simulators (stdlib only).

    predict_step_time(batch, exported_model, model_spec, gpu_spec, tp) -> µs

`batch` is a list of (progress_index, new_tokens, prompt_len) per scheduled request;
`exported_model` is the JSON written by `stepml_core.stepmodels.json_export`; the prediction is
max(ŷ, exported["floor_us"]), the model's positive floor (see `stepml_core.stepmodels.estimators`); `model_spec` / `gpu_spec` are
plain dicts (the catalogue's fields). The features are the seed's 30 (docs/features.md §4),
computed here in plain Python — an independent implementation of `features.step_table_features`
(tests check both agree to 1e-9). It knows the built-in kinds (linear, log_linear, trees); a kind added
since replays through its own class (`stepml_core.stepmodels.fitted`).
"""

from __future__ import annotations

import math

BYTES = 2  # bf16 / fp16 weights and KV


def _consts(m: dict, tp: int) -> dict:
    d, h, hkv, dff = m["hidden_size"], m["num_attention_heads"], m["num_kv_heads"], m["intermediate_size"]
    e, k, v, L = m["num_experts"], m["experts_per_token"], m["vocab_size"], m["num_layers"]
    dh = d // h
    a = 2 * d * d + 2 * d * hkv * dh
    mm = 3 * d * dff
    r = d * e if e > 1 else 0
    return {
        "L": L,
        "lin": 2 * (a + k * mm + r) / tp,
        "attn_b": BYTES * a / tp,
        "exp_b": BYTES * mm / tp,
        "rtr_b": BYTES * r / tp,
        "kv_tok": BYTES * 2 * (hkv / tp) * dh,
        "pair": 4 * (h / tp) * dh,
        "lm_f": 2 * v * d / tp,
        "lm_b": BYTES * v * d / tp,
        "E": e,
        "k": k,
        "active": (a + k * mm + r) / (a + e * mm + r),
        "moe": 1.0 if e > 1 else 0.0,
    }


def batch_features(batch, model: dict, gpu: dict, tp: int, model_names: list[str]) -> dict:
    """The 30 features (model_id one-hot over model_names) of one batch, plain Python."""
    return features_from_sums(batch_sums(batch), _consts(model, tp), gpu, tp, model_names, model["name"])


def batch_sums(batch, decoders: tuple = (0, 0, 0, 0, 0)) -> tuple:
    """(P, D, n_pf, n_dc, prefill pairs, prefill context, sequences sampling a token, kv_mean, kv_std, kv_max, kv_min,
    kv_sum) of a batch: KV statistics over decode requests' context lengths (0 without decodes). ``decoders``:
    (n, Σc, Σc², max c, min c) of one-token decode requests summed already and not in ``batch`` (the simulator keeps
    them incrementally: sim_step_time.sums_from_decode_stats) — the same numbers, the sums being exact."""
    n, s1, s2, kmax, kmin = decoders  # Σ ctx, Σ ctx² over decode requests (ints: exact)
    if not n:
        kmax, kmin = -math.inf, math.inf
    P = npf = 0
    D = ndc = n
    pf_pairs = pf_ctx = 0.0
    n_logit_pf = 0
    for ci, qi, pi in batch:  # the hot loop: plain comparisons, no calls
        if qi <= 0:
            continue
        if ci >= pi:  # decode
            D += qi
            ndc += 1
            s1 += ci
            s2 += ci * ci
            if ci > kmax:
                kmax = ci
            if ci < kmin:
                kmin = ci
        else:
            P += qi
            npf += 1
            pf_pairs += qi * ci + qi * (qi + 1) / 2
            pf_ctx += ci
            if ci + qi >= pi:
                n_logit_pf += 1
    s1, s2 = float(s1), float(s2)
    if ndc:
        kv_mean = s1 / ndc
        kv_std = math.sqrt(max(s2 / ndc - kv_mean * kv_mean, 0.0))
        kv_max, kv_min, kv_sum = float(kmax), float(kmin), s1
    else:
        kv_mean = kv_std = kv_max = kv_min = kv_sum = 0.0
    return P, D, npf, ndc, pf_pairs, pf_ctx, n_logit_pf + ndc, kv_mean, kv_std, kv_max, kv_min, kv_sum


def features_from_sums(sums: tuple, c: dict, gpu: dict, tp: int, model_names: list[str], model_name: str) -> dict:
    """The 30 features from a batch's sums (:func:`batch_sums`) and the model's per-GPU constants (:func:`_consts`)."""
    P, D, npf, ndc, pf_pairs, pf_ctx, n_logit, kv_mean, kv_std, kv_max, kv_min, kv_sum = sums
    dc_ctx = kv_sum
    dc_pairs = dc_ctx + ndc  # Σ (ctx + 1)
    S = P + D
    L = c["L"]
    f_lin = L * S * c["lin"] + n_logit * c["lm_f"]
    f_attn = L * c["pair"] * (pf_pairs + dc_pairs)
    f_tot = f_lin + f_attn
    if S > 0:
        n_eff = c["E"] * (1 - (1 - c["k"] / c["E"]) ** S) if c["E"] > 1 else 1.0
        w = L * (c["attn_b"] + n_eff * c["exp_b"] + c["rtr_b"]) + c["lm_b"]
    else:
        w = 0.0
    kvb = lambda ctx, tok: L * c["kv_tok"] * (ctx + tok)
    b_tot = w + kvb(pf_ctx + dc_ctx, S)
    ai = f_tot / b_tot if b_tot else 0.0
    f_pf = L * P * c["lin"] + L * c["pair"] * pf_pairs
    f_dc = L * D * c["lin"] + ndc * c["lm_f"] + L * c["pair"] * dc_pairs
    den_pf = w + kvb(pf_ctx, P)
    balance = gpu["peak_flops"] / gpu["hbm_bandwidth_bytes_per_s"]
    out = {
        "prefill_tokens": float(P),
        "decode_tokens": float(D),
        "scheduled_tokens": float(S),
        "num_prefill_reqs": float(npf),
        "num_decode_reqs": float(ndc),
        "kv_mean": kv_mean,
        "kv_max": kv_max,
        "kv_min": kv_min,
        "kv_std": kv_std,
        "kv_sum": kv_sum,
        "prefill_fraction": P / S if S else 0.0,
        "decode_fraction": D / S if S else 0.0,
        "is_mixed_batch": 1.0 if npf and ndc else 0.0,
        "is_pure_prefill": 1.0 if npf and not ndc else 0.0,
        "total_flops_estimate": f_tot,
        "arithmetic_intensity": ai,
        "compute_bound_indicator": 1.0 if ai > balance else 0.0,
        "prefill_compute_intensity": (f_pf / den_pf if den_pf else 0.0) if P > 0 else 0.0,
        "decode_memory_intensity": ((w + kvb(dc_ctx, D)) / f_dc if f_dc else 0.0) if D > 0 else 0.0,
        "attention_flops_ratio": f_attn / f_tot if f_tot else 0.0,
        "gemm_flops_ratio": f_lin / f_tot if f_tot else 0.0,
        "active_param_ratio": c["active"],
    }
    for name in model_names:
        out[f"model_id={name}"] = 1.0 if name == model_name else 0.0
    out["tp_degree"] = float(tp)
    out["is_moe"] = c["moe"]
    out["prefill_tokens×decode_tokens"] = float(P * D)
    out["kv_max×num_decode_reqs"] = kv_max * ndc
    out["arithmetic_intensity×is_moe"] = ai * c["moe"]
    out["prefill_tokens×kv_mean"] = P * kv_mean
    out["batch_size×kv_max"] = (npf + ndc) * kv_max
    out["t_compute_us"] = f_tot / gpu["peak_flops"] * 1e6
    out["t_memory_us"] = b_tot / gpu["hbm_bandwidth_bytes_per_s"] * 1e6
    return out


def _tree_value(nodes: list, x: list) -> float:
    """One exported tree on a feature list (the format's rule; _trees_sum walks a compiled form)."""
    i = 0
    while True:
        n = nodes[i]
        if n[0] < 0:  # leaf: [-1, value]
            return n[1]
        feat, thr, left, right, missing_left = n
        v = x[feat]
        i = left if (v <= thr if v == v else missing_left) else right


def _compile_tree(nodes: list) -> tuple:
    """Parallel lists (feature, threshold, left, right, missing-left, leaf value): no per-node unpacking."""
    inner = [n[0] >= 0 for n in nodes]
    return (
        [n[0] for n in nodes],
        [n[1] if k else 0.0 for n, k in zip(nodes, inner)],
        [n[2] if k else 0 for n, k in zip(nodes, inner)],
        [n[3] if k else 0 for n, k in zip(nodes, inner)],
        [bool(n[4]) if k else False for n, k in zip(nodes, inner)],
        [0.0 if k else n[1] for n, k in zip(nodes, inner)],
    )


_COMPILED: dict[int, tuple] = {}  # id(exported["trees"]) → (that list, compiled trees)


def _trees_sum(trees: list, x: list, s: float = 0.0) -> float:
    """Σ tree values: the same rule as _tree_value (NaN goes the missing-value way), 1.4× faster."""
    hit = _COMPILED.get(id(trees))
    if hit is None or hit[0] is not trees:
        if len(_COMPILED) > 64:
            _COMPILED.clear()
        hit = _COMPILED[id(trees)] = (trees, [_compile_tree(t) for t in trees])
    for F, T, L, R, M, V in hit[1]:
        i = 0
        f = F[0]
        while f >= 0:
            v = x[f]
            if v <= T[i]:
                i = L[i]
            elif v == v:
                i = R[i]
            else:
                i = L[i] if M[i] else R[i]
            f = F[i]
        s += V[i]
    return s


def predict_from_features(feats: dict, exported: dict) -> float:
    """Apply an exported model (linear, log-linear or boosted trees) to a feature dict."""
    x = [feats[f] for f in exported["features"]]
    kind = exported["kind"]
    if kind in ("linear", "log_linear"):
        s = exported["intercept"]
        for xi, mu, sd, w in zip(x, exported["mean"], exported["scale"], exported["coef"]):
            s += w * (xi - mu) / sd
        # exp capped at exp(50) µs (≈ 160 years), as the study predicts (fitted.LogLinearFit): a cap, not a value
        y = math.exp(min(s, 50.0)) * exported.get("smearing", 1.0) if kind == "log_linear" else s
    elif kind == "trees":
        s = _trees_sum(exported["trees"], x, exported["baseline"])
        y = math.exp(s) if exported.get("log_target") else s
    else:
        raise ValueError(f"unknown exported model kind {kind!r}")
    floor = exported.get("floor_us")  # the positive floor, the same rule as fitted.predict_model
    return y if floor is None else max(y, floor)


def feature_predictor(exported: dict):
    """predict_from_features(·, exported) as a function of the feature dict alone, the linear kinds' numbers read once
    (the simulator predicts once per step): the same operations in the same order, so the same float."""
    kind = exported["kind"]
    if kind not in ("linear", "log_linear"):
        return lambda feats: predict_from_features(feats, exported)
    terms = tuple(zip(exported["features"], exported["mean"], exported["scale"], exported["coef"]))
    intercept, floor = exported["intercept"], exported.get("floor_us")
    log_linear, smearing = kind == "log_linear", exported.get("smearing", 1.0)

    def predict(feats: dict) -> float:
        s = intercept
        for f, mu, sd, w in terms:
            s += w * (feats[f] - mu) / sd
        y = math.exp(min(s, 50.0)) * smearing if log_linear else s
        return y if floor is None else max(y, floor)

    return predict


def predict_step_time(batch, exported: dict, model_spec: dict, gpu_spec: dict, tp: int) -> float:
    """Predicted step time (µs, the exported model's target) of one batch."""
    feats = batch_features(batch, model_spec, gpu_spec, tp, exported["model_names"])
    return predict_from_features(feats, exported)
