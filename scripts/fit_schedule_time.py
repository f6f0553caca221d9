#!/usr/bin/env python
"""Fit the synthesizer's model of ``step.duration_us`` (schedule() CPU time) on real data.

Inputs (read here only; synthesis never reads them):
  * ../shared/real/experiments/*/traces.json.gz — every sampled BATCH_SUMMARY of two real
    runs (all 16 attributes), parsed with a few lines of orjson;
  * ../shared/real/xgboost_round1_test_predictions.csv.gz — the real test-split
    ``step.duration_us`` (last 20 % of steps by id) of all 16 runs.

Model (stepml_core/synth/schedtime.py): two regimes in log space,
    log d = x·β_r + δ_r(run) + σ_r·ε_r,  r ∈ {fast, slow},  ε_r ~ empirical standardized residuals,
    x = [1, log1p(running), log1p(prefill_tokens), min(prefill_reqs,8), min(finished,8), min(preempted,8)],
with P(slow) = sigmoid((running − r0(run)) / width).

1. Shared slopes, σ's, residual quantiles and the gate width: EM for this mixture of
   regressions on the pooled real rows (run-specific intercepts and gate thresholds).
   The preemption coefficient is not identifiable (no preemption in these rows) and is set
   to a prior (PREEMPT_PRIOR).
2. Per run (all 16): the synthesizer simulates the run (``--scale`` of its duration) and
   records the features of every step; on the last 20 % of steps, (r0, δ_fast, δ_slow) are
   set so that the slow fraction and the medians of both regimes match the real test split
   (split into regimes by a 1-D two-component Gaussian mixture of log d when it is bimodal).
   Two passes, since schedule() time feeds back into the engine cycle of CPU-bound runs.

Writes data/synth/schedule_time_model.json (with where it came from: files, rows, date, script).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stepml_core.paths import DATA_DIR  # noqa: E402

REAL = ROOT.parent / "shared" / "real"
OUT = DATA_DIR / "synth" / "schedule_time_model.json"
PREEMPT_PRIOR = 0.3
SLOW_FLOOR = 30.0  # running depth below which the slow regime's power law is not extrapolated
# (above: the largest running depth among the real slow-regime rows)
GATE_WIDTH_MIN = 2.0
RES_P = np.concatenate(
    [[0.0002, 0.0005, 0.001, 0.0025, 0.005], np.linspace(0.01, 0.99, 99), [0.995, 0.9975, 0.999, 0.9995, 0.9998]]
)
KEYS = (
    "step.id",
    "step.duration_us",
    "queue.running_depth",
    "batch.prefill_tokens",
    "batch.num_prefill_reqs",
    "batch.num_finished",
    "batch.num_preempted",
)


def read_rows(path: Path) -> dict[str, np.ndarray]:
    cols = {k: [] for k in KEYS}
    with gzip.open(path, "rb") as f:
        for line in f:
            if not line.strip():
                continue
            for rs in orjson.loads(line)["resourceSpans"]:
                for ss in rs["scopeSpans"]:
                    for sp in ss["spans"]:
                        for ev in sp.get("events", []):
                            if ev["name"] != "step.BATCH_SUMMARY":
                                continue
                            a = {x["key"]: x["value"] for x in ev["attributes"]}
                            for k in KEYS:
                                v = a[k]
                                cols[k].append(int(v.get("intValue", v.get("doubleValue"))))
    return {k: np.asarray(v, dtype=np.float64) for k, v in cols.items()}


def design(
    running, prefill_tokens, prefill_reqs, finished, preempted, floor: float = 0.0, ceiling: float = 1e9
) -> np.ndarray:
    return np.column_stack(
        [
            np.ones_like(running),
            np.log1p(np.clip(running, floor, ceiling)),
            np.log1p(prefill_tokens),
            np.minimum(prefill_reqs, 8),
            np.minimum(finished, 8),
            np.minimum(preempted, 8),
        ]
    )


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


def _wls(X, y, w, ridge=1e-4):
    A = (X * w[:, None]).T @ X + ridge * np.eye(X.shape[1])
    return np.linalg.solve(A, (X * w[:, None]).T @ y)


def fit_base(runs: list[dict[str, np.ndarray]], iters: int = 300):
    """EM for the two-regime mixture with run-specific intercepts and gate thresholds."""
    k = len(runs)
    Xs, ys, rs, ids = [], [], [], []
    for j, d in enumerate(runs):
        X = design(
            d["queue.running_depth"],
            d["batch.prefill_tokens"],
            d["batch.num_prefill_reqs"],
            d["batch.num_finished"],
            d["batch.num_preempted"],
        )[:, 1:]
        D = np.zeros((len(X), k))
        D[:, j] = 1.0
        Xs.append(np.column_stack([D, X]))
        ys.append(np.log(np.maximum(d["step.duration_us"], 1.0)))
        rs.append(d["queue.running_depth"])
        ids.append(np.full(len(X), j))
    X, y, r, rid = np.vstack(Xs), np.concatenate(ys), np.concatenate(rs), np.concatenate(ids)
    G = np.column_stack([(rid == j).astype(float) for j in range(k)] + [r])
    resp = (y > np.log(800.0)).astype(float)  # start: slow = above 0.8 ms
    g = np.zeros(G.shape[1])
    for _ in range(iters):
        bF, bS = _wls(X, y, 1 - resp), _wls(X, y, resp)
        eF, eS = y - X @ bF, y - X @ bS
        sF = np.sqrt(np.sum((1 - resp) * eF**2) / np.sum(1 - resp))
        sS = np.sqrt(np.sum(resp * eS**2) / np.sum(resp))
        for _ in range(25):
            p = _sigmoid(G @ g)
            W = p * (1 - p) + 1e-9
            g = g + np.linalg.solve((G * W[:, None]).T @ G + 1e-6 * np.eye(G.shape[1]), G.T @ (resp - p))
        g[-1] = min(g[-1], 1.0 / GATE_WIDTH_MIN)  # keep the gate from becoming a step function
        p = _sigmoid(G @ g)
        lF = (1 - p) * np.exp(-0.5 * (eF / sF) ** 2) / sF
        lS = p * np.exp(-0.5 * (eS / sS) ** 2) / sS
        resp = lS / (lF + lS + 1e-300)
    slow = resp > 0.5
    info_ceiling = float(r[slow].max()) if slow.any() else 1e9
    zF, zS = (eF / sF)[~slow], (eS / sS)[slow]
    width = 1.0 / g[-1]
    base = {
        "fast": {"beta": [float(np.mean(bF[:k]))] + [float(x) for x in bF[k:]], "sigma": float(sF)},
        "slow": {"beta": [float(np.mean(bS[:k]))] + [float(x) for x in bS[k:]], "sigma": float(sS)},
    }
    for reg in ("fast", "slow"):
        base[reg]["beta"][5] = PREEMPT_PRIOR
    per_run = [
        {"intercept_fast": float(bF[j]), "intercept_slow": float(bS[j]), "r0": float(-g[j] * width)} for j in range(k)
    ]
    resq = {"p": RES_P.tolist(), "fast": np.quantile(zF, RES_P).tolist(), "slow": np.quantile(zS, RES_P).tolist()}
    return (
        base,
        width,
        resq,
        per_run,
        {"slow_fraction": float(slow.mean()), "rows": int(len(y)), "slow_running_max": info_ceiling},
    )


def read_test_split(path: Path) -> dict[str, np.ndarray]:
    import csv

    out: dict[str, list] = {}
    with gzip.open(path, "rt", newline="") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["experiment_id"], []).append(float(row["step.duration_us"]))
    return {k: np.asarray(v) for k, v in out.items()}


def split_regimes(logd: np.ndarray):
    """(p_slow, log-median fast, log-median slow, bimodal?) of a real test-split sample."""
    from sklearn.mixture import GaussianMixture

    gm = GaussianMixture(2, random_state=0, n_init=3).fit(logd[:, None])
    mu = gm.means_.ravel()
    hi = int(np.argmax(mu))
    w = gm.weights_
    lab = gm.predict(logd[:, None]) == hi
    if abs(mu[0] - mu[1]) > 1.2 and min(w) > 0.03 and 0 < lab.sum() < len(lab):
        return float(lab.mean()), float(np.median(logd[~lab])), float(np.median(logd[lab])), True
    return None, float(np.median(logd)), float(np.median(logd)), False


def simulate_features(real_id: str, scale: float, model: dict, seed: int = 0) -> dict[str, np.ndarray]:
    from stepml_core.synth.run_engine import simulate_synthetic_run
    from stepml_core.synth.runner import _clocks, _streams
    from stepml_core.synth.schedtime import ScheduleTimeModel
    from stepml_core.synth.spec import resolve_run_ids
    from stepml_core.synth.workload import build_workload

    spec = resolve_run_ids([real_id])[0]
    rng_wl, rng_eng, *_ = _streams(real_id, seed)
    mono0, _, _ = _clocks(spec)
    wl = build_workload(spec, scale, rng_wl)
    sim = simulate_synthetic_run(
        spec, wl, rng_eng, mono0=mono0, sched_model=ScheduleTimeModel(real_id, model), record_all=True
    )
    return {k: np.asarray(v, dtype=np.float64) for k, v in sim.features.items()}


def _gate_center(r: np.ndarray, target: float, width: float) -> float:
    """r0 of the slow-regime gate sigmoid((running - r0) / width) whose mean over the window is the real slow
    fraction `target` (bisection); 1e6 (gate shut) when there is no slow regime."""
    if target <= 0.005:
        return 1e6
    if target >= 0.995:  # all slow in the window: gate open from just below its running depths
        return float(np.quantile(r, 0.05)) - 2.0 * width
    a, b = -1000.0, 2000.0
    for _ in range(80):
        mid = 0.5 * (a + b)
        if _sigmoid((r - mid) / width).mean() > target:
            a = mid
        else:
            b = mid
    return 0.5 * (a + b)


def _weighted_quantile(y: np.ndarray, w: np.ndarray, q: float) -> float:
    """The q-quantile of y with weights w (the first y whose cumulative weight reaches q · Σw)."""
    o = np.argsort(y)
    c = np.cumsum(w[o])
    return float(y[o][min(len(y) - 1, np.searchsorted(c, q * c[-1]))])


def _fit_regime(lin, z, sigma, w, real_r, real_median) -> tuple[float, float, float]:
    """(center, δ, k): the regime's median and inter-quartile range matched to the real ones."""
    wq = _weighted_quantile
    if w.sum() <= 1.0:
        return 0.0, 0.0, 1.0
    c = wq(lin, w, 0.5)
    iqr_real = float(np.subtract(*np.quantile(real_r, [0.75, 0.25])))
    k, d = 1.0, 0.0
    for _ in range(6):
        y = c + k * (lin - c) + k * sigma * z
        iqr = wq(y, w, 0.75) - wq(y, w, 0.25)
        k = float(np.clip(k * iqr_real / max(iqr, 1e-6), 0.05, 3.0))
    y = c + k * (lin - c) + k * sigma * z
    d = real_median - wq(y, w, 0.5)
    return c, d, k


