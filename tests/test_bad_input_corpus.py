"""Bad input, as a corpus: one run folder per case, all processed in one study next to a good run.

Each case asserts what happened to every record: a quarantine row with file, line and reason,
or a clear error naming the file (that partition fails, the others do not), or a skip with a
reason; and rows in = rows kept + rows quarantined. Built from a small synthetic run.
"""

import gzip
import json
import os
import shutil
from pathlib import Path

import orjson
import polars as pl
import pytest

from stepml_core.synth import synthesize_runs
from stepml_dagster.cli import run_study

BASE_REAL_ID = "20260217-155451-llama-2-7b-tp1-codegen"
SLUG = "llama-2-7b-tp1-codegen"
CASES = ["good", "truncated", "garbage", "utf8", "empty", "zero_byte_gz", "corrupt_gz", "missing_attr", "wrong_type",
         "nan", "overflow", "duplicate", "durations", "out_of_order", "unknown_event", "dropped", "no_exp_config", "yaml_tags"]


def run_id(case: str) -> str:
    return f"20260301-{CASES.index(case):06d}-{SLUG}-synth"


def _is_step_line(d: dict) -> bool:
    return any(ss["scope"]["name"] == "vllm.scheduler.step" for rs in d["resourceSpans"] for ss in rs["scopeSpans"])


