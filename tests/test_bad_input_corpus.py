"""Bad input, as a corpus: one run folder per case, all processed in one study next to a good run.

Each case asserts what happened to every record: a quarantine row with file, line and reason,
or a clear error naming the file (that partition fails, the others do not), or a skip with a
reason; and rows in = rows kept + rows quarantined. Built from a small synthetic run.

The second half (issue 11, hostile input) adds cases that used to end "ok" with a wrong report,
hang, or exhaust memory: each asserts the exact outcome now. The study is run twice on the same
output folder: once over every case, then again after one scored run breaks (``victim``) while
another changed after it was read (``appended``): the second report must leave both out and say
why. Operational cases (sensor time budget, dead workers, two runs on one output folder) are in
test_bad_input_ops.py.
"""

# long module: the hostile-input corpus: one fixture builds every case and both studies, the tests read it

import gzip
import hashlib
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
CASES = [
    "good",
    "truncated",
    "garbage",
    "utf8",
    "empty",
    "zero_byte_gz",
    "corrupt_gz",
    "missing_attr",
    "wrong_type",
    "nan",
    "overflow",
    "duplicate",
    "durations",
    "out_of_order",
    "unknown_event",
    "dropped",
    "no_exp_config",
    "yaml_tags",
    # issue 11
    "dotted_a",
    "dotted_b",
    "victim",
    "appended",
    "truncated_gz",
    "bitflip_gz",
    "absurd",
    "clock_backwards",
    "two_traces",
    "bad_optional",
    "lines_bomb",
    "repeat_bomb",
    "long_line",
    "many_bad_lines",
    "yaml_bomb",
    "yaml_big",
    "fifo_trace",
    "dir_trace",
    "symlink_trace",
    "secret_line",
    "exp_tp0",
    "exp_lots",
]
DOTTED = "mixtral-8x7b-v0.1-tp2"  # run ids that differ only after a '.': Path.with_suffix used to map both to one file
MAX_LINE_BYTES = (
    1 << 20
)  # the corpus runs with STEPML_MAX_LINE_BYTES at 1 MiB (its lines are at most ~330 KB) to test that limit cheaply
SECRET = (
    "sk-live-" + "0123456789abcdef" * 4
)  # an API key inside an unparseable line: only a short escaped excerpt may reach outputs


def run_id(case: str) -> str:
    if case == "dotted_a":  # same timestamp as dotted_b: the two ids are equal up to the '.' in 'v0.1'
        return f"20260301-{CASES.index(case):06d}-{DOTTED}-general-synth"
    if case == "dotted_b":
        return f"20260301-{CASES.index('dotted_a'):06d}-{DOTTED}-codegen-synth"
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


