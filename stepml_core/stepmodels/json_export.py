"""Export a fitted step-time model as JSON for simulators (no pickle, no scikit-learn needed to use it).

The JSON carries: kind (one of stepml_core.stepmodels.fitted.KINDS), target and its unit (µs), the positive
floor (predictions are max(ŷ, floor_us), the same rule as the study's), feature order
and units, scaler (mean, scale) and coefficients or trees, the model and GPU specs it was
fitted for, the model-id one-hot vocabulary, and a fingerprint of the training data.
Use it with `stepml_core.stepmodels.reference_predictor.predict_step_time`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from stepml_core.catalog import gpu_spec, known_model_names, model_spec

FEATURE_UNITS = {
    "prefill_tokens": "tokens",
    "decode_tokens": "tokens",
    "scheduled_tokens": "tokens",
    "num_prefill_reqs": "requests",
    "num_decode_reqs": "requests",
    "kv_mean": "tokens",
    "kv_max": "tokens",
    "kv_min": "tokens",
    "kv_std": "tokens",
    "kv_sum": "tokens",
    "prefill_fraction": "1",
    "decode_fraction": "1",
    "is_mixed_batch": "0/1",
    "is_pure_prefill": "0/1",
    "total_flops_estimate": "FLOP per GPU",
    "arithmetic_intensity": "FLOP/byte",
    "compute_bound_indicator": "0/1",
    "prefill_compute_intensity": "FLOP/byte",
    "decode_memory_intensity": "byte/FLOP",
    "attention_flops_ratio": "1",
    "gemm_flops_ratio": "1",
    "active_param_ratio": "1",
    "tp_degree": "GPUs",
    "is_moe": "0/1",
    "prefill_tokens×decode_tokens": "tokens²",
    "kv_max×num_decode_reqs": "tokens·requests",
    "arithmetic_intensity×is_moe": "FLOP/byte",
    "prefill_tokens×kv_mean": "tokens²",
    "batch_size×kv_max": "requests·tokens",
    "t_compute_us": "µs",
    "t_memory_us": "µs",
}


def training_fingerprint(data_versions: dict[str, str], n_rows: int) -> str:
    h = hashlib.sha256(json.dumps({"runs": data_versions, "n": n_rows}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def export_model(
    fitted: dict, *, model: str, tp: int, data_versions: dict[str, str], floor_us: float | None = None
) -> dict:
    """A fitted model dict (from study.fit_models) → self-contained export JSON object.

    floor_us: the positive floor the predictor applies (ŷ = max(ŷ, floor_us)); by default the
    fitted model's own floor_us (the rule of `fitted.predict_model`), so the exported
    predictor and the study predict the same numbers."""
    from stepml_core.stepmodels.fitted import KINDS

    if fitted.get("kind") not in KINDS:
        raise ValueError(f"cannot export model kind {fitted.get('kind')!r} (registered kinds: {sorted(KINDS)})")
    out = {k: v for k, v in fitted.items() if not k.startswith("_")}
    out.update(
        {
            "format": "stepml-step-time-model/1",
            "target_unit": "µs",
            "feature_units": {
                f: FEATURE_UNITS.get(f, "0/1" if f.startswith("model_id=") else "?") for f in fitted["features"]
            },
            "model_names": known_model_names(),
            "model_spec": asdict(model_spec(model)),
            "gpu_spec": asdict(gpu_spec()),
            "tp": tp,
            "training_data": {
                "runs": data_versions,
                "n_rows": fitted.get("n_fit"),
                "fingerprint": training_fingerprint(data_versions, fitted.get("n_fit", 0)),
            },
            "floor_us": fitted.get("floor_us") if floor_us is None else floor_us,
        }
    )
    return out


def write_export(obj: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=True))
    return path
