"""Why request-log calibration misses where it does (real data; README, *Calibration from request logs*).

    python benchmarks/calibration_diagnosis.py [--shared ../shared] [--study OUT]

1. **Held-out decode cycle, leave one workload out** (closed form, no simulator): per run, the fold that
   calibrates on the LLM model's other workloads predicts each successful request's average decode cycle
   (E2E − TTFT)/(G − 1) at its window's observed batch composition; printed: mean predicted / mean observed − 1,
   and the range of window-mean decoders the calibration runs covered against the held-out run's.
   1b. per LLM model, the slope of the observed decode cycle on the decoders below 60 and from 80 decoders
   (non-saturated runs pooled): where the linear form bends.
2. **The max_num_seqs cap** (needs ``--study OUT``, a `stepml run` output on the real runs): share of the second
   stage (t > 600 s) with ≥ 125 requests decoding, observed (from the request timelines) and as replayed by
   each calibrated model, beside its decode-cycle and TTFT errors — near the cap, TTFT is a threshold function
   of the cycle.
0. **Errored requests in stage 1** (issue 20, point 7): per run with client timeouts, how well first come, first
   served admission at ``max_num_seqs`` (``calibrate.fcfs_admissions``, departures from the ground truth) predicts
   the first token of the successes that queued; the time-averaged decoders while a queue exists and the mean
   decoders of the stage-1 windows, rebuilt from the successes alone (the timelines before the fix: the errored
   requests dropped) and with the errored requests' modelled windows; per LLM model the closed-form parameters
   (all runs) both ways. ``--errored-replay``: the leave-one-workload-out calibrations (simulator in the loop)
   both ways, replayed on their held-out runs, for the LLM models whose closed form moves. ``--timeout-rule``
   (issue 20, point 9b): each saturated run replayed by its leave-one-workload-out model with a flat 300 s limit
   (the rule before) and with the client's (300 s rounded up to its next whole second, ``rules.client_limits_s``).
3. **CPU-bound saturated runs** (needs ``--study OUT`` and the real steps' schedule() times in
   ``../shared/real/xgboost_round1_test_predictions.csv.gz``): per run, the real schedule() median
   against the mean cycle (run time / steps), and — diagnosis only, **in sample** — the run-roles model replayed
   with a CPU floor at that schedule() median (cycle = max(GPU path, floor)).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

CAP_NEAR = 125  # "at the cap": ≥ this many requests decoding (max_num_seqs 128)


def _occupancy(f: np.ndarray, e: np.ndarray, grid: np.ndarray) -> np.ndarray:
    ok = np.isfinite(f) & np.isfinite(e)
    return np.searchsorted(np.sort(f[ok]), grid, side="right") - np.searchsorted(np.sort(e[ok]), grid, side="right")


def errored_requests(infos, load) -> dict:
    """Section 0; returns {run: (with, without errored requests)} CalibrationRuns of the LLM models whose closed
    form moves (for --errored-replay)."""
    from dataclasses import replace

    import polars as pl

    from stepml_core.calibration import fit as F
    from stepml_core.calibration import timelines as C

    print("0. errored requests: FCFS admission at max_num_seqs, decoders rebuilt without / with them")
    runs = {i.experiment_id: load(i.experiment_id) for i in infos if i.has_ground_truth}
    drop = {e: replace(r, table=r.table.filter(~pl.col("observed_has_error"))) for e, r in runs.items()}
    for e, r in sorted(runs.items()):
        t = r.table.sort("index")
        err = t["observed_has_error"].to_numpy()
        if not err.any():
            continue
        a = t["arrival_time_us"].to_numpy() * 1e-6
        ttft, e2e = (t[c].fill_null(np.nan).to_numpy() for c in ("observed_ttft_s", "observed_e2e_s"))
        adm = C.fcfs_admissions(a, a + e2e, int(r.ctx.max_num_seqs))
        queued = ~err & (adm > a)
        gap = (a + ttft - adm)[queued]
        grid = np.arange(0.0, float(a.max()), 0.05)
        insys = _occupancy(a, a + e2e, grid) > int(r.ctx.max_num_seqs)  # a queue exists
        rows = []
        for tl in (C.request_timelines(drop[e]), C.request_timelines(r)):
            m = np.isfinite(tl.cycle_us) & (tl.kv_over <= 0.05) & np.isfinite(tl.dec_mean)
            rows.append(float(np.mean(tl.dec_mean[m])) if m.any() else float("nan"))
        ef, ee, _ = C._errored_windows(a, ttft, e2e, ~err, err, C._generated_tokens(t, r.ctx), r.ctx.max_num_seqs)
        only = _occupancy((a + ttft)[~err], (a + e2e)[~err], grid)
        both = only + _occupancy(ef, ee, grid)
        print(
            f"   {e:48s} errored {int(err.sum()):4d} (decoding {int(np.isfinite(ef).sum()):4d}); queued successes: first "
            f"token − admission median {np.median(gap):.3f} s, p95 {np.percentile(gap, 95):.3f} s; while a queue exists "
            f"({insys.sum() * 0.05:.0f} s) decoders {only[insys].mean():5.1f} → {both[insys].mean():5.1f} of "
            f"{r.ctx.max_num_seqs}; stage-1 windows {rows[0]:5.1f} → {rows[1]:5.1f}"
        )
    moved = {}
    for llm in sorted({r.llm_model for r in runs.values()}):
        mine = sorted(e for e in runs if runs[e].llm_model == llm)
        prior = F.arch_prior(llm, runs[mine[0]].ctx.tp)
        p0, p1 = (F.fit_closed_form([C.request_timelines(x[e]) for e in mine], prior).params for x in (drop, runs))
        names = ("b0_us", "b_dec_us", "b_kv_us", "b_npf_us", "q0_us")
        print(
            f"   {llm:16s} closed form, all runs: "
            + ", ".join(f"{n} {getattr(p0, n):.4g} → {getattr(p1, n):.4g}" for n in names)
        )
        if p0 != p1:
            moved.update({e: (runs[e], drop[e]) for e in mine})
    return moved


def errored_replay(moved: dict) -> None:
    """Leave one workload out (calibrate, simulator in the loop, no bootstrap) with / without the errored requests,
    replayed on each held-out run with ground truth: TTFT, E2E, p99 E2E errors (%)."""
    from stepml_core.calibration import fit as C
    from stepml_core.calibration.params import serving_model
    from stepml_core.replay.simulate import replay, replay_workload, score_replay

    print(
        "\n0b. leave one workload out with the errored requests' windows (before: dropped): errors on the held-out run"
    )
    for e, (r, _) in sorted(moved.items()):
        sel = [v for x, v in moved.items() if v[0].llm_model == r.llm_model and v[0].workload != r.workload]
        if all(v[0].table.height == v[1].table.height for v in sel):
            continue  # no calibration run with errored requests: the same fold both ways
        errs = []
        for k in (1, 0):
            params = C.calibrate([v[k] for v in sel], n_boot=0).params
            pr = replay(replay_workload(r.table, r.ctx), serving_model(params), r.ctx).per_request
            errs.append({x["metric"]: x["rel_err_pct"] for x in score_replay(pr, r.table)[0]})
        print(
            f"   {e:48s} "
            + ", ".join(f"{m} {errs[0][m]:+.2f} → {errs[1][m]:+.2f} %" for m in ("ttft_mean", "e2e_mean", "e2e_p99"))
        )


def timeout_rule(infos, load) -> None:
    """Section 0c: the saturated runs' errors with a flat 300 s client limit and with the client's rule."""
    from stepml_core.calibration import fit as C
    from stepml_core.calibration.params import serving_model
    from stepml_core.replay.simulate import CLIENT_TIMEOUT_S, replay, replay_workload, score_replay

    print("\n0c. saturated runs, leave one workload out: client limit flat 300 s → the client's rule (errors %)")
    runs = {i.experiment_id: load(i.experiment_id) for i in infos if i.has_ground_truth}
    for e, r in sorted(runs.items()):
        if not r.saturated:
            continue
        sel = [v for v in runs.values() if v.llm_model == r.llm_model and v.workload != r.workload]
        model = serving_model(C.calibrate(sel, n_boot=0).params)
        errs = []
        for flat in (True, False):
            w = replay_workload(r.table, r.ctx)
            if flat:
                w.timeout_s = CLIENT_TIMEOUT_S
            pr = replay(w, model, r.ctx).per_request
            errs.append({x["metric"]: x["rel_err_pct"] for x in score_replay(pr, r.table)[0]})
        ms = ("ttft_mean", "e2e_mean", "e2e_p99", "successes")
        print(f"   {e:48s} " + ", ".join(f"{m} {errs[0][m]:+.2f} → {errs[1][m]:+.2f}" for m in ms))


def held_out_cycles(infos, load) -> None:
    from stepml_core.calibration import fit as C

    runs = {i.experiment_id: load(i.experiment_id) for i in infos if i.has_ground_truth}
    tls = {e: C.request_timelines(r) for e, r in runs.items()}
    print("1. leave one workload out, closed form: held-out mean decode cycle error (request logs)")
    print(f"   {'run':48s} {'sat':>3s} {'cycle err %':>11s}  calibration decoders p5–p95 / held-out p5–p95")
    for e in sorted(runs):
        r = runs[e]
        sel = [x for x in runs if runs[x].llm_model == r.llm_model and runs[x].workload != r.workload]
        if not sel:
            continue
        p = C.fit_closed_form([tls[x] for x in sel], C.arch_prior(r.llm_model, r.ctx.tp)).params
        tl = tls[e]
        m = np.isfinite(tl.cycle_us) & (tl.kv_over <= 0.05) & np.isfinite(tl.dec_mean)
        if not m.any():
            print(f"   {e:48s} {'y' if tl.saturated else 'n':>3s} {'–':>11s}  (no usable decode window)")
            continue
        pred = p.step_us(tl.dec_mean[m], tl.kv_mean[m]) + p.b_npf_us * tl.prefills_per_step[m]
        calm = [tls[x] for x in sel if not tls[x].saturated]  # the runs that determine the fit
        cal_dec = (
            np.concatenate([t.dec_mean[np.isfinite(t.cycle_us) & np.isfinite(t.dec_mean)] for t in calm])
            if calm
            else np.array([np.nan])
        )
        print(
            f"   {e:48s} {'y' if tl.saturated else 'n':>3s} {100 * (pred.mean() / tl.cycle_us[m].mean() - 1):+11.1f}  "
            f"{np.nanpercentile(cal_dec, 5):5.0f}–{np.nanpercentile(cal_dec, 95):<5.0f} / "
            f"{np.percentile(tl.dec_mean[m], 5):5.0f}–{np.percentile(tl.dec_mean[m], 95):<5.0f}"
        )


def cycle_slopes(infos, load) -> None:
    """Per LLM model, pooled over its non-saturated runs: slope of the observed per-request decode cycle on the
    window's mean decoders, below 60 and from 80 decoders (least squares; µs per decoder)."""
    from stepml_core.calibration import fit as C

    print("\n1b. observed decode cycle vs decoders (non-saturated runs pooled): slope µs per decoder")
    for llm in sorted({i.llm_model for i in infos}):
        tls = [
            C.request_timelines(load(i.experiment_id))
            for i in infos
            if i.llm_model == llm and i.has_ground_truth and i.workload != "reasoning"
        ]
        tls = [t for t in tls if not t.saturated]
        d = np.concatenate([t.dec_mean for t in tls])
        c = np.concatenate([t.cycle_us for t in tls])
        ok = np.isfinite(d) & np.isfinite(c)
        d, c = d[ok], c[ok]
        out = []
        for lo, hi in ((0, 60), (80, 129)):
            m = (d >= lo) & (d < hi)
            out.append(f"{lo}–{hi}: {np.polyfit(d[m], c[m], 1)[0]:5.1f}" if m.sum() > 50 else f"{lo}–{hi}: –")
        print(f"   {llm:16s} " + ", ".join(out))


