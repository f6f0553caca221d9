"""stepml_core.traces: the streaming OTLP reader (fast canonical path + general orjson path)."""

# long module: the two trace readers tested against each other over shared trace-building fixtures

from __future__ import annotations

import gzip
import random
import re
import zlib
from pathlib import Path

import orjson
import polars as pl
import pytest
from conftest import SHARED_REAL as REAL  # noqa: E402
from polars.testing import assert_frame_equal

from stepml_core.traces import TABLE_SCHEMAS, TraceReadError, read_traces

TABLES = ("steps", "snapshots", "journey", "api", "step_spans", "quarantine")

# ---------------------------------------------------------------------------------------------
# a tiny OTLP composer (compact JSON, keys in the collector's order)
# ---------------------------------------------------------------------------------------------


def val(v):
    if isinstance(v, dict):
        return v  # a raw AnyValue, for odd cases
    if isinstance(v, bool):
        return {"boolValue": v}
    if isinstance(v, int):
        return {"intValue": str(v)}
    if isinstance(v, float):
        return {"doubleValue": v}
    return {"stringValue": v}


def kv(pairs):
    return [{"key": k, "value": val(v)} for k, v in pairs]


def ev(name, t, pairs):
    return {"timeUnixNano": str(t), "name": name, "attributes": kv(pairs)}


def span(trace, sid, name, t0, t1, attrs, events, *, parent=None, kind=1, dropped=None, status=None):
    d = {"traceId": trace, "spanId": sid}
    if parent:
        d["parentSpanId"] = parent
    d.update(
        {
            "flags": 768 if parent else 256,
            "name": name,
            "kind": kind,
            "startTimeUnixNano": str(t0),
            "endTimeUnixNano": str(t1),
            "attributes": kv(attrs),
        }
    )
    if events:
        d["events"] = events
    if dropped:
        d["droppedEventsCount"] = dropped
    d["status"] = status or {}
    return d


RESOURCE = {
    "attributes": kv(
        [
            ("telemetry.sdk.language", "python"),
            ("telemetry.sdk.name", "opentelemetry"),
            ("telemetry.sdk.version", "1.26.0"),
            ("service.name", "stepml-test"),
        ]
    )
}


def export(*scopes, resource=RESOURCE):
    """scopes: (scope name, [spans]); one resourceSpans entry."""
    return {
        "resourceSpans": [{"resource": resource, "scopeSpans": [{"scope": {"name": n}, "spans": s} for n, s in scopes]}]
    }


def export_multi(*resources):
    """Several resourceSpans entries, each a list of (scope, spans)."""
    return {
        "resourceSpans": [
            {"resource": RESOURCE, "scopeSpans": [{"scope": {"name": n}, "spans": s} for n, s in scopes]}
            for scopes in resources
        ]
    }


def line(doc) -> bytes:
    return orjson.dumps(doc)


