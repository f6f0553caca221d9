"""The what-if figure: TTFT, E2E and inter-token latency percentiles (with the decode time per token) and throughput against the swept value, one
line per (TP, max_num_seqs, max_num_batched_tokens), the interval (lo–hi) as a band."""

from __future__ import annotations

from pathlib import Path

import polars as pl

SWEPT = ("rate_rps", "max_num_seqs", "max_num_batched_tokens", "tp")  # the columns a sweep may vary
PANELS = (
    ("TTFT (s)", ("ttft_p50", "ttft_p90", "ttft_p99")),
    ("E2E (s)", ("e2e_p50", "e2e_p90", "e2e_p99")),
    ("inter-token latency (s)", ("itl_p50", "itl_p90", "itl_p99", "decode_time_per_token_mean")),
    ("throughput (req/s)", ("throughput_rps",)),
)


def swept_axis(table: pl.DataFrame) -> str:
    """The column with the most distinct values among rate, max_num_seqs, max_num_batched_tokens, tp (rate on a tie)."""
    cols = SWEPT
    return max(cols, key=lambda c: (table[c].n_unique(), c == "rate_rps"))


def figure_whatif(table: pl.DataFrame, title: str = "", saturation: list[dict] | None = None):
    """A 2 × 2 figure of PANELS against the swept value; a dotted vertical line at each predicted saturation rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = swept_axis(table)
    others = [c for c in SWEPT if c != x]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), dpi=110)
    for ax, (ylabel, metrics) in zip(axes.flat, PANELS):
        for gi, (key, g) in enumerate(table.group_by(others, maintain_order=True)):
            label_of = ", ".join(f"{c} {v:g}" for c, v in zip(others, key))
            for mi, m in enumerate(metrics):
                s = g.filter(pl.col("metric") == m).sort(x)
                colour = f"C{(gi * len(metrics) + mi) % 10}"
                ax.plot(s[x], s["predicted"], marker="o", ms=3, color=colour, label=f"{m} ({label_of})")
                ax.fill_between(s[x], s["lo"], s["hi"], color=colour, alpha=0.2, linewidth=0)
        if x == "rate_rps":
            for i, row in enumerate(saturation or []):
                if row.get("saturation_rate_rps") is not None:
                    ax.axvline(
                        row["saturation_rate_rps"],
                        color="grey",
                        ls=":",
                        lw=1,
                        label="saturated from" if i == 0 else None,
                    )
        if "(s)" in ylabel:
            ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(title or "what if", fontsize=10)
    fig.tight_layout()
    return fig


def plot_whatif(table: pl.DataFrame, path: Path, title: str = "", saturation: list[dict] | None = None) -> Path:
    import matplotlib.pyplot as plt

    fig = figure_whatif(table, title, saturation)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
