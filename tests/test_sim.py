"""The simulator package: the synthesizer's output is pinned (byte-identical across the refactor into
stepml_core/sim), phases are callable on their own, clocks obey their contracts."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from stepml_core.sim import CycleClock, EngineCore, FixedArrivals, SchedulerConfig, SimRequest
from stepml_core.sim.kv_cache import BlockPool
from stepml_core.synth import synthesize_runs

# sha256 of every file of one small synthetic run (7B reasoning: preemptions and client timeouts), seed 11,
# scale 0.05 — computed with the engine before it moved into stepml_core/sim and unchanged since. A change
# here means the synthesizer's output changed: bump SYNTH_VERSION and say why.
GOLDEN = {
    "exp-config.yaml": "ada7e25e944b1858808e39b3ac07177b021502cecf4c08529ec7f05619f53a0d",
    "profile.yaml": "ab1a336ea93dd72d274f21679f078a706c9b6d675d12a67bca6122f859d5976c",
    "results/config.yaml": "8d5d3a2a3e2eb2cdf8dcdf7538cbab2da3ab7c7a3778d6430b602485bca31c89",
    "results/per_request_lifecycle_metrics.json": "daae66180b3e8c9c375b0d8cf98f182487f4584c840cf428a93c781e073fd9e0",
    "results/stage_0_lifecycle_metrics.json": "6582e6413e80f022a0f2621d89c78fba9e303db98323e782ad25b8c6aaf02909",
    "results/summary_lifecycle_metrics.json": "8abaf2b7bc3b5629fdcdbbdec8a444bb1adb4d6f1a577ffc9df4713fe66f9592",
    "traces.json.gz": "13d106bc6b4ac0a938fe5a0c94b17e0b2829761972e620f3fc982ffea48e63ae",
}


def test_synthesizer_output_is_pinned(tmp_path):
    (f,) = synthesize_runs(tmp_path, ["20260217-170634-llama-2-7b-tp1-reasoning"], scale=0.05, seed=11, workers=1)
    got = {
        str(p.relative_to(f)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(f.rglob("*"))
        if p.is_file() and p.name != "provenance.json"
    }
    assert got == GOLDEN


class ConstantStep:
    def __init__(self, us):
        self.us = us
        self.batches = []

    def step_time_us(self, b):
        self.batches.append((b.step, b.scheduled_tokens, b.prefill_tokens, b.num_running, b.kv_blocks_free))
        return self.us


def _engine(n=3, prompt=100, out=4, kv_blocks=1000, step_us=1000.0, arrivals=None, **cfg):
    reqs = [SimRequest(i, i, 0, prompt, out, 0) for i in range(n)]
    model = ConstantStep(step_us)
    arr = FixedArrivals(np.asarray(arrivals if arrivals is not None else [0.0] * n), 300.0, lambda p, r: 0.0)
    return EngineCore(reqs, SchedulerConfig(kv_blocks_total=kv_blocks, **cfg), arr, CycleClock(model)), model


def test_cycle_clock_steps_are_back_to_back_and_outputs_one_step_late():
    eng, model = _engine(n=1, prompt=100, out=4)
    sim = eng.run()
    ts = np.diff(np.asarray(sim.ts_start_ns))
    assert (np.abs(ts - 1_000_000) <= 1).all()  # each cycle is the model's 1 ms (the clock counts whole ns)
    R = sim.requests[0]
    assert (
        R.first_token_step == 1 and R.segments == [(1, 4)] and sim.steps == 5
    )  # prefill, 3 decodes, the lagged last step
    assert sim.update_s[0] == pytest.approx(1.0 + 0.001)  # step 1's output at the end of its cycle


def test_budget_and_max_num_seqs_limit_admission():
    eng, model = _engine(
        n=5,
        prompt=1000,
        out=2,
        max_num_batched_tokens=2048,
        max_num_seqs=2,
        arrivals=[0.0, 0.0005, 0.0005, 0.0005, 0.0005],
    )
    eng.run()
    assert max(b[3] for b in model.batches) == 2 and max(b[1] for b in model.batches) <= 2048
    second = model.batches[1]  # request 0 decodes, request 1's prompt runs; 2-4 wait for a free seq
    assert second[1] == 1 + 1000 and second[3] == 2


def test_preemption_when_kv_runs_out():
    eng, model = _engine(n=4, prompt=64, out=200, kv_blocks=30)  # 4 × (4 + 13) blocks needed, 30 available
    sim = eng.run()
    assert sim.counters["preemptions"] > 0
    assert all(R.finish_status == "length" for R in sim.requests)  # recomputed, every request still finishes


def _two(prompts, outs, arrivals, **cfg):
    reqs = [SimRequest(i, i, 0, p, o, 0) for i, (p, o) in enumerate(zip(prompts, outs))]
    arr = FixedArrivals(np.asarray(arrivals, dtype=float), 300.0, lambda p, r: 0.0)
    return EngineCore(reqs, SchedulerConfig(**cfg), arr, CycleClock(ConstantStep(1000.0)))


def test_prompts_over_16384_tokens_never_share_prefix_cache_keys():
    """Issue 21: with 1,024 blocks per key stride, prompt 0's blocks past 16,384 tokens had prompt 1's keys."""
    sim = _two([17_000, 17_000], [2, 2], [0.0, 5.0], kv_blocks_total=4000).run()
    a, b = sim.requests
    assert a.finish_status == b.finish_status == "length"
    assert b.cached_tokens == 0  # a different prompt: no prefix-cache hit (was 608 tokens)
    same = _two([17_000, 17_000], [2, 2], [0.0, 5.0], kv_blocks_total=4000)
    same.reqs[1].prompt_id = 0  # the same prompt twice: the whole prompt but its last token hits
    assert same.run().requests[1].cached_tokens == 16 * ((17_000 - 1) // 16)


@pytest.mark.parametrize("cfg", [{"kv_blocks_total": 100}, {"kv_blocks_total": 4000, "max_model_len": 4096}])
def test_a_request_that_can_never_fit_is_refused_at_once_the_others_run(cfg):
    """vLLM answers a request over max_model_len (its KV cache holds max_model_len) with an error at once; before,
    one stayed at the head of the queue and every later step was empty until its client gave up."""
    sim = _two([5_000, 100, 100], [10, 10, 10], [0.0, 0.01, 0.02], **cfg).run()
    assert [R.finish_status for R in sim.requests] == ["refused", "length", "length"]
    assert sim.counters["refused"] == 1 and sim.counters["empty_steps"] <= 2 and sim.steps < 30


def test_an_engine_that_cannot_progress_stops_with_an_error_not_300k_empty_steps():
    from stepml_core.sim.engine import MAX_EMPTY_STEPS, SimulationStalled

    eng = _two([100], [10], [0.0], kv_blocks_total=100, max_num_batched_tokens=0)
    with pytest.raises(SimulationStalled, match=f"scheduled nothing for {MAX_EMPTY_STEPS + 1} steps in a row"):
        eng.run()


@pytest.mark.parametrize("enabled", [True, False])
def test_a_simulation_pauses_the_garbage_collector_and_restores_it_even_when_it_fails(enabled):
    """EngineCore.run runs with the cyclic collector off (engine.gc_paused: a speed-up, same results) and leaves it as
    it found it, also when the simulation raises."""
    import gc

    from stepml_core.sim.engine import SimulationStalled

    seen = []

    class Watch(ConstantStep):
        def step_time_us(self, b):
            seen.append(gc.isenabled())
            return super().step_time_us(b)

    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        eng = _two([100, 50], [10, 10], [0.0, 0.01])
        eng.clock = CycleClock(Watch(1000.0))
        assert eng.run().requests[1].finish_status == "length"
        assert seen and not any(seen) and gc.isenabled() is enabled
        stalled = _two([100], [10], [0.0], kv_blocks_total=100, max_num_batched_tokens=0)
        with pytest.raises(SimulationStalled):
            stalled.run()
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()


class RecordingRequests:
    """A constant step time that keeps each batch's labels, prompt chunks and per-request view (b.requests())."""

    def __init__(self, us: float = 1000.0):
        self.us = us
        self.steps = []

    def step_time_us(self, b):
        self.steps.append((b.step, b.scheduled_tokens, b.num_scheduled, list(b.chunks), b.requests()))
        return self.us


