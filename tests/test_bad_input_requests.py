"""Bad input, request logs and ground truth (issue 21): one run folder per case, all in one `stepml run`.

The trace corpus (test_bad_input_corpus.py) holds run folders of traces; this one holds run folders of request logs
(requests.json[.gz] + ground_truth.json[.gz], as the 16 real runs have them), each next to two good ones, built from
a small synthetic run's client records (no real data needed). Each case asserts its exact outcome: the run replayed
and scored as it should be, or failed alone with one line naming the file and the key, record or limit; nothing read
outside the data root; bounded time and memory. A second study on the same output folder changes one scored run's
ground truth while the models phase fails: its old replay must be left out as stale, never shown as current.
"""

import gzip
import json
import os
import random
import shutil
from pathlib import Path

import polars as pl
import pytest

from stepml_core.runs.request_log import MAX_ARRIVAL_US, read_request_log
from stepml_core.synth import synthesize_runs
from stepml_core.synth.spec import engine_params
from stepml_core.tables.data_checks import records_balance
from stepml_dagster.cli import run_study
from stepml_dagster.io_manager import read_object

BASE_REAL_ID = "20260217-155451-llama-2-7b-tp1-codegen"
SLUG = "llama-2-7b-tp1-codegen"
CASES = [
    "good",
    "good_test",
    "huge_prompt",
    "late_arrival",
    "no_config",
    "seqs_many",
    "seqs_negative",
    "budget_negative",
    "kv_one_block",
    "header_disagrees",
    "header_tp",
    "symlink_log",
    "symlink_truth",
    "fifo_log",
    "gzip_bomb",
    "truncated_gz",
    "half_truth",
    "duplicate_truth",
    "shifted_truth",
    "bad_truth",
    "out_of_order",
    "over_64_bits",
    "empty",
    "two_logs",
    "two_truths",
    "traced_cut",
    "long_prompts",
]
MAX_REQUEST_BYTES = 16 << 20  # the corpus runs with STEPML_MAX_REQUEST_BYTES at 16 MiB to test that limit cheaply
MODEL = "requests_roles"  # one calibrated model for every run of the LLM: equal loads give equal predictions


def run_id(case: str) -> str:
    return f"20260302-{CASES.index(case):06d}-{SLUG}"


def _base_log(tmp_path_factory) -> tuple[Path, dict, list[dict], list[dict]]:
    """A small synthetic run, its client records as requests.json records, ground truth and header."""
    base = tmp_path_factory.mktemp("reqbase")
    [src] = synthesize_runs(base, [BASE_REAL_ID], scale=0.03, seed=5, workers=1)
    t = read_request_log(src).table  # inference-perf's per-request records, read by the project's own reader
    reqs = [
        {**r, "prefix_group": ""}
        for r in t.select("index", "arrival_time_us", "input_tokens", "output_tokens", "has_error").to_dicts()
    ]
    truth = [
        {
            "index": r["index"],
            "has_error": r["observed_has_error"],
            "ttft_s": r["observed_ttft_s"],
            "e2e_s": r["observed_e2e_s"],
        }
        for r in t.to_dicts()
    ]
    kv = int(engine_params()["models"]["llama-2-7b"]["kv_blocks_total"])
    header = {
        "model_id": "meta-llama/Llama-2-7b-hf",
        "model_short": "llama-2-7b",
        "profile": "codegen",
        "split": "train",
        "config": {
            "tensor_parallelism": 1,
            "max_num_seqs": 128,
            "max_num_batched_tokens": 2048,
            "kv_blocks_total_gpu": kv,
            "block_size": 16,
            "num_prefix_groups": 0,  # as the 16 real headers say; the profile (what ran) says 10 groups, 100 tokens
            "system_prompt_len": 0,
        },
    }
    return src, header, reqs, truth


