"""Why the `general` runs' TTFT goals are out of reach from other workloads (issues 24, 25): the form's ceiling and
the cycle tolerance at the `max_num_seqs` cap. Evidence only, in sample by design; nothing here reaches a study.

    python benchmarks/ttft_tolerance.py --study OUT --data REAL [--scales 0.94,0.96,...] [--limit-pct 15]

OUT: a `stepml run --data REAL` output folder (its stored request logs and request calibrations).

1. **Ceiling.** Every run with ground truth replayed with the model `stepml export` ships for its LLM model
   (`requests_all`: calibrated on all that model's runs with ground truth, the scored run among them): what the
   linear form reaches when nothing is out of sample. Beside it, the run's leave-one-workload-out figures from
   replay.csv (`requests_lowo`). Means over the non-saturated runs against the issue's goals.
2. **Tolerance.** Each `general` run replayed with that model × a scale s on every step coefficient
   (`StepParams.scaled`, α0 kept): TTFT and E2E error per s, and the band of s where |TTFT| < limit (linear
   interpolation between grid points). Beside it, where the run's own step level sits among its LLM model's other
   non-saturated runs: the all-runs calibration's between-run term (each run's log step-time error under the pooled
   model, `calibration.between_runs`), and the leave-one-workload-out replay's E2E error (≈ its cycle error there);
   per load stage (arrivals before / from 600 s), the TTFT distribution (p5 / p50 / p75) of the in-sample replay against the observed one.
3. **Profile alone.** Issue 24's check (stepml_core.whatif.check: the run's profile and serving limits, no request
   of its own) with the same shipped model: what the what-if reaches when the model is not the limit.
4. **TTFT residual by load.** Per non-saturated run, the in-sample replay's TTFT residual (observed − replayed, median
   ms) by the observed decoders at the request's arrival (docs/calibration.md, the load delay's evidence).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

METRICS = ("ttft_mean", "e2e_mean", "e2e_p99")


def tolerance_band(scales, errors_pct, limit_pct: float) -> tuple[float, float] | None:
    """The interval of scales around the grid point of least |error| where |error| < limit_pct, its ends found by
    linear interpolation between grid points (an end at the grid's edge is that edge); None if no point is inside.

    >>> tolerance_band([0.98, 1.0, 1.02], [-30.0, 0.0, 30.0], 15.0)
    (0.99, 1.01)
    """
    s, e = np.asarray(scales, dtype=float), np.asarray(errors_pct, dtype=float)
    inside = np.abs(e) < limit_pct
    if not inside.any():
        return None
    i = int(np.argmin(np.abs(e)))
    lo, hi = i, i
    while lo > 0 and inside[lo - 1]:
        lo -= 1
    while hi < len(s) - 1 and inside[hi + 1]:
        hi += 1

    def crossing(a: int, b: int) -> float:  # a inside, b outside: where |e| reaches the limit between them
        target = math.copysign(limit_pct, e[b])
        return float(s[a] + (target - e[a]) * (s[b] - s[a]) / (e[b] - e[a]))

    left = crossing(lo, lo - 1) if lo > 0 else float(s[lo])
    right = crossing(hi, hi + 1) if hi < len(s) - 1 else float(s[hi])
    return round(left, 6), round(right, 6)


def _runs(study: Path, data: Path):
    from stepml_core import pipeline
    from stepml_dagster.export_cli import _stored

    folder = study / "assets" / "request_log"
    for p in sorted(folder.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        log = _stored(p, p.name, True)
        if log["requests"]["observed_ttft_s"].is_null().all():
            continue  # ground truth withheld: nothing to score
        meta = pipeline.stored_run_metadata(p.name, log, data)
        yield p.name, log, pipeline.replay_context(p.name, meta, log["header"])


DECODER_BINS = (0, 20, 40, 60, 80, 100, 120, 200)


def _residual_by_decoders(t) -> dict[str, tuple[float, int]]:
    """Median TTFT residual (observed − replayed, ms) per bin of the observed decoders at arrival (requests between
    their observed first token and their end), bins with ≥ 50 requests."""
    a = t["arrival_time_us"].to_numpy() * 1e-6
    first, end = np.sort(a + t["observed_ttft_s"].to_numpy()), np.sort(a + t["observed_e2e_s"].to_numpy())
    n = np.searchsorted(first, a, side="right") - np.searchsorted(end, a, side="right")
    res = (t["observed_ttft_s"] - t["ttft_s"]).to_numpy() * 1e3
    k = np.digitize(n, DECODER_BINS)
    out = {}
    for b in range(1, len(DECODER_BINS)):
        m = k == b
        if m.sum() >= 50:
            out[f"{DECODER_BINS[b - 1]}–{DECODER_BINS[b]}"] = (float(np.median(res[m])), int(m.sum()))
    return out


def _errors(params, w, ctx, log, stages: list | None = None, bins: dict | None = None) -> dict:
    """Relative errors (%) of METRICS; with ``stages`` (a list) also appends per load stage the
    successes' TTFT median and 5th/75th percentiles (ms), predicted and observed: arrivals before 600 s, and from 600 s;
    with ``bins`` (a dict) fills it with :func:`_residual_by_decoders`."""
    from stepml_core.calibration.params import serving_model
    from stepml_core.replay.simulate import replay, score_replay

    pred = replay(w, serving_model(params), ctx, seed=0).per_request
    rows, _ = score_replay(pred, log["requests"])
    if stages is not None or bins is not None:
        obs = log["requests"].select("index", "observed_ttft_s", "observed_e2e_s", "observed_has_error")
        t = pred.join(obs, on="index")
        t = t.filter(t["success"] & ~t["observed_has_error"]).drop_nulls(["ttft_s", "observed_ttft_s"])
    if bins is not None:
        bins.update(_residual_by_decoders(t))
    if stages is not None:
        k = np.minimum(t["arrival_time_us"].to_numpy() // 600_000_000, 1).astype(int)  # `general`: 8, then 20 req/s
        for stage in np.unique(k):
            sel = k == stage
            q = lambda c: np.percentile(t[c].to_numpy()[sel] * 1e3, [5, 50, 75])  # noqa: E731
            stages.append((int(stage) + 1, int(sel.sum()), q("ttft_s"), q("observed_ttft_s")))
    return {r["metric"]: r["rel_err_pct"] for r in rows if r["metric"] in METRICS}


def _lowo(study: Path) -> dict:
    import polars as pl

    t = pl.read_csv(study / "replay.csv").filter(pl.col("step_model") == "requests_lowo")
    return {(r["experiment_id"], r["metric"]): r["rel_err_pct"] for r in t.iter_rows(named=True)}


def main(argv=None) -> int:
    from stepml_core.calibration.params import StepParams
    from stepml_core.calibration.timelines import is_saturated
    from stepml_core.replay.simulate import replay_workload
    from stepml_core.runs.folders import parse_run_id

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--scales", default="0.94,0.96,0.98,0.99,1.0,1.01,1.02,1.03,1.04,1.06")
    ap.add_argument("--limit-pct", type=float, default=15.0)
    a = ap.parse_args(argv)
    scales = [float(x) for x in a.scales.split(",")]
    cal = json.loads((a.study / "assets" / "request_calibration" / "__all__.json").read_text())
    shipped = cal["shipped"]
    lowo = _lowo(a.study)
    ceiling, tolerance = [], []
    for e, log, ctx in _runs(a.study, a.data):
        llm = parse_run_id(e).model
        spec = shipped[llm]
        params = StepParams(**spec["params"])
        w = replay_workload(log["requests"], ctx, seed=0)
        stages, bins = [], {}
        err = _errors(params, w, ctx, log, stages, bins)
        sat = is_saturated(log["requests"])
        ceiling.append((e, sat, err, {m: lowo.get((e, m)) for m in METRICS}, bins))
        print(f"{e}: in sample {', '.join(f'{m} {err[m]:+.1f} %' for m in METRICS)}", flush=True)
        if parse_run_id(e).workload != "general":
            continue
        curve = [(s, _errors(params.scaled(s), w, ctx, log)) for s in scales]
        br = spec["calibration"]["between_runs"] or {}
        own = dict(zip(br.get("runs", []), br.get("step_log_err", [])))
        band = tolerance_band(scales, [c["ttft_mean"] for _, c in curve], a.limit_pct)
        tolerance.append((e, curve, band, own, stages))
    _print_ceiling(ceiling)
    _print_tolerance(tolerance, lowo, a.limit_pct)
    _print_profile_alone(_profile_alone(a.study, a.data, shipped), {e for e, sat, *_ in ceiling if not sat})
    _print_residual_bins(ceiling)
    return 0


def _profile_alone(study: Path, data: Path, shipped: dict) -> list:
    """Each run with ground truth predicted from its profile alone (stepml_core.whatif.check, no bound models) by the
    shipped `requests_all` model: (run, TTFT %, E2E %, per-stage E2E %)."""
    from stepml_core.runs.folders import parse_run_id
    from stepml_core.whatif.check import observed_summaries, predicted_summaries
    from stepml_core.whatif.study import template_tokens
    from stepml_dagster.export_cli import _stored
    from stepml_dagster.whatif_cli import study_runs

    runs = {r.experiment_id: r for r in study_runs(study, data)}
    rel = lambda p, o, m: (p[m] / o[m] - 1) * 100  # noqa: E731
    out = []
    for e, r in runs.items():
        obs = observed_summaries(_stored(study / "assets" / "request_log" / e, e, True)["requests"], r)
        if obs is None:
            continue
        spec = {**shipped[parse_run_id(e).model], "bootstrap": None}
        template = template_tokens([runs[x] for x in spec["fitted_on"] if x in runs])
        pred, _, _ = predicted_summaries(spec, r, template, 0)
        stages = {k: rel(pred[k], obs[k], "e2e_mean") for k in pred if k != "all"}
        out.append((e, rel(pred["all"], obs["all"], "ttft_mean"), rel(pred["all"], obs["all"], "e2e_mean"), stages))
    return out


def _print_profile_alone(rows, non_saturated: set) -> None:
    print("\n## 3. Profile alone (issue 24's check), in sample: the shipped model, no request of the run\n")
    print("| run | TTFT % | E2E % | E2E per load stage % |")
    print("|---|---|---|---|")
    for e, t, x, st in rows:
        print(f"| {e[16:]} | {_fmt(t)} | {_fmt(x)} | {' / '.join(_fmt(v) for v in st.values()) or '–'} |")
    ns = [(t, x) for e, t, x, _ in rows if e in non_saturated]
    print(
        f"* mean |TTFT| over {len(ns)} non-saturated runs {np.mean([abs(t) for t, _ in ns]):.1f} % (issue 24's goal < 15 %), "
        f"mean |E2E| {np.mean([abs(x) for _, x in ns]):.1f} % (< 5 %)"
    )


def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:+.1f}"


def _print_ceiling(ceiling) -> None:
    print("\n## 1. Ceiling: the shipped `requests_all` model (in sample) vs leave one workload out (replay.csv)\n")
    print("| run | saturated | TTFT in / LOWO % | E2E in / LOWO % | p99 E2E in / LOWO % |")
    print("|---|---|---|---|---|")
    for e, sat, err, lw, _ in ceiling:
        cells = " | ".join(f"{_fmt(err[m])} / {_fmt(lw[m])}" for m in METRICS)
        print(f"| {e[16:]} | {'yes' if sat else 'no'} | {cells} |")
    ns = [(err, lw) for _, sat, err, lw, _ in ceiling if not sat]
    for m, goal in zip(METRICS, ("< 10", "< 2.5", "< 6")):
        ins = np.mean([abs(err[m]) for err, _ in ns])
        out = [abs(lw[m]) for _, lw in ns if lw[m] is not None]
        print(
            f"* mean |{m}| over {len(ns)} non-saturated runs: in sample {ins:.1f} %, LOWO {np.mean(out):.1f} % "
            f"(issue 25's goal {goal} %)"
        )


def _print_tolerance(tolerance, lowo, limit_pct) -> None:
    print("\n## 2. Tolerance: TTFT / E2E error (%) of each `general` run vs a scale on every step coefficient\n")
    for e, curve, band, own, stages in tolerance:
        print(f"### {e}")
        print("| scale | " + " | ".join(f"{s:.2f}" for s, _ in curve) + " |")
        print("|---|" + "---|" * len(curve))
        for m in ("ttft_mean", "e2e_mean"):
            print(f"| {m} | " + " | ".join(_fmt(c[m]) for _, c in curve) + " |")
        where = "none" if band is None else f"{band[0]:.4f}–{band[1]:.4f} (width {100 * (band[1] - band[0]):.1f} %)"
        print(f"* scales with |TTFT| < {limit_pct:g} %: {where}")
        levels = ", ".join(f"{r[16:]} {100 * v:+.2f} %" for r, v in own.items() if v == v)
        print(f"* each run's own step level under the pooled model (between-run term): {levels}")
        print(
            f"* leave one workload out (replay.csv): TTFT {_fmt(lowo.get((e, 'ttft_mean')))} %, "
            f"E2E {_fmt(lowo.get((e, 'e2e_mean')))} %"
        )
        for stage, n, p, o in stages:
            print(
                f"* stage {stage} ({n} successes), TTFT p5 / p50 / p75 ms at scale 1: predicted "
                f"{' / '.join(f'{x:.1f}' for x in p)}, observed {' / '.join(f'{x:.1f}' for x in o)}"
            )
        print()


def _print_residual_bins(ceiling) -> None:
    print("\n## 4. TTFT residual (observed − in-sample replay, median ms) by the observed decoders at arrival\n")
    labels = [f"{DECODER_BINS[i]}–{DECODER_BINS[i + 1]}" for i in range(len(DECODER_BINS) - 1)]
    print("| run | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    for e, sat, _, _, bins in ceiling:
        if not sat:
            cells = [f"{bins[b][0]:+.1f} ({bins[b][1]})" if b in bins else "–" for b in labels]
            print(f"| {e[16:]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    raise SystemExit(main())
