"""How far the coverage of the 90 % intervals can be read (docs/calibration.md, *Uncertainty*): per regime, with the
binomial uncertainty of k/n, and the intervals that carry no evidence counted apart.

A coverage of k out of n predictions is reported with its exact (Clopper–Pearson) two-sided 95 % interval on the
coverage probability. The predictions of one study are not independent (each widened interval reads the other runs'
scores), so that interval is if anything too narrow: it says at least how little k/n can show.

Which interval counts as evidence (``interval_kind``; the rule reads the interval and its prediction, never the
observed value):

* ``unbounded`` — q = ∞ (fewer scores than the conformal rank needs): it contains every value;
* ``point`` — the model-based interval has zero width (≤ 1e-9·|ŷ|): every model variant replayed gives the same
  value, e.g. ``successes`` = every request of a run all replays serve in full. The quantity is known without the
  model's uncertainty, and "inside" says nothing about the interval. For the widened interval the model-based part
  is its bootstrap interval: widening a point by q % of it (``successes`` ± 10 %) is still a point's interval;
* ``wide`` — hi − lo ≥ ``WIDE_PCT`` % of |ŷ|: an interval at least as wide as the prediction itself (e.g. [0.5·ŷ,
  1.5·ŷ] or wider) cannot tell the prediction from half or one and a half times it: it carries little;
* ``informative`` — the rest.

Coverage is computed over the bounded intervals that are not points (``counted``: informative + wide) and, apart,
over the informative ones. Beside it, the coverage the widening gives *by construction*: with n eligible scores the
widened interval of a run misses only if its excess exceeds the ⌈(n + 1)·level⌉-th smallest of them — the largest
for n = 9 … 18 — so on exchangeable runs P(inside) = ⌈(n + 1)·level⌉/(n + 1) (n/(n + 1) there: 90–95 %) whatever
the model's errors are. A widened coverage equal to that figure is what the method yields, not a check of it.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

COVERAGE_CONF = 0.95  # the binomial interval on k/n
WIDE_PCT = 100.0  # an interval at least this wide (% of |prediction|) carries little
ZERO_REL = 1e-9  # relative width below which an interval is a point
KINDS = ("informative", "wide", "point", "unbounded")
REGIMES = ("non-saturated", "saturated")


def clopper_pearson(k: int, n: int, conf: float = COVERAGE_CONF) -> tuple[float, float]:
    """Exact two-sided ``conf`` interval on a binomial proportion from k successes in n trials (NaN, NaN for n = 0)."""
    from scipy.stats import beta

    if n <= 0:
        return math.nan, math.nan
    a = (1.0 - conf) / 2.0
    lo = 0.0 if k <= 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k >= n else float(beta.ppf(1.0 - a, k + 1, n - k))
    return lo, hi


def construction_coverage(n, level: float) -> np.ndarray:
    """P(inside) of a split-conformal interval on exchangeable scores with n eligible scores: ⌈(n + 1)·level⌉/(n + 1)
    (NaN where that rank exceeds n: the interval is unbounded)."""
    n = np.asarray(n, dtype=np.float64)
    k = np.ceil((n + 1) * level - 1e-9)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(k <= n, k / (n + 1), np.nan)


def interval_kind(lo, hi, predicted, q=None, base_lo=None, base_hi=None) -> np.ndarray:
    """Per interval: 'unbounded', 'point', 'wide' or 'informative' (module docstring). ``q``: the widening term
    (∞ → unbounded), None for an interval without one; base_lo, base_hi: its model-based part (the bootstrap interval
    of a widened one; default the interval itself), a point where that has zero width."""
    lo, hi, p = (np.asarray(a, dtype=np.float64) for a in (lo, hi, predicted))
    blo = lo if base_lo is None else np.asarray(base_lo, dtype=np.float64)
    bhi = hi if base_hi is None else np.asarray(base_hi, dtype=np.float64)
    unb = ~np.isfinite(hi) | ~np.isfinite(lo)
    if q is not None:
        unb |= ~np.isfinite(np.asarray(q, dtype=np.float64))
    with np.errstate(invalid="ignore"):
        point = bhi - blo <= ZERO_REL * np.abs(p)
        wide = hi - lo >= WIDE_PCT / 100.0 * np.abs(p)
    return np.where(unb, "unbounded", np.where(point, "point", np.where(wide, "wide", "informative")))


def with_kinds(x: pl.DataFrame, level: float) -> pl.DataFrame:
    if "boot_lo" not in x.columns:  # intervals written before the widening: the bootstrap only
        x = x.with_columns(
            boot_lo=pl.col("lo"),
            boot_hi=pl.col("hi"),
            boot_inside=pl.col("inside"),
            extrap_q_pct=pl.lit(math.inf),
            extrap_n=pl.lit(0, pl.Int64),
            extrap_pool=pl.lit(""),
        )
    if "brun_lo" not in x.columns:  # intervals written before the between-run term
        x = x.with_columns(
            brun_lo=pl.lit(None, pl.Float64), brun_hi=pl.lit(None, pl.Float64), brun_inside=pl.lit(None, pl.Boolean)
        )
    col = lambda c: x[c].cast(pl.Float64).fill_null(np.nan).to_numpy()  # noqa: E731
    return x.with_columns(
        boot_kind=pl.Series(interval_kind(col("boot_lo"), col("boot_hi"), col("predicted"))),
        brun_kind=pl.Series(interval_kind(col("brun_lo"), col("brun_hi"), col("predicted"))),
        kind=pl.Series(
            interval_kind(col("lo"), col("hi"), col("predicted"), col("extrap_q_pct"), col("boot_lo"), col("boot_hi"))
        ),
        by_construction=pl.Series(construction_coverage(x["extrap_n"].fill_null(0).to_numpy(), level)).fill_nan(None),
    )


def _summary(g: pl.DataFrame, conf: float) -> dict:
    """One regime's row: counts by kind, coverage k/n with its binomial interval, bootstrap and widened."""
    out: dict = {"predictions": g.height}
    for pre, kind, inside, lo, hi in (
        ("boot_", "boot_kind", "boot_inside", "boot_lo", "boot_hi"),
        ("brun_", "brun_kind", "brun_inside", "brun_lo", "brun_hi"),
        ("", "kind", "inside", "lo", "hi"),
    ):
        k = g[kind]
        for name in KINDS:
            out[f"{pre}{name.replace(' ', '_')}"] = int((k == name).sum())
        counted = g.filter(pl.col(kind).is_in(["informative", "wide"]))
        info = counted.filter(pl.col(kind) == "informative")
        n, n_in = counted.height, int(counted[inside].fill_null(False).sum()) if counted.height else 0
        c_lo, c_hi = clopper_pearson(n_in, n, conf)
        out |= {
            f"{pre}counted": n,
            f"{pre}inside": n_in,
            f"{pre}coverage_pct": 100.0 * n_in / n if n else None,
            f"{pre}cp_lo_pct": 100.0 * c_lo if n else None,
            f"{pre}cp_hi_pct": 100.0 * c_hi if n else None,
            f"{pre}informative_inside": int(info[inside].fill_null(False).sum()) if info.height else 0,
            f"{pre}median_width_pct": (
                float(((counted[hi] - counted[lo]) / counted["predicted"].abs() * 100).median()) if n else None
            ),
        }
    bc = g.filter(pl.col("kind").is_in(["informative", "wide"]))["by_construction"].drop_nulls()
    out |= {
        "by_construction_pct": 100.0 * float(bc.mean()) if bc.len() else None,
        "median_q_pct": float(g["extrap_q_pct"].median()) if g.height else None,
        "scores_min": int(g["extrap_n"].min()) if g.height else 0,
        "scores_max": int(g["extrap_n"].max()) if g.height else 0,
        "pool": ", ".join(sorted(set(g["extrap_pool"].fill_null("").to_list()) - {""})),
    }
    return out


