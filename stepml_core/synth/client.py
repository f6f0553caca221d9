"""Client side of a synthetic run: inference-perf's per-request records and summaries.

Token arrival: the tokens of step s leave the engine when ``update_from_output(s)`` ran
(the simulation's update time of s), then pass the API server (detokenise, SSE) and the
network: a per-step egress lag. The server streams about two SSE messages per token (the
second microseconds after the first; docs/request-logs.md §3) plus the final
usage chunk and ``[DONE]``, so ``len(output_token_times) ≈ 2·tokens + 2``.

Client clock: inference-perf's ``time.perf_counter()`` on another host; here the server's
monotonic clock shifted by a constant (same rate).

Summary definitions follow inference-perf as used in Feb 2026 (docs/request-logs.md §3):
request_latency = end − start; TTFT = times[0] − start; TPOT = (times[-1] − times[0]) /
(len − 1) per SSE message; ITL = all consecutive gaps pooled; NTPOT = (end − start) /
output_tokens; throughput = sums over successes / (max end − min start over all requests).
"""

from __future__ import annotations

import json

import numpy as np

from stepml_core.synth.spec import RunSpec, engine_params

DIST_PCTS = (0.1, 1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9)


def dist(values) -> dict | None:
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return None
    q = np.percentile(a, DIST_PCTS)
    out = {"mean": float(a.mean()), "min": float(a.min())}
    for p, v in zip(DIST_PCTS, q):
        out["median" if p == 50 else f"p{p:g}"] = float(v)
    out["max"] = float(a.max())
    return _order(out)


def _order(d: dict) -> dict:
    keys = ("mean", "min", "p0.1", "p1", "p5", "p10", "p25", "median", "p75", "p90", "p95", "p99", "p99.9", "max")
    return {k: d[k] for k in keys}


def _token_times(R, U: np.ndarray, egress: np.ndarray, shift: float, rng: np.random.Generator, sse_us: tuple):
    """(SSE message times, end time) [s, client clock] of a request that produced all its tokens, else None.

    Token k of step s: t = update(s) + egress(s) + shift + N(0, 20 µs), made non-decreasing; its second SSE
    message t + U(sse_us) µs; then the usage chunk (+60–250 µs), ``[DONE]`` (+5–60 µs), end (+50–300 µs)."""
    steps = (
        np.concatenate([np.arange(F, F + c, dtype=np.int64) for F, c in R.segments])
        if R.segments
        else np.zeros(0, np.int64)
    )
    if len(steps) != R.max_tokens:
        return None
    slo, shi = sse_us
    t = U[steps - 1] + egress[steps - 1] + shift + rng.normal(0.0, 20e-6, len(steps))
    t = np.maximum.accumulate(t)
    t2 = t + rng.uniform(slo, shi, len(t)) * 1e-6
    times = np.empty(2 * len(t) + 2)
    times[0:-2:2] = t
    times[1:-2:2] = t2
    times[-2] = t2[-1] + rng.uniform(60, 250) * 1e-6
    times[-1] = times[-2] + rng.uniform(5, 60) * 1e-6
    end = times[-1] + rng.uniform(50, 300) * 1e-6
    return times, end


def _prompt_json(spec: RunSpec, R, hf_id: str) -> str:
    """The request body inference-perf sent for the request's prompt (a placeholder text naming group and prompt)."""
    return json.dumps(
        {
            "model": hf_id,
            "prompt": f"[synthetic shared-prefix prompt: group {R.group}, prompt {R.prompt_id % max(1, spec.prompts_per_group)}, "
            f"{R.prompt_len} tokens]",
            "max_tokens": R.max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": "true"},
        }
    )


def _record(wl, i: int, start: float, end: float, request: str, intended: float, info: dict, error) -> dict:
    """One per-request record (inference-perf's fields, then the private ``_ok, _idx, _stage, _intended``)."""
    return {
        "start_time": start,
        "end_time": end,
        "request": request,
        "response": "",
        "info": {**info, "extra_info": {}, "lora_adapter": None},
        "error": error,
        "_ok": error is None,
        "_idx": i,
        "_stage": int(wl.stage[i]),
        "_intended": intended,
    }