def _mixed_engine(model, n=40, kv_blocks=200, seed=3):
    """Prompts chunked over several steps (a 512-token budget), KV pressure (preemptions) and client timeouts."""
    rng = np.random.default_rng(seed)
    prompts, outs = rng.integers(20, 1500, n), rng.integers(1, 300, n)
    reqs = [SimRequest(i, i, 0, int(p), int(o), 0) for i, (p, o) in enumerate(zip(prompts, outs))]
    arr = FixedArrivals(np.sort(rng.uniform(0, 0.05, n)), 0.25, lambda p, r: 0.0)
    cfg = SchedulerConfig(kv_blocks_total=kv_blocks, max_num_batched_tokens=512, max_num_seqs=16)
    return EngineCore(reqs, cfg, arr, CycleClock(model))


def test_the_step_models_view_of_a_batch_holds_every_scheduled_token_also_the_last_prompt_chunk():
    """A step model reads step N's requests after step N's prompt chunks were applied; a request whose prefill
    completed in N is a decoder from N+1 on. Before, it was counted in N as a decoder with one token at
    context target − 1, its last prompt chunk lost (14,100 of 115,632 steps, 559,078 prompt tokens of the
    synthetic Llama-2-7B general replay of ridge_30f)."""
    model = RecordingRequests()
    sim = _mixed_engine(model).run()
    assert sim.counters["preemptions"] > 0 and sim.steps > 50  # the batches this test is about happened
    completing = 0
    for step, tokens, n_sched, chunks, reqs in model.steps:
        assert sum(q for _, q, _ in reqs) == tokens, step
        assert len(reqs) == n_sched, step
        chunk_view = sorted((c, q, p) for q, c, p in chunks)
        assert sorted(r for r in reqs if r[1] > 1 or r[0] < r[2]) == [c for c in chunk_view if c[1] > 1 or c[0] < c[2]]
        completing += sum(c + q >= p for q, c, p in chunks)
    assert completing > 0


