"""Batch reconstruction from journey events (stepml_core.tables.reconstruct) and teacher-forced E2E fidelity (stepml_core.e2e)."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import numpy as np
import polars as pl
import pytest

import stepml_core.traces.writer as trace_writer
from stepml_core.features.step_features import AGGREGATE_FIELDS, snapshot_aggregates
from stepml_core.study.e2e import (
    compare_step_table,
    e2e_fidelity,
    gap_cycle_us,
    observed_cycle_us,
    step_inputs,
    step_table,
)
from stepml_core.synth import synthesize_runs
from stepml_core.synth.spec import engine_params
from stepml_core.tables.batch_checks import compare_with_batch_summary, compare_with_snapshots, request_aggregates
from stepml_core.tables.reconstruct import reconstruct, reconstruct_batches, reconstruct_run
from stepml_core.traces import read_traces

RUN_7B_CODEGEN = "20260217-155451-llama-2-7b-tp1-codegen"
RUN_7B_REASONING = "20260217-170634-llama-2-7b-tp1-reasoning"  # KV pressure: preemptions, recompute, aborts


# ----------------------------------------------------------------------------- hand-built journeys


def journey(*events) -> pl.DataFrame:
    """events: (request, type, step, ts, prompt, decode_done, max_tokens[, kind/status[, prefill_done]])."""
    rows = []
    for e in events:
        rid, typ, step, ts, prompt, done, mx = e[:7]
        extra = e[7] if len(e) > 7 else None
        pdone = e[8] if len(e) > 8 else (prompt if typ in ("FIRST_TOKEN", "FINISHED") else 0)
        rows.append(
            {
                "request.id": rid,
                "event.type": typ,
                "scheduler.step": step,
                "ts.monotonic_ns": ts,
                "phase": "WAITING" if typ == "QUEUED" else ("DECODE" if done else "PREFILL"),
                "prefill.done_tokens": pdone,
                "prefill.total_tokens": prompt,
                "decode.done_tokens": done,
                "decode.max_tokens": mx,
                "num_preemptions": 0,
                "schedule.kind": extra if typ == "SCHEDULED" else None,
                "finish.status": extra if typ == "FINISHED" else None,
            }
        )
    return pl.DataFrame(rows, schema_overrides={"schedule.kind": pl.Utf8, "finish.status": pl.Utf8})


def rows_of(b: pl.DataFrame, rid: str) -> list[tuple]:
    return (
        b.filter(pl.col("request.id") == rid)
        .sort("step.id")
        .select("step.id", "progress_index", "new_tokens", "num_output_tokens", "phase")
        .rows()
    )


def test_chunked_prefill_and_one_step_lag():
    j = journey(
        ("a", "QUEUED", 0, 100, 5000, 0, 3),
        ("a", "SCHEDULED", 1, 200, 5000, 0, 3, "FIRST"),
        ("a", "FIRST_TOKEN", 3, 900, 5000, 1, 3),
        ("a", "FINISHED", 5, 1500, 5000, 3, 3, "length"),
    )
    b = reconstruct_batches(j)
    assert list(b.columns[:6]) == ["step.id", "request.id", "progress_index", "new_tokens", "prompt_len", "phase"]
    assert rows_of(b, "a") == [
        (1, 0, 2048, 0, "PREFILL"),
        (2, 2048, 2048, 0, "PREFILL"),
        (3, 4096, 904, 0, "PREFILL"),
        (4, 5000, 1, 0, "PREFILL"),  # the extra step before the first token is known (async lag)
        (5, 5001, 1, 1, "DECODE"),
        (6, 5002, 1, 2, "DECODE"),  # still in D+1's batch
    ]
    # synchronous loop: no lag
    b0 = reconstruct(j, output_lag=0).batches
    assert rows_of(b0, "a")[3:] == [(4, 5000, 1, 1, "DECODE"), (5, 5001, 1, 2, "DECODE")]


def test_budget_shared_in_running_order():
    j = journey(
        ("A", "QUEUED", 0, 1, 3000, 0, 2),
        ("A", "SCHEDULED", 1, 10, 3000, 0, 2, "FIRST"),
        ("A", "FIRST_TOKEN", 2, 50, 3000, 1, 2),
        ("A", "FINISHED", 3, 70, 3000, 2, 2, "length"),
        ("B", "QUEUED", 1, 15, 1500, 0, 2),
        ("B", "SCHEDULED", 2, 20, 1500, 0, 2, "FIRST"),
        ("B", "FIRST_TOKEN", 3, 71, 1500, 1, 2),
        ("B", "FINISHED", 4, 90, 1500, 2, 2, "length"),
    )
    b = reconstruct_batches(j)
    assert rows_of(b, "A") == [
        (1, 0, 2048, 0, "PREFILL"),
        (2, 2048, 952, 0, "PREFILL"),
        (3, 3000, 1, 0, "PREFILL"),
        (4, 3001, 1, 1, "DECODE"),
    ]
    # B is admitted after A completes and gets the rest of the budget, then its remainder
    assert rows_of(b, "B") == [
        (2, 0, 1096, 0, "PREFILL"),
        (3, 1096, 404, 0, "PREFILL"),
        (4, 1500, 1, 0, "PREFILL"),
        (5, 1501, 1, 1, "DECODE"),
    ]
    # running order within a step: A (admitted earlier) before B
    assert b.filter(pl.col("step.id") == 3)["request.id"].to_list() == ["A", "B"]


def test_event_order_does_not_matter():
    j = journey(
        ("A", "QUEUED", 0, 1, 3000, 0, 2),
        ("A", "SCHEDULED", 1, 10, 3000, 0, 2, "FIRST"),
        ("A", "FIRST_TOKEN", 2, 50, 3000, 1, 2),
        ("A", "FINISHED", 3, 70, 3000, 2, 2, "length"),
        ("B", "QUEUED", 1, 15, 1500, 0, 2),
        ("B", "SCHEDULED", 2, 20, 1500, 0, 2, "FIRST"),
        ("B", "FIRST_TOKEN", 3, 71, 1500, 1, 2),
        ("B", "FINISHED", 4, 90, 1500, 2, 2, "length"),
    )
    shuffled = j.sample(fraction=1.0, shuffle=True, seed=3)
    assert reconstruct_batches(shuffled).equals(reconstruct_batches(j))


def snapshot_rows(*rows) -> pl.DataFrame:
    cols = [
        "step.id",
        "request.id",
        "request.phase",
        "request.num_prompt_tokens",
        "request.num_computed_tokens",
        "request.num_output_tokens",
        "request.num_preemptions",
        "request.scheduled_tokens_this_step",
        "kv.blocks_allocated_gpu",
        "kv.blocks_cached_gpu",
        "request.effective_prompt_len",
    ]
    return pl.DataFrame([dict(zip(cols, r)) for r in rows])


def test_prefix_cache_hit_sources():
    j = journey(
        ("C", "QUEUED", 0, 1, 600, 0, 4),
        ("C", "SCHEDULED", 1, 10, 600, 0, 4, "FIRST"),
        ("C", "FIRST_TOKEN", 1, 40, 600, 1, 4),
        ("C", "FINISHED", 4, 90, 600, 4, 4, "length"),
        ("D", "QUEUED", 5, 100, 600, 0, 2),
        ("D", "SCHEDULED", 6, 110, 600, 0, 2, "FIRST"),
        ("D", "FIRST_TOKEN", 6, 140, 600, 1, 2),
        ("D", "FINISHED", 7, 160, 600, 2, 2, "length"),
        ("E", "QUEUED", 9, 200, 600, 0, 1),
        ("E", "SCHEDULED", 10, 210, 600, 0, 1, "FIRST"),
        ("E", "FIRST_TOKEN", 10, 240, 600, 1, 1),
        ("E", "FINISHED", 10, 241, 600, 1, 1, "length"),
    )
    # C: seen in one decode-step snapshot -> hit at first scheduling = prompt - effective_prompt_len
    snaps = snapshot_rows((3, "C", "DECODE", 600, 601, 1, 0, 1, 38, 36, 24))
    # D: no snapshot, but its only step is sampled: 40 tokens scheduled -> hit 560
    steps = pl.DataFrame({"step.id": [6], "batch.scheduled_tokens": [40]})
    rec = reconstruct(j, snapshots=snaps, steps=steps)
    b = rec.batches
    assert rows_of(b, "C")[0] == (1, 576, 24, 0, "PREFILL")
    assert rows_of(b, "D")[0] == (6, 560, 40, 0, "PREFILL")
    # E: nothing known -> the most frequent known hit for its prompt length (576, from C)
    assert rows_of(b, "E")[0] == (10, 576, 24, 0, "PREFILL")
    src = dict(rec.episodes.select("request.id", "h_source").rows())
    assert src == {"C": "effective_prompt_len", "D": "batch_summary", "E": "estimate"}
    # nothing known at all -> no hit
    assert rows_of(reconstruct_batches(j), "E")[0] == (10, 0, 600, 0, "PREFILL")


def test_preemption_recompute_and_missing_first_token():
    j = journey(
        ("R", "QUEUED", 0, 1, 100, 0, 10),
        ("R", "SCHEDULED", 1, 10, 100, 0, 10, "FIRST"),
        ("R", "FIRST_TOKEN", 1, 30, 100, 1, 10),
        ("R", "PREEMPTED", 5, 50, 100, 3, 10, None, 100),  # decode.done_tokens lags by one
        ("R", "SCHEDULED", 7, 70, 100, 4, 10, "RESUME", 100),
        ("R", "FINISHED", 12, 130, 100, 10, 10, "length"),
    )
    snaps = snapshot_rows((9, "R", "DECODE", 100, 105, 5, 1, 1, 7, 6, 100))  # 6 cached blocks at the resume
    b = reconstruct_batches(j, snapshots=snaps)
    assert rows_of(b, "R") == [
        (1, 0, 100, 0, "PREFILL"),
        (2, 100, 1, 0, "PREFILL"),
        (3, 101, 1, 1, "DECODE"),
        (4, 102, 1, 2, "DECODE"),
        # preempted at 5, resumed at 7: recompute prompt + 4 generated tokens from the 96 cached ones
        (7, 96, 8, 4, "DECODE"),
        *[(t, 104 + t - 8, 1, 4 + t - 8, "DECODE") for t in range(8, 14)],
    ]
    # preempted right after its last prompt chunk, before FIRST_TOKEN was emitted: the
    # completion step comes from the token count carried by the RESUME event
    j2 = journey(
        ("S", "QUEUED", 0, 1, 100, 0, 5),
        ("S", "SCHEDULED", 1, 10, 100, 0, 5, "FIRST"),
        ("S", "PREEMPTED", 2, 20, 100, 0, 5, None, 100),
        ("S", "SCHEDULED", 4, 40, 100, 1, 5, "RESUME", 100),
        ("S", "FINISHED", 7, 70, 100, 5, 5, "length"),
    )
    rec = reconstruct(j2)
    assert rec.episodes.select("episode", "F", "E").rows() == [(1, 1, 1), (2, 4, 8)]
    assert rows_of(rec.batches, "S")[0] == (1, 0, 100, 0, "PREFILL")
    assert rows_of(rec.batches, "S")[1][2:4] == (101 - rows_of(rec.batches, "S")[1][1], 1)


def test_abort_ends_batch_membership():
    j = journey(
        ("X", "QUEUED", 0, 1, 50, 0, 100),
        ("X", "SCHEDULED", 1, 10, 50, 0, 100, "FIRST"),
        ("X", "FIRST_TOKEN", 1, 20, 50, 1, 100),
        ("X", "FINISHED", 5, 60, 50, 4, 100, "aborted"),
        ("Y", "QUEUED", 2, 25, 50, 0, 10),
        ("Y", "FINISHED", 4, 45, 50, 0, 10, "aborted"),
    )
    b = reconstruct_batches(j)
    assert [r[0] for r in rows_of(b, "X")] == [1, 2, 3, 4, 5]
    assert rows_of(b, "Y") == []


# ----------------------------------------------------------------------------- synthetic runs


@contextmanager
def every_step_traced():
    """Synthesize with BATCH_SUMMARY + REQUEST_SNAPSHOTs on every step and no span event cap
    (in-process only): the snapshots are then the ground truth of every step's batch."""
    P = engine_params()
    saved = copy.deepcopy(P)
    cap = trace_writer.MAX_EVENTS_PER_SPAN
    try:
        P["scheduler"]["step_sample_rate"] = 1.0
        P["scheduler"]["rich_subsample_rate"] = 1.0
        trace_writer.MAX_EVENTS_PER_SPAN = 10**9
        yield
    finally:
        P.clear()
        P.update(saved)
        trace_writer.MAX_EVENTS_PER_SPAN = cap