def coverage_table(
    ivs: pl.DataFrame,
    saturated: dict[str, bool] | None,
    metrics,
    *,
    level: float = 0.90,
    conf: float = COVERAGE_CONF,
) -> pl.DataFrame:
    """Per protocol × metric × regime (non-saturated / saturated as observed — a label of the scored run for the
    report, never an input of its interval; 'all' = both): predictions with an observed value, counts by kind,
    coverage k/n of the counted intervals with its Clopper–Pearson interval, bootstrap and widened, the widened
    coverage by construction, median widths and widening term."""
    if ivs.height == 0:
        return pl.DataFrame()
    x = ivs.filter(pl.col("inside").is_not_null() & pl.col("metric").is_in(list(metrics)))
    if x.height == 0:
        return pl.DataFrame()
    sat = saturated or {}
    x = with_kinds(x, level).with_columns(
        regime=pl.col("experiment_id").replace_strict(
            {e: REGIMES[int(bool(s))] for e, s in sat.items()}, default="unknown"
        ),
    )
    out = []
    for (proto, metric), g in x.group_by("protocol", "metric", maintain_order=True):
        for reg in (*REGIMES, "unknown", "all"):
            h = g if reg == "all" else g.filter(pl.col("regime") == reg)
            if h.height and not (reg == "all" and h["regime"].n_unique() == 1):
                out.append({"protocol": proto, "metric": metric, "regime": reg, **_summary(h, conf)})
    order = {m: i for i, m in enumerate(metrics)}
    return (
        pl.DataFrame(out, infer_schema_length=None)
        .with_columns(_o=pl.col("metric").replace_strict(order, default=len(order)))
        .sort("protocol", "_o", "regime")
        .drop("_o")
    )


def coverage_cell(k, n, lo_pct, hi_pct) -> str:
    """'k/n = c % [lo, hi]' (the binomial interval), '–' without counted intervals."""
    if not n:
        return "–"
    return f"{k}/{n} = {100.0 * k / n:.0f} % [{lo_pct:.0f}, {hi_pct:.0f}]"


def not_counted_cell(r: dict, pre: str = "") -> str:
    """The intervals left out of k/n and the wide ones inside it: 'point z, unbounded u, wide w'."""
    keys = (("point", "point"), ("unbounded", "unbounded"), ("wide", "wide"))
    return ", ".join(f"{name} {r[pre + k]}" for name, k in keys if r[pre + k]) or "–"


def interval_cell(r: dict, pre: str = "") -> str:
    """One interval's cell: 'k/n = c % [lo, hi]; width w %; point z, unbounded u, wide v'."""
    w = r[f"{pre}median_width_pct"]
    nc = not_counted_cell(r, pre)
    return (
        coverage_cell(r[f"{pre}inside"], r[f"{pre}counted"], r[f"{pre}cp_lo_pct"], r[f"{pre}cp_hi_pct"])
        + ("" if w is None else f"; width {w:.0f} %")
        + ("" if nc == "–" else f"; {nc}")
    )
