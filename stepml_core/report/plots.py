"""The report's figures, readable at 16 runs: every series labelled, every reference line named,
one panel per run where runs would overlap, tick labels that never collide.

Each `figure_*` builds a matplotlib Figure (tests inspect it); each `plot_*` saves one to a PNG.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl

from stepml_core.stepmodels.recipes import plot_order, plot_styles


def model_order() -> list[str]:
    """The legend order: every registered step model (stepml_core.stepmodels.recipes.plot_order)."""
    return plot_order()


def model_style(model: str, default: tuple[str, str]) -> tuple[str, str]:
    """A model's (colour, marker): its recipe's, one distinct pair per model (recipes.plot_styles)."""
    return plot_styles().get(model, default)


DPI = 110


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def short_run_name(experiment_id: str) -> str:
    """'20260217-203421-llama-2-70b-hf-tp4-codegen-synth' → 'llama-2-70b-hf-tp4-codegen-synth' (drops the date-time)."""
    parts = experiment_id.split("-", 2)
    return parts[2] if len(parts) == 3 else experiment_id


def compact_number(v: float, _pos=None) -> str:
    """20000 → '20k', 1500000 → '1.5M', 0.5 → '0.5': short tick labels that fit a small panel."""
    a = abs(v)
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= div:
            return f"{v / div:.3g}{suf}"
    return f"{v:.3g}"


def log_axis(axis, lo: float, hi: float) -> None:
    """Log scale with a few labelled ticks (1-2-3-5, 1-2-5 or decades, by the span) in compact numbers, no minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    span = np.log10(max(hi, 1e-12) / max(lo, 1e-12))
    subs = (1.0, 2.0, 3.0, 5.0) if span <= 1.2 else (1.0, 2.0, 5.0) if span <= 2.5 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=12))
    axis.set_major_formatter(FuncFormatter(compact_number))
    axis.set_minor_locator(NullLocator())  # no minor ticks: unlabelled, and building them was most of the drawing time


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)
    return path


def figure_mape_by_experiment(metrics: pl.DataFrame, target: str, source: str = ""):
    """Dot plot: one row per run (labels on the y axis, so 16 never overlap), one marker per model
    (test MAPE, log scale), the H1 threshold (25 %) and refutation line (30 %) labelled in the legend."""
    plt = _plt()
    t = metrics.filter(
        (pl.col("target") == target) & (pl.col("split") == "test") & (pl.col("scope") == "per_experiment")
    )
    if t.height == 0:
        return None
    exps = sorted(set(t["experiment_id"].to_list()))
    models = [m for m in model_order() if m in set(t["model"].to_list())]
    fig, ax = plt.subplots(figsize=(10, 1.6 + 0.38 * len(exps)))
    y = np.arange(len(exps))
    look = {(e, m): v for e, m, v in t.select("experiment_id", "model", "mape_pct").iter_rows()}
    off = np.linspace(-0.3, 0.3, len(models)) if len(models) > 1 else np.zeros(1)
    for k, m in enumerate(models):
        vals = np.array([look.get((e, m), np.nan) for e in exps], float)
        colour, marker = model_style(m, ("k", "o"))
        ax.scatter(np.clip(vals, 1e-2, None), y + off[k], color=colour, marker=marker, s=28, label=m, zorder=3)
    ax.axvline(25, color="k", ls="--", lw=0.9, label="H1 threshold: 25 %")
    ax.axvline(30, color="k", ls=":", lw=0.9, label="refuted above 30 %")
    ax.set_yticks(y)
    ax.set_yticklabels([short_run_name(e) for e in exps], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    finite = t["mape_pct"].drop_nulls().to_numpy()
    finite = finite[np.isfinite(finite) & (finite > 0)]
    log_axis(
        ax.xaxis,
        float(min(finite.min(), 25.0)) if len(finite) else 1.0,
        float(max(finite.max(), 30.0)) if len(finite) else 100.0,
    )
    ax.set_xlabel("per-step test MAPE (%, log scale)")
    ax.grid(axis="x", which="both", lw=0.3, alpha=0.5)
    ax.set_title(
        f"Test MAPE per run and model, per-experiment fits — {target}" + (f" ({source} data)" if source else ""),
        fontsize=10,
    )
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=2.6 / w, right=1 - 1.9 / w, bottom=0.55 / h, top=1 - 0.4 / h)
    return fig


def plot_mape_by_experiment(metrics: pl.DataFrame, target: str, path: Path, source: str = "") -> Path | None:
    fig = figure_mape_by_experiment(metrics, target, source)
    return _save(fig, path) if fig is not None else None