def as_collected(tt, seed: int = 1, rate: float = 0.1, rich: float = 0.1):
    """What the real collection keeps: BATCH_SUMMARY on ~10 % of steps, snapshots on ~10 % of those."""
    rng = np.random.default_rng(seed)
    ids = tt.steps["step.id"].to_numpy()
    keep = ids[rng.random(len(ids)) < rate]
    rich_ids = keep[rng.random(len(keep)) < rich]
    return tt.steps.filter(pl.col("step.id").is_in(keep)), tt.snapshots.filter(pl.col("step.id").is_in(rich_ids))


@pytest.fixture(scope="module")
def truth_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("truth")
    with every_step_traced():
        folders = synthesize_runs(out, [RUN_7B_CODEGEN, RUN_7B_REASONING], scale=0.04, seed=5, workers=1)
    return {f.name: read_traces(f / "traces.json.gz", workers=1) for f in folders}


@pytest.fixture(scope="module")
def collected_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return synthesize_runs(out, [RUN_7B_CODEGEN, RUN_7B_REASONING], scale=0.05, seed=2, workers=1)


def test_agrees_with_every_step_of_a_fully_traced_run(truth_runs):
    """Reconstruct from what a real trace keeps (10 %/1 % sampling), compare with every step's snapshots."""
    for name, tt in truth_runs.items():
        steps, snaps = as_collected(tt)
        rec = reconstruct(tt.journey, steps=steps, snapshots=snaps)
        cs = compare_with_snapshots(rec.batches, tt.snapshots, steps=tt.steps)
        assert cs["pairs"] > 20_000 and cs["snapshot_steps"] == tt.steps.height
        for k in (
            "membership",
            "new_tokens",
            "progress_index",
            "prompt_len",
            "phase",
            "num_output_tokens",
            "all_fields",
        ):
            assert cs[k] >= 0.99, (name, k, cs)
        assert cs["prompt_len"] == 1.0
        cb = compare_with_batch_summary(rec.batches, tt.steps)
        assert cb["all"] >= 0.98, (name, cb)
        if "reasoning" in name:
            assert rec.episodes.height > rec.requests.height  # preemptions were exercised
            assert cs["prefill_work_all_fields"] >= 0.6, cs
        else:
            assert cs["prefill_work_all_fields"] >= 0.9, cs