def fit_run(feat: dict[str, np.ndarray], real: np.ndarray, model: dict, rng: np.random.Generator) -> dict:
    n = len(feat["running"])
    lo = int(n * 0.8)
    f = {k: v[lo:] for k, v in feat.items()}
    args = (f["running"], f["prefill_tokens"], f["prefill_reqs"], f["finished"], f["preempted"])
    XF, XS = (
        design(*args),
        design(*args, floor=model.get("slow_running_floor", 0.0), ceiling=model.get("slow_running_ceiling", 1e9)),
    )
    bF, bS = np.asarray(model["regimes"]["fast"]["beta"]), np.asarray(model["regimes"]["slow"]["beta"])
    sF, sS = model["regimes"]["fast"]["sigma"], model["regimes"]["slow"]["sigma"]
    rq = model["residual_quantiles"]
    zF = np.interp(rng.random(len(XF)), rq["p"], rq["fast"])
    zS = np.interp(rng.random(len(XF)), rq["p"], rq["slow"])
    mF_lin, mS_lin = XF @ bF, XS @ bS
    logd = np.log(np.maximum(real, 1.0))
    p_slow, mf, ms, bimodal = split_regimes(logd)
    width = model["gate_width"]
    r = f["running"]
    if not bimodal:  # one mode: the regime whose synthetic median is nearer
        p_slow = 0.0 if abs(np.median(mF_lin) - mf) <= abs(np.median(mS_lin) - mf) else 1.0
    target = min(max(p_slow, 0.0), 1.0)
    r0 = _gate_center(r, target, width)
    g = _sigmoid((r - r0) / width) if r0 < 1e5 else np.zeros(len(r))
    if bimodal:
        cut = np.quantile(logd, 1 - target)
        realF, realS = logd[logd < cut], logd[logd >= cut]
    else:
        realF = realS = logd

    cF, dF, kF = _fit_regime(mF_lin, zF, sF, 1 - g, realF, mf) if target < 0.995 else (0.0, 0.0, 1.0)
    cS, dS, kS = _fit_regime(mS_lin, zS, sS, g, realS, ms) if target > 0.005 else (0.0, 0.0, 1.0)
    yF = cF + dF + kF * (mF_lin - cF) + kF * sF * zF
    yS = cS + dS + kS * (mS_lin - cS) + kS * sS * zS
    pick = rng.random(len(XF)) < g
    y = np.where(pick, yS, yF)
    qs = [0.05, 0.25, 0.5, 0.75, 0.95]
    return {
        "r0": float(r0),
        "fast": {"center": cF, "delta": dF, "k": kF},
        "slow": {"center": cS, "delta": dS, "k": kS},
        "real_slow_fraction": float(target),
        "bimodal": bool(bimodal),
        "check_quantiles_us": {
            "q": qs,
            "real": np.quantile(real, qs).round(1).tolist(),
            "synthetic": np.exp(np.quantile(y, qs)).round(1).tolist(),
        },
        "window_steps": int(len(XF)),
        "real_test_steps": int(len(real)),
    }


