"""Synthesizer: layout, provenance, determinism, round trip through the reader, invariants, calibration."""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import orjson
import polars as pl
import pytest

from stepml_core.runs.folders import parse_run_id, read_run_metadata
from stepml_core.synth import resolve_run_ids, synthesize_run, synthesize_runs, synthetic_id
from stepml_core.synth.against_real import compare_runs, compare_step_quantiles, cycle_times_ms, ratio_table
from stepml_core.synth.run_engine import simulate_synthetic_run
from stepml_core.synth.runner import _clocks, _streams
from stepml_core.synth.spec import engine_params, reference_runs
from stepml_core.synth.traceout import write_run_traces
from stepml_core.synth.workload import build_workload
from stepml_core.traces import read_traces

RUN_70B = "20260217-203421-llama-2-70b-hf-tp4-codegen"
RUN_7B_REASONING = "20260217-170634-llama-2-7b-tp1-reasoning"
RUN_CL = "20260218-150304-codellama-34b-tp2-general"
from conftest import SHARED_REAL as REAL  # noqa: E402

SCALE = 0.02


@contextmanager
def patched_params():
    """Change the synthesizer's engine parameters for the block (in-process runs only); restored after."""
    P = engine_params()
    saved = copy.deepcopy(P)
    try:
        yield P
    finally:
        P.clear()
        P.update(saved)