def test_agrees_with_the_snapshots_of_collected_runs(collected_runs):
    for folder in collected_runs:
        rec, tt = reconstruct_run(folder)
        cs = compare_with_snapshots(rec.batches, tt.snapshots, steps=tt.steps)
        assert cs["pairs"] > 500
        assert cs["all_fields"] >= 0.99 and cs["membership"] >= 0.99, cs
        cb = compare_with_batch_summary(rec.batches, tt.steps)
        assert cb["all"] >= 0.98, cb
        # every step between the first and last journey step has a row unless it was empty
        assert rec.batches["step.id"].n_unique() >= 0.95 * rec.batches["step.id"].max()


def test_request_aggregates_match_snapshot_aggregates(truth_runs):
    tt = truth_runs[[k for k in truth_runs if "codegen" in k][0]]
    steps, snaps = as_collected(tt)
    b = reconstruct(tt.journey, steps=steps, snapshots=snaps).batches
    ra = request_aggregates(b)
    sa = snapshot_aggregates(tt.snapshots).sort("step.id")
    assert ra.columns == sa.columns
    j = sa.join(ra, on="step.id", how="inner", suffix="_r")
    assert j.height >= 0.95 * sa.height
    same = np.ones(j.height, bool)
    for c in sa.columns[1:]:
        a, r = j[c].cast(pl.Float64).fill_null(0).to_numpy(), j[c + "_r"].cast(pl.Float64).fill_null(0).to_numpy()
        same &= np.isclose(a, r, rtol=1e-9, atol=1e-6)
    assert same.mean() >= 0.99