def cap_share(study: Path) -> None:
    import polars as pl

    rows = pl.read_csv(study / "replay.csv", infer_schema_length=0).with_columns(
        pl.col("metric").replace("decode_interval_mean", "decode_time_per_token_mean")  # its name before issue 20
    )
    print(f"\n2. time at the max_num_seqs cap (≥ {CAP_NEAR} decoding), second stage (t > 600 s) of the general runs")
    for d in sorted((study / "replay").iterdir()):
        if not d.name.endswith("-general"):
            continue
        for f in sorted(d.glob("requests_*.parquet")) + sorted(d.glob("physics.parquet")):
            t = pl.read_parquet(f)
            if "observed_e2e_s" not in t.columns:
                continue
            a = t["arrival_time_us"].to_numpy() * 1e-6
            grid = np.arange(600.0, a.max(), 0.5)

            def share(ttft, e2e):
                ok = np.isfinite(ttft) & np.isfinite(e2e)
                st, en = np.sort((a + ttft)[ok]), np.sort((a + e2e)[ok])
                n = np.searchsorted(st, grid) - np.searchsorted(en, grid)
                return float((n >= CAP_NEAR).mean())

            obs_ttft = t["observed_ttft_s"].fill_null(np.nan).to_numpy()
            obs = share(obs_ttft, t["observed_e2e_s"].fill_null(np.nan).to_numpy())
            if f.stem == "physics":
                print(
                    f"   {d.name:48s} observed mean TTFT {1e3 * np.nanmean(obs_ttft[a <= 600]):5.1f} ms before 600 s, "
                    f"{1e3 * np.nanmean(obs_ttft[a > 600]):5.1f} ms after"
                )
            pred = share(t["ttft_s"].fill_null(np.nan).to_numpy(), t["e2e_s"].to_numpy())
            err = {
                m: rows.filter(
                    (pl.col("experiment_id") == d.name) & (pl.col("step_model") == f.stem) & (pl.col("metric") == m)
                )["rel_err_pct"].to_list()
                for m in ("decode_time_per_token_mean", "ttft_mean")
            }
            fmt = lambda v: f"{float(v[0]):+6.1f}" if v and v[0] else "     –"  # noqa: E731
            print(
                f"   {d.name:48s} {f.stem:15s} at cap: observed {100 * obs:4.1f} %, replayed {100 * pred:4.1f} %; "
                f"cycle err {fmt(err['decode_time_per_token_mean'])} %, TTFT err {fmt(err['ttft_mean'])} %"
            )