def client_records(spec: RunSpec, wl, sim, rng: np.random.Generator, *, mono0: float, client0: float, hf_id: str):
    """Per-request records (inference-perf order: completion order) + arrays for summaries.

    A request succeeds if the engine produced all its tokens and the client received them within its timeout
    (else a TimeoutError record ending at start + timeout; a late one is marked ``client_timeout``)."""
    api = engine_params()["api"]
    U = np.asarray(sim.update_s, dtype=np.float64)
    lo, hi = api["engine_to_client_ms"]
    egress = rng.uniform(lo, hi, len(U)) * 1e-3
    sse_us = api["second_event_us"]
    start = client0 + np.asarray(sim.start_abs, dtype=np.float64)
    intended = start - (wl.start_time - wl.send_time)
    shift = client0 - mono0
    prompts = {}
    recs = []
    for R in sim.requests:
        i = R.idx
        st = float(start[i])
        got = _token_times(R, U, egress, shift, rng, sse_us) if R.finish_status == "length" else None
        if got is not None and got[1] - st > wl.timeout_s[i]:
            got = None
            R.client_timeout = True
        p = R.prompt_id
        if p not in prompts:
            prompts[p] = _prompt_json(spec, R, hf_id)
        if got is not None:
            times, end = got
            info = {
                "input_tokens": int(R.prompt_len),
                "output_tokens": int(wl.client_out_tokens[i]),
                "output_token_times": times.tolist(),
            }
            recs.append(_record(wl, i, st, float(end), prompts[p], float(intended[i]), info, None))
        else:
            info = {"input_tokens": 0, "output_tokens": 0, "output_token_times": []}
            error = {"error_type": "TimeoutError", "error_msg": ""}
            recs.append(_record(wl, i, st, st + float(wl.timeout_s[i]), prompts[p], float(intended[i]), info, error))
    recs.sort(key=lambda r: (r["end_time"], r["_idx"]))
    return recs


def summarize(recs: list[dict], *, stage: dict | None = None) -> dict:
    """inference-perf's lifecycle summary of a set of per-request records."""
    ok = [r for r in recs if r["_ok"]]
    bad = [r for r in recs if not r["_ok"]]
    load = {"count": len(recs), "schedule_delay": dist([r["start_time"] - r["_intended"] for r in recs])}
    if stage is not None:
        starts = [r["start_time"] for r in recs]
        send = (max(starts) - min(starts)) if starts else 0.0
        load.update(
            {
                "send_duration": send,
                "requested_rate": stage["rate"],
                "achieved_rate": (len(recs) / send) if send > 0 else 0.0,
            }
        )
    lat, ttft, tpot, ntpot, itl, plen, olen = [], [], [], [], [], [], []
    for r in ok:
        t = r["info"]["output_token_times"]
        e2e = r["end_time"] - r["start_time"]
        lat.append(e2e)
        ttft.append(t[0] - r["start_time"])
        tpot.append((t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else 0.0)
        oc = r["info"]["output_tokens"]
        ntpot.append(e2e / oc if oc else 0.0)
        itl.append(np.diff(np.asarray(t)))
        plen.append(r["info"]["input_tokens"])
        olen.append(oc)
    if recs:
        dur = max(r["end_time"] for r in recs) - min(r["start_time"] for r in recs)
    else:
        dur = 0.0
    sin, sout = float(sum(plen)), float(sum(olen))
    thr = {
        "input_tokens_per_sec": sin / dur if dur > 0 else 0.0,
        "output_tokens_per_sec": sout / dur if dur > 0 else 0.0,
        "total_tokens_per_sec": (sin + sout) / dur if dur > 0 else 0.0,
        "requests_per_sec": len(ok) / dur if dur > 0 else 0.0,
    }
    succ = {
        "count": len(ok),
        "latency": {
            "request_latency": dist(lat),
            "normalized_time_per_output_token": dist(ntpot),
            "time_per_output_token": dist(tpot),
            "time_to_first_token": dist(ttft),
            "inter_token_latency": dist(np.concatenate(itl)) if itl else None,
        },
        "throughput": thr,
        "prompt_len": dist(plen),
        "output_len": dist(olen),
    }
    fail = {
        "count": len(bad),
        "request_latency": dist([r["end_time"] - r["start_time"] for r in bad]),
        "prompt_len": dist([r["info"]["input_tokens"] for r in bad]),
    }
    return {"load_summary": load, "successes": succ, "failures": fail}


def public_records(recs: list[dict]) -> list[dict]:
    """The records as inference-perf writes them (without the private _fields)."""
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in recs]