class ComparingSums:
    """Checks, every step, the incremental decode statistics against the reference loop over b.requests()."""

    def __init__(self):
        self.steps = 0

    def step_time_us(self, b):
        from stepml_core.stepmodels.reference_predictor import batch_sums
        from stepml_core.stepmodels.sim_step_time import sums_from_decode_stats

        fast, ref = sums_from_decode_stats(b.decode_context_stats(), b.chunks), batch_sums(b.requests())
        assert fast == ref and [type(x) for x in fast] == [type(x) for x in ref], (b.step, fast, ref)
        self.steps += 1
        return 1000.0 + 3.0 * b.scheduled_tokens


@pytest.mark.parametrize("seed,kv_blocks", [(3, 200), (4, 120), (5, 2000)])
def test_the_decoders_context_statistics_kept_incrementally_equal_the_loop_over_the_batch(seed, kv_blocks):
    """EngineCore.decode_context_stats (DecodeContexts: heaps with lazy deletion, a pending list for decoders of
    the next step) gives a step model the same sums as reference_predictor.batch_sums over b.requests(), with
    chunked prefills, preemptions (decoders leave mid-run and return as recompute chunks) and client timeouts."""
    model = ComparingSums()
    sim = _mixed_engine(model, n=60, kv_blocks=kv_blocks, seed=seed).run()
    assert model.steps == sim.steps and sim.steps > 50
    if kv_blocks < 1000:
        assert sim.counters["preemptions"] > 0


def _resuming_engine(seed: int, kv_blocks: int):
    """Shared system prompts, repeated prompts, long outputs and a KV cache that runs out: decoders are preempted
    and resume with prefix-cache hits on their own output blocks, while other requests' blocks evict cached ones."""
    rng = np.random.default_rng(seed)
    n = 80
    prompts, outs = rng.integers(40, 600, n), rng.integers(60, 500, n)
    groups, prompt_ids = rng.integers(0, 3, n), rng.integers(0, 25, n)
    reqs = [
        SimRequest(i, int(prompt_ids[i]), int(groups[i]), int(prompts[i]), int(outs[i]), min(2, int(prompts[i]) // 16))
        for i in range(n)
    ]
    arr = FixedArrivals(np.sort(rng.uniform(0, 0.5, n)), 1e6, lambda p, r: 0.0)
    cfg = SchedulerConfig(kv_blocks_total=kv_blocks, max_num_batched_tokens=1024, max_num_seqs=32)
    return EngineCore(reqs, cfg, arr, CycleClock(ConstantStep(1000.0)))


class _CountingPool(BlockPool):
    """Counts admissions whose prefix-cache hits reach into the request's own output blocks (a resumption)."""

    own_output_hits = 0

    def lookup(self, R, tokens):
        hits = super().lookup(R, tokens)
        self.own_output_hits += len(hits) > max(R.prompt_full_blk, R.nshared_blk)
        return hits


@pytest.mark.parametrize("seed,kv_blocks", [(1, 300), (2, 450), (3, 700)])
def test_output_blocks_registered_on_preemption_give_the_same_run_as_registering_each_as_it_fills(
    monkeypatch, seed, kv_blocks
):
    """engine.LAZY_OUTPUT_KEYS: a decoder's output blocks enter the prefix cache when it is preempted instead of
    one by one as they fill. Every request's events, output segments and hit blocks, every step's time and the
    counters are the same as with eager registration, under preemptions, resumptions that hit their own output
    blocks, shared system prompts and evictions."""
    from stepml_core.sim import engine as engine_module

    runs = {}
    for lazy in (True, False):
        monkeypatch.setattr(engine_module, "LAZY_OUTPUT_KEYS", lazy)
        eng = _resuming_engine(seed, kv_blocks)
        eng.pool = _CountingPool(kv_blocks)
        sim = eng.run()
        runs[lazy] = (
            [(R.events, R.segments, R.hit_blk, R.cached_tokens, R.finish_status) for R in sim.requests],
            sim.ts_start_ns,
            sim.counters,
            eng.pool.own_output_hits,
        )
    assert runs[True] == runs[False]
    assert runs[True][2]["preemptions"] > 0 and runs[True][3] > 0  # resumptions hit their own output blocks
