"""Hostile inputs (issue 11): how long, and how much memory, each one costs before it is stopped.

Each case runs in its own fresh process (so its peak RSS is its own) on inputs built here:

* ``lines_bomb``  - a gzip of 'x' lines inflating to 5.4 GiB (84 concatenated 64 MiB members, 5 MB on disk):
  read_traces must stop at max_unreadable_lines;
* ``long_line``   - a gzip of one 8 GiB line (128 members, 8 MB): stopped by max_inflate_ratio / max_line_bytes;
* ``repeat_bomb`` - one valid step line repeated to 300 MB (ratio 190): stopped by max_inflate_ratio;
* ``yaml_bomb``   - a 630-byte YAML alias bomb as exp-config.yaml: stopped by max_yaml_nodes;
* ``sensor_bomb`` - one experiment_sensor tick over a data folder holding a 16 MB gzip of 16 GiB of
  lines and a good run, with the default time budget (STEPML_SENSOR_TIME_BUDGET_S=20).
* ``dead_worker`` - `stepml run --workers 2` over three small synthetic runs; the worker running the
  first one is SIGKILLed as soon as its run has started (as the out-of-memory killer would): seconds
  from the kill until run_study returns (limit 240 s), and runs left STARTED in the instance.
* ``ingest_real`` - read_traces on the real traces (../shared/real), best of 5: the cost of hashing
  while reading (compare with the same command on an older checkout).

Request logs (issue 21), on a 300-request log built here (arrivals every 0.1 s, 600-token prompts, 100 tokens out,
Llama-2-7B's 7,462 KV blocks, max_model_len 4096):

* ``request_huge``   - one request of 200,000 prompt tokens: the request log read and replayed with the physics
  model (the request is refused as vLLM does; before, every later step was empty until its client gave up);
* ``request_bomb``   - requests.json.gz of 8 GiB of spaces (128 members, 8 MB): stopped by max_inflate_ratio;
* ``timelines_20m``, ``timelines_6h``, ``timelines_24h`` - calibration's request timelines of the log with its last
  arrival 20 min / 6 h / 24 h after the first (the memory max_request_span_s bounds; the read itself refuses a
  span over a day).

    python benchmarks/bench_hostile.py [--cases lines_bomb,long_line,...]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL = ROOT.parent / "shared" / "real" / "experiments"
CASES = ["lines_bomb", "long_line", "repeat_bomb", "yaml_bomb", "sensor_bomb", "dead_worker", "ingest_real"]
CASES += ["request_huge", "request_bomb", "timelines_20m", "timelines_6h", "timelines_24h"]
RID = "20260101-120000-llama-2-7b-tp1-codegen"


def _step_line() -> bytes:
    ev = {
        "timeUnixNano": "1",
        "name": "step.BATCH_SUMMARY",
        "attributes": [
            {"key": k, "value": {"intValue": str(v)}}
            for k, v in [
                ("step.id", 1),
                ("step.ts_start_ns", 10),
                ("step.ts_end_ns", 20),
                ("step.duration_us", 5),
                ("queue.running_depth", 1),
                ("queue.waiting_depth", 0),
                ("batch.num_prefill_reqs", 0),
                ("batch.num_decode_reqs", 1),
                ("batch.scheduled_tokens", 1),
                ("batch.prefill_tokens", 0),
                ("batch.decode_tokens", 1),
                ("batch.num_finished", 0),
                ("batch.num_preempted", 0),
                ("kv.blocks_total_gpu", 100),
                ("kv.blocks_free_gpu", 50),
            ]
        ]
        + [{"key": "kv.usage_gpu_ratio", "value": {"doubleValue": 0.5}}],
    }
    span = {
        "traceId": "a" * 32,
        "spanId": "b" * 16,
        "name": "scheduler_steps_1",
        "startTimeUnixNano": "1",
        "endTimeUnixNano": "2",
        "events": [ev],
    }
    return json.dumps(
        {
            "resourceSpans": [
                {
                    "resource": {"attributes": []},
                    "scopeSpans": [{"scope": {"name": "vllm.scheduler.step"}, "spans": [span]}],
                }
            ]
        },
        separators=(",", ":"),
    ).encode()


def _run_folder(root: Path, trace_name: str, trace: bytes, exp_extra: str = "") -> Path:
    d = root / RID
    d.mkdir(parents=True, exist_ok=True)
    (d / "exp-config.yaml").write_text(
        "tensor_parallelism: 1\nmax_num_batched_tokens: 2048\nmax_num_seqs: 128\n" + exp_extra
    )
    (d / trace_name).write_bytes(trace)
    return d


def case(name: str, tmp: Path) -> dict:
    """Build the input, then time the real code path that must stop it."""
    from stepml_core.tables.ingest import ingest_run

    if name == "lines_bomb":
        d = _run_folder(tmp, "traces.json.gz", gzip.compress(b"x\n" * (32 << 20), compresslevel=9, mtime=0) * 84)
    elif name == "long_line":
        d = _run_folder(tmp, "traces.json.gz", gzip.compress(b"x" * (64 << 20), compresslevel=9, mtime=0) * 128)
    elif name == "repeat_bomb":
        d = _run_folder(
            tmp, "traces.json.gz", gzip.compress((_step_line() + b"\n") * 40_000, compresslevel=9, mtime=0) * 4
        )
    elif name == "yaml_bomb":
        bomb = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
        bomb += [f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9) + "]" for p, c in zip("abcdefgh", "bcdefghi")]
        d = _run_folder(tmp, "traces.json", _step_line() + b"\n", "\n".join(bomb) + "\n")
    elif name == "sensor_bomb":
        return sensor_case(tmp)
    elif name == "ingest_real":
        return ingest_real()
    elif name == "dead_worker":
        return dead_worker(tmp)
    elif name.startswith(("request_", "timelines_")):
        return request_case(name, tmp)
    else:
        raise SystemExit(f"unknown case {name}")
    size = sum(p.stat().st_size for p in d.iterdir())
    t = time.perf_counter()
    try:
        out = ingest_run(d, tmp)
        result = f"read: {out['steps'].height} steps"
    except Exception as e:  # noqa: BLE001 - the outcome is what is measured
        result = f"{type(e).__name__}: {str(e).replace(str(tmp), '…')}"
    return {"case": name, "input_bytes": size, "seconds": round(time.perf_counter() - t, 2), "outcome": result}


def _request_folder(root: Path, huge: bool = False, last_s: float | None = None, bomb: bool = False) -> Path:
    n = 300
    reqs = [
        {"index": i, "arrival_time_us": i * 100_000, "input_tokens": 600, "output_tokens": 100, "has_error": False}
        for i in range(n)
    ]
    if huge:
        reqs[5]["input_tokens"] = 200_000
    if last_s is not None:
        reqs[-1]["arrival_time_us"] = int(last_s * 1e6)
    header = {
        "split": "train",
        "config": {"max_num_seqs": 128, "max_num_batched_tokens": 2048, "kv_blocks_total_gpu": 7462},
    }
    d = _run_folder(
        root,
        "ground_truth.json",
        json.dumps([{"index": i, "has_error": False, "ttft_s": 0.1, "e2e_s": 2.0} for i in range(n)]).encode(),
        "max_model_len: 4096\n",
    )
    if bomb:
        (d / "requests.json.gz").write_bytes(gzip.compress(b" " * (64 << 20), compresslevel=9, mtime=0) * 128)
    else:
        (d / "requests.json").write_text(json.dumps({**header, "requests": reqs}))
    return d


def request_case(name: str, tmp: Path) -> dict:
    """Read (and replay, or build the calibration timelines of) a request log built by _request_folder."""
    from stepml_core import pipeline
    from stepml_core.runs.limits import InputLimits

    spans = {"timelines_20m": 1200.0, "timelines_6h": 6 * 3600.0, "timelines_24h": 24 * 3600.0}
    d = _request_folder(tmp, huge=name == "request_huge", last_s=spans.get(name), bomb=name == "request_bomb")
    size = sum(p.stat().st_size for p in d.iterdir())
    t = time.perf_counter()
    try:
        limits = InputLimits.from_env(max_request_span_s=max(spans.values()) + 1) if name in spans else None
        stored = pipeline.request_log(d, tmp, limits)
        result = _request_outcome(name, d, stored)
    except Exception as e:  # noqa: BLE001 - the outcome is what is measured
        result = f"{type(e).__name__}: {str(e).replace(str(tmp), '…')}"
    return {"case": name, "input_bytes": size, "seconds": round(time.perf_counter() - t, 2), "outcome": result}


def _request_outcome(name: str, d: Path, stored: dict) -> str:
    from stepml_core import pipeline
    from stepml_core.calibration.timelines import CalibrationRun, request_timelines
    from stepml_core.replay.simulate import PhysicsServingModel, replay, replay_workload
    from stepml_core.runs.folders import read_run_metadata

    meta = read_run_metadata(d)
    ctx = pipeline.replay_context(d.name, meta, stored["header"])
    if name == "request_huge":
        r = replay(replay_workload(stored["requests"], ctx), PhysicsServingModel(), ctx)
        return f"replayed: {r.steps} steps, {r.counters.get('refused', 0)} refused, {r.counters['empty_steps']} empty"
    tl = request_timelines(CalibrationRun(d.name, meta.model, meta.workload, "train", stored["requests"], ctx))
    return f"timelines of {tl.arrival_s.size} requests over {tl.arrival_s.max():.0f} s"


def sensor_case(tmp: Path) -> dict:
    import dagster as dg

    from stepml_dagster import sensors as S
    from stepml_dagster.resources import StepMLSettings

    data = tmp / "data"
    bomb = _run_folder(data, "traces.json.gz", gzip.compress(b"x\n" * (32 << 20), compresslevel=9, mtime=0) * 256)
    bomb.rename(data / "20260101-110000-llama-2-7b-tp1-codegen")  # sorts first
    _run_folder(data, "traces.json", _step_line() + b"\n")
    os.environ["STEPML_SENSOR_SETTLE_S"] = "0"
    with dg.instance_for_test() as inst:
        ctx = dg.build_sensor_context(
            instance=inst, resources={"settings": StepMLSettings(data_dir=str(data), out_dir=str(tmp / "out"))}
        )
        t = time.perf_counter()
        res = S.build_experiment_sensor(minimum_interval_seconds=1)(ctx)
        secs = time.perf_counter() - t
    keys = [r.partition_key for r in getattr(res, "run_requests", None) or []]
    return {
        "case": "sensor_bomb",
        "input_bytes": sum(p.stat().st_size for p in data.rglob("*") if p.is_file()),
        "seconds": round(secs, 2),
        "outcome": f"requested {keys}",
    }


def dead_worker(tmp: Path) -> dict:
    import shutil
    import signal
    import threading

    os.environ["DAGSTER_HOME"] = str(tmp / "dagster_home")
    (tmp / "dagster_home").mkdir()
    import dagster as dg

    from stepml_core.synth import synthesize_runs
    from stepml_dagster.cli import run_study

    [src] = synthesize_runs(tmp / "base", ["20260217-155451-llama-2-7b-tp1-codegen"], scale=0.03, seed=5, workers=1)
    keys = [f"20260401-00000{i}-llama-2-7b-tp1-codegen-synth" for i in (1, 2, 3)]
    for k in keys:
        shutil.copytree(src, tmp / "data" / k)
    inst = dg.DagsterInstance.get()
    res: dict = {}

    def killer():
        while "killed" not in res:
            for r in inst.get_runs(
                dg.RunsFilter(tags={"dagster/partition": keys[0]}, statuses=[dg.DagsterRunStatus.STARTED])
            ):
                pids = {
                    e.dagster_event.pid for e in inst.all_logs(r.run_id) if e.dagster_event and e.dagster_event.pid
                } - {os.getpid()}
                if pids:
                    os.kill(pids.pop(), signal.SIGKILL)
                    res["killed"] = time.perf_counter()
                    return
            time.sleep(0.05)

    threading.Thread(target=killer, daemon=True).start()
    t = threading.Thread(
        target=lambda: res.update(
            out=run_study(tmp / "data", tmp / "out", synth_if_empty=False, quiet=True, workers=2)
        ),
        daemon=True,
    )
    t.start()
    t.join(timeout=240 + 60)
    after = time.perf_counter() - res["killed"] if "killed" in res else None
    out = res.get("out") or {}
    started = inst.get_runs_count(dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))
    outcome = (
        (
            f"{'returned' if not t.is_alive() else 'STILL RUNNING'} {after:.0f} s after the kill; failed {out.get('failed')}: "
            f"{(out.get('errors') or {}).get(keys[0])}; runs left STARTED: {started}"
        )
        if after is not None
        else "no kill"
    )
    if t.is_alive():
        print(json.dumps({"case": "dead_worker", "outcome": outcome}), flush=True)
        os._exit(0)  # the old pool waits forever
    return {"case": "dead_worker", "seconds": round(after, 1) if after else None, "outcome": outcome}


def ingest_real() -> dict:
    from stepml_core.traces import read_traces

    files = sorted(REAL.glob("*/traces.json*"))
    if not files:
        return {"case": "ingest_real", "outcome": f"skipped: no real traces at {REAL}"}
    best = float("inf")
    nbytes = 0
    for _ in range(5):
        t = time.perf_counter()
        nbytes = sum(read_traces(f, workers=1).counters["bytes_uncompressed"] for f in files)
        best = min(best, time.perf_counter() - t)
    return {
        "case": "ingest_real",
        "input_bytes": nbytes,
        "seconds": round(best, 3),
        "outcome": f"{nbytes / best / 1e6:.0f} MB/s over {len(files)} real files (best of 5)",
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        with tempfile.TemporaryDirectory() as tmp:
            r = case(a.one, Path(tmp))
        r["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print(json.dumps(r))
        return
    for name in a.cases.split(","):
        p = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True)
        line = (
            p.stdout.strip().splitlines()[-1]
            if p.stdout.strip()
            else json.dumps({"case": name, "error": p.stderr[-500:]})
        )
        print(line, flush=True)


if __name__ == "__main__":
    main()
