#!/usr/bin/env python
"""What drives the CPU path (schedule() time) of the 16 real runs — evidence for issue 23, part 1.

    python benchmarks/cpu_path_evidence.py [--out DIR] [--windows 10]

Data (../shared/real; skips cleanly without it):
* the real ``step.duration_us`` (schedule() CPU time) of every test-split step of all 16 runs
  (``xgboost_round1_test_predictions.csv.gz``: step id and duration, the last 20 % of each run by step id);
* the engine state at those steps as StepML's simulator reconstructs it: each run's real request log replayed
  with the physics clock (in sample for the reconstruction: the physics loads the run's own fitted schedule()
  parameters; only the state is used here, never its schedule() times as a predictor). Step id s of a run whose
  test split ends at step S_real maps to simulated step round(s · S_sim / S_real);
* the two traced runs' BATCH_SUMMARY (running, waiting, KV usage next to ``step.duration_us``, all steps sampled).

Prints per run the test split's median schedule() time beside the simulated state (running, waiting, KV blocks in
use, finished and preempted per step), per-window medians, and leave-one-run-out fits of log schedule() time on
those variables: across all runs and within each LLM model. Writes the tables as CSV under --out.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STEPML_SHARED", str(REPO.parent / "shared")))
STATE = ("running", "waiting", "decode_reqs", "prefill_tokens", "finished", "preempted", "kv_used_frac")


class StateRecorder:
    """A clock that records the batch state at each schedule() and defers everything else to the wrapped clock."""

    def __init__(self, inner):
        self._inner = inner
        self.rows: list[tuple] = []

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def schedule_ns(self, b) -> int:
        self.rows.append(
            (
                b.num_running,
                b.num_waiting,
                b.num_decode_reqs,
                b.prefill_tokens,
                b.num_finished,
                b.num_preempted,
                1.0 - b.kv_blocks_free / b.kv_blocks_total,
            )
        )
        return self._inner.schedule_ns(b)


class _Recording:
    def __init__(self, model):
        self._m = model
        self.rec = None

    def __getattr__(self, name):
        return getattr(self._m, name)

    def clock(self, ctx, rng):
        self.rec = StateRecorder(self._m.clock(ctx, rng))
        return self.rec


def simulated_state(folder: Path) -> tuple[str, dict]:
    """Replay the run's request log with the physics clock; the per-step state arrays (index = step − 1)."""
    from stepml_core.pipeline import replay_context
    from stepml_core.replay.simulate import replay, replay_workload
    from stepml_core.replay.specs import physics_spec, serving_model
    from stepml_core.runs.folders import read_run_metadata
    from stepml_core.runs.request_log import read_request_log

    meta = read_run_metadata(folder)
    log = read_request_log(folder)
    ctx = replay_context(folder.name, meta, log.header)
    m = _Recording(serving_model(physics_spec()))
    replay(replay_workload(log.table, ctx), m, ctx)
    a = np.asarray(m.rec.rows, dtype=np.float64)
    return folder.name, {k: a[:, i] for i, k in enumerate(STATE)}


def test_steps() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import polars as pl

    with gzip.open(SHARED / "real" / "xgboost_round1_test_predictions.csv.gz", "rb") as f:
        t = pl.read_csv(f.read())
    out = {}
    for (eid,), g in t.group_by("experiment_id"):
        g = g.sort("step.id")
        out[eid] = (g["step.id"].to_numpy(), g["step.duration_us"].to_numpy().astype(np.float64))
    return out


def window_table(eid: str, ids: np.ndarray, sched: np.ndarray, state: dict, windows: int) -> list[dict]:
    """Per window of test steps (equal counts, in step order): median real schedule() time, mean simulated state
    over the mapped simulated steps."""
    s_real = float(ids.max())
    n_sim = len(state["running"])
    sim_idx = np.clip(np.rint(ids / s_real * n_sim).astype(np.int64) - 1, 0, n_sim - 1)
    rows = []
    for w, part in enumerate(np.array_split(np.arange(len(ids)), windows)):
        if not len(part):
            continue
        lo, hi = sim_idx[part].min(), sim_idx[part].max() + 1
        rows.append(
            {"experiment_id": eid, "window": w, "n_steps": len(part), "sched_median_us": float(np.median(sched[part]))}
            | {k: float(state[k][lo:hi].mean()) for k in STATE}
        )
    return rows


