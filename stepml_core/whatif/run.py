"""One what-if, start to end: sweep, summarize, write ``whatif.csv``, ``whatif.json`` and ``whatif.png``."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

from stepml_core.whatif.slo import parse_slo
from stepml_core.whatif.sweep import run_sweep, summarize, sweep_points, whatif_table
from stepml_core.whatif.workload import ServingLimits, WorkloadDescription

SATURATION_RULE = (
    "a point is saturated when its predicted replay has a failed request (no last token by the client's 300 s limit) "
    "or a mean TTFT above stepml_core.runs.rules.SATURATED_TTFT_S (is_saturated); the saturation rate is the smallest "
    "swept rate whose central prediction is saturated (lo/hi: the smallest rates at which the slowest/fastest bound "
    "model saturates)"
)


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def run_whatif(
    spec: dict,
    model_info: dict,
    desc: WorkloadDescription,
    limits: ServingLimits,
    out_dir: Path,
    *,
    rates=None,
    max_num_seqs=None,
    max_num_batched_tokens=None,
    tps=None,
    slo: str | None = None,
    seed: int = 0,
    duration_s: float | None = None,
    workers: int = 1,
    progress_factory=None,
    defaults_from: str | None = None,
) -> dict:
    """Sweep (rates default: the description's stage rates; ``tps`` default: the calibrated TP, any other through
    stepml_core.whatif.tp), write DIR/whatif.csv (WHATIF_COLUMNS), whatif.json (the summary, the model and what fitted
    it, per TP where its model and KV blocks come from, the workload, limits, seed, seconds) and whatif.png; returns
    {"table", "summary", "paths", "seconds"}. ``progress_factory(total, label)``: a stepml_core.progress context."""
    from stepml_core.whatif.plots import plot_whatif
    from stepml_core.whatif.tp import limits_at_tp, spec_at_tp, tp_note

    terms = parse_slo(slo) if slo else ()
    rates = sorted({float(r) for r in (rates or [r for r, _ in desc.stages])})
    tp_list = sorted({int(t) for t in (tps or [limits.tp])})
    engines = {t: (spec_at_tp(spec, limits, t), limits_at_tp(limits, t)) for t in tp_list}  # refused before any replay
    points = [p for t in tp_list for p in sweep_points(rates, max_num_seqs, max_num_batched_tokens, engines[t][1], t)]
    kw = dict(seed=seed, duration_s=duration_s, workers=workers, engines=engines)
    t0 = time.perf_counter()
    if progress_factory is not None:
        with progress_factory(len(points), "whatif") as bar:
            rows = run_sweep(spec, desc, limits, points, progress=bar, **kw)
    else:
        rows = run_sweep(spec, desc, limits, points, **kw)
    seconds = time.perf_counter() - t0
    table = whatif_table(rows)
    summary = summarize(table, terms)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv = out_dir / "whatif.csv"
    table.write_csv(csv)
    tp_text = ", ".join(str(t) for t in tp_list)
    fitted = len(model_info.get("fitted_on") or [])
    title = f"{limits.model} (TP {tp_text}): {model_info.get('step_model')} fitted on {fitted} run(s) at TP {limits.tp}"
    png = plot_whatif(table, out_dir / "whatif.png", title, summary)
    doc = {
        "model": limits.model,
        "step_model": model_info,
        "workload": {**asdict(desc), "duration_s": duration_s or max(d for _, d in desc.stages)},
        "serving_limits": asdict(limits),
        "tp": [tp_note(limits, engines[t][1]) for t in tp_list],
        "defaults_from": defaults_from,
        "seed": seed,
        "points": len(points),
        "seconds": round(seconds, 2),
        "saturation_rule": SATURATION_RULE,
        "summary": summary,
    }
    js = out_dir / "whatif.json"
    js.write_text(json.dumps(_clean(doc), indent=1, sort_keys=True, default=str) + "\n")
    return {"table": table, "summary": summary, "paths": [csv, js, png], "seconds": seconds}