# long: the corpus fixture: one short block per case, then both studies
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    src, header, reqs, truth = _base_log(tmp_path_factory)
    data = tmp_path_factory.mktemp("reqcorpus") / "experiments"
    data.mkdir()
    outside = tmp_path_factory.mktemp("outside")
    info = {"n": len(reqs)}

    def make(case, requests=None, gt=None, hdr=None, *, gz=False, keep_traces=False) -> Path:
        d = data / run_id(case)
        shutil.copytree(src, d, ignore=shutil.ignore_patterns("per_request_lifecycle_metrics.json", "provenance.json"))
        if not keep_traces:
            (d / "traces.json.gz").unlink()
        doc = {
            "experiment": d.name,
            **(header if hdr is None else hdr),
            "requests": reqs if requests is None else requests,
        }
        body = json.dumps(doc).encode()
        (d / ("requests.json.gz" if gz else "requests.json")).write_bytes(gzip.compress(body, mtime=0) if gz else body)
        (d / "ground_truth.json").write_text(json.dumps(truth if gt is None else gt))
        return d

    def with_config(**kv) -> dict:
        return {**header, "config": {**header["config"], **kv}}

    make("good")
    make("good_test", hdr={**header, "split": "test"})
    huge = [dict(r) for r in reqs]
    huge[5]["input_tokens"] = 200_000  # more than the KV cache (and max_model_len) holds: vLLM refuses it
    make("huge_prompt", huge)
    late = [dict(r) for r in reqs]
    late[-1]["arrival_time_us"] = MAX_ARRIVAL_US  # an arrival a week after the first (the schema's bound)
    make("late_arrival", late)
    make("no_config", hdr={k: v for k, v in header.items() if k != "config"})
    make("seqs_many", hdr=with_config(max_num_seqs="many"))
    make("seqs_negative", hdr=with_config(max_num_seqs=-1))
    make("budget_negative", hdr=with_config(max_num_batched_tokens=-2048))
    make("kv_one_block", hdr=with_config(kv_blocks_total_gpu=1))
    make("header_disagrees", hdr=with_config(max_num_seqs=64))  # exp-config.yaml says 128
    d = make("header_tp", hdr=with_config(tensor_parallelism=2))  # the run id says tp1; exp-config.yaml says none
    (d / "exp-config.yaml").write_text(
        "".join(
            line for line in (d / "exp-config.yaml").read_text().splitlines(True) if "tensor_parallelism" not in line
        )
    )
    d = make("symlink_log")
    (outside / "requests.json").write_bytes((d / "requests.json").read_bytes())
    (d / "requests.json").unlink()
    os.symlink(outside / "requests.json", d / "requests.json")
    d = make("symlink_truth")
    (outside / "ground_truth.json").write_text(json.dumps(truth))
    (d / "ground_truth.json").unlink()
    os.symlink(outside / "ground_truth.json", d / "ground_truth.json")
    d = make("fifo_log")
    (d / "requests.json").unlink()
    os.mkfifo(d / "requests.json")
    d = make("gzip_bomb")
    (d / "requests.json").unlink()
    (d / "requests.json.gz").write_bytes(gzip.compress(b" " * (MAX_REQUEST_BYTES * 2), compresslevel=9, mtime=0))
    d = make("truncated_gz", gz=True)
    blob = (d / "requests.json.gz").read_bytes()
    (d / "requests.json.gz").write_bytes(blob[: len(blob) // 2])
    info["half"] = len(reqs) // 2
    make("half_truth", gt=truth[: info["half"]])
    dup = truth + [{**truth[3], "e2e_s": 99.0, "ttft_s": 98.0}]
    make("duplicate_truth", gt=dup)
    info["duplicate_line"] = len(dup) - 1
    make("shifted_truth", gt=[{**g, "index": g["index"] + 1} for g in truth])
    bad = [dict(g) for g in truth]
    bad[7]["ttft_s"] = bad[7]["e2e_s"] + 1.0
    bad[8]["e2e_s"] = -1.0
    make("bad_truth", gt=bad)
    perm = list(range(len(reqs)))
    random.Random(3).shuffle(perm)  # record k becomes index perm[k]: index order is no longer time order
    make(
        "out_of_order",
        [{**r, "index": perm[r["index"]]} for r in reqs],
        [{**g, "index": perm[g["index"]]} for g in truth],
    )
    info["perm"] = perm
    big = [dict(r) for r in reqs]
    big[10]["arrival_time_us"] = 2**63
    big[11]["input_tokens"] = 2**64
    make("over_64_bits", big)
    make("empty", [], [])
    d = make("two_logs")
    (d / "requests.json.gz").write_bytes(gzip.compress((d / "requests.json").read_bytes(), mtime=0))
    d = make("two_truths")
    (d / "ground_truth.json.gz").write_bytes(gzip.compress((d / "ground_truth.json").read_bytes(), mtime=0))
    # 200 prompts of 17,000-17,199 tokens, 10 s apart: alone in the engine; as many lengths as the profile's 100
    # prompts or more, so each length is one prompt and consecutive requests have consecutive prompt ids
    long = [{**reqs[0], "index": i, "arrival_time_us": i * 10_000_000, "input_tokens": 17_000 + i} for i in range(200)]
    d = make("long_prompts", long, hdr={**header, "split": "test"})
    (d / "ground_truth.json").unlink()  # predicted only: out of every calibration
    (d / "exp-config.yaml").write_text((d / "exp-config.yaml").read_text().replace("4096", "32768"))
    for f in (d / "results" / "config.yaml", d / "profile.yaml"):  # no shared system prompt: nothing to share at all
        f.write_text(
            f.read_text()
            .replace("system_prompt_len: 100", "system_prompt_len: 0")
            .replace('"system_prompt_len":100', '"system_prompt_len":0')
        )
    d = make("traced_cut", keep_traces=True)
    blob = (d / "traces.json.gz").read_bytes()
    (d / "traces.json.gz").write_bytes(blob[: len(blob) // 2])
    out = tmp_path_factory.mktemp("reqcorpus_out")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEPML_MAX_REQUEST_BYTES", str(MAX_REQUEST_BYTES))
        res = run_study(data, out, synth_if_empty=False, quiet=True, workers=1)
    first = {c: _per_request(out, c) for c in ("good", "good_test")}
    report1 = (out / "report.md").read_text()
    # second study: good_test's ground truth changes (its request log is read again) while the models phase fails
    t2 = [{**g, "e2e_s": g["e2e_s"] * 1.5 if g["e2e_s"] else g["e2e_s"]} for g in truth]
    (data / run_id("good_test") / "ground_truth.json").write_text(json.dumps(t2))

    def models_fail(*a, **kw):
        raise RuntimeError("calibration failed (injected by the test)")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STEPML_MAX_REQUEST_BYTES", str(MAX_REQUEST_BYTES))
        mp.setattr("stepml_core.pipeline.request_calibration", models_fail)
        res2 = run_study(data, out, synth_if_empty=False, quiet=True, workers=1, experiments=[run_id("good_test")])
    return {"res": res, "res2": res2, "out": out, "data": data, "info": info, "first": first, "report1": report1}


def _per_request(out: Path, case: str, model: str = MODEL) -> pl.DataFrame:
    """The predictions (without the observed columns) for every request of the run."""
    p = pl.read_parquet(out / "replay" / run_id(case) / f"{model}.parquet")
    return p.select("index", "arrival_time_us", "ttft_s", "e2e_s", "success", "output_tokens")


def _stored_log(c, case: str) -> dict:
    folder = c["out"] / "assets" / "request_log" / run_id(case)
    return json.loads((folder / "_values.json").read_text())


def _ok(c, case: str) -> None:
    rid = run_id(case)
    assert rid in c["res"]["experiments"] and rid not in c["res"]["failed"], c["res"]["errors"].get(rid)


def _failed_with(c, case: str, *needles: str) -> str:
    rid = run_id(case)
    assert rid in c["res"]["failed"], (case, c["res"]["errors"].get(rid))
    err = c["res"]["errors"][rid]
    assert "\n" not in err.strip() and "Traceback" not in err, err  # one line
    for n in needles:
        assert n in err, (case, n, err)
    return err


def _replay_rows(c, case: str) -> pl.DataFrame:
    rows = pl.read_csv(c["out"] / "replay.csv", schema_overrides={"observed": pl.Float64, "rel_err_pct": pl.Float64})
    return rows.filter((pl.col("experiment_id") == run_id(case)) & (pl.col("step_model") == MODEL))


def test_good_runs_replayed_and_scored_the_study_goes_on(corpus):
    _ok(corpus, "good"), _ok(corpus, "good_test")
    assert corpus["res"]["study_ok"]
    for case in ("good", "good_test"):
        assert corpus["first"][case].height == corpus["info"]["n"]
        assert _replay_rows(corpus, case)["observed"].is_not_null().any() or case == "good_test"


def test_header_shape_values_the_replay_does_not_use_are_a_stated_choice(corpus):
    stored = json.loads((corpus["out"] / "assets" / "replay" / run_id("good") / "_values.json").read_text())
    choice = stored["assumptions"]["header_not_used"]
    assert choice["system_prompt_len"]["header"] == 0 and choice["system_prompt_len"]["used"] == 100
    assert choice["num_prefix_groups"]["header"] == 0 and choice["num_prefix_groups"]["used"] == 10
    assert choice["system_prompt_len"]["from"] in ("results/config.yaml", "profile.yaml")


def test_a_request_that_can_never_fit_is_refused_as_vllm_does_not_a_stall(corpus):
    _ok(corpus, "huge_prompt")
    p = _per_request(corpus["out"], "huge_prompt").sort("index")
    assert p.height == corpus["info"]["n"]
    assert p.filter(pl.col("index") == 5).select("success", "e2e_s").row(0) == (False, 0.0)
    assert p.filter(pl.col("index") != 5)["success"].sum() > 0


def test_an_arrival_a_week_late_fails_the_run_naming_the_limit(corpus):
    _failed_with(corpus, "late_arrival", "requests.json: arrivals span", "max_request_span_s = 86400")


@pytest.mark.parametrize(
    "case,needle",
    [
        ("no_config", "requests.json: key config.kv_blocks_total_gpu: missing"),
        ("seqs_many", "requests.json: key config.max_num_seqs: expected an integer from 1 to 1048576, got 'many'"),
        ("seqs_negative", "requests.json: key config.max_num_seqs: -1 is outside 1..1048576"),
        ("budget_negative", "requests.json: key config.max_num_batched_tokens: -2048 is outside 1..16777216"),
        (
            "kv_one_block",
            "requests.json: key config.kv_blocks_total_gpu: 1 blocks (16 tokens) cannot hold one sequence",
        ),
        ("header_disagrees", "requests.json: key config.max_num_seqs: 64, but exp-config.yaml says 128"),
        (
            "header_tp",
            f"requests.json: key config.tensor_parallelism: 2, but the run id '{run_id('header_tp')}' says tp1",
        ),
    ],
)
def test_a_bad_header_fails_that_run_alone_naming_file_and_key(corpus, case, needle):
    _failed_with(corpus, case, needle)
    assert not (corpus["out"] / "replay" / run_id(case)).exists()


@pytest.mark.parametrize(
    "case,needle",
    [
        ("symlink_log", "requests.json: a symlink to"),
        ("symlink_truth", "ground_truth.json: a symlink to"),
        ("fifo_log", "requests.json: a FIFO (named pipe), not a regular file"),
        ("gzip_bomb", f"requests.json.gz: inflates to more than {MAX_REQUEST_BYTES} bytes"),
        ("truncated_gz", "requests.json.gz: truncated gzip stream"),
    ],
)
def test_request_files_get_the_file_safety_checks_of_traces(corpus, case, needle):
    err = _failed_with(corpus, case, needle)
    if case.startswith("symlink"):
        assert "outside the data root" in err and not (corpus["out"] / "replay" / run_id(case)).exists()
    if case == "gzip_bomb":
        assert "max_request_bytes = 16777216 (STEPML_MAX_REQUEST_BYTES or settings.max_request_bytes)" in err


def test_truth_for_half_the_requests_scores_that_half_and_names_the_rest(corpus):
    _ok(corpus, "half_truth")
    half, n = corpus["info"]["half"], corpus["info"]["n"]
    log = _stored_log(corpus, "half_truth")
    assert log["truth"]["truth_used"] == half and log["truth"]["requests_without_truth"] == n - half
    assert log["truth"]["first_without_truth"][0] == half
    assert _per_request(corpus["out"], "half_truth").equals(corpus["first"]["good"])  # the load is the same
    rows = _replay_rows(corpus, "half_truth")
    good = _replay_rows(corpus, "good")
    observed = dict(zip(rows["metric"], rows["observed"]))
    assert observed["successes"] <= half < dict(zip(good["metric"], good["observed"]))["successes"]
    pred = dict(zip(rows["metric"], rows["predicted"]))
    assert pred["successes"] <= half  # predicted over the same scored half
    report = (corpus["out"] / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith(f"| {run_id('half_truth')} |"))
    assert f"{half} of {n} requests" in row, row


def test_duplicate_truth_keeps_the_first_record_as_requests_do(corpus):
    _ok(corpus, "duplicate_truth")
    q = pl.read_parquet(corpus["out"] / "assets" / "request_log" / run_id("duplicate_truth") / "quarantine.parquet")
    assert q.select("kind", "line", "reason").rows() == [
        ("ground_truth", corpus["info"]["duplicate_line"], "duplicate index (first kept)")
    ]
    assert _replay_rows(corpus, "duplicate_truth")["observed"].equals(_replay_rows(corpus, "good")["observed"])


def test_truth_that_cannot_be_matched_is_refused(corpus):
    _failed_with(corpus, "shifted_truth", "ground_truth.json: 1 of", "name no request of requests.json", "refused")


def test_bad_truth_values_never_change_the_simulated_load(corpus):
    _ok(corpus, "bad_truth")
    assert _per_request(corpus["out"], "bad_truth").equals(corpus["first"]["good"])
    q = pl.read_parquet(corpus["out"] / "assets" / "request_log" / run_id("bad_truth") / "quarantine.parquet")
    assert q.filter(pl.col("kind") == "ground_truth").select("line").to_series().sort().to_list() == [7, 8]
    stored = read_object(corpus["out"] / "assets" / "request_log" / run_id("bad_truth"))
    outcome = records_balance({run_id("bad_truth"): stored})  # records in = kept + quarantined, truth in = used + q.
    assert outcome.passed and outcome.metadata["partitions"][run_id("bad_truth")]["truth_quarantine_rows_stored"] == 2


def test_arrivals_out_of_index_order_are_replayed_in_time_order(corpus):
    _ok(corpus, "out_of_order")
    perm = corpus["info"]["perm"]
    p = _per_request(corpus["out"], "out_of_order")
    good = corpus["first"]["good"].with_columns(pl.col("index").map_elements(lambda i: perm[i], return_dtype=pl.Int64))
    assert p.sort("index").equals(good.sort("index"))
    assert _replay_rows(corpus, "out_of_order")["observed"].equals(_replay_rows(corpus, "good")["observed"])


def test_values_over_64_bits_are_quarantined_naming_the_record(corpus):
    _ok(corpus, "over_64_bits")
    q = pl.read_parquet(corpus["out"] / "assets" / "request_log" / run_id("over_64_bits") / "quarantine.parquet")
    recs = q.filter(pl.col("kind") == "record").sort("line")
    assert recs["line"].to_list() == [10, 11]
    assert recs["reason"].str.starts_with("arrival_time_us missing or outside")[0]
    assert recs["reason"].str.starts_with("input_tokens missing or outside")[1]


def test_an_empty_request_list_fails_with_a_clear_error(corpus):
    _failed_with(corpus, "empty", "requests.json: key requests: the list is empty")


def test_prompts_over_16384_tokens_get_no_false_prefix_cache_hits(corpus):
    """Each request runs alone with its own prompt: TTFT grows with the prompt. With keys 1,024 blocks apart, the
    blocks past 16,384 tokens of one prompt were found as the next prompt's first blocks (false hits, a faster
    TTFT for every request after the first)."""
    _ok(corpus, "long_prompts")
    ttft = _per_request(corpus["out"], "long_prompts").sort("index")["ttft_s"].to_list()
    assert len(ttft) == 200 and all(t is not None for t in ttft)
    assert all(b >= a * (1 - 1e-9) for a, b in zip(ttft, ttft[1:])), ttft


@pytest.mark.parametrize("case,kind", [("two_logs", "requests"), ("two_truths", "ground truth")])
def test_two_forms_of_one_file_refuse_that_run(corpus, case, kind):
    _failed_with(corpus, case, f"two {kind} files, ", " bytes) and ", "remove the one that is not the whole run")


def test_a_trace_cut_short_is_studied_on_part_of_its_steps_and_the_report_says_so(corpus):
    _ok(corpus, "traced_cut")
    report = corpus["report1"]
    section = report.split("## Runs studied on part of their trace")[1].split("\n## ")[0]
    row = next(line for line in section.splitlines() if line.startswith(f"| `{run_id('traced_cut')}` |"))
    assert "the gzip stream ends early (cut short): studied on the " in row and "steps read before the damage" in row


def test_a_replay_made_from_an_earlier_request_log_is_never_shown_as_current(corpus):
    res2 = corpus["res2"]
    assert not res2["study_ok"] and res2["failed"] == []  # the models phase failed; the run's request log was read
    rows = pl.read_csv(corpus["out"] / "replay.csv")
    assert run_id("good_test") not in set(rows["experiment_id"]) and run_id("good") in set(rows["experiment_id"])
    report = (corpus["out"] / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith(f"| {run_id('good_test')} | stale |"))
    assert "replay made from an earlier request log" in row and "not re-run since" in row, row
