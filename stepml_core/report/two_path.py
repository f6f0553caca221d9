"""The report section on two-path replays of the saturated runs (issue 23; docs/cpu_path.md, *Two paths*).

Per saturated run (a run whose own test-split steps reach the saturated state): observed vs predicted mean TTFT,
mean E2E, successes and throughput, relative error of the GPU-path-only model (the recommended out-of-sample
spec), the two-path model (CPU path from the other runs), the two-path form with the run's own plateau (in sample:
the form's ceiling), the in-sample physics and BLIS 4a; a plot per run of the queue (requests arrived without a
first token) over time, observed vs predicted. The section is costly (a replay of every run twice and of every
run's state once): ``two_path_not_run`` is the line the report carries when it was not asked for.
"""

from __future__ import annotations

from pathlib import Path

from stepml_core.report.plots import _plt, _save, short_run_name

VARIANTS = (
    ("gpu_path", "GPU path only (recommended, out of sample)"),
    ("two_path", "two paths (out of sample)"),
    ("two_path_own_plateau", "two paths, own plateau (in sample)"),
    ("physics_in_sample", "physics (in sample)"),
    ("blis_4a", "BLIS 4a"),
)
METRIC_NAMES = {
    "ttft_mean": "mean TTFT",
    "e2e_mean": "mean E2E",
    "successes": "successes",
    "throughput_rps": "throughput",
}
HOW_TO_ASK = (
    "opt-in: `stepml run --two-path [STEPS]` or STEPML_TWO_PATH=1|STEPS, or `python benchmarks/two_path.py --study OUT`"
)


def two_path_not_run() -> list[str]:
    """The report's lines when the two-path section was not asked for."""
    return ["## Two paths: the saturated runs", "", f"**not run in this study ({HOW_TO_ASK})**", ""]


def write_queue_plots(queues: dict, plateaus: list, out_dir: Path) -> dict[str, Path]:
    """One PNG per saturated run: the observed queue and each variant's predicted queue over time."""
    plt = _plt()
    saturated = {p.experiment_id for p in plateaus if p.plateau_us is not None}
    paths = {}
    for eid in sorted(set(queues) & saturated):
        fig, ax = plt.subplots(figsize=(6.4, 3.2))
        per = queues[eid]
        grid, obs, _ = next(iter(per.values()))
        ax.plot(grid, obs, color="black", lw=1.6, label="observed (request log)")
        styles = (("tab:blue", "-"), ("tab:orange", "--"), ("tab:green", ":"))
        for (variant, (g, _o, pred)), (color, ls) in zip(sorted(per.items()), styles):
            ax.plot(g, pred, color=color, ls=ls, lw=1.3, label=f"predicted, {dict(VARIANTS).get(variant, variant)}")
        ax.set_xlabel("time since the first request (s)")
        ax.set_ylabel("requests without a first token")
        ax.set_title(short_run_name(eid), fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths[eid] = _save(fig, Path(out_dir) / f"two_path_queue_{short_run_name(eid)}.png")
    return paths


def _fmt(v) -> str:
    return "—" if v is None or v != v else f"{v:+.1f} %"


def two_path_markdown(
    table, plateaus: list, cpu_paths: dict, plots: dict, *, out_dir: Path | None = None, transfers=None
) -> str:
    """The section: per saturated run and metric, observed and each variant's relative error; the CPU paths (value,
    what set it); each scaling's transfer error (``transfers``: replay.two_path.transfer_errors rows); the
    non-saturated runs' largest change; the queue plots (paths relative to ``out_dir``)."""
    import polars as pl

    saturated = [p for p in plateaus if p.plateau_us is not None]
    cols = [v for v, _ in VARIANTS if v in table.columns]
    lines = [
        "## Two paths: the saturated runs",
        "",
        "Cycle = max(GPU path, CPU path): the GPU path is the model recommended out of sample for the run, the CPU "
        "path a plateau of `schedule()` time while the simulated engine is saturated (running set at "
        "`max_num_seqs`, requests waiting), learned from the other runs' test-split steps (docs/cpu_path.md). "
        "Relative error of each model, per metric:",
        "",
        "| run | metric | observed | " + " | ".join(dict(VARIANTS)[c] for c in cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    for p in saturated:
        for r in table.filter(pl.col("experiment_id") == p.experiment_id).iter_rows(named=True):
            lines.append(
                f"| {short_run_name(p.experiment_id)} | {METRIC_NAMES.get(r['metric'], r['metric'])} | "
                f"{r['observed']:.4g} | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |"
            )
    lines += ["", "CPU path per saturated run (µs while saturated; what set it), and the run's own plateau:", ""]
    lines += ["| run | CPU path µs | own plateau µs (not used) | set by |", "|---|---|---|---|"]
    for p in saturated:
        cpu = cpu_paths.get(p.experiment_id)
        if cpu is not None:
            lines.append(
                f"| {short_run_name(p.experiment_id)} | {cpu[0].plateau_us:.0f} | {p.plateau_us:.0f} | {cpu[0].basis} |"
            )
    lines += _transfer_lines(transfers)
    lines += ["", _calm_runs_line(table, {p.experiment_id for p in saturated}), ""]
    for eid, path in sorted(plots.items()):
        rel = Path(path).relative_to(out_dir) if out_dir is not None else Path(path).name
        lines.append(f"![queue over time, {short_run_name(eid)}]({rel})")
    return "\n".join(lines) + "\n"


def _calm_runs_line(table, saturated: set[str]) -> str:
    """The largest change in |error| of mean TTFT / E2E, two paths vs GPU path only, over the other runs."""
    import polars as pl

    calm = table.filter(
        ~pl.col("experiment_id").is_in(sorted(saturated))
        & pl.col("metric").is_in(["ttft_mean", "e2e_mean"])
        & pl.col("gpu_path").is_not_null()
    )
    if not calm.height:
        return "No other run was scored."
    d = (calm["two_path"].abs() - calm["gpu_path"].abs()).max()
    return (
        f"The {calm['experiment_id'].n_unique()} other scored runs: the largest increase of |error| of mean TTFT or "
        f"E2E with two paths is {d:+.2f} points (the goal: no more than +0.5)."
    )


def _transfer_lines(transfers) -> list[str]:
    """Each scaling's transferred plateau against each model's own, relative error (the rule's choice in bold)."""
    if transfers is None or not len(transfers):
        return []
    models = sorted(set(transfers["llm_model"]))
    out = [
        "",
        "Transfer of the plateau across LLM models, per declared scaling (relative error against the model's own "
        "plateau; **bold**: the scaling the leave-one-model-out rule chose without the model):",
        "",
        "| scaling | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for s in dict.fromkeys(transfers["scaling"]):
        cells = []
        for m in models:
            r = transfers.filter((transfers["llm_model"] == m) & (transfers["scaling"] == s)).row(0, named=True)
            v = f"{r['rel_err_pct']:+.0f} %"
            cells.append(f"**{v}**" if r["chosen"] else v)
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    return out
