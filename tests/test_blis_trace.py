"""BLIS's replay input from StepML's workload: the token IDs carry exactly the prompt identity StepML's prefix cache
uses (checked by hashing 16-token blocks cumulatively, as BLIS does, against SimRequest.key), arrivals read back as
the same µs, the command names the run's serving limits."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from stepml_core.replay.blis_trace import BLIS_ENV, arrival_text, blis_run_of, find_blis, write_blis_trace
from stepml_core.replay.simulate import ReplayWorkload, RunContext
from stepml_core.sim.engine import SchedulerConfig
from stepml_core.sim.request import SimRequest


def _workload(n: int = 300, seed: int = 4, nshared_blk: int = 6) -> ReplayWorkload:
    rng = np.random.default_rng(seed)
    lengths = rng.choice([48, 64, 90, 96, 130, 200, 333], n)  # 48, 64 and 96: whole blocks; 48 and 64 under the prefix
    n_prompts = 40
    prompt_of_len = {L: i for i, L in enumerate(sorted(set(lengths.tolist())))}
    prompt_id = np.array([prompt_of_len[L] * 6 + int(rng.integers(0, 6)) for L in lengths])
    group_of_prompt = rng.integers(0, 5, n_prompts + 60)
    return ReplayWorkload(
        experiment_id="20260101-000000-llama-2-7b-tp1-general",
        arrival_s=np.sort(rng.uniform(0, 30, n)),
        prompt_tokens=lengths.astype(np.int64),
        max_tokens=rng.integers(1, 40, n),
        prompt_id=prompt_id,
        group=group_of_prompt[prompt_id],
        nshared_blk=nshared_blk,
        config=SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=16, kv_blocks_total=900, max_model_len=None),
        timeout_s=np.full(n, 300.0),
        index=np.arange(n) + 1000,
        assumptions={},
    )


def _block_chains(tokens: list[int]) -> list[int]:
    """BLIS's view: one hash per full 16-token block, over every token up to the block's end."""
    return [hash(tuple(tokens[: 16 * (k + 1)])) for k in range(len(tokens) // 16)]


def _blis_hits(a: list[int], b: list[int]) -> int:
    """Blocks request b would hit from request a's prompt in BLIS: leading equal chain hashes."""
    n = 0
    for x, y in zip(_block_chains(a), _block_chains(b)):
        if x != y:
            break
        n += 1
    return n