# long: the corpus fixture: builds the good run and the plain bad-input cases, one short block per case, then runs both studies
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
    make("truncated", body)
    info["truncated"] = (len(lines), steps_in(lines[-1]))
    g = list(lines)
    g.insert(3, b'{"resourceSpans":[{"garbage')
    make("garbage", b"\n".join(g) + b"\n")
    info["garbage"] = 4
    u = list(lines)
    u.insert(5, b'{"resourceSpans":[]}\xff\xfe')
    make("utf8", b"\n".join(u) + b"\n")
    info["utf8"] = 6
    make("empty", b"")
    make("zero_byte_gz", b"", gz=True)
    make("corrupt_gz", gzip.compress(b"\n".join(lines) + b"\n", mtime=0)[:-400] + b"\x00" * 64, gz=True)
    body, ln = edit_first_summary(lambda ev: ev["attributes"].remove(_attr(ev, "step.duration_us")))
    make("missing_attr", body)
    info["missing_attr"] = ln
    body, ln = edit_first_summary(lambda ev: _attr(ev, "batch.prefill_tokens").update(value={"stringValue": "many"}))
    make("wrong_type", body)
    info["wrong_type"] = ln
    body, ln = edit_first_summary(lambda ev: _attr(ev, "kv.usage_gpu_ratio").update(value={"doubleValue": "NaN"}))
    make("nan", body)
    info["nan"] = ln
    body, ln = edit_first_summary(lambda ev: _attr(ev, "batch.decode_tokens").update(value={"intValue": str(2**64)}))
    make("overflow", body)
    info["overflow"] = ln
    dl = list(lines)
    dl.append(dl[step_idx[0]])
    make("duplicate", b"\n".join(dl) + b"\n")
    info["duplicate"] = (len(dl), steps_in(dl[step_idx[0]]))

    def two_durations():
        out = list(lines)
        d = orjson.loads(out[step_idx[0]])
        evs = [ev for _, ev in _summaries(d)]
        _attr(evs[0], "step.duration_us")["value"] = {"intValue": "0"}
        _attr(evs[-1], "step.duration_us")["value"] = {"intValue": "-5"}
        out[step_idx[0]] = _dump(d)
        return b"\n".join(out) + b"\n", int(_attr(evs[-1], "step.id")["value"]["intValue"])

    body, neg_id = two_durations()
    make("durations", body)
    info["durations"] = neg_id
    make("out_of_order", b"\n".join(reversed(lines)) + b"\n")
    body, ln = edit_first_summary(lambda ev: ev.update(name="step.MYSTERY"))
    make("unknown_event", body)
    info["unknown_event"] = ln

    def dropped():
        out = list(lines)
        d = orjson.loads(out[step_idx[0]])
        sp, _ = next(_summaries(d))
        sp["droppedEventsCount"] = 37
        out[step_idx[0]] = _dump(d)
        return b"\n".join(out) + b"\n"

    make("dropped", dropped())
    d = make("no_exp_config", b"\n".join(lines) + b"\n")
    (d / "exp-config.yaml").unlink()
    d = make("yaml_tags", b"\n".join(lines) + b"\n")
    (d / "exp-config.yaml").write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    # names that must never become partitions
    (data / "not-a-run-id").mkdir()
    (data / "not-a-run-id" / "traces.json").write_bytes(lines[0] + b"\n")
    outside = tmp_path_factory.mktemp("outside") / f"20260301-999999-{SLUG}-synth"
    shutil.copytree(data / run_id("good"), outside)
    os.symlink(outside, data / f"20260301-888888-{SLUG}-synth")
    hostile_cases(make, data, lines, step_idx, info, tmp_path_factory)
    out = tmp_path_factory.mktemp("corpus_out")
    appended = data / run_id("appended") / "traces.json"
    info["appended_read"] = (appended.stat().st_size, hashlib.sha256(appended.read_bytes()).hexdigest())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEPML_MAX_LINE_BYTES", str(MAX_LINE_BYTES))
        mp.setattr("stepml_core.traces.read_traces", _appending_after_read(appended))
        res = run_study(data, out, synth_if_empty=False, quiet=True, workers=1)
    # second study on the same output folder: a scored run breaks (corrupt gzip), only it is re-run
    victim = data / run_id("victim") / "traces.json.gz"
    blob = bytearray(victim.read_bytes())
    for i in range(len(blob) // 2, len(blob) // 2 + 64):
        blob[i] ^= 0x5A
    victim.write_bytes(bytes(blob))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEPML_MAX_LINE_BYTES", str(MAX_LINE_BYTES))
        res2 = run_study(data, out, synth_if_empty=False, quiet=True, workers=1, experiments=[run_id("victim")])
    return {"res": res, "res2": res2, "out": out, "data": data, "info": info}


def _appending_after_read(path: Path):
    """read_traces that appends a line to `path` right after reading it: a writer still appending."""
    from stepml_core import traces

    original = traces.read_traces

    def read_then_append(p, *a, **kw):
        tables = original(p, *a, **kw)
        if Path(p) == path:
            with open(path, "ab") as f:
                f.write(path.read_bytes().splitlines()[-1] + b"\n")
        return tables

    return read_then_append


def _edit_step(lines: list[bytes], step_id: int, fn) -> tuple[list[bytes], int]:
    """Apply fn to the BATCH_SUMMARY event of step `step_id`; (new lines, 1-based line)."""
    out = list(lines)
    for i, l in enumerate(out):
        if not _is_step_line(orjson.loads(l)):
            continue
        d = orjson.loads(l)
        for _, ev in _summaries(d):
            if int(_attr(ev, "step.id")["value"]["intValue"]) == step_id:
                fn(ev)
                out[i] = _dump(d)
                return out, i + 1
    raise KeyError(step_id)


def _step_ids(lines: list[bytes]) -> list[int]:
    return sorted(
        int(_attr(ev, "step.id")["value"]["intValue"]) for l in lines for _, ev in _summaries(orjson.loads(l))
    )


def _set(ev: dict, key: str, value: int) -> None:
    _attr(ev, key)["value"] = {"intValue": str(value)}


def _get(ev: dict, key: str) -> int:
    return int(_attr(ev, key)["value"]["intValue"])


# long: a table of the issue-11 cases, one numbered block per case, all cut from the same base run's lines
def hostile_cases(make, data: Path, lines: list[bytes], step_idx: list[int], info: dict, tmp_path_factory) -> None:
    """The issue-11 cases: one run folder each, next to the good run."""
    whole = b"\n".join(lines) + b"\n"
    steps_per_line = [sum(1 for _ in _summaries(orjson.loads(l))) for l in lines]
    # 1. ids equal up to a '.': two partitions, two files; dotted_b holds the first half of the lines only
    for case, body in (("dotted_a", whole), ("dotted_b", b"\n".join(lines[: len(lines) // 2]) + b"\n")):
        d = make(case, body)
        cfg = d / "exp-config.yaml"
        cfg.write_text(cfg.read_text().replace("tensor_parallelism: 1", "tensor_parallelism: 2"))
    info["dotted_b"] = sum(steps_per_line[: len(lines) // 2])
    # 2. scored, then broken (second study); a truncated gzip keeps the lines before the damage
    make("victim", gzip.compress(whole, mtime=0), gz=True)
    blob = gzip.compress(whole, mtime=0)
    cut = blob[: len(blob) * 2 // 3]
    make("truncated_gz", cut, gz=True)
    inflated = __import__("zlib").decompressobj(wbits=31).decompress(cut)
    n_whole = inflated.count(b"\n")
    info["truncated_gz"] = (n_whole, sum(steps_per_line[:n_whole]))
    flipped = bytearray(blob)
    for i in range(len(blob) // 2, len(blob) // 2 + 64):
        flipped[i] ^= 0x5A
    make("bitflip_gz", bytes(flipped), gz=True)
    # 3. one absurd but schema-valid row, and one over the run's token budget
    first = _get(next(_summaries(orjson.loads(lines[step_idx[0]])))[1], "step.id")
    big = 9_000_000_000_000_000_000

    def absurd(ev):
        for k in (
            "step.ts_start_ns",
            "step.ts_end_ns",
            "step.duration_us",
            "queue.running_depth",
            "queue.waiting_depth",
            "batch.num_prefill_reqs",
            "batch.num_decode_reqs",
            "batch.scheduled_tokens",
            "batch.prefill_tokens",
            "batch.num_finished",
            "batch.num_preempted",
            "kv.blocks_total_gpu",
            "kv.blocks_free_gpu",
        ):
            _set(ev, k, big)
        _set(ev, "batch.decode_tokens", 0)

    ab, ln_abs = _edit_step(lines, first, absurd)
    second = _step_ids(lines)[1]

    def over_budget(ev):
        _set(ev, "batch.scheduled_tokens", 4096)
        _set(ev, "batch.prefill_tokens", 4096 - _get(ev, "batch.decode_tokens"))

    ab, ln_budget = _edit_step(ab, second, over_budget)
    make("absurd", b"\n".join(ab) + b"\n")
    info["absurd"] = {first: ln_abs, second: ln_budget}
    # 14b. the clock goes backwards by 2 ms between two consecutive sampled steps (cycle_us would be -2000)
    ids = _step_ids(lines)
    k = next(i for i, j in zip(ids, ids[1:]) if j == i + 1)
    ts_k = {}
    _edit_step(lines, k, lambda ev: ts_k.update(ts=_get(ev, "step.ts_start_ns")))

    def backwards(ev):
        span = _get(ev, "step.ts_end_ns") - _get(ev, "step.ts_start_ns")
        _set(ev, "step.ts_start_ns", ts_k["ts"] - 2_000_000)
        _set(ev, "step.ts_end_ns", ts_k["ts"] - 2_000_000 + span)

    cb, ln_back = _edit_step(lines, k + 1, backwards)
    make("clock_backwards", b"\n".join(cb) + b"\n")
    info["clock_backwards"] = (k, k + 1, ln_back)
    # 5. two trace files: a partial traces.json beside the whole traces.json.gz
    d = make("two_traces", b"\n".join(lines[: len(lines) // 2]) + b"\n")
    (d / "traces.json.gz").write_bytes(blob)
    # 6 + 10. malformed optional results/ files (and one that is a FIFO): quarantined, the steps survive
    d = make("bad_optional", whole)
    (d / "results" / "summary_lifecycle_metrics.json").write_text("{not json")
    (d / "results" / "stage_0_lifecycle_metrics.json").write_text("[1, 2]")
    (d / "results" / "stage_1_lifecycle_metrics.json").unlink()
    os.mkfifo(d / "results" / "stage_1_lifecycle_metrics.json")
    # 7. appended while read (the read_traces wrapper in the fixture appends a line after reading)
    make("appended", whole)
    # 8. bounded resources: 'x' lines inflating to 1.5 GB; one valid line repeated (ratio 190, past 100);
    #    one 8 MiB line; 12,000 unreadable lines (over the 10,000 stored quarantine records); a YAML alias bomb; a 9 MB YAML
    unit = gzip.compress(b"x\n" * (32 << 20), compresslevel=9, mtime=0)
    make("lines_bomb", unit * 24, gz=True)
    one = orjson.loads(
        lines[step_idx[0]]
    )  # one valid line with a single step (short: deflate's window sees the repeats)
    ss = one["resourceSpans"][0]["scopeSpans"][0]
    ss["spans"] = ss["spans"][:1]
    ss["spans"][0]["events"] = ss["spans"][0]["events"][:1]
    rep = gzip.compress((_dump(one) + b"\n") * 40_000, compresslevel=9, mtime=0)
    make("repeat_bomb", rep * 4, gz=True)
    make("long_line", gzip.compress(b'{"resourceSpans":[' + b"x" * (8 << 20) + b"\n", mtime=0), gz=True)
    make("many_bad_lines", whole + b"x\n" * 12_000)
    d = make("yaml_bomb", whole)
    bomb = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i, c in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        bomb.append(f"{c}: &{c} [" + ", ".join([f"*{prev}"] * 9) + "]")
    (d / "exp-config.yaml").write_text((d / "exp-config.yaml").read_text() + "\n".join(bomb) + "\n")
    info["yaml_bomb_bytes"] = len("\n".join(bomb))
    d = make("yaml_big", whole)
    (d / "profile.yaml").write_text("# padding\n" * (900 << 10))
    # 10. a FIFO and a directory named traces.json
    d = make("fifo_trace")
    os.mkfifo(d / "traces.json")
    d = make("dir_trace")
    (d / "traces.json").mkdir()
    # 13. traces.json symlinked to a file outside the data root holding secrets; a secret inside an unreadable line
    secrets = tmp_path_factory.mktemp("secrets") / "shadow"
    secrets.write_text(
        f"root:$6$saltsalt$Q1w2E3r4T5y6U7i8O9p0QwErTyUiOpAsDfGhJkLzXcVbNm:19000:0:99999:7:::\nOPENAI_API_KEY={SECRET}\n"
    )
    d = make("symlink_trace")
    os.symlink(secrets, d / "traces.json")
    info["secrets"] = ["Q1w2E3r4T5y6U7i8O9p0", SECRET]
    sl = list(lines)
    sl.insert(2, b'{"note": "\x1b[31m' + SECRET.encode() + b' and more text after it"')
    make("secret_line", b"\n".join(sl) + b"\n")
    info["secret_line"] = 3
    # 14. exp-config values of the wrong kind
    for case, (key, value) in (
        ("exp_tp0", ("tensor_parallelism", "0")),
        ("exp_lots", ("max_num_batched_tokens", "lots")),
    ):
        d = make(case, whole)
        text = (d / "exp-config.yaml").read_text()
        (d / "exp-config.yaml").write_text(
            "\n".join(f"{key}: {value}" if l.startswith(key + ":") else l for l in text.splitlines()) + "\n"
        )
    # 4. the same run under other names: a trailing newline, a full-width digit, tp01, a symlink inside the root
    good = data / run_id("good")
    for name in (good.name + "\n", good.name.replace("-tp1-", "-tp\uff11-"), good.name.replace("-tp1-", "-tp01-")):
        shutil.copytree(good, data / name)
    os.symlink(good, data / f"20260301-235959-{SLUG}-synth")
    info["aliases"] = {
        good.name + "\n": "only ASCII",
        good.name.replace("-tp1-", "-tp\uff11-"): "only ASCII",
        good.name.replace("-tp1-", "-tp01-"): "leading zero",
        f"20260301-235959-{SLUG}-synth": "the same run folder as",
    }


def _q(c, case):
    return pl.read_parquet(c["out"] / "assets" / "quarantine" / f"{run_id(case)}.parquet")


def _kept(c, case):
    return pl.read_parquet(c["out"] / "assets" / "step_table" / f"{run_id(case)}.parquet")


def _ok(c, case):
    assert run_id(case) in c["res"]["experiments"] and run_id(case) not in c["res"]["failed"], c["res"]["errors"].get(
        run_id(case)
    )


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


def test_gzip_cut_short_and_zero_padded_keeps_the_lines_before_the_damage(corpus):
    """corrupt_gz is a copy cut 400 bytes short and padded with zeros: a truncation (issue 11, point 2)."""
    _ok(corpus, "corrupt_gz")
    q = _q(corpus, "corrupt_gz")
    assert q["kind"].to_list() == ["line", "file"] and q["reason"][1].startswith("truncated gzip stream")
    assert 0 < _kept(corpus, "corrupt_gz").height < corpus["info"]["n_steps"]


def test_corrupt_gzip_fails_that_partition_naming_the_file(corpus):
    """Bit flips in the middle of the stream: what was inflated cannot be trusted; that partition fails."""
    assert run_id("bitflip_gz") in corpus["res"]["failed"]
    err = corpus["res"]["errors"][run_id("bitflip_gz")]
    assert err.startswith("traces.json.gz: corrupt gzip stream after line ") and "incorrect data check" in err, err


@pytest.mark.parametrize(
    "case,needle",
    [
        ("missing_attr", "missing attributes: step.duration_us"),
        ("wrong_type", "batch.prefill_tokens"),
        ("nan", "NaN"),
        ("overflow", "64-bit"),
    ],
)
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
    assert (
        q.height == 1
        and "step.duration_us" in q["reason"][0]
        and f"step.id={corpus['info']['durations']}" == q["excerpt"][0]
    )
    kept = _kept(corpus, "durations")
    assert kept.height == corpus["info"]["n_steps"] - 1 and (kept["step.duration_us"] == 0).sum() >= 1


def test_out_of_order_lines_are_all_kept_and_sorted(corpus):
    _ok(corpus, "out_of_order")
    kept = _kept(corpus, "out_of_order")
    assert (
        kept.height == corpus["info"]["n_steps"]
        and kept["step.id"].is_sorted()
        and _q(corpus, "out_of_order").height == 0
    )


def test_unknown_event_name_quarantined_as_event(corpus):
    _ok(corpus, "unknown_event")
    q = _q(corpus, "unknown_event")
    assert (
        q.select("kind", "line").rows() == [("event", corpus["info"]["unknown_event"])]
        and "step.MYSTERY" in q["reason"][0]
    )
    assert _kept(corpus, "unknown_event").height == corpus["info"]["n_steps"] - 1


def test_dropped_event_counts_are_counted(corpus):
    _ok(corpus, "dropped")
    meta = json.loads((corpus["out"] / "assets" / "raw_traces" / f"{run_id('dropped')}.json").read_text())
    assert meta["counters"]["dropped_events_total"] == 37
    assert _kept(corpus, "dropped").height == corpus["info"]["n_steps"]


@pytest.mark.parametrize(
    "case,needle", [("no_exp_config", "exp-config.yaml: missing"), ("yaml_tags", "exp-config.yaml")]
)
def test_bad_metadata_fails_that_partition_naming_the_file(corpus, case, needle):
    assert run_id(case) in corpus["res"]["failed"]
    assert needle in corpus["res"]["errors"][run_id(case)]


def test_bad_names_and_symlinks_never_become_partitions(corpus):
    skipped = corpus["res"]["skipped"]
    assert "does not match" in skipped["not-a-run-id"]
    link = f"20260301-888888-{SLUG}-synth"
    assert "outside the data root" in skipped[link] and link not in corpus["res"]["experiments"]


# ---------------------------------------------------------------------------------------------
# issue 11: hostile and broken inputs (no silent wrong results, no hangs, bounded memory)
# ---------------------------------------------------------------------------------------------


def _failed_with(c, case: str, *needles: str) -> str:
    rid = run_id(case)
    assert rid in c["res"]["failed"] and rid not in c["res"]["skipped"], (case, c["res"]["errors"].get(rid))
    err = c["res"]["errors"][rid]
    assert "\n" not in err.strip(), err  # one line
    for n in needles:
        assert n in err, (case, n, err)
    return err


def _metrics(c) -> pl.DataFrame:
    return pl.read_csv(c["out"] / "metrics.csv")


def test_1_run_ids_differing_after_a_dot_are_two_partitions_two_files(corpus):
    _ok(corpus, "dotted_a"), _ok(corpus, "dotted_b")
    a, b = run_id("dotted_a"), run_id("dotted_b")
    assert a.split(".")[0] == b.split(".")[0]  # equal up to the dot
    assert (corpus["out"] / "assets" / "step_table" / f"{a}.parquet").is_file()
    assert (corpus["out"] / "assets" / "step_table" / f"{b}.parquet").is_file()
    assert _kept(corpus, "dotted_a").height == corpus["info"]["n_steps"]
    assert _kept(corpus, "dotted_b").height == corpus["info"]["dotted_b"]
    m = _metrics(corpus).filter(
        (pl.col("scope") == "per_experiment")
        & (pl.col("model") == "naive_mean")
        & (pl.col("target") == "schedule_us")
        & (pl.col("split") == "test")
    )
    rows = dict(m.select("experiment_id", "n").iter_rows())
    assert set(m["experiment_id"]).issuperset({a, b}) and m.filter(pl.col("experiment_id").is_in([a, b])).height == 2
    assert rows[a] > rows[b]  # each run's own numbers, not one run's twice


def test_2_a_run_broken_after_it_was_scored_is_failed_in_the_report_not_its_old_numbers(corpus):
    """Second study: victim's gzip now corrupt (it fails), appended changed after it was read (stale)."""
    res2, victim, appended = corpus["res2"], run_id("victim"), run_id("appended")
    assert res2["failed"] == [victim] and res2["study_ok"]
    assert "traces.json.gz: corrupt gzip stream after line " in res2["errors"][victim]
    m = _metrics(corpus)
    assert victim not in set(m["experiment_id"]) and appended not in set(m["experiment_id"])
    assert run_id("good") in set(m["experiment_id"])
    verdict = json.loads((corpus["out"] / "verdict.json").read_text())
    left = verdict["runs_left_out"]
    assert left[victim]["status"] == "failed" and "traces.json.gz: corrupt gzip stream" in left[victim]["reason"]
    assert left[appended]["status"] == "stale" and "traces.json" in left[appended]["reason"]
    assert left[run_id("exp_tp0")]["status"] == "failed"  # failed in the first study, nothing stored: listed too
    report = (corpus["out"] / "report.md").read_text()
    assert "## Runs left out: failed or stale" in report
    row = next(l for l in report.splitlines() if l.startswith(f"| `{victim}` |"))
    assert "**failed**" in row and "corrupt gzip stream" in row and "from an earlier run: not used" in row
    row = next(l for l in report.splitlines() if l.startswith(f"| `{appended}` |"))
    assert "**stale**" in row and "changed since it was processed" in row
    assert f"`{victim}`" not in report.split("## Runs left out")[0]  # nowhere in the tables before it


def test_2_truncated_gzip_keeps_the_lines_before_the_damage_and_records_it(corpus):
    _ok(corpus, "truncated_gz")
    n_whole, steps = corpus["info"]["truncated_gz"]
    assert _kept(corpus, "truncated_gz").height == steps
    q = _q(corpus, "truncated_gz")
    assert q.select("kind", "line").rows() == [("line", n_whole + 1), ("file", n_whole + 1)]
    assert q["reason"][1].startswith("truncated gzip stream: compressed data ends before the end of the stream")
    meta = json.loads((corpus["out"] / "assets" / "raw_traces" / f"{run_id('truncated_gz')}.json").read_text())
    assert meta["counters"]["gzip_truncated"] == 1


def test_3_absurd_row_and_row_over_the_token_budget_are_quarantined_pooled_models_stay_sane(corpus):
    _ok(corpus, "absurd")
    q = _q(corpus, "absurd").sort("line")
    (first, ln_abs), (second, ln_budget) = sorted(corpus["info"]["absurd"].items(), key=lambda kv: kv[1])
    assert q.height == 2 and q["kind"].to_list() == ["row", "row"]
    by_id = {int(e.split("=")[1]): r for e, r in zip(q["excerpt"], q["reason"])}
    assert by_id[first].startswith("schema: ") and "step.duration_us: less_than_or_equal_to(3600000000)" in by_id[first]
    assert by_id[second] == "bound: batch.scheduled_tokens 4096 > max_num_batched_tokens 2048 (exp-config.yaml)"
    assert _kept(corpus, "absurd").height == corpus["info"]["n_steps"] - 2
    g = _metrics(corpus).filter(
        (pl.col("scope") == "global") & (pl.col("model") == "ridge_30f") & (pl.col("split") == "test")
    )
    assert g.height > 0 and g["mape_pct"].max() < 1000, g.sort("mape_pct").tail(3)  # poisoned: ~1e8 %


def test_4_the_same_run_under_other_names_is_one_partition(corpus):
    skipped = corpus["res"]["skipped"]
    for name, needle in corpus["info"]["aliases"].items():
        assert needle in skipped[name], (name, skipped.get(name))
        assert name not in corpus["res"]["experiments"]
    assert corpus["res"]["experiments"].count(run_id("good")) == 1


def test_5_two_trace_files_refuse_the_run(corpus):
    _failed_with(
        corpus, "two_traces", "two trace files, traces.json (", "bytes) and traces.json.gz (", "remove the one"
    )


def test_6_malformed_optional_results_files_are_quarantined_the_steps_survive(corpus):
    _ok(corpus, "bad_optional")
    assert _kept(corpus, "bad_optional").height == corpus["info"]["n_steps"]
    q = _q(corpus, "bad_optional").filter(pl.col("kind") == "file").sort("file")
    files = [Path(f).name for f in q["file"]]
    assert files == [
        "stage_0_lifecycle_metrics.json",
        "stage_1_lifecycle_metrics.json",
        "summary_lifecycle_metrics.json",
    ]
    assert all(r.startswith("optional file left out: ") for r in q["reason"])
    assert "expected a JSON object, got list" in q["reason"][0]
    assert "a FIFO (named pipe), not a regular file" in q["reason"][1]
    assert "not valid JSON" in q["reason"][2]


def test_7_fingerprint_is_of_what_was_read_and_the_sensor_reads_the_appended_tail(corpus, monkeypatch):
    import dagster as dg

    from stepml_dagster import sensors as S
    from stepml_dagster.resources import StepMLSettings

    _ok(corpus, "appended")
    meta = json.loads((corpus["out"] / "assets" / "raw_traces" / f"{run_id('appended')}.json").read_text())
    rec = next(f for f in meta["files"] if f["file"] == "traces.json")
    size, sha = corpus["info"]["appended_read"]
    assert (rec["size_bytes"], rec["sha256"]) == (size, sha)
    assert (
        corpus["data"] / run_id("appended") / "traces.json"
    ).stat().st_size > size  # the file grew after it was read
    monkeypatch.setenv("STEPML_SENSOR_SETTLE_S", "0")
    monkeypatch.setenv("STEPML_SENSOR_TIME_BUDGET_S", "5")
    ctx = dg.build_sensor_context(
        instance=dg.DagsterInstance.get(),
        resources={"settings": StepMLSettings(data_dir=str(corpus["data"]), out_dir=str(corpus["out"]))},
    )
    res = S.build_experiment_sensor(minimum_interval_seconds=1)(ctx)
    requested = {r.partition_key for r in res.run_requests}
    assert run_id("appended") in requested and run_id("good") not in requested


def test_8_resources_per_run_are_bounded_each_limit_named(corpus):
    _failed_with(
        corpus,
        "lines_bomb",
        "traces.json.gz: more than 1000000 lines are not OTLP JSON",
        "max_unreadable_lines = 1000000",
    )
    _failed_with(
        corpus,
        "repeat_bomb",
        "traces.json.gz: inflates more than 100x",
        "max_inflate_ratio = 100",
        "stopped after line",
    )
    _failed_with(
        corpus,
        "long_line",
        f"traces.json.gz: a line longer than {MAX_LINE_BYTES} bytes",
        f"max_line_bytes = {MAX_LINE_BYTES} (STEPML_MAX_LINE_BYTES or settings.max_line_bytes)",
        "stopped after line 0",
    )
    _failed_with(
        corpus,
        "yaml_bomb",
        "exp-config.yaml: more than 100000 YAML nodes once aliases are expanded",
        "max_yaml_nodes = 100000",
    )
    _failed_with(corpus, "yaml_big", "profile.yaml: larger than 8388608 bytes", "max_metadata_bytes = 8388608")
    for case in ("lines_bomb", "repeat_bomb", "long_line", "yaml_bomb", "yaml_big"):
        assert run_id(case) in corpus["res"]["experiments"]  # failed alone; the study went on
    assert corpus["res"]["study_ok"]


def test_8_quarantine_stores_the_first_records_and_counts_the_rest(corpus):
    _ok(corpus, "many_bad_lines")
    q = _q(corpus, "many_bad_lines")
    assert q.height == 10_001 and q["count"][:10_000].to_list() == [1] * 10_000
    summary = q.row(10_000, named=True)
    assert summary["kind"] == "line" and summary["count"] == 2_000 and summary["line"] is None
    assert (
        summary["reason"].startswith("2000 more line record(s)") and "max_quarantine_rows = 10000" in summary["reason"]
    )
    assert q["count"].sum() == 12_000 and _kept(corpus, "many_bad_lines").height == corpus["info"]["n_steps"]
    rs = json.loads((corpus["out"] / "assets" / "run_summary" / f"{run_id('many_bad_lines')}.json").read_text())
    assert rs["quarantine_rows"] == 12_000 and rs["lines_quarantined"] == 12_000


@pytest.mark.parametrize(
    "case,needle",
    [
        ("fifo_trace", "traces.json: a FIFO (named pipe), not a regular file"),
        ("dir_trace", "traces.json: a directory, not a regular file"),
    ],
)
def test_10_special_files_named_traces_json_fail_saying_what_they_are(corpus, case, needle):
    err = _failed_with(corpus, case, needle, "StepML reads regular files only")
    assert run_id(case) in err  # the path names the run folder


def test_13_file_symlink_out_of_the_root_is_refused_and_nothing_of_it_reaches_outputs(corpus):
    err = _failed_with(corpus, "symlink_trace", "traces.json: a symlink to", "outside the data root")
    assert "StepML reads files inside the data folder only" in err
    _assert_nowhere_in_outputs(corpus, corpus["info"]["secrets"])


def test_13_unreadable_line_keeps_only_a_short_escaped_excerpt(corpus):
    _ok(corpus, "secret_line")
    q = _q(corpus, "secret_line")
    assert q.select("kind", "line").rows() == [("line", corpus["info"]["secret_line"])]
    ex = q["excerpt"][0]
    assert ex.startswith('{"note": "\\x1b[31msk-live-0123') and ex.endswith("...") and ex.isascii() and ex.isprintable()
    assert len(ex) <= 48 + 3 + 3  # 48 characters, the escape of ESC, '...'
    _assert_nowhere_in_outputs(corpus, [SECRET, "and more text after it"])


def _assert_nowhere_in_outputs(c, needles: list[str]) -> None:
    for p in c["out"].rglob("*"):
        if not p.is_file():
            continue
        if p.suffix == ".parquet":
            cols = [c for c, t in pl.read_parquet_schema(p).items() if t == pl.Utf8]
            df = pl.read_parquet(p, columns=cols) if cols else pl.DataFrame()
            texts = [v for col in df.columns for v in df[col].drop_nulls().to_list()]
            blob = "\n".join(texts).encode()
        else:
            blob = p.read_bytes()
        for n in needles:
            assert n.encode() not in blob, (n, p)


@pytest.mark.parametrize(
    "case,needle",
    [
        ("exp_tp0", "exp-config.yaml: key tensor_parallelism: 0 is outside 1..1024"),
        ("exp_lots", "exp-config.yaml: key max_num_batched_tokens: expected an integer from 1 to 16777216, got 'lots'"),
    ],
)
def test_14_bad_exp_config_values_fail_naming_file_and_key(corpus, case, needle):
    _failed_with(corpus, case, needle)


def test_14_clock_going_backwards_is_quarantined_no_negative_cycle(corpus):
    _ok(corpus, "clock_backwards")
    k, k1, line = corpus["info"]["clock_backwards"]
    q = _q(corpus, "clock_backwards")
    assert q.select("kind", "line", "excerpt").rows() == [("row", line, f"step.id={k1}")]
    assert q["reason"][0].startswith("clock: step.ts_start_ns ") and "goes backwards" in q["reason"][0]
    kept = _kept(corpus, "clock_backwards")
    assert kept.height == corpus["info"]["n_steps"] - 1 and k1 not in set(kept["step.id"])
    fm = pl.read_parquet(corpus["out"] / "assets" / "feature_matrix" / f"{run_id('clock_backwards')}.parquet")
    assert fm["cycle_us"].drop_nulls().min() > 0
