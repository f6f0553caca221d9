import numpy as np
import polars as pl
import pytest

from stepml_core.catalog import UnknownModelError, gpu_spec, model_spec
from stepml_core.features.roofline import per_gpu_constants
from stepml_core.features.step_features import (
    SEED_FEATURES,
    RequestInBatch,
    batch_features,
    feature_columns,
    snapshot_aggregates,
    step_table_features,
)

# docs/features.md §1, per GPU: linear FLOPs/token/layer (M), weight MB/layer, KV B/token/layer, attn FLOPs/pair/layer, weights GB
SPEC_TABLE = {
    ("llama-2-7b", 1): (404.8, 404.8, 16384, 16384, 13.48),
    ("llama-2-70b", 4): (427.8, 427.8, 1024, 8192, 34.49),
    ("codellama-34b", 2): (692.1, 692.1, 2048, 16384, 33.74),
    ("mixtral-8x7b", 2): (394.3, 1451.3, 2048, 8192, 46.70),
}


@pytest.mark.parametrize("key", SPEC_TABLE)
def test_per_gpu_constants_match_spec_table(key):
    c = per_gpu_constants(model_spec(key[0]), key[1])
    lin, w, kv, attn, total = SPEC_TABLE[key]
    assert c.linear_flops_per_token_per_layer / 1e6 == pytest.approx(lin, rel=1e-3)
    assert c.weight_bytes_per_layer / 1e6 == pytest.approx(w, rel=1e-3)
    assert c.kv_bytes_per_token_per_layer == kv
    assert c.attn_flops_per_pair_per_layer == attn
    assert c.weight_bytes_total / 1e9 == pytest.approx(total, rel=2e-3)


def test_mixtral_active_ratio_and_aliases():
    assert model_spec("mixtral-8x7b-v0-1").active_param_ratio == pytest.approx(0.272, abs=1e-3)
    assert model_spec("llama-2-70b-hf").name == "llama-2-70b"
    with pytest.raises(UnknownModelError, match="models.json"):
        model_spec("gpt-5")


def test_decode_request_adds_exact_attention_flops_and_kv_bytes():
    m, g = model_spec("llama-2-7b"), gpu_spec()
    c = per_gpu_constants(m, 1)
    one = batch_features([RequestInBatch(progress_index=1000, new_tokens=1, prompt_len=500)], m, g, 1)
    assert one["kv_mean"] == 1000 and one["num_decode_reqs"] == 1 and one["decode_tokens"] == 1
    attn = one["attention_flops_ratio"] * one["total_flops_estimate"]
    assert attn == pytest.approx(c.layers * c.attn_flops_per_pair_per_layer * 1001)


def test_prefill_from_zero_attention_pairs():
    m, g = model_spec("llama-2-7b"), gpu_spec()
    c = per_gpu_constants(m, 1)
    f = batch_features([RequestInBatch(0, 512, 512)], m, g, 1)
    attn = f["attention_flops_ratio"] * f["total_flops_estimate"]
    assert attn == pytest.approx(c.layers * c.attn_flops_per_pair_per_layer * 512 * 513 / 2)
    assert f["is_pure_prefill"] == 1 and f["kv_mean"] == 0


def test_dense_linear_intensity_close_to_tokens():
    """For dense bf16 linear layers F/B ≈ T when KV and LM head are small."""
    m, g = model_spec("llama-2-70b"), gpu_spec()
    f = batch_features([RequestInBatch(0, 256, 10_000)], m, g, 4)
    assert 150 < f["arithmetic_intensity"] < 300


def _random_batches(rng, n_steps):
    rows, snaps = [], []
    for sid in range(1, n_steps + 1):
        reqs = []
        for _ in range(rng.integers(1, 40)):
            p = int(rng.integers(50, 1500))
            if rng.random() < 0.3:
                c = int(rng.integers(0, p))
                q = int(rng.integers(1, p - c + 1))
            else:
                c = int(rng.integers(p, p + 800))
                q = 1
            reqs.append(RequestInBatch(c, q, p))
        P = sum(r.new_tokens for r in reqs if r.progress_index < r.prompt_len)
        D = sum(r.new_tokens for r in reqs if r.progress_index >= r.prompt_len)
        npf = sum(r.progress_index < r.prompt_len for r in reqs)
        rows.append(
            {
                "step.id": sid,
                "batch.prefill_tokens": P,
                "batch.decode_tokens": D,
                "batch.scheduled_tokens": P + D,
                "batch.num_prefill_reqs": npf,
                "batch.num_decode_reqs": len(reqs) - npf,
                "queue.running_depth": len(reqs),
                "kv.blocks_total_gpu": 7000,
                "kv.blocks_free_gpu": 5000,
            }
        )
        for i, r in enumerate(reqs):
            snaps.append(
                {
                    "step.id": sid,
                    "request.id": f"r{i}",
                    "request.num_computed_tokens": r.progress_index,
                    "request.scheduled_tokens_this_step": r.new_tokens,
                    "request.num_prompt_tokens": r.prompt_len,
                }
            )
        snaps.append(
            {
                "step.id": sid,
                "request.id": "idle",
                "request.num_computed_tokens": 77,
                "request.scheduled_tokens_this_step": 0,
                "request.num_prompt_tokens": 50,
            }
        )
        yield reqs, rows[-1]
    _random_batches.snaps = snaps
    _random_batches.rows = rows


@pytest.mark.parametrize("model,tp", [("llama-2-7b", 1), ("mixtral-8x7b", 2)])
def test_vectorized_equals_per_batch(model, tp):
    m, g = model_spec(model), gpu_spec()
    rng = np.random.default_rng(7)
    per_batch = [batch_features(reqs, m, g, tp) for reqs, _ in _random_batches(rng, 60)]
    steps, snaps = pl.DataFrame(_random_batches.rows), pl.DataFrame(_random_batches.snaps)
    vec = step_table_features(steps, m, g, tp, request_aggregates=snapshot_aggregates(snaps))
    assert (vec["kv_source"] == "snapshot").all()
    for col in feature_columns():
        np.testing.assert_allclose(vec[col].to_numpy(), [b[col] for b in per_batch], rtol=1e-9, atol=1e-9, err_msg=col)


def test_proxy_rows_are_labelled_and_thirty_features():
    assert len(SEED_FEATURES) == 30
    m, g = model_spec("llama-2-7b"), gpu_spec()
    steps = pl.DataFrame(
        {
            "step.id": [1, 2],
            "batch.prefill_tokens": [100, 0],
            "batch.decode_tokens": [3, 4],
            "batch.scheduled_tokens": [103, 4],
            "batch.num_prefill_reqs": [1, 0],
            "batch.num_decode_reqs": [3, 4],
            "queue.running_depth": [4, 4],
            "kv.blocks_total_gpu": [1000, 1000],
            "kv.blocks_free_gpu": [900, 900],
        }
    )
    f = step_table_features(steps, m, g, 1)
    assert f["kv_source"].to_list() == ["proxy_blocks", "proxy_blocks"]
    assert f["kv_mean"].to_list() == [400.0, 400.0]  # 100 blocks × 16 tokens / 4 running
    assert f["kv_std"].to_list() == [0.0, 0.0]
