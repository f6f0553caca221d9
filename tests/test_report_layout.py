"""The report at 16 runs: a one-screen summary first, full tables in the appendix, plots readable (labels, no overlaps)."""

import csv

import numpy as np
import polars as pl
import pytest

from stepml_core.paths import REFERENCE_DIR
from stepml_core.report.plots import figure_mape_by_experiment, figure_pred_vs_actual, figure_residuals, model_order
from stepml_core.report.study import render_report
from stepml_core.study.findings import study_findings
from stepml_core.study.h1 import metrics_from_predictions
from stepml_core.study.verdict import h1_verdict

MODELS = [
    "naive_mean",
    "blackbox_2f",
    "ridge_30f",
    "blackbox_ols_orig",
    "ridge_30f_orig",
    "ridge_log_30f",
    "nnls_physics",
    "hgb_30f",
]


@pytest.fixture(scope="module")
def sixteen():
    with open(REFERENCE_DIR / "original_study.csv", newline="") as f:
        ids = [r["experiment_id"] + "-synth" for r in csv.DictReader(f)]
    assert len(ids) == 16
    rng = np.random.default_rng(0)
    parts = []
    for i, e in enumerate(ids):
        for target, n, level in (("schedule_us", 300, 500.0), ("cycle_us", 40, 20000.0)):
            y = level * rng.lognormal(0, 0.5 if target == "schedule_us" else 0.1, n)
            for k, m in enumerate(MODELS):
                err = {"naive_mean": 0.6, "blackbox_2f": 0.3}.get(m, 0.1 + 0.02 * k)
                yp = y * (1 + err * rng.normal(size=n))
                floor = np.zeros(n, bool)
                if m == "ridge_30f" and i % 3 == 0:
                    floor[:2] = True
                    yp[:2] = y.min()
                for scope in ("per_experiment", "per_model", "global"):
                    parts.append(
                        pl.DataFrame(
                            {
                                "experiment_id": e,
                                "source": "synthetic",
                                "step.id": np.arange(n),
                                "split": "test",
                                "load_stage": 1,
                                "kv_mean": rng.uniform(0, 1000, n),
                                "batch_size": rng.uniform(1, 128, n),
                                "target": target,
                                "model": m,
                                "scope": scope,
                                "y": y,
                                "y_pred": yp,
                                "at_floor": floor,
                            }
                        )
                    )
    pred = pl.concat(parts)
    met = metrics_from_predictions(pred)
    runs = [
        {
            "experiment_id": e,
            "source": "synthetic",
            "stands_for": e[:-6],
            "model": e.split("-")[2],
            "tp": 1,
            "workload": "x",
        }
        for e in ids
    ]
    return ids, pred, met, runs


def _shown(axis):
    """The tick labels an axis draws (major and minor ticks inside its view interval, with text)."""
    lo, hi = sorted(axis.get_view_interval())
    out = []
    for locs, labs in (
        (axis.get_majorticklocs(), axis.get_majorticklabels()),
        (axis.get_minorticklocs(), axis.get_minorticklabels()),
    ):
        out += [lab for loc, lab in zip(locs, labs) if lo <= loc <= hi and lab.get_text()]
    return out


def _all_texts_apart(fig):
    """No two text items of the figure collide: tick labels, axis labels, titles, the figure's own labels, legends."""
    fig.canvas.draw()
    items = []
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        items += _shown(ax.xaxis) + _shown(ax.yaxis) + [ax.title, ax.xaxis.label, ax.yaxis.label]
        if ax.get_legend():
            items.append(ax.get_legend())
    items += [*fig.legends, fig._suptitle, fig._supxlabel, fig._supylabel]
    _no_overlaps(fig, items, draw=False)


def _no_overlaps(fig, labels, draw=True):
    if draw:
        fig.canvas.draw()
    r = fig.canvas.get_renderer()
    labels = [t for t in labels if t is not None and t.get_visible() and (not hasattr(t, "get_text") or t.get_text())]
    boxes = [t.get_window_extent(r) for t in labels]
    fb = fig.bbox
    for b in boxes:
        assert b.x0 >= fb.x0 - 1 and b.x1 <= fb.x1 + 1 and b.y0 >= fb.y0 - 1 and b.y1 <= fb.y1 + 1, "label cut off"
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not boxes[i].overlaps(boxes[j]), (labels[i], labels[j])
    return len(boxes)


def test_mape_by_experiment_readable_at_16_runs(sixteen):
    ids, _, met, _ = sixteen
    fig = figure_mape_by_experiment(met, "schedule_us", "synthetic")
    ax = fig.axes[0]
    assert _no_overlaps(fig, _shown(ax.yaxis)) == 16
    _no_overlaps(fig, _shown(ax.xaxis))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert set(model_order()) <= set(legend) and "H1 threshold: 25 %" in legend and "refuted above 30 %" in legend
    colours = {tuple(np.round(c.get_facecolor()[0], 3)) for c in ax.collections}
    assert len(colours) == len(model_order())  # one colour per model, none repeated
    _all_texts_apart(fig)


def test_pred_vs_actual_one_labelled_panel_per_run_at_16_runs(sixteen):
    ids, pred, _, _ = sixteen
    fig = figure_pred_vs_actual(pred, "cycle_us", source="synthetic")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 16
    assert all(ax.get_title() for ax in panels)
    legend = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert "y = x (perfect)" in legend and "raised to the positive floor" in legend and "ridge_30f prediction" in legend
    assert (
        sum("at floor" in ax.get_title() for ax in panels) == 6
    )  # runs 0, 3, …, 15 have floored predictions, named in their title
    fig.canvas.draw()
    for ax in panels:
        _no_overlaps(fig, _shown(ax.xaxis), draw=False)
        _no_overlaps(fig, _shown(ax.yaxis), draw=False)
    _all_texts_apart(fig)


def test_residuals_labelled_at_16_runs(sixteen):
    _, pred, _, _ = sixteen
    fig = figure_residuals(pred, "cycle_us", "ridge_30f", "per_model")
    for ax in fig.axes:
        assert {"no error"} <= {t.get_text() for t in ax.get_legend().get_texts()} and ax.get_xlabel()
    _all_texts_apart(fig)


def test_report_starts_with_a_one_screen_summary_and_keeps_full_tables_in_the_appendix(sixteen, tmp_path):
    ids, pred, met, runs = sixteen
    verdict = h1_verdict(met, pred, reps=100)
    findings = study_findings(predictions=pred)
    md = render_report(
        runs=runs,
        metrics=met,
        predictions=pred,
        verdict=verdict,
        out_dir=tmp_path,
        findings=findings,
        extra_sections=["## A later section", ""],
    )
    lines = md.splitlines()
    heads = [i for i, l in enumerate(lines) if l.startswith("## ")]
    assert lines[heads[0]] == "## Summary" and lines[heads[1]] == "## Data"
    summary = lines[heads[0] : heads[1]]
    assert len(summary) <= 40, len(summary)
    for target, v in verdict["targets"].items():
        assert any(f"`{target}`" in l and f"**{v['verdict']}**" in l for l in summary)
    assert any("What a simulator builder should use" in l for l in summary)
    appendix = md.index("## Appendix")
    assert md.index("## A later section") < appendix
    full_header = "| experiment | source | scope | model | n | MAPE %"
    assert full_header in md and md.index(full_header) > appendix
    for name in ("mape_by_experiment_cycle_us.png", "pred_vs_actual_schedule_us.png"):
        assert (tmp_path / name).is_file() and md.index(name) > appendix