def test_step_table_matches_batch_summary(truth_runs):
    for name, tt in truth_runs.items():
        steps, snaps = as_collected(tt)
        b = reconstruct(tt.journey, steps=steps, snapshots=snaps).batches
        tbl = step_table(b, tt.journey, steps=steps)  # kv calibrated on the 10 % only: leave-out check below
        assert tbl["step.id"].to_list() == list(range(1, tbl.height + 1))
        cmp = compare_step_table(tbl, tt.steps)
        for k in ("queue.running_depth", "queue.waiting_depth", "batch.num_preempted", "batch.num_finished"):
            assert cmp[k] >= 0.99, (name, k, cmp)
        assert cmp["kv_used_within_tolerance"] >= 0.9, (name, cmp)
        inputs = step_inputs(b, tt.journey, steps=steps)
        assert set(AGGREGATE_FIELDS[5:]) <= set(inputs.columns) and inputs.height == tbl.height


# ----------------------------------------------------------------------------- E2E fidelity


def test_e2e_with_true_cycle_times_lands_on_observed(truth_runs):
    for name, tt in truth_runs.items():
        steps, snaps = as_collected(tt)
        b = reconstruct(tt.journey, steps=steps, snapshots=snaps).batches
        res = e2e_fidelity(b, tt.journey, observed_cycle_us(tt.steps), steps=steps, api=tt.api, experiment_id=name)
        s = res.summary
        assert s["ttft"]["n"] > 100 and s["e2e"]["n"] > 100
        for m in ("ttft", "e2e", "decode_interval"):
            assert abs(s[m]["mean_error_pct"]) < 2.0, (name, m, s[m])
            assert s[m]["median_ape_pct"] < 2.0, (name, m, s[m])
        per = res.per_request
        assert {
            "obs_ttft_us",
            "pred_ttft_us",
            "obs_e2e_us",
            "pred_e2e_us",
            "e2e_err_pct",
            "obs_api_e2e_us",
            "n_steps_scheduled",
        } <= set(per.columns)
        fin = per.filter(pl.col("finish_status") == "length")
        assert (fin["obs_api_e2e_us"] >= fin["obs_e2e_us"]).mean() > 0.99  # API span wraps the engine
        # only the sampled steps' time stamps: gaps averaged over unsampled steps, E2E still close
        g = e2e_fidelity(b, tt.journey, gap_cycle_us(steps), steps=steps).summary
        assert abs(g["e2e"]["mean_error_pct"]) < 2.0 and abs(g["decode_interval"]["mean_error_pct"]) < 2.0


