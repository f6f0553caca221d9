"""Synthesize run folders modelled on the 16 H100 runs (one run per process)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import orjson
import yaml

from stepml_core.gc_pause import gc_paused
from stepml_core.parallel import process_workers
from stepml_core.runs.folders import PROVENANCE_FILE
from stepml_core.synth.client import client_records, public_records, summarize
from stepml_core.synth.run_engine import simulate_synthetic_run
from stepml_core.synth.schedtime import ScheduleTimeModel
from stepml_core.synth.spec import SYNTH_VERSION, RunSpec, engine_params, resolve_run_ids, schedule_time_model
from stepml_core.synth.traceout import write_run_traces
from stepml_core.synth.workload import build_workload

GENERATOR = "stepml-synth"
Progress = Callable[[str, float], None]


def _stable_u64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _streams(real_id: str, seed: int):
    ss = np.random.SeedSequence(
        entropy=[int(seed) & 0xFFFFFFFF, int(seed) >> 32 & 0xFFFFFFFF], spawn_key=(_stable_u64(real_id) & 0xFFFFFFFF,)
    )
    return [np.random.default_rng(s) for s in ss.spawn(5)]


def _clocks(spec: RunSpec) -> tuple[float, float, int]:
    """(engine monotonic at run start [s], client perf_counter at run start [s], wall - monotonic [ns])."""
    h = _stable_u64("clock:" + spec.real_id)
    mono0 = 12_000.0 + (h % 8_000_000) / 1000.0
    client0 = 40_000.0 + ((h >> 24) % 30_000_000) / 1000.0
    wall0_ns = int(spec.started_at.timestamp()) * 1_000_000_000 + 25_000_000_000
    return mono0, client0, wall0_ns - int(round(mono0 * 1e9))


MODELLED = {
    "workload": "inference-perf shared_prefix as resolved by the real run: groups x prompts-per-group distinct prompts "
    "with a shared system prompt per group, prompt lengths drawn from the real client-side quantiles, "
    "fixed max_tokens with ignore_eos (server always generates max_tokens); client output-token counts "
    "drawn from the real run's output_len quantiles (client re-tokenisation)",
    "load": "constant-rate stages of the real run (durations x scale); arrivals a Poisson process conditioned on "
    "rate x duration requests; a stage starts when the previous one has completed; client timeout "
    "300-301 s (TimeoutError, server aborts the request)",
    "scheduler": "discrete-event model of vLLM v1 (v0.15.1) with async scheduling: running first then FCFS "
    "admission, 2048-token budget with chunked prefill, 128 max sequences, 16-token KV blocks in an "
    "LRU free queue, prefix caching with eviction, preemption by recompute, one-step output lag",
    "engine_cycle": "roofline physics per GPU (weights streaming vs compute with a knee, decode/prefill attention, "
    "MoE experts touched, TP all-reduce, LM head, host overheads, CUDA-graph padding) with "
    "efficiencies tuned against the real runs' per-stage decode intervals; lognormal/gamma noise, "
    "drift, stragglers, warm-up; cycle = max(GPU path, CPU path incl. schedule())",
    "step.duration_us": "empirical (no physics): two-regime log-linear model on batch/queue attributes with a "
    "logistic gate on running depth and empirical heavy-tailed residuals, fitted on the real "
    "BATCH_SUMMARY rows of two runs and scaled per run to the real test-split distribution "
    "(data/synth/schedule_time_model.json, scripts/fit_schedule_time.py)",
    # (written into every provenance.json as is: changing the text changes the synthetic runs' bytes)
    "traces": "OTLP/JSON lines as trace-format.md: BATCH_SUMMARY on a Bernoulli 10 % of steps, REQUEST_SNAPSHOT on "
    "10 % of those, llm_request + llm_core spans for every request, scheduler_steps_<n> spans with "
    "closure interval 10, 128-event cap, 5 s export batches per process",
    "client": "inference-perf per-request records and lifecycle summaries computed from simulated token times "
    "(about two SSE messages per token)",
}


def _write_json(path: Path, obj, *, indent: bool = True) -> None:
    path.write_bytes(orjson.dumps(obj, option=orjson.OPT_INDENT_2 if indent else 0))


def _exp_config(spec: RunSpec) -> dict:
    sp = engine_params()["scheduler"]
    return {
        "model": spec.arch.hf_id,
        "tensor_parallelism": spec.tp,
        "max_model_len": sp["max_model_len"],
        "max_num_batched_tokens": sp["max_num_batched_tokens"],
        "max_num_seqs": sp["max_num_seqs"],
        "app": "inference-perf",
    }


def _stages(spec: RunSpec, scale: float) -> list[dict]:
    out = []
    for r, d in zip(spec.stage_rates, spec.stage_durations):
        dd = d * scale
        out.append({"rate": r, "duration": int(dd) if float(dd).is_integer() else round(dd, 6)})
    return out


def _profile(spec: RunSpec, scale: float, out_path: str) -> dict:
    return {
        "api": {"streaming": True, "type": "completion"},
        "data": {
            "shared_prefix": {
                "num_groups": spec.num_groups,
                "num_prompts_per_group": spec.prompts_per_group,
                "output_len": spec.output_len,
                "question_len": spec.question_len,
                "system_prompt_len": spec.system_prompt_len,
            },
            "type": "shared_prefix",
        },
        "load": {"stages": _stages(spec, scale), "type": "constant"},
        "report": {"request_lifecycle": {"per_request": True, "per_stage": True, "summary": True}},
        "server": {
            "base_url": "http://localhost:8000",
            "ignore_eos": True,
            "model_name": spec.arch.hf_id,
            "type": "vllm",
        },
        "storage": {"local_storage": {"path": out_path}},
        "tokenizer": {"pretrained_model_name_or_path": spec.arch.hf_id},
    }


def _resolved_config(spec: RunSpec, scale: float, out_path: str) -> dict:
    return {
        "api": {"type": "completion", "streaming": True, "headers": None},
        "data": {
            "type": "shared_prefix",
            "path": None,
            "input_distribution": None,
            "output_distribution": None,
            "shared_prefix": {
                "num_groups": spec.num_groups,
                "num_prompts_per_group": spec.prompts_per_group,
                "system_prompt_len": spec.system_prompt_len,
                "question_len": spec.question_len,
                "output_len": spec.output_len,
            },
        },
        "load": {
            "type": "constant",
            "interval": 1.0,
            "stages": _stages(spec, scale),
            "sweep": None,
            "num_workers": 224,
            "worker_max_concurrency": 100,
            "worker_max_tcp_connections": 2500,
            "circuit_breakers": [],
            "request_timeout": None,
        },
        "metrics": None,
        "report": {
            "request_lifecycle": {"summary": True, "per_stage": True, "per_request": True},
            "prometheus": {"summary": True, "per_stage": False},
        },
        "storage": {
            "local_storage": {"path": out_path, "report_file_prefix": None},
            "google_cloud_storage": None,
            "simple_storage_service": None,
        },
        "server": {
            "type": "vllm",
            "model_name": spec.arch.hf_id,
            "base_url": "http://localhost:8000",
            "ignore_eos": True,
            "api_key": None,
        },
        "tokenizer": {"pretrained_model_name_or_path": spec.arch.hf_id, "trust_remote_code": None, "token": None},
        "circuit_breakers": None,
    }


def _data_digest() -> dict:
    from stepml_core.paths import REFERENCE_DIR
    from stepml_core.synth.spec import SYNTH_DATA_DIR

    out = {}
    for p in [
        REFERENCE_DIR / "runs.csv",
        *sorted(SYNTH_DATA_DIR.glob("*.json")),
        *sorted(SYNTH_DATA_DIR.glob("*.csv")),
    ]:
        if p.is_file():
            out[f"{p.parent.name}/{p.name}"] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
    return out


def _simulate(spec: RunSpec, scale: float, seed: int, trace_path: Path, progress, compresslevel: int):
    """Workload, engine simulation, client records and the trace file, each from its own random stream;
    (simulation, client records, trace counts). Progress: 0 → 0.8 in the simulation, 0.95 when written."""
    rng_wl, rng_eng, rng_cli, rng_trace, _ = _streams(spec.real_id, seed)
    mono0, client0, wall_off = _clocks(spec)
    wl = build_workload(spec, scale, rng_wl)
    p_sim = (lambda f: progress(0.8 * f)) if progress else None
    sim = simulate_synthetic_run(
        spec, wl, rng_eng, mono0=mono0, sched_model=ScheduleTimeModel(spec.real_id), progress=p_sim
    )
    if progress:
        progress(0.8)
    recs = client_records(spec, wl, sim, rng_cli, mono0=mono0, client0=client0, hf_id=spec.arch.hf_id)
    counts = write_run_traces(
        trace_path,
        sim,
        hf_id=spec.arch.hf_id,
        wall_off=wall_off,
        rng=rng_trace,
        compresslevel=compresslevel,
    )
    if progress:
        progress(0.95)
    return sim, recs, counts


def _write_client_files(tmp: Path, spec: RunSpec, scale: float, recs: list[dict]) -> dict:
    """inference-perf's results/ (per-request records, per-stage and overall summaries, config.yaml) plus
    exp-config.yaml and profile.yaml; returns the overall summary."""
    res = tmp / "results"
    out_path = f"/synthetic/{spec.synth_id}/results"
    (res / "per_request_lifecycle_metrics.json").write_bytes(orjson.dumps(public_records(recs)))
    for k, rate in enumerate(spec.stage_rates):
        _write_json(
            res / f"stage_{k}_lifecycle_metrics.json",
            summarize([r for r in recs if r["_stage"] == k], stage={"rate": rate}),
        )
    summary = summarize(recs)
    _write_json(res / "summary_lifecycle_metrics.json", summary)
    (res / "config.yaml").write_text(yaml.safe_dump(_resolved_config(spec, scale, out_path), sort_keys=False))
    (tmp / "exp-config.yaml").write_text(yaml.safe_dump(_exp_config(spec), sort_keys=False))
    (tmp / "profile.yaml").write_text(
        json.dumps(_profile(spec, scale, out_path), sort_keys=True, separators=(",", ":")) + "\n"
    )
    return summary


def _provenance(spec: RunSpec, scale: float, seed: int, sim, summary: dict, counts: dict) -> dict:
    """provenance.json of a synthetic run: what it stands for, generator, seed, scale, data digests, counts."""
    stm = schedule_time_model()
    return {
        "source": "synthetic",
        "stands_for": spec.real_id,
        "generator": GENERATOR,
        "generator_version": SYNTH_VERSION,
        "seed": int(seed),
        "scale": float(scale),
        "modelled": MODELLED,
        "data_files": _data_digest(),
        "schedule_time_model": {
            "fitted_on": stm.get("source", {}).get("fitted_on"),
            "per_run_params": stm.get("runs", {}).get(spec.real_id),
        }
        if stm
        else None,
        "counts": {
            "requests_sent": len(sim.requests),
            "successes": int(summary["successes"]["count"]),
            "failures": int(summary["failures"]["count"]),
            "scheduler_steps": int(sim.steps),
            "sampled_steps": int(counts["batch_summaries_written"]),
            "sampled_steps_emitted": int(counts["batch_summaries_emitted"]),
            "events_dropped_by_span_cap": int(counts["events_dropped"]),
            "trace_lines": int(counts["lines"]),
            **{k: int(v) for k, v in sim.counters.items()},
        },
    }


def synthesize_run(
    spec: RunSpec,
    out_dir: Path,
    *,
    scale: float = 1.0,
    seed: int = 0,
    progress: Callable[[float], None] | None = None,
    compresslevel: int = 3,
) -> Path:
    """Simulate one run and write its folder ``out_dir/<synthetic id>``; returns the folder.

    Written into ``.<id>.partial`` first and renamed when complete."""
    if not (0.0 < scale <= 1.0):
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / spec.synth_id
    tmp = out_dir / f".{spec.synth_id}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "results").mkdir(parents=True)
    with gc_paused():  # the simulation and its records: millions of small objects, no cycles (stepml_core.gc_pause)
        sim, recs, counts = _simulate(spec, scale, seed, tmp / "traces.json.gz", progress, compresslevel)
        summary = _write_client_files(tmp, spec, scale, recs)
    _write_json(tmp / PROVENANCE_FILE, _provenance(spec, scale, seed, sim, summary, counts))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if progress:
        progress(1.0)
    return final


# ---------------------------------------------------------------------------- several runs
_QUEUE = None


def _init_worker(q):
    global _QUEUE
    _QUEUE = q


def _worker(real_id: str, out_dir: str, scale: float, seed: int) -> str:
    spec = resolve_run_ids([real_id])[0]
    q = _QUEUE

    def prog(f: float):
        if q is not None:
            q.put((spec.synth_id, float(f)))

    return str(synthesize_run(spec, Path(out_dir), scale=scale, seed=seed, progress=prog))


def _expected_work(spec: RunSpec) -> float:
    return spec.num_sampled_steps


def synthesize_runs(
    out_dir: Path,
    run_ids: list[str] | None = None,
    *,
    scale: float = 1.0,
    seed: int = 0,
    workers: int | None = None,
    progress: Progress | None = None,
) -> list[Path]:
    """Write one synthetic run folder per requested run under ``out_dir``.

    ``run_ids``: real run ids of data/reference/runs.csv or their ``-synth`` ids (None = all
    16); ``scale``: fraction of each run's duration; ``seed``: same seed → byte-identical
    files; ``workers``: processes (default: CPU cores), one run per process;
    ``progress(run_id, fraction)`` is called from the calling process.
    Returns the run folders in the order of ``run_ids``.
    """
    specs = resolve_run_ids(run_ids)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    workers = process_workers(max(1, min(len(specs), workers or os.cpu_count() or 1)))
    if progress:
        for s in specs:
            progress(s.synth_id, 0.0)
    if workers == 1:
        out = []
        for s in specs:
            cb = (lambda f, sid=s.synth_id: progress(sid, f)) if progress else None
            out.append(synthesize_run(s, out_dir, scale=scale, seed=seed, progress=cb))
        return out
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")
    q = ctx.Queue() if progress else None
    order = sorted(range(len(specs)), key=lambda i: -_expected_work(specs[i]))
    results: dict[int, str] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker, initargs=(q,)) as ex:
        futs = {ex.submit(_worker, specs[i].real_id, str(out_dir), scale, seed): i for i in order}
        pending = set(futs)
        while pending:
            done = {f for f in pending if f.done()}
            for f in done:
                results[futs[f]] = f.result()
            pending -= done
            if q is not None:
                _drain(q, progress, timeout=0.2 if pending else 0.0)
            elif pending:
                time.sleep(0.1)
        if q is not None:
            _drain(q, progress, timeout=0.0)
    return [Path(results[i]) for i in range(len(specs))]


def _drain(q, progress: Progress, timeout: float) -> None:
    import queue as _q

    try:
        item = q.get(timeout=timeout) if timeout else q.get_nowait()
    except _q.Empty:
        return
    while True:
        progress(*item)
        try:
            item = q.get_nowait()
        except _q.Empty:
            return