def _summaries(d: dict):
    for rs in d["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for sp in ss["spans"]:
                for ev in sp.get("events", []):
                    if ev["name"] == "step.BATCH_SUMMARY":
                        yield sp, ev


def _attr(ev: dict, key: str) -> dict:
    return next(a for a in ev["attributes"] if a["key"] == key)


def _dump(d: dict) -> bytes:
    return json.dumps(d, separators=(",", ":")).encode()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("base")
    [src] = synthesize_runs(base, [BASE_REAL_ID], scale=0.03, seed=5, workers=1)
    lines = gzip.open(src / "traces.json.gz", "rb").read().splitlines()
    data = tmp_path_factory.mktemp("corpus") / "experiments"
    data.mkdir()
    step_idx = [i for i, l in enumerate(lines) if _is_step_line(orjson.loads(l))]
    n_steps = sum(1 for l in lines for _ in _summaries(orjson.loads(l)))
    info = {"n_steps": n_steps, "n_lines": len(lines)}

    def make(case: str, body: bytes | None = None, gz: bool = False) -> Path:
        d = data / run_id(case)
        shutil.copytree(src, d)
        (d / "traces.json.gz").unlink()
        if body is not None:
            (d / ("traces.json.gz" if gz else "traces.json")).write_bytes(body)
        return d

    def edit_first_summary(fn) -> tuple[bytes, int]:
        """Apply fn to the first BATCH_SUMMARY event of the first step line; return (body, 1-based line)."""
        out = list(lines)
        i = step_idx[0]
        d = orjson.loads(out[i])
        _, ev = next(_summaries(d))
        fn(ev)
        out[i] = _dump(d)
        return b"\n".join(out) + b"\n", i + 1

    def steps_in(line: bytes) -> int:
        return sum(1 for _ in _summaries(orjson.loads(line)))

    make("good", b"\n".join(lines) + b"\n")
    body = b"\n".join(lines[:-1]) + b"\n" + lines[-1][: len(lines[-1]) // 2]
    make("truncated", body); info["truncated"] = (len(lines), steps_in(lines[-1]))
    g = list(lines); g.insert(3, b'{"resourceSpans":[{"garbage'); make("garbage", b"\n".join(g) + b"\n"); info["garbage"] = 4
    u = list(lines); u.insert(5, b'{"resourceSpans":[]}\xff\xfe'); make("utf8", b"\n".join(u) + b"\n"); info["utf8"] = 6
    make("empty", b"")
    make("zero_byte_gz", b"", gz=True)
    make("corrupt_gz", gzip.compress(b"\n".join(lines) + b"\n", mtime=0)[:-400] + b"\x00" * 64, gz=True)
    body, ln = edit_first_summary(lambda ev: ev["attributes"].remove(_attr(ev, "step.duration_us"))); make("missing_attr", body); info["missing_attr"] = ln
    body, ln = edit_first_summary(lambda ev: _attr(ev, "batch.prefill_tokens").update(value={"stringValue": "many"})); make("wrong_type", body); info["wrong_type"] = ln
    body, ln = edit_first_summary(lambda ev: _attr(ev, "kv.usage_gpu_ratio").update(value={"doubleValue": "NaN"})); make("nan", body); info["nan"] = ln
    body, ln = edit_first_summary(lambda ev: _attr(ev, "batch.decode_tokens").update(value={"intValue": str(2 ** 64)})); make("overflow", body); info["overflow"] = ln
    dl = list(lines); dl.append(dl[step_idx[0]]); make("duplicate", b"\n".join(dl) + b"\n"); info["duplicate"] = (len(dl), steps_in(dl[step_idx[0]]))

    def two_durations():
        out = list(lines)
        d = orjson.loads(out[step_idx[0]])
        evs = [ev for _, ev in _summaries(d)]
        _attr(evs[0], "step.duration_us")["value"] = {"intValue": "0"}
        _attr(evs[-1], "step.duration_us")["value"] = {"intValue": "-5"}
        out[step_idx[0]] = _dump(d)
        return b"\n".join(out) + b"\n", int(_attr(evs[-1], "step.id")["value"]["intValue"])
    body, neg_id = two_durations(); make("durations", body); info["durations"] = neg_id
    make("out_of_order", b"\n".join(reversed(lines)) + b"\n")
    body, ln = edit_first_summary(lambda ev: ev.update(name="step.MYSTERY")); make("unknown_event", body); info["unknown_event"] = ln

    def dropped():
        out = list(lines)
        d = orjson.loads(out[step_idx[0]])
        sp, _ = next(_summaries(d))
        sp["droppedEventsCount"] = 37
        out[step_idx[0]] = _dump(d)
        return b"\n".join(out) + b"\n"
    make("dropped", dropped())
    d = make("no_exp_config", b"\n".join(lines) + b"\n"); (d / "exp-config.yaml").unlink()
    d = make("yaml_tags", b"\n".join(lines) + b"\n"); (d / "exp-config.yaml").write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    # names that must never become partitions
    (data / "not-a-run-id").mkdir(); (data / "not-a-run-id" / "traces.json").write_bytes(lines[0] + b"\n")
    outside = tmp_path_factory.mktemp("outside") / f"20260301-999999-{SLUG}-synth"
    shutil.copytree(data / run_id("good"), outside)
    os.symlink(outside, data / f"20260301-888888-{SLUG}-synth")
    out = tmp_path_factory.mktemp("corpus_out")
    res = run_study(data, out, synth_if_empty=False, quiet=True, workers=1)
    return {"res": res, "out": out, "data": data, "info": info}


def _q(c, case):
    return pl.read_parquet(c["out"] / "assets" / "quarantine" / f"{run_id(case)}.parquet")


def _kept(c, case):
    return pl.read_parquet(c["out"] / "assets" / "step_table" / f"{run_id(case)}.parquet")


def _ok(c, case):
    assert run_id(case) in c["res"]["experiments"] and run_id(case) not in c["res"]["failed"], c["res"]["errors"].get(run_id(case))


def test_good_run_and_study_unaffected(corpus):
    _ok(corpus, "good")
    assert corpus["res"]["study_ok"]
    assert _kept(corpus, "good").height == corpus["info"]["n_steps"] and _q(corpus, "good").height == 0
    assert (corpus["out"] / "report.md").is_file()


def test_truncated_last_line(corpus):
    _ok(corpus, "truncated")
    q = _q(corpus, "truncated")
    line, lost = corpus["info"]["truncated"]
    assert q.select("kind", "line").rows() == [("line", line)] and "truncated" in q["reason"][0]
    assert _kept(corpus, "truncated").height == corpus["info"]["n_steps"] - lost


@pytest.mark.parametrize("case,needle", [("garbage", "invalid JSON"), ("utf8", "invalid UTF-8")])
def test_unreadable_line(corpus, case, needle):
    _ok(corpus, case)
    q = _q(corpus, case)
    assert q.select("kind", "line").rows() == [("line", corpus["info"][case])] and needle in q["reason"][0]
    assert q["file"][0].endswith("traces.json")
    assert _kept(corpus, case).height == corpus["info"]["n_steps"]


@pytest.mark.parametrize("case", ["empty", "zero_byte_gz"])
def test_empty_trace_files_give_an_empty_partition(corpus, case):
    _ok(corpus, case)
    assert _kept(corpus, case).height == 0 and _q(corpus, case).height == 0


def test_corrupt_gzip_fails_that_partition_naming_the_file(corpus):
    assert run_id("corrupt_gz") in corpus["res"]["failed"]
    err = corpus["res"]["errors"][run_id("corrupt_gz")]
    assert "traces.json.gz" in err and "gzip" in err.lower()


@pytest.mark.parametrize("case,needle", [("missing_attr", "missing attributes: step.duration_us"),
                                         ("wrong_type", "batch.prefill_tokens"), ("nan", "NaN"),
                                         ("overflow", "64-bit")])
def test_bad_values_quarantine_exactly_that_row(corpus, case, needle):
    _ok(corpus, case)
    q = _q(corpus, case)
    assert q.height == 1 and q["kind"][0] == "row" and q["line"][0] == corpus["info"][case], q.rows()
    assert q["reason"][0].startswith("parse:") and needle in q["reason"][0], q["reason"][0]
    assert _kept(corpus, case).height == corpus["info"]["n_steps"] - 1


def test_duplicate_step_ids_keep_first(corpus):
    _ok(corpus, "duplicate")
    line, n_dup = corpus["info"]["duplicate"]
    q = _q(corpus, "duplicate")
    assert q.height == n_dup and set(q["line"]) == {line} and all("duplicate step.id" in r for r in q["reason"])
    assert _kept(corpus, "duplicate").height == corpus["info"]["n_steps"]


def test_zero_duration_kept_negative_quarantined(corpus):
    _ok(corpus, "durations")
    q = _q(corpus, "durations")
    assert q.height == 1 and "step.duration_us" in q["reason"][0] and f"step.id={corpus['info']['durations']}" == q["excerpt"][0]
    kept = _kept(corpus, "durations")
    assert kept.height == corpus["info"]["n_steps"] - 1 and (kept["step.duration_us"] == 0).sum() >= 1


def test_out_of_order_lines_are_all_kept_and_sorted(corpus):
    _ok(corpus, "out_of_order")
    kept = _kept(corpus, "out_of_order")
    assert kept.height == corpus["info"]["n_steps"] and kept["step.id"].is_sorted() and _q(corpus, "out_of_order").height == 0


def test_unknown_event_name_quarantined_as_event(corpus):
    _ok(corpus, "unknown_event")
    q = _q(corpus, "unknown_event")
    assert q.select("kind", "line").rows() == [("event", corpus["info"]["unknown_event"])] and "step.MYSTERY" in q["reason"][0]
    assert _kept(corpus, "unknown_event").height == corpus["info"]["n_steps"] - 1


def test_dropped_event_counts_are_counted(corpus):
    _ok(corpus, "dropped")
    raw = json.loads((corpus["out"] / "assets" / "raw_traces" / run_id("dropped") / "_values.json").read_text())
    assert raw["meta"]["counters"]["dropped_events_total"] == 37
    assert _kept(corpus, "dropped").height == corpus["info"]["n_steps"]


@pytest.mark.parametrize("case,needle", [("no_exp_config", "exp-config.yaml: missing"), ("yaml_tags", "exp-config.yaml")])
def test_bad_metadata_fails_that_partition_naming_the_file(corpus, case, needle):
    assert run_id(case) in corpus["res"]["failed"]
    assert needle in corpus["res"]["errors"][run_id(case)]


def test_bad_names_and_symlinks_never_become_partitions(corpus):
    skipped = corpus["res"]["skipped"]
    assert "does not match" in skipped["not-a-run-id"]
    link = f"20260301-888888-{SLUG}-synth"
    assert "outside the data root" in skipped[link] and link not in corpus["res"]["experiments"]