def figure_pred_vs_actual(predictions: pl.DataFrame, target: str, model: str = "ridge_30f", source: str = ""):
    """One panel per run (up to 4 columns): predicted vs actual on the test split, log-log, with the y = x
    line; a panel's title gives the run, its test rows and how many predictions sit at the model's positive floor."""
    plt = _plt()
    p = predictions.filter(
        (pl.col("target") == target)
        & (pl.col("split") == "test")
        & (pl.col("model") == model)
        & (pl.col("scope") == "per_experiment")
        & (pl.col("y") > 0)
    )
    if p.height == 0:
        return None
    exps = sorted(set(p["experiment_id"].to_list()))
    cols = min(4, len(exps))
    rows = math.ceil(len(exps) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols + 0.7, 2.9 * rows + 1.4), squeeze=False)
    colour = model_style(model, ("#d62728", "o"))[0]
    for ax, e in zip(axes.flat, exps):
        s = p.filter(pl.col("experiment_id") == e)
        yv, yp = s["y"].to_numpy(), s["y_pred"].to_numpy()
        floor = s["at_floor"].to_numpy() if "at_floor" in s.columns else np.zeros(len(yv), bool)
        ax.scatter(yv[~floor], yp[~floor], s=3, alpha=0.4, color=colour, label=f"{model} prediction")
        if floor.any():
            ax.scatter(yv[floor], yp[floor], s=8, marker="x", color="k", label="raised to the positive floor")
        lo, hi = float(min(yv.min(), max(yp.min(), 1e-9))), float(max(yv.max(), yp.max()))
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x (perfect)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        log_axis(ax.xaxis, lo, hi)
        log_axis(ax.yaxis, lo, hi)
        ax.tick_params(labelsize=7)
        ax.set_title(
            f"{short_run_name(e)}\nn={len(yv)}" + (f", {int(floor.sum())} at floor" if floor.any() else ""), fontsize=7
        )
    for ax in list(axes.flat)[len(exps) :]:
        ax.set_visible(False)
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    w, h = fig.get_size_inches()
    fig.legend(
        list(handles.values()),
        list(handles.keys()),
        loc="lower center",
        bbox_to_anchor=(0.5, 0.03 / h),
        ncol=len(handles),
        fontsize=8,
        markerscale=3,
    )
    fig.supxlabel(f"actual {target} (µs)", fontsize=9, y=0.5 / h, va="center")
    fig.supylabel(f"predicted {target} (µs)", fontsize=9)
    fig.suptitle(
        f"{model}, per-experiment fits, test split — {target}" + (f" ({source} data)" if source else ""),
        fontsize=10,
        y=1 - 0.12 / h,
        va="top",
    )
    fig.subplots_adjust(left=0.85 / w, right=1 - 0.15 / w, bottom=1.05 / h, top=1 - 0.85 / h, hspace=0.6, wspace=0.35)
    return fig


def plot_pred_vs_actual(
    predictions: pl.DataFrame, target: str, path: Path, model: str = "ridge_30f", source: str = ""
) -> Path | None:
    fig = figure_pred_vs_actual(predictions, target, model, source)
    return _save(fig, path) if fig is not None else None


def figure_residuals(predictions: pl.DataFrame, target: str, model: str, scope: str):
    """Signed relative error of one model against batch size and mean decode context, all runs pooled, with the zero line labelled."""
    plt = _plt()
    p = predictions.filter(
        (pl.col("target") == target)
        & (pl.col("split") == "test")
        & (pl.col("model") == model)
        & (pl.col("scope") == scope)
        & (pl.col("y") > 0)
    )
    if p.height == 0 or "batch_size" not in p.columns:
        return None
    r = (100 * (p["y_pred"] - p["y"]) / p["y"]).to_numpy()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, col, label in (
        (axes[0], "batch_size", "batch size (requests)"),
        (axes[1], "kv_mean", "mean decode context (tokens)"),
    ):
        ax.scatter(
            p[col].to_numpy(),
            r,
            s=2,
            alpha=0.3,
            color=model_style(model, ("C0", "o"))[0],
            label=f"test step ({p.height} over {p['experiment_id'].n_unique()} runs)",
        )
        ax.axhline(0, color="k", lw=0.8, label="no error")
        ax.set_xlabel(label)
        ax.legend(fontsize=7, loc="upper right", markerscale=4)
    axes[0].set_ylabel("signed error (ŷ − y) / y (%)")
    fig.suptitle(f"Residuals of {model} ({scope}), test split — {target}")
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=0.85 / w, right=1 - 0.2 / w, bottom=0.6 / h, top=1 - 0.55 / h, wspace=0.06)
    return fig


def plot_residuals(predictions: pl.DataFrame, target: str, model: str, scope: str, path: Path) -> Path | None:
    fig = figure_residuals(predictions, target, model, scope)
    return _save(fig, path) if fig is not None else None


def plot_e2e(per_request: pl.DataFrame, model: str, path: Path) -> Path | None:
    """Teacher-forced E2E: predicted vs observed TTFT and E2E per request (ms), y = x labelled."""
    plt = _plt()
    p = per_request.filter(pl.col("model") == model) if per_request.height else per_request
    if p.height == 0:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, m in zip(axes, ("ttft", "e2e")):
        o, q = p[f"obs_{m}_us"].to_numpy() / 1e3, p[f"pred_{m}_us"].to_numpy() / 1e3
        ok = np.isfinite(o) & np.isfinite(q) & (o > 0) & (q > 0)
        ax.scatter(o[ok], q[ok], s=2, alpha=0.3, label=f"request ({int(ok.sum())})")
        if ok.any():
            lo, hi = min(o[ok].min(), q[ok].min()), max(o[ok].max(), q[ok].max())
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x (perfect)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"observed {m.upper()} (ms)")
        ax.set_ylabel(f"predicted {m.upper()} (ms)")
        ax.legend(fontsize=7, loc="upper left", markerscale=4)
    fig.suptitle(f"Teacher-forced E2E fidelity: {model} cycle-time predictions summed per request")
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=0.85 / w, right=1 - 0.2 / w, bottom=0.6 / h, top=1 - 0.55 / h, wspace=0.25)
    return _save(fig, path)