def _stepml_hits(ra: SimRequest, rb: SimRequest) -> int:
    """Blocks rb hits from ra's prompt in StepML (kv_cache.lookup): equal keys, at most (prompt − 1) // 16 blocks,
    and only blocks ra registered for its prompt (its full prompt blocks)."""
    n = 0
    for k in range(min((rb.prompt_len - 1) // 16, ra.prompt_full_blk)):
        if ra.key(k) != rb.key(k):
            break
        n += 1
    return n


def test_trace_token_ids_carry_stepmls_prompt_identity(tmp_path):
    w = _workload()
    path = write_blis_trace(w, tmp_path / "trace.csv", model="llama-2-7b")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert len(rows) == w.prompt_tokens.size
    ins = [json.loads(r[3]) for r in rows]
    outs = [json.loads(r[4]) for r in rows]
    assert [len(x) for x in ins] == w.prompt_tokens.tolist() and [len(x) for x in outs] == w.max_tokens.tolist()
    assert [r[1] for r in rows] == [f"request_{i}" for i in w.index.tolist()]
    reqs = [
        SimRequest(
            i, int(w.prompt_id[i]), int(w.group[i]), int(w.prompt_tokens[i]), int(w.max_tokens[i]), w.nshared_blk
        )
        for i in range(w.prompt_tokens.size)
    ]
    pairs = 0
    for a in range(0, len(reqs), 3):
        for b in range(len(reqs)):
            if a == b:
                continue
            want = _stepml_hits(reqs[a], reqs[b])
            # BLIS hits whole equal blocks; StepML caps a lookup at prompt − 1 tokens: an aligned prompt's last block
            # is the request's own in the trace, so BLIS's cap is the same
            got = _blis_hits(ins[a], ins[b])
            Lb = reqs[b].prompt_len
            if Lb % 16 == 0 and Lb <= 16 * w.nshared_blk and want == Lb // 16 - 1:
                assert got in (want, want + 1)  # the documented exception: a prompt inside the system prompt
            else:
                assert got == want, (a, b, reqs[a].prompt_len, Lb)
            pairs += want > 0
    assert pairs > 100  # shared system prompts and repeated prompts were exercised
    # output blocks are the request's own: no chain of one request's prompt + output meets another's
    chains = [set(_block_chains(i + o)[len(i) // 16 :]) for i, o in zip(ins, outs)]
    assert sum(len(c) for c in chains) == len(set().union(*chains))


def test_arrivals_read_back_as_the_same_microseconds():
    us = np.concatenate([np.arange(0, 5_000_000, 997), [1_234_567, 999_999_999, 7, 300_000_001]])
    back = [int(float(s) * 1e6) for s in arrival_text(us)]  # BLIS: int64(x * 1e6), truncating
    assert back == us.tolist()


def test_the_command_names_the_runs_serving_limits(tmp_path):
    w = _workload(n=10)
    ctx = RunContext(w.experiment_id, "llama-2-7b", 1)
    br = blis_run_of(w, ctx, model="llama-2-7b", trace="trace.csv", model_file="../../llama-2-7b.json")
    a = br.args()
    got = {a[i]: a[i + 1] for i in range(2, len(a) - 1, 2)}
    assert got["--max-num-running-reqs"] == "16" and got["--max-num-scheduled-tokens"] == "512"
    assert got["--total-kv-blocks"] == "900" and got["--block-size-in-tokens"] == "16" and got["--tp"] == "1"
    assert got["--max-model-len"] == str(900 * 16)  # no max_model_len: what the KV cache holds, not BLIS's 2,048
    assert got["--workload"] == "traces" and got["--stepml-model"] == "../../llama-2-7b.json"
    assert br.script().startswith("#!/bin/sh") and '"${BLIS:-blis}" run ' in br.script()


def test_find_blis_says_why_not(monkeypatch, tmp_path):
    monkeypatch.setenv(BLIS_ENV, str(tmp_path / "nowhere" / "blis"))
    blis, why = find_blis(tmp_path)
    assert blis is None and "nowhere" in why
    monkeypatch.setenv(BLIS_ENV, "off")
    assert find_blis(tmp_path) == (None, f"${BLIS_ENV}=off")


@pytest.mark.parametrize("n", [16_800])
def test_trace_of_a_large_run_is_written(tmp_path, n):
    w = _workload(n=n, seed=1)
    path = write_blis_trace(w, tmp_path / "t.csv", model="m")
    assert sum(1 for _ in open(path)) == n + 1


def test_final_step_is_what_blis_adds_to_a_finished_requests_e2e():
    """blis-stepml-format.md §1: a lone request, input 1000 / output 3, step 9000 + 40·prefill + 60·decode µs: BLIS's
    TTFT 49.00 ms, E2E 49 + 3 × 9.06 ms; StepML's E2E counts two decode steps, plus final_step_s = BLIS's."""
    from stepml_core.replay.simulate import replay
    from stepml_core.replay.specs import serving_model

    doc = {
        "version": 1,
        "step_time": {
            "model_type": "linear",
            "intercept": 9000,
            "feature_coefficients": {"prefill_tokens": 40.0, "decode_tokens": 60.0},
        },
    }
    w = ReplayWorkload(
        "x",
        np.array([0.0]),
        np.array([1000]),
        np.array([3]),
        np.array([0]),
        np.array([0]),
        0,
        SchedulerConfig(kv_blocks_total=1000),
        np.array([np.inf]),
        np.array([0]),
        {},
    )
    spec = {"name": "m", "kind": "blis_linear", "doc": doc, "llm_model": "llama-2-7b", "fitted_on": []}
    r = replay(w, serving_model(spec), RunContext("x", "llama-2-7b", 1))
    assert r.per_request["ttft_s"][0] * 1e3 == pytest.approx(49.0)
    assert r.per_request["e2e_s"][0] * 1e3 == pytest.approx(49 + 2 * 9.06)
    assert (r.per_request["e2e_s"][0] + r.final_step_s[0]) * 1e3 == pytest.approx(49 + 3 * 9.06)


def test_the_report_section_says_when_blis_is_not_found():
    import polars as pl

    from stepml_core.replay.blis_round_trip import AGREEMENT_SCHEMA, blis_section

    row = {k: None for k in AGREEMENT_SCHEMA} | {
        "experiment_id": "20260101-000000-llama-2-7b-tp1-general",
        "llm_model": "llama-2-7b",
        "requests": 10,
        "stepml_ttft_ms": 30.0,
        "stepml_e2e_ms": 400.0,
        "blis_status": "BLIS not found: no executable BLIS binary at /nowhere",
    }
    blis4a = pl.DataFrame(  # as replay.scores.load_blis4a gives it
        {"experiment_id": [row["experiment_id"]], "ttft_mean_err_pct": [2.49], "e2e_mean_err_pct": [-4.01]}
    )
    lines = blis_section(
        pl.DataFrame([row], schema=AGREEMENT_SCHEMA), blis4a, blis_note=row["blis_status"], out_dir_name="blis"
    )
    text = "\n".join(lines)
    assert (
        "## The exported model in BLIS" in text and "**BLIS not found: no executable BLIS binary at /nowhere**" in text
    )
    assert "| 30.000 / 400.000 | – / – |" in text and "| +2.5 / -4.0 |" in text and "BLIS within ±1 %" not in text


def test_the_studys_round_trip_is_opt_in(monkeypatch, tmp_path):
    """`stepml run` writes and runs the BLIS bundle only when asked (`--blis [PATH]` sets STEPML_BLIS)."""
    from stepml_core.replay.blis_trace import study_blis
    from stepml_dagster.cli import build_parser

    monkeypatch.delenv(BLIS_ENV, raising=False)
    blis, why, asked = study_blis(tmp_path)
    assert blis is None and not asked and "stepml run --blis" in why
    monkeypatch.setenv(BLIS_ENV, "off")
    assert study_blis(tmp_path)[2] is False
    monkeypatch.setenv(BLIS_ENV, "auto")
    assert study_blis(tmp_path)[2] is True  # discovery: here nothing beside tmp_path, maybe `blis` on PATH
    monkeypatch.setenv(BLIS_ENV, str(tmp_path / "nowhere"))
    blis, why, asked = study_blis(tmp_path)
    assert asked and blis is None and "nowhere" in why
    assert build_parser().parse_args(["run", "--blis"]).blis == "auto"
    assert build_parser().parse_args(["run", "--blis", "/x/blis"]).blis == "/x/blis"
    assert build_parser().parse_args(["run"]).blis is None
