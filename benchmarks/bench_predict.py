"""One step-time prediction for a 128-request batch, features included, with an exported model.

Prints µs per prediction for the dependency-light reference predictor (stdlib only) and, as a
baseline in the same process, the vectorized numpy/polars feature path applied to one row.
Targets: the seed's 1 ms; aim < 50 µs.

    python benchmarks/bench_predict.py [--reps 20000] [--kind linear|log_linear|trees]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import polars as pl

from stepml_core.catalog import gpu_spec, model_spec
from stepml_core.features.step_features import (
    RequestInBatch,
    batch_features,
    feature_columns,
    snapshot_aggregates,
    step_table_features,
)
from stepml_core.stepmodels.estimators import (
    fit_hgb_validated,
    fit_ridge_log_validated,
    fit_ridge_validated,
)
from stepml_core.stepmodels.fitted import predict_model
from stepml_core.stepmodels.json_export import export_model
from stepml_core.stepmodels.reference_predictor import predict_step_time


def make_batch(rng, n=128, prefill=2):
    reqs = [(int(rng.integers(600, 1400)), 1, 600) for _ in range(n - prefill)]
    reqs += [(0, 256, 600) for _ in range(prefill)]
    return reqs


def fit_example(kind: str, rng) -> dict:
    m, g = model_spec("llama-2-70b"), gpu_spec()
    batches = [
        [RequestInBatch(*r) for r in make_batch(rng, int(rng.integers(1, 128)), int(rng.integers(0, 3)))]
        for _ in range(600)
    ]
    X = np.array([[batch_features(b, m, g, 4)[c] for c in feature_columns()] for b in batches])
    col = feature_columns().index
    y = 9000 + 20 * X[:, col("decode_tokens")] + X[:, col("kv_sum")] / 50
    y = y * rng.lognormal(0, 0.03, len(y))
    args = ("bench", "cycle_us", feature_columns(), X[:400], y[:400], X[400:], y[400:])
    fitted = {
        "linear": lambda: {**fit_ridge_validated(*args).to_dict(), "kind": "linear"},
        "log_linear": lambda: fit_ridge_log_validated(*args),
        "trees": lambda: {k: v for k, v in fit_hgb_validated(*args).items() if k != "_sklearn"},
    }[kind]()
    return json.loads(
        json.dumps(export_model(fitted, model="llama-2-70b", tp=4, data_versions={"bench": "synthetic-random"}))
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20000)
    ap.add_argument("--kind", default="all", choices=["all", "linear", "log_linear", "trees"])
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    batch = make_batch(rng)
    for kind in ["linear", "log_linear", "trees"] if a.kind == "all" else [a.kind]:
        exp = fit_example(kind, rng)
        ms, gs = exp["model_spec"], exp["gpu_spec"]
        reps = a.reps if kind != "trees" else max(1000, a.reps // 10)
        predict_step_time(batch, exp, ms, gs, 4)
        t = time.perf_counter()
        for _ in range(reps):
            predict_step_time(batch, exp, ms, gs, 4)
        ref_us = (time.perf_counter() - t) / reps * 1e6
        # baseline: vectorized numpy/polars path on one step
        snaps = pl.DataFrame(
            {
                "step.id": [1] * len(batch),
                "request.num_computed_tokens": [c for c, _, _ in batch],
                "request.scheduled_tokens_this_step": [q for _, q, _ in batch],
                "request.num_prompt_tokens": [p for _, _, p in batch],
            }
        )
        P = sum(q for c, q, p in batch if c < p)
        D = sum(q for c, q, p in batch if c >= p)
        step = pl.DataFrame(
            {
                "step.id": [1],
                "batch.prefill_tokens": [P],
                "batch.decode_tokens": [D],
                "batch.scheduled_tokens": [P + D],
                "batch.num_prefill_reqs": [sum(c < p for c, _, p in batch)],
                "batch.num_decode_reqs": [sum(c >= p for c, _, p in batch)],
                "queue.running_depth": [len(batch)],
                "kv.blocks_total_gpu": [30000],
                "kv.blocks_free_gpu": [20000],
            }
        )
        m, g = model_spec("llama-2-70b"), gpu_spec()
        n_base = 200
        t = time.perf_counter()
        for _ in range(n_base):
            f = step_table_features(step, m, g, 4, request_aggregates=snapshot_aggregates(snaps))
            base_pred = predict_model(exp, f.select(exp["features"]).to_numpy())
        base_us = (time.perf_counter() - t) / n_base * 1e6
        ref_pred = predict_step_time(batch, exp, ms, gs, 4)
        assert abs(ref_pred - max(base_pred[0], exp["floor_us"])) <= 1e-6 * abs(ref_pred), (ref_pred, base_pred)
        print(
            f"{kind:10s} reference predictor: {ref_us:8.1f} µs/prediction (128 requests, features included)  "
            f"target < 1000 µs: {'met' if ref_us < 1000 else 'MISSED'}; aim < 50 µs: {'met' if ref_us < 50 else 'missed'}  |  "
            f"baseline vectorized path: {base_us:8.1f} µs  ratio {base_us / ref_us:5.1f}×"
        )


if __name__ == "__main__":
    main()