STEP_KEYS = [
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


def batch_pairs(step, *, ratio=0.125, **over):
    ts = 5_000_000_000 + step * 1_000_000
    vals = dict(zip(STEP_KEYS, [step, ts, ts + 150_000, 150, 3, 1, 1, 2, 300, 298, 2, 0, 0, ratio, 4096, 3584]))
    vals.update({k.replace("__", "."): v for k, v in over.items()})
    return [(k, vals[k]) for k in STEP_KEYS if vals.get(k, "<drop>") != "<drop>"]


def batch_event(step, t=None, **over):
    return ev("step.BATCH_SUMMARY", t or 1_771_000_000_000_000_000 + step * 1000, batch_pairs(step, **over))


def snapshot_event(step, rid, phase="DECODE", eff=True):
    pairs = [
        ("step.id", step),
        ("request.id", rid),
        ("request.phase", phase),
        ("request.num_prompt_tokens", 500),
        ("request.num_computed_tokens", 520),
        ("request.num_output_tokens", 20),
        ("request.num_preemptions", 0),
        ("request.scheduled_tokens_this_step", 1),
        ("kv.blocks_allocated_gpu", 34),
        ("kv.blocks_cached_gpu", 4),
    ]
    if eff:
        pairs.append(("request.effective_prompt_len", 436))
    return ev("step.REQUEST_SNAPSHOT", 1_771_000_000_000_000_500 + step * 1000, pairs)


def step_span(seq, events, *, dropped=None, end=True):
    attrs = [
        ("scheduler.span_sequence", seq),
        ("scheduler.step_range_start", seq * 10 - 9),
        ("scheduler.closure_interval", 10),
    ]
    if end:
        attrs.append(("scheduler.step_range_end", seq * 10))
    return span(
        f"{seq:032x}",
        f"{seq:016x}",
        f"scheduler_steps_{seq}",
        1_771_000_000_000_000_000 + seq,
        1_771_000_000_000_009_000 + seq,
        attrs,
        events,
        dropped=dropped,
    )


def journey_event(typ, step, ns, *, with_ns=True, **extra):
    pairs = [("event.type", typ), ("ts.monotonic", ns / 1e9)]
    if with_ns:
        pairs.append(("ts.monotonic_ns", ns))
    pairs += [
        ("scheduler.step", step),
        ("phase", "WAITING" if typ == "QUEUED" else "DECODE"),
        ("prefill.done_tokens", 0 if typ == "QUEUED" else 500),
        ("prefill.total_tokens", 500),
        ("decode.done_tokens", 0 if typ in ("QUEUED", "SCHEDULED") else 7),
        ("decode.max_tokens", 64),
        ("num_preemptions", extra.pop("preemptions", 0)),
    ]
    if typ == "SCHEDULED":
        pairs.append(("schedule.kind", extra.pop("kind", "FIRST")))
    if typ == "FINISHED":
        pairs.append(("finish.status", extra.pop("status", "length")))
    return ev("journey." + typ, 1_771_000_000_000_000_000 + ns, pairs)


def core_span(i, events, *, dropped=None):
    return span(
        f"{0xABC000 + i:032x}",
        f"{0xC0DE00 + i:016x}",
        "llm_core",
        1_771_000_000_000_000_000 + i,
        1_771_000_000_100_000_000 + i,
        [("gen_ai.request.id", f"cmpl-{i:016x}-0-{i:08x}")],
        events,
        parent=f"{0xA91 + i:016x}",
        dropped=dropped,
    )


def api_span(i, events, *, status=None, max_tokens=64):
    attrs = [
        ("gen_ai.request.id", f"cmpl-{i:016x}"),
        ("http.route", "/v1/completions"),
        ("gen_ai.response.model", "meta-llama/Llama-2-7b-hf"),
        ("gen_ai.usage.prompt_tokens", 500),
        ("gen_ai.request.temperature", 1.0),
        ("gen_ai.request.top_p", 1.0),
    ]
    if max_tokens is not None:
        attrs.append(("gen_ai.request.max_tokens", max_tokens))
    attrs.append(("gen_ai.request.n", 1))
    return span(
        f"{0xABC000 + i:032x}",
        f"{0xA91 + i:016x}",
        "llm_request",
        1_771_000_000_000_000_000 + i,
        1_771_000_000_200_000_000 + i,
        attrs,
        events,
        kind=2,
        status=status,
    )


def api_events(i, aborted=False):
    evs = [ev("api.ARRIVED", 1_771_000_000_000_000_100 + i, [("event.ts.monotonic", 1000.5 + i)])]
    if aborted:
        evs.append(
            ev(
                "api.ABORTED",
                1_771_000_000_100_000_100 + i,
                [("event.ts.monotonic", 1001.25 + i), ("reason", "client_disconnect")],
            )
        )
    else:
        evs.append(ev("api.DEPARTED", 1_771_000_000_100_000_100 + i, [("event.ts.monotonic", 1001.75 + i)]))
    return evs


def write(tmp_path: Path, lines: list[bytes], name="traces.json", *, final_newline=True) -> Path:
    body = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
    p = tmp_path / name
    p.write_bytes(gzip.compress(body) if name.endswith(".gz") else body)
    return p


def check_invariants(t) -> None:
    c = t.counters
    assert c["lines_total"] == c["lines_blank"] + c["lines_ok"] + c["lines_quarantined"]
    for name in TABLES:
        df = getattr(t, name)
        assert dict(df.schema) == TABLE_SCHEMAS[name], name


def assert_tables_equal(a, b) -> None:
    for name in TABLES:
        assert_frame_equal(getattr(a, name), getattr(b, name), check_exact=True)
    ca = {k: v for k, v in a.counters.items() if k not in ("lines_fast", "lines_general")}
    cb = {k: v for k, v in b.counters.items() if k not in ("lines_fast", "lines_general")}
    assert ca == cb


def read_both(path: Path, **kw):
    """Fast path (default) and general path only; they must agree."""
    fast, general = read_traces(path, **kw), read_traces(path, fast=False, **kw)
    check_invariants(fast)
    assert_tables_equal(fast, general)
    return fast


# ---------------------------------------------------------------------------------------------
# a mixed, canonical file: every line should take the fast path and match the general path
# ---------------------------------------------------------------------------------------------


def mixed_lines() -> list[bytes]:
    steps1 = [
        step_span(
            1,
            [
                batch_event(3),
                snapshot_event(3, "cmpl-0000000000000001-0-00000001"),
                snapshot_event(3, "cmpl-0000000000000002-0-00000002", phase="PREFILL", eff=False),
                batch_event(7, ratio=0.0),
            ],
        ),
        step_span(2, [batch_event(12)], dropped=37),
        step_span(3, [batch_event(25, ratio={"intValue": "0"})], end=False),
    ]
    # journey events out of order: FIRST_TOKEN of step 9 appended after a SCHEDULED from step 10
    j1 = [
        journey_event("QUEUED", 4, 1_523_456_784_233_871),
        journey_event("SCHEDULED", 5, 1_523_456_789_061_217),
        journey_event("PREEMPTED", 10, 1_523_456_800_000_000, preemptions=1),
        journey_event("FIRST_TOKEN", 9, 1_523_456_811_482_930),
        journey_event("SCHEDULED", 12, 1_523_456_820_000_000, kind="RESUME", preemptions=1),
        journey_event("FINISHED", 30, 1_523_458_795_120_448, preemptions=1),
    ]
    j2 = [
        journey_event("QUEUED", 6, 1_523_456_900_000_000),
        journey_event("FINISHED", 6, 1_523_456_950_000_000, status="aborted"),
    ]
    return [
        line(export(("vllm.scheduler.step", steps1))),
        line(export(("vllm.scheduler", [core_span(1, j1), core_span(2, j2, dropped=3)]))),
        line(
            export(
                (
                    "vllm.api",
                    [
                        api_span(1, api_events(1)),
                        api_span(
                            2,
                            api_events(2, aborted=True),
                            max_tokens=None,
                            status={"message": "Client disconnected", "code": 2},
                        ),
                    ],
                )
            )
        ),
        # two scopes in one resource, then two resources in one line
        line(
            export(
                ("vllm.scheduler.step", [step_span(4, [batch_event(33)])]),
                ("vllm.scheduler", [core_span(3, [journey_event("QUEUED", 33, 1_523_457_000_000_000)])]),
            )
        ),
        line(
            export_multi(
                [("vllm.api", [api_span(3, api_events(3))])],
                [
                    (
                        "vllm.scheduler.step",
                        [step_span(5, [batch_event(41), batch_event(44)]), step_span(6, [batch_event(55)])],
                    )
                ],
            )
        ),
        line(export(("vllm.scheduler.step", [step_span(7, [])]))),  # a span without events
    ]


def test_mixed_canonical_file(tmp_path):
    t = read_both(write(tmp_path, mixed_lines()))
    c = t.counters
    assert c["lines_total"] == 6 and c["lines_ok"] == 6 and c["lines_fast"] == 6 and c["lines_general"] == 0
    assert t.quarantine.height == 0
    assert t.steps["step.id"].to_list() == [3, 7, 12, 25, 33, 41, 44, 55]
    assert t.steps["span_sequence"].to_list() == [1, 1, 2, 3, 4, 5, 5, 6]
    assert t.steps["source_line"].to_list() == [1, 1, 1, 1, 4, 5, 5, 5]
    assert t.steps["kv.usage_gpu_ratio"].to_list() == [0.125, 0.0, 0.125, 0.0, 0.125, 0.125, 0.125, 0.125]
    assert t.steps["parse_issue"].null_count() == t.steps.height
    # snapshots, with the optional effective_prompt_len
    assert t.snapshots["request.id"].to_list() == [
        "cmpl-0000000000000001-0-00000001",
        "cmpl-0000000000000002-0-00000002",
    ]
    assert t.snapshots["request.effective_prompt_len"].to_list() == [436, None]
    assert t.snapshots["request.phase"].to_list() == ["DECODE", "PREFILL"]
    # step spans
    ss = t.step_spans
    assert ss["span_sequence"].to_list() == [1, 2, 3, 4, 5, 6, 7]
    assert ss["n_events"].to_list() == [4, 1, 1, 1, 2, 1, 0]
    assert ss["dropped_events_count"].to_list() == [0, 37, 0, 0, 0, 0, 0]
    assert ss["step_range_end"].to_list() == [10, 20, None, 40, 50, 60, 70]
    # journey: kept in emission order; sorting by (request, step, ts) restores the step order
    j = t.journey
    r1 = j.filter(pl.col("request.id") == "cmpl-0000000000000001-0-00000001")
    assert r1["event.type"].to_list() == ["QUEUED", "SCHEDULED", "PREEMPTED", "FIRST_TOKEN", "SCHEDULED", "FINISHED"]
    assert r1.sort("scheduler.step", "ts.monotonic_ns")["event.type"].to_list() == [
        "QUEUED",
        "SCHEDULED",
        "FIRST_TOKEN",
        "PREEMPTED",
        "SCHEDULED",
        "FINISHED",
    ]
    assert r1["schedule.kind"].to_list() == [None, "FIRST", None, None, "RESUME", None]
    assert r1["finish.status"].to_list()[-1] == "length"
    assert r1["parent_span_id"].unique().to_list() == [f"{0xA92:016x}"]
    assert j["span_dropped_events"].to_list() == [0] * 6 + [3, 3, 0]
    assert j["ts.monotonic_ns"][0] == 1_523_456_784_233_871
    # api
    a = t.api
    assert a["event"].to_list() == ["ARRIVED", "DEPARTED", "ARRIVED", "ABORTED", "ARRIVED", "DEPARTED"]
    assert a["reason"].to_list() == [None, None, None, "client_disconnect", None, None]
    assert a["status_code"].to_list() == [None, None, 2, 2, None, None]
    assert a["max_tokens"].to_list() == [64, 64, None, None, 64, 64]
    assert a["model"].unique().to_list() == ["meta-llama/Llama-2-7b-hf"]
    assert a["event.ts.monotonic"][0] == 1001.5
    assert c["spans_by_scope"] == {"vllm.scheduler.step": 7, "vllm.scheduler": 3, "vllm.api": 3}
    assert c["events_by_name"]["step.BATCH_SUMMARY"] == 8 and c["events_by_name"]["journey.QUEUED"] == 3
    assert c["dropped_events_total"] == 37 + 3
    assert c["events_unknown"] == 0


def test_gz_and_plain_equal(tmp_path):
    lines = mixed_lines()
    a = read_traces(write(tmp_path, lines, "traces.json"))
    b = read_traces(write(tmp_path, lines, "traces.json.gz"))
    for name in TABLES:
        assert_frame_equal(
            getattr(a, name),
            getattr(b, name).with_columns(pl.lit(str(tmp_path / "traces.json")).alias("file"))
            if name == "quarantine" and b.quarantine.height
            else getattr(b, name),
        )
    assert a.counters == b.counters


def test_chunking_and_workers_identical(tmp_path):
    rng = random.Random(7)
    lines = []
    for k in range(60):
        spans = [
            step_span(
                k * 10 + i, [batch_event(k * 1000 + i * 10 + j, ratio=rng.random()) for j in range(rng.randint(1, 4))]
            )
            for i in range(rng.randint(1, 5))
        ]
        lines.append(line(export(("vllm.scheduler.step", spans))))
        if k % 7 == 3:
            lines.append(b"")
        if k % 11 == 5:
            lines.append(
                line(
                    export(
                        (
                            "vllm.scheduler.step",
                            [step_span(9999, [batch_event(k, **{"step__duration_us": {"stringValue": "abc"}})])],
                        )
                    )
                )
            )
    p = write(tmp_path, lines, "traces.json.gz")
    ref = read_traces(p)
    check_invariants(ref)
    assert ref.counters["lines_blank"] == 9 and ref.counters["lines_general"] == 5
    for kw in (
        {"chunk_bytes": 1 << 16},
        {"workers": 2},
        {"workers": 2, "chunk_bytes": 1 << 16},
        {"workers": 1, "chunk_bytes": 1 << 16, "fast": False},
    ):
        assert_tables_equal(ref, read_traces(p, **kw))


def test_random_canonical_lines_fast_equals_general(tmp_path):
    rng = random.Random(11)
    lines = []
    for k in range(40):
        scopes = []
        if rng.random() < 0.7:
            scopes.append(
                (
                    "vllm.scheduler.step",
                    [
                        step_span(
                            k * 10 + i,
                            [
                                batch_event(k * 100 + i * 10 + j, ratio=rng.choice([0.0, 1.0, rng.random(), 1e-7]))
                                if rng.random() < 0.7
                                else snapshot_event(
                                    k,
                                    f"cmpl-{rng.getrandbits(64):016x}-0-{rng.getrandbits(32):08x}",
                                    eff=rng.random() < 0.8,
                                )
                                for j in range(rng.randint(0, 3))
                            ],
                            dropped=rng.choice([None, None, 5]),
                            end=rng.random() < 0.9,
                        )
                        for i in range(rng.randint(1, 3))
                    ],
                )
            )
        if rng.random() < 0.5:
            scopes.append(
                (
                    "vllm.scheduler",
                    [
                        core_span(
                            k * 5 + i,
                            [
                                journey_event(
                                    rng.choice(["QUEUED", "SCHEDULED", "FIRST_TOKEN", "PREEMPTED", "FINISHED"]),
                                    rng.randint(0, 10**6),
                                    rng.randint(1, 10**16),
                                    with_ns=rng.random() < 0.8,
                                )
                                for _ in range(rng.randint(1, 4))
                            ],
                        )
                        for i in range(rng.randint(1, 3))
                    ],
                )
            )
        if rng.random() < 0.5:
            scopes.append(
                (
                    "vllm.api",
                    [
                        api_span(
                            k * 5 + i,
                            api_events(i, aborted=rng.random() < 0.3),
                            max_tokens=rng.choice([None, 16, 4096]),
                        )
                        for i in range(rng.randint(1, 2))
                    ],
                )
            )
        if scopes:
            lines.append(line(export(*scopes)))
    t = read_both(write(tmp_path, lines))
    assert t.counters["lines_fast"] == len(lines)
    # ts.monotonic_ns derived from ts.monotonic where the attribute is absent
    assert t.journey["ts.monotonic_ns"].null_count() == 0


# ---------------------------------------------------------------------------------------------
# broken lines and values
# ---------------------------------------------------------------------------------------------


def test_truncated_last_line_and_garbage_line(tmp_path):
    good = [line(export(("vllm.scheduler.step", [step_span(i, [batch_event(i * 10)])]))) for i in range(1, 6)]
    lines = good[:2] + [b"#### this is not json {"] + good[2:4] + [good[4][: len(good[4]) // 2]]
    t = read_both(write(tmp_path, lines, final_newline=False))
    q = t.quarantine
    assert q["line"].to_list() == [3, 6]
    assert q["kind"].to_list() == ["line", "line"]
    assert q["reason"][0].startswith("invalid JSON: ")
    assert q["reason"][1].startswith("truncated JSON at end of file")
    assert q["excerpt"][0] == "#### this is not json {"
    assert q["excerpt"][1] == lines[-1][:48].decode() + "..."  # a short excerpt, never the whole line
    assert t.steps["step.id"].to_list() == [10, 20, 30, 40]
    assert t.steps["source_line"].to_list() == [1, 2, 4, 5]
    c = t.counters
    assert (c["lines_total"], c["lines_ok"], c["lines_quarantined"]) == (6, 4, 2)


def test_truncated_line_with_final_newline_is_invalid_json(tmp_path):
    good = line(export(("vllm.scheduler.step", [step_span(1, [batch_event(10)])])))
    t = read_both(write(tmp_path, [good, good[:-5]]))
    assert t.quarantine["reason"][0].startswith("invalid JSON: ")


def test_not_otlp_and_blank_lines(tmp_path):
    good = line(export(("vllm.scheduler.step", [step_span(1, [batch_event(10)])])))
    t = read_both(write(tmp_path, [b"", b"   ", good, b'{"hello": 1}', b"[1,2]", b"\t"]))
    q = t.quarantine
    assert q["line"].to_list() == [4, 5]
    assert set(q["reason"]) == {"not an OTLP export (no resourceSpans)"}
    c = t.counters
    assert (c["lines_total"], c["lines_blank"], c["lines_ok"], c["lines_quarantined"]) == (6, 3, 1, 2)


def test_invalid_utf8(tmp_path):
    good = line(export(("vllm.scheduler.step", [step_span(1, [batch_event(10)])])))
    bad = good.replace(b"scheduler_steps_1", b"scheduler_st\xffps_1")
    t = read_both(write(tmp_path, [good, bad, good]))
    q = t.quarantine
    assert q["line"].to_list() == [2]
    pos = bad.index(b"\xff")
    assert q["reason"][0] == f"invalid UTF-8 at byte {pos}"
    assert "\\xff" in q["excerpt"][0] or q["excerpt"][0].startswith('{"resourceSpans"')
    assert t.steps.height == 2
    # valid multi-byte UTF-8 in a string value is fine (and stays on the fast path)
    ok = good.replace(b"stepml-test", "stepml-t\u00e9st".encode())
    t2 = read_both(write(tmp_path, [ok], "u.json"))
    assert t2.counters["lines_fast"] == 1 and t2.steps.height == 1


def test_escaped_strings_take_the_general_path(tmp_path):
    doc = export(("vllm.scheduler.step", [step_span(1, [snapshot_event(4, 'cmpl-"quoted"\\-0-1')])]))
    t = read_both(write(tmp_path, [line(doc)]))
    assert t.snapshots["request.id"].to_list() == ['cmpl-"quoted"\\-0-1']
    assert t.counters["lines_general"] == 1


def test_empty_file(tmp_path):
    for name in ("traces.json", "traces.json.gz"):
        p = tmp_path / name
        p.write_bytes(b"")
        t = read_traces(p)
        check_invariants(t)
        assert t.counters["lines_total"] == 0
        assert all(getattr(t, n).height == 0 for n in TABLES)
    p = write(tmp_path, [], "empty.json.gz")  # a valid gzip stream of nothing
    assert read_traces(p).counters["lines_total"] == 0


def test_corrupt_and_truncated_gzip(tmp_path):
    rng = random.Random(3)
    lines = [
        line(export(("vllm.scheduler.step", [step_span(i, [batch_event(i, ratio=rng.random())])])))
        for i in range(1, 3000)
    ]
    blob = gzip.compress(b"\n".join(lines) + b"\n")
    p = tmp_path / "traces.json.gz"
    corrupt = bytearray(blob)
    for i in range(len(blob) // 2, len(blob) // 2 + 64):
        corrupt[i] ^= 0x5A
    p.write_bytes(bytes(corrupt))
    with pytest.raises(TraceReadError, match=r"traces\.json\.gz: corrupt gzip stream after line \d+") as e:
        read_traces(p)
    assert isinstance(e.value, ValueError)
    # the line reached: no more than the complete lines zlib can inflate before the damage
    d, out = zlib.decompressobj(wbits=31), []
    try:
        for i in range(0, len(corrupt), 4096):
            out.append(d.decompress(bytes(corrupt[i : i + 4096])))
    except zlib.error:
        pass
    reachable = b"".join(out).count(b"\n")
    reported = int(re.search(r"after line (\d+)", str(e.value)).group(1))
    assert 0 < reported <= reachable < len(lines)
    # truncated (a copy cut short): the lines before the damage are kept and the truncation recorded
    p.write_bytes(blob[: len(blob) * 2 // 3])
    t = read_traces(p)
    d = zlib.decompressobj(wbits=31)
    inflated = d.decompress(blob[: len(blob) * 2 // 3])
    whole = inflated.count(b"\n")
    assert t.steps.height == whole and t.counters["lines_total"] == whole + 1 and t.counters["gzip_truncated"] == 1
    q = t.quarantine
    assert q.select("kind", "line").rows() == [("line", whole + 1), ("file", whole + 1)]
    assert q["reason"][0].startswith("truncated JSON at end of file")
    assert q["reason"][1].startswith("truncated gzip stream: compressed data ends before the end of the stream")
    assert t.read["size_bytes"] == len(blob) * 2 // 3
    p.write_bytes(b"this is not gzip at all")
    with pytest.raises(TraceReadError, match="not a gzip file"):
        read_traces(p)


def test_non_finite_overflow_and_wrong_types(tmp_path):
    evs = [
        batch_event(1, ratio={"doubleValue": "NaN"}),
        batch_event(2, ratio={"doubleValue": "Infinity"}),
        batch_event(3, batch__prefill_tokens={"intValue": "9223372036854775808"}),
        batch_event(4, step__duration_us={"stringValue": "abc"}),
        batch_event(5, step__duration_us={"intValue": 150}, ratio={"intValue": "1"}),  # bare number; int for a float
        batch_event(6, ratio={"doubleValue": "-Infinity"}, queue__running_depth={"intValue": "-9223372036854775809"}),
        batch_event(7, batch__num_finished={"doubleValue": 2.0}, kv__blocks_free_gpu={"doubleValue": 2.5}),
        batch_event(8, step__id={"intValue": "12abc"}),
    ]
    t = read_both(write(tmp_path, [line(export(("vllm.scheduler.step", [step_span(1, evs)])))]))
    s = t.steps
    issues = s["parse_issue"].to_list()
    assert issues[0] == "kv.usage_gpu_ratio: non-finite double NaN"
    assert issues[1] == "kv.usage_gpu_ratio: non-finite double Infinity"
    assert issues[2] == "batch.prefill_tokens: integer out of 64-bit range"
    assert issues[3] == "step.duration_us: expected integer, got stringValue 'abc'"
    assert issues[4] is None
    assert issues[5] == (
        "queue.running_depth: integer out of 64-bit range; kv.usage_gpu_ratio: non-finite double -Infinity"
    )
    assert issues[6] == "kv.blocks_free_gpu: expected integer, got doubleValue 2.5"
    assert issues[7] == "step.id: expected integer, got intValue '12abc'"
    assert s["kv.usage_gpu_ratio"].to_list()[:2] == [None, None]
    assert s["batch.prefill_tokens"][2] is None and s["step.duration_us"][3] is None
    assert s["step.duration_us"][4] == 150 and s["kv.usage_gpu_ratio"][4] == 1.0
    assert s["batch.num_finished"][6] == 2 and s["step.id"][7] is None
    assert t.quarantine.height == 0 and t.counters["lines_general"] == 1


def test_number_grammar_matches_json():
    import pyarrow as pa

    from stepml_core.traces import _json_numbers_ok

    rx = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?\Z")
    rng = random.Random(5)
    cases = ["".join(rng.choice("0123456789.eE+-") for _ in range(rng.randint(0, 8))) for _ in range(5000)]
    cases += ["0", "-0", "0.5", "1e5", "1E+05", "+1", ".5", "5.", "01", "1.e3", "1e", "-", "0.0024237785431815430"]
    got = _json_numbers_ok(pa.array(cases, pa.large_string()))
    assert got.tolist() == [bool(rx.match(c)) for c in cases]


def test_numbers_that_are_not_json(tmp_path):
    good = line(export(("vllm.scheduler.step", [step_span(1, [batch_event(10)])])))
    lines = [good]
    for bad in (b"+0.125", b".125", b"00.125", b"1e400", b"0.125."):
        lines.append(good.replace(b'"doubleValue":0.125', b'"doubleValue":' + bad))
    t = read_both(write(tmp_path, lines))
    assert t.quarantine["line"].to_list() == [2, 3, 4, 5, 6]
    assert all(r.startswith("invalid JSON") for r in t.quarantine["reason"])
    assert t.steps.height == 1


def test_missing_attributes(tmp_path):
    evs = [
        ev("step.BATCH_SUMMARY", 1, batch_pairs(1, step__duration_us="<drop>", kv__blocks_free_gpu="<drop>")),
        ev("step.REQUEST_SNAPSHOT", 2, [("step.id", 1), ("request.id", "r")]),
        ev("step.BATCH_SUMMARY", 3, []),
    ]
    jev = [
        ev(
            "journey.QUEUED",
            4,
            [
                ("event.type", "QUEUED"),
                ("ts.monotonic", 1.5),
                ("scheduler.step", 1),
                ("phase", "WAITING"),
                ("prefill.done_tokens", 0),
                ("prefill.total_tokens", 9),
                ("decode.done_tokens", 0),
                ("decode.max_tokens", 9),
                ("num_preemptions", 0),
            ],
        ),
        ev("journey.SCHEDULED", 5, [("event.type", "SCHEDULED"), ("scheduler.step", 2)]),
    ]
    core = span("a" * 32, "b" * 16, "llm_core", 1, 2, [], jev, parent="c" * 16)
    t = read_both(
        write(tmp_path, [line(export(("vllm.scheduler.step", [step_span(1, evs)]), ("vllm.scheduler", [core])))])
    )
    s = t.steps
    assert s["parse_issue"][0] == "missing attributes: step.duration_us, kv.blocks_free_gpu"
    assert s["step.duration_us"][0] is None and s["step.id"][0] == 1
    assert s["parse_issue"][1].startswith("missing attributes: step.id, step.ts_start_ns")
    assert t.snapshots["parse_issue"][0] == (
        "missing attributes: request.phase, request.num_prompt_tokens, request.num_computed_tokens, "
        "request.num_output_tokens, request.num_preemptions, request.scheduled_tokens_this_step, "
        "kv.blocks_allocated_gpu, kv.blocks_cached_gpu"
    )
    j = t.journey
    assert j["parse_issue"][0] == "missing span attributes: gen_ai.request.id"
    assert j["ts.monotonic_ns"][0] == 1_500_000_000  # derived from ts.monotonic
    assert j["parse_issue"][1] == (
        "missing span attributes: gen_ai.request.id; missing attributes: ts.monotonic_ns, "
        "phase, prefill.done_tokens, prefill.total_tokens, decode.done_tokens, "
        "decode.max_tokens, num_preemptions, schedule.kind"
    )


def test_unknown_event_names_and_value_kinds(tmp_path):
    evs = [
        batch_event(1),
        ev("step.MYSTERY", 2, [("x", 1)]),
        batch_event(3),
        ev(
            "step.BATCH_SUMMARY",
            4,
            batch_pairs(4)[:3] + [("step.duration_us", {"arrayValue": {"values": [{"intValue": "1"}]}})],
        ),
    ]
    jev = [journey_event("QUEUED", 1, 10), ev("journey.TELEPORTED", 11, [("event.type", "TELEPORTED")])]
    other = span("d" * 32, "e" * 16, "some_other_span", 1, 2, [], [ev("whatever", 1, [])])
    t = read_both(
        write(
            tmp_path,
            [
                line(
                    export(
                        ("vllm.scheduler.step", [step_span(1, evs)]),
                        ("vllm.scheduler", [core_span(1, jev)]),
                        ("my.scope", [other]),
                    )
                )
            ],
        )
    )
    q = t.quarantine
    assert q["kind"].to_list() == ["event", "event", "event"]
    assert q["reason"].to_list() == [
        "unknown event name 'step.MYSTERY'",
        "step.BATCH_SUMMARY: step.duration_us: unsupported value kind 'arrayValue'",
        "unknown event name 'journey.TELEPORTED'",
    ]
    assert q["line"].to_list() == [1, 1, 1]
    assert q["excerpt"][0].startswith('{"timeUnixNano":"2","name":"step.MYSTERY"')
    assert t.steps["step.id"].to_list() == [1, 3]
    assert t.journey.height == 1
    c = t.counters
    assert c["events_unknown"] == 3  # two unknown names + one event on an unknown span kind
    assert c["events_quarantined"] == 3
    assert c["lines_ok"] == 1 and c["lines_quarantined"] == 0
    assert c["spans_by_scope"]["my.scope"] == 1


def test_event_type_mismatch_and_bad_span_attrs(tmp_path):
    j = journey_event("QUEUED", 1, 10)
    j["attributes"][0]["value"] = {"stringValue": "SCHEDULED"}
    sp = core_span(1, [j])
    sp["attributes"][0]["value"] = {"intValue": "5"}
    t = read_both(write(tmp_path, [line(export(("vllm.scheduler", [sp])))]))
    assert t.journey["parse_issue"][0] == (
        "gen_ai.request.id: expected string, got intValue '5'; event.type "
        "attribute 'SCHEDULED' differs from event name 'journey.QUEUED'"
    )
    assert t.journey["event.type"][0] == "QUEUED" and t.journey["request.id"][0] is None


def test_dropped_events_count(tmp_path):
    t = read_both(
        write(
            tmp_path,
            [
                line(
                    export(
                        (
                            "vllm.scheduler.step",
                            [
                                step_span(1, [snapshot_event(5, "r1"), snapshot_event(5, "r2")], dropped=126),
                                step_span(2, [batch_event(15)]),
                            ],
                        )
                    )
                )
            ],
        )
    )
    assert t.step_spans["dropped_events_count"].to_list() == [126, 0]
    assert t.step_spans["n_events"].to_list() == [2, 1]
    assert t.counters["dropped_events_total"] == 126
    assert t.snapshots.height == 2 and t.steps.height == 1  # snapshots kept although their summary is gone


def test_non_canonical_but_valid_json_goes_general(tmp_path):
    """Pretty-printed / reordered lines are valid OTLP: same rows, general path."""
    doc = export(("vllm.scheduler.step", [step_span(1, [batch_event(10), batch_event(11)])]))
    compact = line(doc)
    spaced = orjson.dumps(doc, option=orjson.OPT_INDENT_2).replace(b"\n", b"")
    reordered = doc["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
    reordered = dict(reversed(list(reordered.items())))
    doc2 = export(("vllm.scheduler.step", [reordered]))
    t = read_both(write(tmp_path, [compact, spaced, line(doc2)]))
    assert t.counters["lines_fast"] == 1 and t.counters["lines_general"] == 2
    assert t.steps["step.id"].to_list() == [10, 11] * 3


# ---------------------------------------------------------------------------------------------
# the real runs (../shared/real)
# ---------------------------------------------------------------------------------------------

REAL_RUNS = {"20260217-203421-llama-2-70b-hf-tp4-codegen": 6679, "20260218-150304-codellama-34b-tp2-general": 7441}


@pytest.mark.real
@pytest.mark.parametrize("run,n_steps", sorted(REAL_RUNS.items()))
def test_real_runs(run, n_steps):
    p = REAL / "experiments" / run / "traces.json.gz"
    if not p.is_file():
        pytest.skip(f"{p} is absent")
    t = read_traces(p)
    check_invariants(t)
    assert t.steps.height == n_steps
    assert t.quarantine.height == 0
    assert t.steps["step.id"].n_unique() == n_steps
    assert t.steps["parse_issue"].null_count() == n_steps
    assert t.steps.select(pl.all().exclude("parse_issue").null_count()).sum_horizontal().item() == 0
    assert t.counters["lines_fast"] == t.counters["lines_total"] == 234
    assert t.snapshots.height == t.journey.height == t.api.height == 0
    assert t.step_spans.height == t.counters["spans_by_scope"]["vllm.scheduler.step"]
    assert t.step_spans["n_events"].sum() == n_steps
    assert (t.steps["step.ts_end_ns"] >= t.steps["step.ts_start_ns"]).all()
    assert_tables_equal(t, read_traces(p, fast=False))
    assert_tables_equal(t, read_traces(p, workers=2, chunk_bytes=1 << 20))