def test_e2e_basic_properties():
    j = journey(
        ("A", "QUEUED", 0, 0, 3000, 0, 2),
        ("A", "SCHEDULED", 1, 10, 3000, 0, 2, "FIRST"),
        ("A", "FIRST_TOKEN", 2, 3_000_000, 3000, 1, 2),
        ("A", "FINISHED", 3, 4_000_000, 3000, 2, 2, "length"),
        ("B", "QUEUED", 1, 1_000_000, 1500, 0, 3),
        ("B", "SCHEDULED", 2, 2_000_010, 1500, 0, 3, "FIRST"),
        ("B", "FIRST_TOKEN", 3, 4_000_001, 1500, 1, 3),
        ("B", "FINISHED", 5, 6_000_000, 1500, 3, 3, "length"),
    )
    b = reconstruct_batches(j)
    const = pl.DataFrame({"step.id": list(range(1, 8)), "cycle_us": [1000.0] * 7})
    per = e2e_fidelity(b, j, const).per_request.sort("request.id")
    # TTFT spans steps q+1 … F+1, E2E q+1 … D+1 (one-step output lag), every step 1 ms
    assert per["pred_ttft_us"].to_list() == [3000.0, 3000.0]
    assert per["pred_e2e_us"].to_list() == [4000.0, 5000.0]
    assert per["obs_ttft_us"].to_list() == [3000.0, 3000.001]
    assert per["pred_decode_interval_us"].to_list() == [1000.0, 1000.0]
    assert per["n_steps_scheduled"].to_list() == [4, 5]
    # a callable on the step table; predictions scale linearly
    res2 = e2e_fidelity(b, j, lambda t: np.full(t.height, 2000.0))
    assert res2.per_request.sort("request.id")["pred_e2e_us"].to_list() == [8000.0, 10000.0]
    assert abs(res2.summary["e2e"]["mean_error_pct"] - 100.0) < 1e-9  # mean 9000 vs observed mean 4500
    # a step without a prediction makes the requests spanning it unknown
    res3 = e2e_fidelity(b, j, const.filter(pl.col("step.id") != 5))
    p3 = res3.per_request.sort("request.id")
    assert p3["pred_e2e_us"].to_list() == [4000.0, None] and res3.summary["e2e"]["n"] == 1


def test_shared_batch_summary_counts_give_the_same_tables(truth_runs):
    """h1.request_context computes batch_summary_counts once and hands it to the step table and the BATCH_SUMMARY
    check: both come out as when each computed its own."""
    from stepml_core.tables.batch_checks import batch_summary_counts

    tt = truth_runs[[k for k in truth_runs if "codegen" in k][0]]
    steps, snaps = as_collected(tt)
    b = reconstruct(tt.journey, steps=steps, snapshots=snaps).batches
    counts = batch_summary_counts(b)
    assert step_inputs(b, tt.journey, steps=steps, counts=counts).equals(step_inputs(b, tt.journey, steps=steps))
    assert compare_with_batch_summary(b, steps, counts=counts) == compare_with_batch_summary(b, steps)
