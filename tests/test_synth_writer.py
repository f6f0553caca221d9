"""trace_writer: OTLP value encoding, the 128-event cap, export batching, reproducible gzip."""

from __future__ import annotations

import gzip

import orjson

from stepml_core.traces.writer import (
    MAX_EVENTS_PER_SPAN,
    ExportItem,
    Span,
    batch_exports,
    encode_attrs,
    encode_event,
    encode_value,
    export_line,
    merge_exports,
    resource_json,
    write_lines,
)


def test_encode_value_by_runtime_type():
    assert encode_value(29) == '{"intValue":"29"}'
    assert encode_value(True) == '{"boolValue":true}'
    assert encode_value(0.25) == '{"doubleValue":0.25}'
    assert encode_value(float("nan")) == '{"doubleValue":"NaN"}'
    assert encode_value("DECODE") == '{"stringValue":"DECODE"}'
    assert orjson.loads(encode_value('a"b')) == {"stringValue": 'a"b'}
    attrs = orjson.loads(encode_attrs([("a", 1), ("b", None), ("c", 1.5)]))
    assert attrs == [{"key": "a", "value": {"intValue": "1"}}, {"key": "c", "value": {"doubleValue": 1.5}}]


def test_span_event_cap_drops_oldest():
    sp = Span(trace_id="0" * 32, span_id="1" * 16, name="scheduler_steps_1", kind=1, start_ns=1, end_ns=2)
    for i in range(MAX_EVENTS_PER_SPAN + 7):
        sp.add_event(encode_event(10 + i, "step.BATCH_SUMMARY", encode_attrs([("step.id", i)])))
    d = orjson.loads(sp.to_json())
    assert len(d["events"]) == MAX_EVENTS_PER_SPAN and d["droppedEventsCount"] == 7
    assert d["events"][0]["attributes"][0]["value"]["intValue"] == "7"
    assert d["startTimeUnixNano"] == "1" and d["status"] == {} and "parentSpanId" not in d


def test_batch_exports_flush_windows_and_max_batch():
    items = [
        ExportItem(end_ns=int(t * 1e9), scope="s", span_json="{}", order=i)
        for i, t in enumerate([0.5, 1.0, 4.9, 5.1, 12.0])
    ]
    ex = batch_exports(items, flush_s=5.0)
    assert [len(b) for _, b in ex] == [3, 1, 1]
    assert [t for t, _ in ex] == [5_000_000_000, 10_000_000_000, 15_000_000_000]
    many = [ExportItem(end_ns=i, scope="s", span_json="{}", order=i) for i in range(1100)]
    assert [len(b) for _, b in batch_exports(many, max_export_batch=512)] == [512, 512, 76]


def test_export_lines_group_scopes_and_merge(tmp_path):
    res = resource_json()
    a = export_line(
        res,
        [
            ExportItem(1, "vllm.scheduler.step", '{"x":1}'),
            ExportItem(2, "vllm.scheduler", '{"x":2}'),
            ExportItem(3, "vllm.scheduler.step", '{"x":3}'),
        ],
    )
    d = orjson.loads(a)
    scopes = d["resourceSpans"][0]["scopeSpans"]
    assert [s["scope"]["name"] for s in scopes] == ["vllm.scheduler.step", "vllm.scheduler"]
    assert [len(s["spans"]) for s in scopes] == [2, 1]
    lines = merge_exports([(5, "eng1", 1), (10, "eng2", 1)], [(7, "api1", 0)])
    assert lines == ["eng1", "api1", "eng2"]
    p = tmp_path / "t.json.gz"
    assert write_lines(p, lines) == 3
    raw = p.read_bytes()
    assert raw[4:8] == b"\x00\x00\x00\x00"
    assert gzip.decompress(raw).decode().splitlines() == lines
    p2 = tmp_path / "u.json.gz"
    write_lines(p2, lines)
    assert p2.read_bytes() == raw