def loo_fit(rows: list[dict], features: list[str], group_key: str) -> tuple[float, list[tuple[str, float, float]]]:
    """Leave one group out: ridge-free least squares of log(sched_median_us) on the features (log1p of counts);
    returns the mean |error| % and per group (group, observed median, predicted median)."""
    groups = sorted({r[group_key] for r in rows})
    X = np.array([[1.0] + [np.log1p(r[f]) if f != "kv_used_frac" else r[f] for f in features] for r in rows])
    y = np.log(np.array([r["sched_median_us"] for r in rows]))
    g = np.array([r[group_key] for r in rows])
    out, errs = [], []
    for k in groups:
        tr, te = g != k, g == k
        beta, *_ = np.linalg.lstsq(X[tr], y[tr], rcond=None)
        pred = np.exp(X[te] @ beta)
        obs = np.exp(y[te])
        errs.extend(list(100 * np.abs(pred - obs) / obs))
        out.append((k, float(np.median(obs)), float(np.median(pred))))
    return float(np.mean(errs)), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--windows", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args(argv)
    if not (SHARED / "real" / "requests").is_dir():
        print(f"skipped: no real data under {SHARED / 'real'}")
        return 0
    import tempfile
    from concurrent.futures import ProcessPoolExecutor

    from stepml_core.runs.real_data import assemble_real_runs

    steps = test_steps()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        assemble_real_runs(SHARED, root)
        folders = sorted(p for p in root.iterdir() if p.is_dir())
        import multiprocessing as mp

        with ProcessPoolExecutor(a.workers, mp_context=mp.get_context("spawn")) as ex:
            states = dict(ex.map(simulated_state, folders))
    run_rows, win_rows = [], []
    for eid, (ids, sched) in sorted(steps.items()):
        st = states[eid]
        wr = window_table(eid, ids, sched, st, a.windows)
        win_rows.extend(wr)
        llm = eid.split("-")[2]
        whole = window_table(eid, ids, sched, st, 1)[0]
        run_rows.append(whole | {"llm": llm, "sim_steps": len(st["running"]), "real_last_step": int(ids.max())})
    _print_runs(run_rows)
    _print_within(steps, states)
    for feats in (
        ["running"],
        ["waiting"],
        ["running", "waiting"],
        ["running", "waiting", "kv_used_frac"],
        ["running", "waiting", "finished", "preempted"],
    ):
        m_run, _ = loo_fit(run_rows, feats, "experiment_id")
        m_win, _ = loo_fit(win_rows, feats, "experiment_id")
        print(
            f"leave one run out, across models, log sched ~ {' + '.join(feats)}: "
            f"per-run median |err| {m_run:.0f} %, per-window {m_win:.0f} %"
        )
    if a.out:
        import polars as pl

        a.out.mkdir(parents=True, exist_ok=True)
        pl.DataFrame(run_rows).write_csv(a.out / "cpu_path_runs.csv")
        pl.DataFrame(win_rows).write_csv(a.out / "cpu_path_windows.csv")
    return 0


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def _print_within(steps: dict, states: dict) -> None:
    """Within each run: rank correlation of the real schedule() time with the simulated state at the mapped step,
    and the median schedule() time with the running set at the cap (max over the run) vs below it."""
    print("\n| run | ρ(sched, waiting) | ρ(sched, running) | median sched at the running cap µs | below it µs |")
    print("|---|---|---|---|---|")
    for eid, (ids, sched) in sorted(steps.items()):
        st = states[eid]
        n_sim = len(st["running"])
        k = np.clip(np.rint(ids / float(ids.max()) * n_sim).astype(np.int64) - 1, 0, n_sim - 1)
        run, wait = st["running"][k], st["waiting"][k]
        cap = run >= 0.97 * st["running"].max()
        at = f"{np.median(sched[cap]):.0f}" if cap.any() else "—"
        below = f"{np.median(sched[~cap]):.0f}" if (~cap).any() else "—"
        print(f"| {eid[16:]} | {_spearman(sched, wait):.2f} | {_spearman(sched, run):.2f} | {at} | {below} |")


def _print_runs(rows: list[dict]) -> None:
    print("| run | sched median µs | running | waiting | KV used | finished/step | preempted/step | sim steps / real |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['experiment_id'][16:]} | {r['sched_median_us']:.0f} | {r['running']:.0f} | {r['waiting']:.0f} | "
            f"{r['kv_used_frac']:.2f} | {r['finished']:.2f} | {r['preempted']:.3f} | "
            f"{r['sim_steps'] / (r['real_last_step']):.2f} |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
