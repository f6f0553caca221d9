"""The BLIS round trip: the exported model files with each run's workload and ``blis run`` command, run through the
real BLIS binary beside StepML's own replay of the same files (docs/replay.md, *BLIS*).

    runs = [BundleRun(...), ...]                               # a run's workload (replay_workload), context, LLM
    manifest = write_bundle(chosen, runs, out_dir, ...)      # what `stepml export --format blis` writes
    table = agreement_table(chosen, runs, out_dir, blis)     # BLIS's results.json vs StepML's replay, per run
    lines = blis_section(table, why_not)                      # the report's section

``write_bundle`` writes DIR/<llm>.json (stepmodels.blis.write_exports), per run DIR/runs/<run>/trace.csv and
run_blis.sh (replay.blis_trace), and manifest.json with each run's command. ``agreement_table`` runs each script as
a user would (``BLIS=<binary> sh run_blis.sh``), so the table's BLIS figures are the results.json a user's run of the
same script writes, bit for bit.

Differences between the two simulators that the table shows (measured with one-request probes, not assumed):

* BLIS appends a finished request's last step once more to its E2E (blis-stepml-format.md §1): BLIS's E2E ≈ StepML's
  E2E + the request's last step (``e2e_plus_step``, from replay.simulate.ReplayResult.final_step_s);
* StepML models vLLM v1's async scheduling: a finished request stays in the next step's batch (its slot, KV blocks
  and one decode token freed a step later); BLIS frees them at once. At the ``max_num_seqs`` cap a waiting request
  is admitted a step sooner in BLIS (Llama-2-70B ``general``: BLIS's TTFT −4.7 %, −0.14 % with the cap lifted);
* in the step that prefills a request with prefix-cache hits, BLIS's features count its progress index as 0, StepML
  as the hit tokens (a ``kv_sum`` term makes that step shorter in BLIS);
* StepML registers a prompt's blocks in the prefix cache after the step that computes them; BLIS at admission, so
  two requests of the same prompt (or system prompt) admitted in the same step share it in BLIS, not in StepML;
* BLIS has no client timeout: a run whose StepML replay has requests the client gave up on (a saturated run) is not
  run in BLIS (its queue grows without bound there) and says so.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl

from stepml_core.replay.blis_trace import mean_ms, run_bundle, write_run_bundle

AGREEMENT_PCT = 1.0  # the goal: BLIS's mean TTFT and E2E within 1 % of StepML's replay of the same file
BLIS_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class BundleRun:
    """One run to export: its id, LLM model (the exported file's key), workload and context, request log table."""

    experiment_id: str
    llm_model: str
    workload: object  # replay.simulate.ReplayWorkload
    ctx: object  # replay.simulate.RunContext
    log_table: pl.DataFrame


def run_folder(out_dir: Path, experiment_id: str) -> Path:
    return Path(out_dir) / "runs" / experiment_id


def write_bundle(chosen: dict, runs: list[BundleRun], out_dir: Path, *, source: str, seed: int) -> dict:
    """The model files (stepmodels.blis.write_exports) and per run its trace, script and command in
    manifest.json["runs"] (a run whose LLM model has no exported file: in ``runs_not_exported`` with the reason)."""
    from stepml_core.stepmodels.blis import write_exports

    out_dir = Path(out_dir)
    write_exports(chosen, out_dir, source=source)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    manifest["runs"], manifest["runs_not_exported"] = {}, {}
    for r in sorted(runs, key=lambda r: r.experiment_id):
        if r.llm_model not in chosen:
            manifest["runs_not_exported"][r.experiment_id] = f"no exported model for {r.llm_model}"
            continue
        folder = run_folder(out_dir, r.experiment_id)
        br, _ = write_run_bundle(r.workload, r.ctx, folder, model=r.llm_model, model_file=f"../../{r.llm_model}.json")
        rel = folder.relative_to(out_dir)
        manifest["runs"][r.experiment_id] = {
            "llm_model": r.llm_model,
            "model_file": f"{r.llm_model}.json",
            "requests": int(r.workload.prompt_tokens.size),
            "trace": str(rel / br.trace),
            "script": str(rel / "run_blis.sh"),
            "results": str(rel / br.results),
            "command": br.command(),
            "run_in": str(rel),
            "seed": int(seed),
            "prompt_identity": r.workload.assumptions.get("prompt_identity", ""),
            "generated_tokens": r.workload.assumptions.get("generated_tokens", ""),
        }
    manifest["round_trip"] = (
        "each run: `sh runs/<run>/run_blis.sh` (BLIS=/path/to/blis, default `blis` on PATH) writes "
        "runs/<run>/results.json; the trace carries the prompt identity StepML's replay imputed (same seed)"
    )
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    return manifest


def stepml_figures(chosen: dict, r: BundleRun, *, seed: int) -> dict:
    """StepML's replay of the exported file on the run's workload: mean TTFT / E2E (ms) over the requests that
    succeeded (as replay.csv scores them), E2E plus each request's last step (what BLIS counts), client timeouts,
    observed means (ms, None without ground truth) and wall seconds."""
    from stepml_core.replay.simulate import replay, score_replay
    from stepml_core.replay.specs import serving_model

    c = chosen[r.llm_model]
    spec = {
        "name": "exported",
        "kind": "blis_linear",
        "doc": c["doc"],
        "llm_model": r.llm_model,
        "fitted_on": c["fitted_on"],
    }
    t0 = time.perf_counter()
    res = replay(r.workload, serving_model(spec), r.ctx, seed=seed)
    secs = time.perf_counter() - t0
    p = res.per_request
    ok = p["success"].to_numpy()
    e2e = p["e2e_s"].to_numpy()
    rows, _ = score_replay(p, r.log_table)
    obs = {row["metric"]: row["observed"] for row in rows}
    ttft = p["ttft_s"].fill_null(np.nan).to_numpy()
    plus_step = e2e + np.nan_to_num(res.final_step_s)
    mean_ok = lambda x: float(np.nanmean(x[ok])) * 1e3 if ok.any() else math.nan  # noqa: E731
    return {
        "stepml_ttft_ms": mean_ok(ttft),
        "stepml_e2e_ms": mean_ok(e2e),
        "stepml_e2e_plus_step_ms": mean_ok(plus_step),
        "stepml_failed": int((~ok).sum()),
        "observed_ttft_ms": obs["ttft_mean"] * 1e3 if obs.get("ttft_mean") is not None else None,
        "observed_e2e_ms": obs["e2e_mean"] * 1e3 if obs.get("e2e_mean") is not None else None,
        "stepml_s": secs,
    }


def _rel(a, b) -> float | None:
    ok = a is not None and b is not None and math.isfinite(a) and math.isfinite(b) and b != 0
    return (a - b) / b * 100 if ok else None


def agreement_row(chosen: dict, r: BundleRun, out_dir: Path, blis: Path | None, *, seed: int, why_not: str) -> dict:
    """One run: StepML's replay of the exported file, and BLIS's results.json from running the run's script (when
    ``blis`` is given and StepML's replay has no client timeouts), with the relative differences (%)."""
    row = {"experiment_id": r.experiment_id, "llm_model": r.llm_model, "requests": int(r.workload.prompt_tokens.size)}
    row |= stepml_figures(chosen, r, seed=seed)
    status, res, secs = why_not, {}, None
    if blis is not None and row["stepml_failed"]:
        status = (
            f"not run: {row['stepml_failed']} request(s) fail in StepML's replay (client timeouts of a saturated run, "
            "or refused: longer than max_model_len); BLIS has no client timeout (its queue would grow without bound)"
        )
    elif blis is not None:
        t0 = time.perf_counter()
        try:
            res = run_bundle(run_folder(out_dir, r.experiment_id) / "run_blis.sh", blis, timeout_s=BLIS_TIMEOUT_S)
            status = "compared"
        except (RuntimeError, OSError) as e:
            status = f"BLIS failed: {e}"
        except Exception as e:  # subprocess.TimeoutExpired
            status = f"BLIS failed: {type(e).__name__}"
        secs = time.perf_counter() - t0
    b_ttft, b_e2e = mean_ms(res, "ttft_mean_ms"), mean_ms(res, "e2e_mean_ms")
    row |= {
        "blis_status": status,
        "blis_ttft_ms": b_ttft if res else None,
        "blis_e2e_ms": b_e2e if res else None,
        "blis_completed": res.get("completed_requests") if res else None,
        "blis_s": secs,
        "blis_vs_stepml_ttft_pct": _rel(b_ttft, row["stepml_ttft_ms"]) if res else None,
        "blis_vs_stepml_e2e_pct": _rel(b_e2e, row["stepml_e2e_ms"]) if res else None,
        "blis_vs_stepml_e2e_plus_step_pct": _rel(b_e2e, row["stepml_e2e_plus_step_ms"]) if res else None,
        "stepml_ttft_err_pct": _rel(row["stepml_ttft_ms"], row["observed_ttft_ms"]),
        "stepml_e2e_err_pct": _rel(row["stepml_e2e_ms"], row["observed_e2e_ms"]),
        "blis_ttft_err_pct": _rel(b_ttft, row["observed_ttft_ms"]) if res else None,
        "blis_e2e_err_pct": _rel(b_e2e, row["observed_e2e_ms"]) if res else None,
    }
    return row


AGREEMENT_SCHEMA = {
    "experiment_id": pl.String,
    "llm_model": pl.String,
    "requests": pl.Int64,
    "stepml_ttft_ms": pl.Float64,
    "stepml_e2e_ms": pl.Float64,
    "stepml_e2e_plus_step_ms": pl.Float64,
    "stepml_failed": pl.Int64,
    "observed_ttft_ms": pl.Float64,
    "observed_e2e_ms": pl.Float64,
    "stepml_s": pl.Float64,
    "blis_status": pl.String,
    "blis_ttft_ms": pl.Float64,
    "blis_e2e_ms": pl.Float64,
    "blis_completed": pl.Int64,
    "blis_s": pl.Float64,
    "blis_vs_stepml_ttft_pct": pl.Float64,
    "blis_vs_stepml_e2e_pct": pl.Float64,
    "blis_vs_stepml_e2e_plus_step_pct": pl.Float64,
    "stepml_ttft_err_pct": pl.Float64,
    "stepml_e2e_err_pct": pl.Float64,
    "blis_ttft_err_pct": pl.Float64,
    "blis_e2e_err_pct": pl.Float64,
}


def agreement_table(
    chosen: dict, runs: list[BundleRun], out_dir: Path, blis: Path | None, *, seed: int, why_not: str = ""
) -> pl.DataFrame:
    """agreement_row per exported run (those in ``chosen``), sorted by run."""
    rows = [
        agreement_row(chosen, r, out_dir, blis, seed=seed, why_not=why_not)
        for r in sorted(runs, key=lambda r: r.experiment_id)
        if r.llm_model in chosen
    ]
    return pl.DataFrame(rows, schema=AGREEMENT_SCHEMA) if rows else pl.DataFrame(schema=AGREEMENT_SCHEMA)


def not_asked(why: str) -> dict:
    """blis_round_trip's value when the study was not asked to run it: nothing written, no run, the reason."""
    return {"table": pl.DataFrame(schema=AGREEMENT_SCHEMA), "manifest": None, "blis": "", "why_not": why}


def without_timeouts(r: BundleRun) -> BundleRun:
    """The run with no client timeout (what BLIS simulates): for a saturated run's engine-to-engine comparison."""
    w = replace(r.workload, timeout_s=np.full(r.workload.timeout_s.size, np.inf))
    return replace(r, workload=w)


# ---------------------------------------------------------------------------- the report's section


def _f(x, fmt: str) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return repr(x) if fmt == "repr" else format(x, fmt)


def blis_section(table: pl.DataFrame, blis4a: pl.DataFrame | None, *, blis_note: str, out_dir_name: str) -> list[str]:
    """'The exported model in BLIS': per run, observed vs StepML's replay of the exported file vs BLIS with it (its
    results.json, as a user's run of the written script gives it) vs BLIS iteration 4a's published error; the title
    and the note alone when no run was compared or run (blis_note says why)."""
    if not table.height and blis_note:
        return ["## The exported model in BLIS", "", f"**{blis_note}**", ""]
    lines = [
        "## The exported model in BLIS",
        "",
        f"`stepml export --format blis` writes, beside each LLM model's file, every run's workload as BLIS's trace "
        f"(the prompt identity StepML's replay imputed, same seed) and its `blis run` command (`{out_dir_name}/runs/"
        "<run>/run_blis.sh`). Here each script was run as a user runs it; the BLIS columns are its `results.json` "
        "(ms, as written). StepML = StepML's replay of the same file (in sample: the file is calibrated on every run "
        "with ground truth; the out-of-sample figures are in the replay section). Errors are (predicted − observed) / "
        "observed × 100; *BLIS vs StepML* = (BLIS − StepML) / StepML × 100, the goal is within ±1 %. "
        "*E2E +1 step*: BLIS adds a finished request's last step to its E2E once more, so it is compared with StepML's "
        "E2E plus that step. The other known differences: StepML keeps a finished request in the next step's batch "
        "(vLLM's async scheduling), so at the `max_num_seqs` cap a waiting request is admitted a step later than in "
        "BLIS (lower TTFT in BLIS on runs at the cap), and it caches a prompt's blocks after the step that computes "
        "them, BLIS at admission (two requests of one prompt admitted in the same step share it in BLIS only). "
        "BLIS 4a: the published error of BLIS iteration 4a on the run (../shared/reference).",
        "",
    ]
    if blis_note:
        lines += [f"**{blis_note}**", ""]
    if not table.height:
        return lines + ["No run was exported.", ""]
    b4 = {r["experiment_id"]: r for r in blis4a.iter_rows(named=True)} if blis4a is not None and blis4a.height else {}
    head = (
        "| run | observed TTFT / E2E (ms) | StepML TTFT / E2E (ms) | BLIS TTFT / E2E (ms) | BLIS vs StepML TTFT / E2E "
        "/ E2E +1 step (%) | StepML err TTFT / E2E (%) | BLIS err TTFT / E2E (%) | BLIS 4a err TTFT / E2E (%) | BLIS |"
    )
    lines += [head, "|" + "---|" * 9]
    for r in table.iter_rows(named=True):
        a = b4.get(r["experiment_id"], {})
        lines.append(
            f"| {r['experiment_id']} | {_f(r['observed_ttft_ms'], '.1f')} / {_f(r['observed_e2e_ms'], '.1f')} "
            f"| {_f(r['stepml_ttft_ms'], '.3f')} / {_f(r['stepml_e2e_ms'], '.3f')} "
            f"| {_f(r['blis_ttft_ms'], 'repr')} / {_f(r['blis_e2e_ms'], 'repr')} "
            f"| {_f(r['blis_vs_stepml_ttft_pct'], '+.2f')} / {_f(r['blis_vs_stepml_e2e_pct'], '+.2f')} / "
            f"{_f(r['blis_vs_stepml_e2e_plus_step_pct'], '+.2f')} "
            f"| {_f(r['stepml_ttft_err_pct'], '+.1f')} / {_f(r['stepml_e2e_err_pct'], '+.1f')} "
            f"| {_f(r['blis_ttft_err_pct'], '+.1f')} / {_f(r['blis_e2e_err_pct'], '+.1f')} "
            f"| {_f(a.get('ttft_mean_err_pct'), '+.1f')} / {_f(a.get('e2e_mean_err_pct'), '+.1f')} "
            f"| {r['blis_status']} |"
        )
    lines.append("")
    cmp_ = table.filter(pl.col("blis_status") == "compared")
    if cmp_.height:
        within = cmp_.filter(
            (pl.col("blis_vs_stepml_ttft_pct").abs() <= AGREEMENT_PCT)
            & (pl.col("blis_vs_stepml_e2e_plus_step_pct").abs() <= AGREEMENT_PCT)
        ).height
        worst_t = float(cmp_["blis_vs_stepml_ttft_pct"].abs().max())
        worst_e = float(cmp_["blis_vs_stepml_e2e_plus_step_pct"].abs().max())
        lines += [
            f"BLIS within ±{AGREEMENT_PCT:g} % of StepML's replay (TTFT and E2E +1 step): {within} of {cmp_.height} "
            f"run(s) run in BLIS; largest |difference| TTFT {worst_t:.2f} %, E2E +1 step {worst_e:.2f} %.",
            "",
        ]
    return lines