def _files(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    folders = synthesize_runs(out, [RUN_70B, synthetic_id(RUN_CL)], scale=SCALE, seed=0, workers=1)
    return out, folders


@pytest.fixture(scope="module")
def stressed_run(tmp_path_factory):
    """A 7B reasoning run with a tiny KV cache and a short client timeout: preemptions and aborts."""
    out = tmp_path_factory.mktemp("stressed")
    with patched_params() as P:
        P["models"]["llama-2-7b"]["kv_blocks_total"] = 700
        P["api"]["client_timeout_s"] = [15.0, 16.0]
        spec = resolve_run_ids([RUN_7B_REASONING])[0]
        folder = synthesize_run(spec, out, scale=0.03, seed=3)
    return folder


# ---------------------------------------------------------------------------- ids and layout
def test_run_ids_resolve_and_parse():
    ids = list(reference_runs())
    assert len(ids) == 16
    assert resolve_run_ids(None)[0].real_id == ids[0]
    sid = synthetic_id(RUN_70B)
    assert sid == RUN_70B + "-synth" and sid != RUN_70B
    r = parse_run_id(sid)
    assert r.synthetic_suffix and r.tp == 4 and r.workload == "codegen"
    assert [s.real_id for s in resolve_run_ids([sid, RUN_70B])] == [RUN_70B]
    with pytest.raises(ValueError):
        resolve_run_ids(["20990101-000000-llama-2-7b-tp1-codegen"])


def test_layout_and_provenance(small_runs):
    out, folders = small_runs
    assert [f.name for f in folders] == [synthetic_id(RUN_70B), synthetic_id(RUN_CL)]
    for f in folders:
        for name in [
            "traces.json.gz",
            "exp-config.yaml",
            "profile.yaml",
            "provenance.json",
            "results/config.yaml",
            "results/per_request_lifecycle_metrics.json",
            "results/summary_lifecycle_metrics.json",
            "results/stage_0_lifecycle_metrics.json",
            "results/stage_1_lifecycle_metrics.json",
        ]:
            assert (f / name).is_file(), name
        meta = read_run_metadata(f)
        assert meta.source == "synthetic"
        prov = meta.provenance
        assert prov["source"] == "synthetic" and prov["generator"] == "stepml-synth"
        assert prov["stands_for"] == meta.stands_for == f.name.removesuffix("-synth")
        assert prov["seed"] == 0 and prov["scale"] == SCALE and prov["generator_version"]
        assert {"workload", "load", "scheduler", "engine_cycle", "step.duration_us", "traces"} <= set(prov["modelled"])
        assert meta.exp_config["max_num_batched_tokens"] == 2048 and meta.exp_config["max_num_seqs"] == 128
        stages = meta.profile["load"]["stages"]
        assert [s["duration"] for s in stages] == [12, 12]
        assert meta.summary["successes"]["count"] + meta.summary["failures"]["count"] == prov["counts"]["requests_sent"]
        recs = json.loads((f / "results/per_request_lifecycle_metrics.json").read_bytes())
        assert len(recs) == prov["counts"]["requests_sent"]
        ok = [r for r in recs if r["error"] is None]
        assert ok and all(
            len(r["info"]["output_token_times"]) == 2 * json.loads(r["request"])["max_tokens"] + 2 for r in ok
        )
        assert all(r["end_time"] >= r["start_time"] for r in recs)
        assert json.loads(ok[0]["request"])["ignore_eos"] is True
    # no leftovers of the atomic write
    assert not list(out.glob(".*partial"))


def test_determinism_same_seed_identical_bytes(small_runs, tmp_path):
    out, folders = small_runs
    again = synthesize_runs(tmp_path / "a", [RUN_70B], scale=SCALE, seed=0, workers=1)[0]
    assert _files(again) == _files(folders[0])
    gz = (again / "traces.json.gz").read_bytes()
    assert gz[4:8] == b"\x00\x00\x00\x00"  # gzip mtime 0


def test_determinism_independent_of_processes(small_runs, tmp_path):
    out, folders = small_runs
    par = synthesize_runs(tmp_path / "p", [RUN_CL, RUN_70B], scale=SCALE, seed=0, workers=2)
    assert _files(par[1]) == _files(folders[0])
    assert _files(par[0]) == _files(folders[1])


def test_different_seed_differs(small_runs, tmp_path):
    out, folders = small_runs
    other = synthesize_runs(tmp_path / "b", [RUN_70B], scale=SCALE, seed=1, workers=1)[0]
    assert (other / "traces.json.gz").read_bytes() != (folders[0] / "traces.json.gz").read_bytes()
    assert json.loads((other / "provenance.json").read_bytes())["seed"] == 1


# ---------------------------------------------------------------------------- round trip
def _simulate(real_id: str, scale: float, seed: int):
    spec = resolve_run_ids([real_id])[0]
    rng_wl, rng_eng, _, rng_trace, _ = _streams(real_id, seed)
    mono0, _, wall_off = _clocks(spec)
    wl = build_workload(spec, scale, rng_wl)
    sim = simulate_synthetic_run(spec, wl, rng_eng, mono0=mono0)
    return spec, sim, rng_trace, wall_off


def test_round_trip_writer_reader(tmp_path):
    spec, sim, rng_trace, wall_off = _simulate(RUN_CL, SCALE, 7)
    path = tmp_path / "traces.json.gz"
    counts = write_run_traces(path, sim, hf_id=spec.arch.hf_id, wall_off=wall_off, rng=rng_trace)
    t = read_traces(path)
    assert t.quarantine.height == 0
    assert counts["events_dropped"] == 0
    # step rows: every sampled record, all 16 attributes
    cols = [
        "step.id",
        "step.ts_start_ns",
        "step.ts_end_ns",
        "step.duration_us",
        "queue.running_depth",
        "queue.waiting_depth",
        "batch.num_prefill_reqs",
        "batch.num_decode_reqs",
        "batch.scheduled_tokens",
        "batch.prefill_tokens",
        "batch.decode_tokens",
        "batch.num_finished",
        "batch.num_preempted",
        "kv.usage_gpu_ratio",
        "kv.blocks_total_gpu",
        "kv.blocks_free_gpu",
    ]
    want = pl.DataFrame([list(r) for r, _ in sim.sampled], schema=cols, orient="row")
    got = t.steps.select(cols).sort("step.id")
    assert got.equals(want.with_columns(pl.col(c).cast(got.schema[c]) for c in cols))
    # snapshots
    n_snap = sum(len(s) for _, s in sim.sampled if s)
    assert t.snapshots.height == n_snap > 0
    # journey events: per request, the same (type, step, ns) sequence
    names = {0: "QUEUED", 1: "SCHEDULED", 2: "FIRST_TOKEN", 3: "PREEMPTED", 4: "FINISHED"}
    want_j = sorted((names[e[0]], e[1], e[2], e[5]) for R in sim.requests for e in R.events)
    got_j = sorted(
        zip(
            t.journey["event.type"].to_list(),
            t.journey["scheduler.step"].to_list(),
            t.journey["ts.monotonic_ns"].to_list(),
            t.journey["decode.done_tokens"].to_list(),
        )
    )
    assert got_j == want_j
    assert t.api.filter(pl.col("event") == "ARRIVED").height == len(sim.requests)


# ---------------------------------------------------------------------------- invariants
def _check_invariants(folder: Path, *, allow_drops: bool):
    t = read_traces(folder / "traces.json.gz")
    assert t.quarantine.height == 0
    s = t.steps
    assert s.height > 0
    assert (s["batch.prefill_tokens"] + s["batch.decode_tokens"] == s["batch.scheduled_tokens"]).all()
    assert (s["kv.blocks_free_gpu"] <= s["kv.blocks_total_gpu"]).all()
    assert s["kv.usage_gpu_ratio"].is_between(0.0, 1.0).all()
    assert np.allclose(
        s["kv.usage_gpu_ratio"].to_numpy(), 1 - s["kv.blocks_free_gpu"].to_numpy() / s["kv.blocks_total_gpu"].to_numpy()
    )
    assert (s["batch.scheduled_tokens"] <= 2048).all() and (s["queue.running_depth"] <= 128).all()
    assert (s["step.duration_us"] == (s["step.ts_end_ns"] - s["step.ts_start_ns"]) // 1000).all()
    # snapshot sums equal the BATCH_SUMMARY counts (steps whose snapshots all survived the event cap)
    sn = t.snapshots
    agg = sn.group_by("step.id").agg(
        pl.len().alias("n"),
        pl.col("request.scheduled_tokens_this_step").sum().alias("tok"),
        pl.col("request.scheduled_tokens_this_step").filter(pl.col("request.phase") == "PREFILL").sum().alias("pf"),
        (pl.col("request.scheduled_tokens_this_step") > 0).sum().alias("nsched"),
    )
    j = agg.join(s, on="step.id").filter(pl.col("n") == pl.col("queue.running_depth"))
    assert j.height > 0
    assert (j["tok"] == j["batch.scheduled_tokens"]).all()
    assert (j["pf"] == j["batch.prefill_tokens"]).all()
    assert (j["nsched"] == j["batch.num_prefill_reqs"] + j["batch.num_decode_reqs"]).all()
    if not allow_drops:
        assert agg.height == j.height
    # journey: SCHEDULED inside its step's window; ts.monotonic == ts.monotonic_ns / 1e9
    sch = t.journey.filter(pl.col("event.type") == "SCHEDULED").join(
        s.select("step.id", "step.ts_start_ns", "step.ts_end_ns"), left_on="scheduler.step", right_on="step.id"
    )
    assert sch.height > 0
    assert (
        (sch["ts.monotonic_ns"] >= sch["step.ts_start_ns"]) & (sch["ts.monotonic_ns"] <= sch["step.ts_end_ns"])
    ).all()
    with gzip.open(folder / "traces.json.gz", "rb") as f:
        for k, line in enumerate(f):
            for rs in orjson.loads(line)["resourceSpans"]:
                for ss in rs["scopeSpans"]:
                    for sp in ss["spans"]:
                        assert len(sp.get("events", [])) <= 128
                        for ev in sp.get("events", []):
                            if ev["name"].startswith("journey."):
                                a = {x["key"]: x["value"] for x in ev["attributes"]}
                                assert a["ts.monotonic"]["doubleValue"] == int(a["ts.monotonic_ns"]["intValue"]) / 1e9
            if k > 40:
                break
    # per request: event order by (step, ns) is a legal lifecycle
    ev = t.journey.sort("request.id", "scheduler.step", "ts.monotonic_ns")
    for _, g in ev.group_by("request.id"):
        types = g["event.type"].to_list()
        assert types[0] == "QUEUED" and types.count("FINISHED") <= 1
        if "FIRST_TOKEN" in types:
            assert types.index("SCHEDULED") < types.index("FIRST_TOKEN")
    return t


def test_reader_visible_invariants(small_runs):
    out, folders = small_runs
    for f in folders:
        _check_invariants(f, allow_drops=False)


def test_preemption_and_aborts(stressed_run):
    prov = json.loads((stressed_run / "provenance.json").read_bytes())
    c = prov["counts"]
    assert c["preemptions"] > 0 and c["aborts"] > 0
    t = _check_invariants(stressed_run, allow_drops=True)
    assert (t.steps["batch.num_preempted"] > 0).any()
    types = set(t.journey["event.type"].unique())
    assert {"PREEMPTED", "SCHEDULED", "FINISHED"} <= types
    assert set(t.journey.filter(pl.col("event.type") == "SCHEDULED")["schedule.kind"].unique()) == {"FIRST", "RESUME"}
    assert "aborted" in set(t.journey["finish.status"].drop_nulls().unique())
    assert t.api.filter(pl.col("event") == "ABORTED").height > 0
    summ = json.loads((stressed_run / "results/summary_lifecycle_metrics.json").read_bytes())
    assert summ["failures"]["count"] > 0 and summ["failures"]["request_latency"]["min"] >= 15.0
    recs = json.loads((stressed_run / "results/per_request_lifecycle_metrics.json").read_bytes())
    assert any(r["error"] == {"error_type": "TimeoutError", "error_msg": ""} for r in recs)


# ---------------------------------------------------------------------------- calibration
def test_calibration_table(small_runs):
    out, folders = small_runs
    t = compare_runs(folders)
    assert set(t["metric"]) >= {"ttft_mean_s", "e2e_mean_s", "decode_interval_ms", "successes", "sampled_steps"}
    assert t.height == 2 * 8
    assert t.filter(pl.col("metric") == "successes")["ratio"].is_between(0.8, 1.2).all()
    di = t.filter(pl.col("metric") == "decode_interval_ms")["ratio"]
    assert di.is_between(0.7, 1.3).all()
    w = ratio_table(t)
    assert w.height == 2 and "e2e_mean_s" in w.columns


@pytest.mark.real  # its second half compares with a real run
def test_cycle_times_and_quantiles(small_runs):
    out, folders = small_runs
    syn = read_traces(folders[0] / "traces.json.gz").steps
    c = cycle_times_ms(syn)
    assert c.size > 0 and np.median(c) > 5
    real_path = REAL / "experiments" / RUN_70B / "traces.json.gz"
    if not real_path.is_file():
        pytest.skip("../shared/real not present")
    real = read_traces(real_path).steps
    q = compare_step_quantiles(syn, real)
    cyc = q.filter((pl.col("metric") == "cycle_time_ms") & (pl.col("quantile") == 0.5))
    assert cyc.height == 1 and 0.7 < cyc["ratio"][0] < 1.3
