"""Ingest throughput: StepML's trace reader against a plain json+pandas loader and the bare floor.

For every ``traces.json[.gz]`` found (../shared/real/experiments by default, plus ``--data``):

* (a) baseline - ``json.loads`` per line, walk resourceSpans/scopeSpans/spans/events, one dict
  per row, ``pd.DataFrame`` per table (the same tables: steps, snapshots, journey, api, step spans);
* (b) floor - inflate + ``orjson.loads`` of every line, no walking, no table;
* (c) ``stepml_core.traces.read_traces`` with workers=1 and workers=2 (the worker pool is started
  before timing).

Each is timed ``--repeat`` times in this one process, round-robin; the best and median wall times
are kept (on a shared machine the best is the least disturbed run; ratios use best against best),
and the best CPU time of this process (inflating thread included; worker processes of w2 are
not, so w2 has no CPU figure). MB/s counts uncompressed bytes. All readers must agree on the
number of BATCH_SUMMARY rows.

    python benchmarks/bench_ingest.py [--data data/experiments] [--repeat 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import time
from pathlib import Path

import orjson
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stepml_core.traces import read_traces  # noqa: E402

REAL = ROOT.parent / "shared" / "real" / "experiments"


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def baseline(path: Path) -> dict:
    """(a) The plain loader: json.loads per line, walk the OTLP structure, one dict per row, pandas
    DataFrames - for the same tables as read_traces (steps, snapshots, journey, api, step spans)."""
    tables = {"steps": [], "snapshots": [], "journey": [], "api": [], "step_spans": []}
    with _open(path) as fh:
        for ln, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            for rs in doc.get("resourceSpans", []):
                for ss in rs.get("scopeSpans", []):
                    for sp in ss.get("spans", []):
                        sattrs = {}
                        for a in sp.get("attributes", []):
                            v = a["value"]
                            sattrs[a["key"]] = next(iter(v.values()), None)
                        events = sp.get("events", [])
                        if sp.get("name", "").startswith("scheduler_steps_"):
                            tables["step_spans"].append(
                                {
                                    "span_sequence": int(sattrs.get("scheduler.span_sequence", 0)),
                                    "step_range_start": int(sattrs.get("scheduler.step_range_start", 0)),
                                    "step_range_end": int(sattrs.get("scheduler.step_range_end", 0)),
                                    "closure_interval": int(sattrs.get("scheduler.closure_interval", 0)),
                                    "dropped_events_count": int(sp.get("droppedEventsCount", 0)),
                                    "n_events": len(events),
                                    "start_unix_nano": int(sp["startTimeUnixNano"]),
                                    "end_unix_nano": int(sp["endTimeUnixNano"]),
                                    "source_line": ln,
                                }
                            )
                        for ev in events:
                            row = {}
                            for a in ev.get("attributes", []):
                                v = a["value"]
                                if "intValue" in v:
                                    row[a["key"]] = int(v["intValue"])
                                elif "doubleValue" in v:
                                    row[a["key"]] = float(v["doubleValue"])
                                elif "stringValue" in v:
                                    row[a["key"]] = v["stringValue"]
                            row["event_time_unix_nano"] = int(ev["timeUnixNano"])
                            row["source_line"] = ln
                            name = ev.get("name", "")
                            if name == "step.BATCH_SUMMARY":
                                row["span_sequence"] = int(sattrs.get("scheduler.span_sequence", 0))
                                tables["steps"].append(row)
                            elif name == "step.REQUEST_SNAPSHOT":
                                tables["snapshots"].append(row)
                            elif name.startswith(("journey.", "api.")):
                                row.update(
                                    {
                                        "request.id": sattrs.get("gen_ai.request.id"),
                                        "trace_id": sp.get("traceId"),
                                        "span_id": sp.get("spanId"),
                                    }
                                )
                                tables["journey" if name[0] == "j" else "api"].append(row)
    return {k: pd.DataFrame(v) for k, v in tables.items()}


def floor(path: Path) -> tuple[int, int]:
    """(b) Inflate + orjson.loads of every line (no walking); returns (lines, BATCH_SUMMARY count)."""
    data = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    n = 0
    for line in data.split(b"\n"):
        if line.strip():
            orjson.loads(line)
            n += 1
    return n, data.count(b'"name":"step.BATCH_SUMMARY"')


def bench_file(path: Path, repeat: int) -> dict:
    """Time every reader ``repeat`` times, round-robin (so that load changes on a shared machine
    hit all readers alike); keep the best and the median wall time of each."""
    first = read_traces(path, workers=1)  # warm imports and the allocator
    read_traces(path, workers=2)  # start the worker pool outside the timing
    mb = first.counters["bytes_uncompressed"] / 1e6
    readers = {
        "baseline": lambda: len(baseline(path)["steps"]),
        "floor": lambda: floor(path)[1],
        "stepml_w1": lambda: read_traces(path, workers=1).steps.height,
        "stepml_w2": lambda: read_traces(path, workers=2).steps.height,
    }
    times: dict[str, list] = {k: [] for k in readers}
    cpu: dict[str, list] = {k: [] for k in readers}
    steps: dict[str, set] = {k: set() for k in readers}
    for _ in range(repeat):
        for k, fn in readers.items():
            c, t = time.process_time(), time.perf_counter()
            steps[k].add(fn())
            times[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    res = {"file": str(path), "mb_uncompressed": round(mb, 3)}
    for k in readers:
        res[k] = {
            "best_s": min(times[k]),
            "median_s": statistics.median(times[k]),
            "cpu_best_s": None if k == "stepml_w2" else min(cpu[k]),
            "steps": steps[k].pop() if len(steps[k]) == 1 else sorted(steps[k]),
        }
    res["steps_agree"] = len({str(res[k]["steps"]) for k in readers}) == 1
    res["lines_fast"] = first.counters.get("lines_fast")
    res["lines_general"] = first.counters.get("lines_general")
    for k in readers:
        r = res[k]
        n_steps = r["steps"] if isinstance(r["steps"], int) else 0
        r["mb_per_s"] = mb / r["best_s"]
        r["steps_per_s"] = n_steps / r["best_s"]
        r["speedup_vs_baseline"] = res["baseline"]["best_s"] / r["best_s"]
        r["speedup_vs_floor"] = res["floor"]["best_s"] / r["best_s"]
        r["median_speedup_vs_baseline"] = res["baseline"]["median_s"] / r["median_s"]
        r["cpu_speedup_vs_baseline"] = res["baseline"]["cpu_best_s"] / r["cpu_best_s"] if r["cpu_best_s"] else None
    return res


def _print(res: dict) -> None:
    print(f"\n{res['file']}  ({res['mb_uncompressed']:.1f} MB uncompressed)")
    print(
        f"  {'reader':<12} {'best ms':>9} {'median ms':>10} {'MB/s':>8} {'steps/s':>11} {'x baseline':>11} "
        f"{'(median)':>9} {'x floor':>8} {'cpu ms':>8} {'(x base)':>9} {'steps':>7}"
    )
    for k in ("baseline", "floor", "stepml_w1", "stepml_w2"):
        r = res[k]
        cpu = (
            f"{r['cpu_best_s'] * 1e3:8.1f} {r['cpu_speedup_vs_baseline']:9.2f}"
            if r["cpu_best_s"]
            else f"{'-':>8} {'-':>9}"
        )
        print(
            f"  {k:<12} {r['best_s'] * 1e3:9.1f} {r['median_s'] * 1e3:10.1f} {r['mb_per_s']:8.0f} "
            f"{r['steps_per_s']:11.0f} {r['speedup_vs_baseline']:11.2f} {r['median_speedup_vs_baseline']:9.2f} "
            f"{r['speedup_vs_floor']:8.2f} {cpu} {r['steps']!s:>7}"
        )
    print(
        f"  BATCH_SUMMARY row counts agree: {res['steps_agree']}; StepML lines on the fast path: "
        f"{res['lines_fast']}, general path: {res['lines_general']}"
    )


def find_traces(folder: Path) -> list[Path]:
    out = []
    for run in sorted(p for p in folder.iterdir() if p.is_dir()):
        for name in ("traces.json.gz", "traces.json"):
            if (run / name).is_file():
                out.append(run / name)
                break
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="a folder of run folders (e.g. data/experiments)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    files = []
    if REAL.is_dir():
        files += find_traces(REAL)
    else:
        print(f"skipping real runs: {REAL} is absent")
    if args.data:
        if args.data.is_dir():
            files += find_traces(args.data)
        else:
            print(f"skipping --data: {args.data} is not a folder")
    if not files:
        print("no trace files found")
        return 0
    results = []
    for f in files:
        res = bench_file(f, args.repeat)
        _print(res)
        results.append(res)
    tot = {k: sum(r[k]["best_s"] for r in results) for k in ("baseline", "floor", "stepml_w1", "stepml_w2")}
    mb = sum(r["mb_uncompressed"] for r in results)
    summary = {
        k: {"mb_per_s": mb / v, "speedup_vs_baseline": tot["baseline"] / v, "speedup_vs_floor": tot["floor"] / v}
        for k, v in tot.items()
    }
    print(
        f"\nall files ({mb:.1f} MB): "
        + "; ".join(
            f"{k} {v['mb_per_s']:.0f} MB/s ({v['speedup_vs_baseline']:.2f}x baseline, {v['speedup_vs_floor']:.2f}x floor)"
            for k, v in summary.items()
        )
    )
    ok = all(r["steps_agree"] for r in results)
    if not ok:
        print("ERROR: readers disagree on the number of BATCH_SUMMARY rows")
    if args.json:
        args.json.write_text(json.dumps({"files": results, "summary": summary, "all_agree": ok}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