def cpu_floor(study: Path, shared: Path, infos, load) -> None:
    import polars as pl

    from stepml_core.calibration.params import StepParams, serving_model
    from stepml_core.replay.simulate import StepServingModel, replay, replay_workload, score_replay

    xg_file = shared / "real" / "xgboost_round1_test_predictions.csv.gz"
    cal_file = study / "assets" / "request_calibration" / "__all__.json"
    if not xg_file.is_file() or not cal_file.is_file():
        print(f"\n3. skipped: needs {xg_file} and {cal_file}")
        return
    xg = pl.read_csv(xg_file)
    cals = json.loads(cal_file.read_text())["calibrations"]

    class Floor:
        def __init__(self, inner, floor_us):
            self.inner, self.floor_us, self.name = inner, floor_us, inner.name + "+cpu_floor"

        def step_time_us(self, b):
            return max(self.inner.step_time_us(b), self.floor_us)

    print(
        "\n3. real schedule() (step.duration_us) median vs mean cycle (run time / steps); reasoning runs: the run-roles"
        " model with a CPU floor at that median (in sample)"
    )
    for i in sorted(infos, key=lambda r: r.experiment_id):
        s = xg.filter(pl.col("experiment_id") == i.experiment_id)
        if i.workload != "reasoning" and i.has_ground_truth and not s.is_empty():
            t = load(i.experiment_id).table
            end_s = float((t["arrival_time_us"] * 1e-6 + t["observed_e2e_s"].fill_null(0.0)).max())
            print(
                f"   {i.experiment_id:48s} schedule() median {float(s['step.duration_us'].median()) / 1e3:5.2f} ms, "
                f"mean cycle {end_s / float(s['step.id'].max()) * 1e3:5.1f} ms"
            )
        if i.workload != "reasoning" or not i.has_ground_truth:
            continue
        train = sorted(
            r.experiment_id for r in infos if r.llm_model == i.llm_model and r.role == "train" and r.has_ground_truth
        )
        c = next((c for c in cals if sorted(c["fitted_on"]) == train), None)
        if c is None or s.is_empty():
            continue
        run = load(i.experiment_id)
        end_s = float((run.table["arrival_time_us"] * 1e-6 + run.table["observed_e2e_s"].fill_null(0.0)).max())
        sched_us = float(s["step.duration_us"].median())
        cycle_us = end_s / float(s["step.id"].max()) * 1e6
        w = replay_workload(run.table, run.ctx)
        base = serving_model(StepParams(**c["params"]), "requests_roles")
        out = []
        for label, m in (
            ("roles", base),
            ("roles+floor", StepServingModel("floor", Floor(base.step_model, sched_us), queueing_us=base.queueing_us)),
        ):
            sc = {x["metric"]: x["rel_err_pct"] for x in score_replay(replay(w, m, run.ctx).per_request, run.table)[0]}
            out.append(
                f"{label}: TTFT {sc['ttft_mean']:+.1f} % E2E {sc['e2e_mean']:+.1f} % successes {sc['successes']:+.1f} %"
            )
        print(
            f"   {i.experiment_id:48s} schedule() median {sched_us / 1e3:5.1f} ms, mean cycle {cycle_us / 1e3:5.1f} ms | "
            + " | ".join(out)
        )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    ap.add_argument("--study", type=Path, default=None, help="a `stepml run` output folder on the real runs")
    ap.add_argument("--errored-replay", action="store_true", help="section 0b: leave one workload out, replayed")
    ap.add_argument("--timeout-rule", action="store_true", help="section 0c: saturated runs, flat vs client limit")
    a = ap.parse_args()
    from bench_calibration import real_runs

    with real_runs(a.shared) as runs:
        if runs is None:
            return 0
        infos, load = runs
        moved = errored_requests(infos, load)
        if a.errored_replay:
            errored_replay(moved)
        if a.timeout_rule:
            timeout_rule(infos, load)
        held_out_cycles(infos, load)
        cycle_slopes(infos, load)
        if a.study:
            cap_share(a.study)
            cpu_floor(a.study, a.shared, infos, load)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