def sha16(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()[:16]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", type=Path, default=REAL, help="the shared/real folder (default: ../shared/real)")
    ap.add_argument("--scale", type=float, default=1.0, help="duration fraction of the per-run simulations")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args(argv)
    files = sorted((a.real / "experiments").glob("*/traces.json.gz"))
    test_csv = a.real / "xgboost_round1_test_predictions.csv.gz"
    if not files or not test_csv.is_file():
        print(f"no real data under {a.real}", file=sys.stderr)
        return 2
    runs = [read_rows(p) for p in files]
    base, width, resq, per_run, info = fit_base(runs)
    print(f"base fit on {info['rows']} rows; slow fraction {info['slow_fraction']:.3f}; gate width {width:.2f}")
    for p, pr in zip(files, per_run):
        print(f"  {p.parent.name}: {pr}")
    model = {
        "regimes": base,
        "gate_width": float(width),
        "slow_running_floor": SLOW_FLOOR,
        "slow_running_ceiling": info["slow_running_max"],
        "residual_quantiles": resq,
        "runs": {},
    }
    test = read_test_split(test_csv)
    from stepml_core.synth.spec import reference_runs

    rng = np.random.default_rng(12345)
    for k in range(a.passes):
        fitted = {}
        for rid in reference_runs():
            if rid not in test:
                continue
            feat = simulate_features(rid, a.scale, model)
            fitted[rid] = fit_run(feat, test[rid], model, rng)
            c = fitted[rid]["check_quantiles_us"]
            print(
                f"pass {k + 1} {rid[:48]:48s} slow {fitted[rid]['real_slow_fraction']:.2f} r0 {fitted[rid]['r0']:8.1f} "
                f"dF {fitted[rid]['fast']['delta']:+.2f} dS {fitted[rid]['slow']['delta']:+.2f} k {fitted[rid]['fast']['k']:.2f}/{fitted[rid]['slow']['k']:.2f} real {c['real']} syn {c['synthetic']}"
            )
        model["runs"] = fitted
    model["source"] = {
        "script": "scripts/fit_schedule_time.py",
        "date": _dt.date.today().isoformat(),
        "fitted_on": {
            "batch_summary_rows": {
                p.parent.name: {
                    "file": f"shared/real/experiments/{p.parent.name}/traces.json.gz",
                    "sha256_16": sha16(p),
                    "rows": int(len(d["step.id"])),
                }
                for p, d in zip(files, runs)
            },
            "test_split": {
                "file": "shared/real/xgboost_round1_test_predictions.csv.gz",
                "sha256_16": sha16(test_csv),
                "rows": int(sum(len(v) for v in test.values())),
            },
        },
        "per_run_simulation_scale": a.scale,
        "passes": a.passes,
        "notes": "step.duration_us is schedule() CPU time (docs/trace-format.md §3.3); no physics gives it. The preemption "
        f"coefficient ({PREEMPT_PRIOR}) is a prior: the real rows contain no preemption.",
    }
    a.out.write_text(json.dumps(model, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
