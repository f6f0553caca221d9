"""Statistics for comparing step-time models on time-ordered test rows (numpy / scipy only).

* Circular block bootstrap of a mean (Politis & Romano 1992): blocks of b = round(√n) consecutive
  rows, block starts drawn uniformly from all n rows and wrapping from the last row to the first,
  so every row is drawn equally often and the bootstrap mean is centred on the sample mean
  (E*[x̄*] = x̄). A moving-block bootstrap that draws starts from [0, n − b] only draws the
  first and last rows ~b times less often than the middle ones.
* One-sided Wilcoxon signed-rank test across experiments: with n non-zero paired differences its
  smallest attainable exact p is 0.5ⁿ (all differences on one side), so below
  WILCOXON_MIN_N = 5 experiments it cannot reach p < 0.05 and its p-value is not evidence.
* Noise of a difference of mean errors: a 95 % percentile interval of the bootstrap means; a
  difference is "within noise" when that interval contains 0.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as _st

ALPHA_TEST = 0.05
BOOT_REPS = 1000


def wilcoxon_min_p(n: int) -> float:
    """Smallest exact one-sided p of a signed-rank test on n non-zero differences: 0.5ⁿ."""
    return 0.5**n if n > 0 else 1.0


def wilcoxon_min_n(alpha: float = ALPHA_TEST) -> int:
    """Fewest differences with which a one-sided signed-rank test can reach p < alpha (5 for 0.05)."""
    return max(1, math.floor(math.log(alpha) / math.log(0.5)) + 1)


WILCOXON_MIN_N = wilcoxon_min_n()


def wilcoxon_one_sided(diffs, alternative: str = "less", alpha: float = ALPHA_TEST) -> dict:
    """{"n", "min_p", "reachable", "p"}: p of the one-sided signed-rank test, None when n < WILCOXON_MIN_N
    (the test could not reach p < alpha whatever the data) or when every difference is 0."""
    d = np.asarray(diffs, float)
    d = d[np.isfinite(d)]
    n = int(np.count_nonzero(d))
    reachable = wilcoxon_min_p(n) < alpha
    p = float(_st.wilcoxon(d, alternative=alternative).pvalue) if reachable else None
    return {"n": n, "min_p": wilcoxon_min_p(n), "reachable": bool(reachable), "p": p}


def block_length(n: int) -> int:
    """Block length of the bootstrap: round(√n), at least 1."""
    return max(1, int(round(math.sqrt(n))))


def circular_block_indices(n: int, reps: int, seed: int, block: int | None = None) -> np.ndarray:
    """(reps, n) row indices of circular block bootstrap resamples of n time-ordered rows."""
    b = block or block_length(n)
    k = -(-n // b)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n, size=(reps, k))
    return ((starts[:, :, None] + np.arange(b)[None, None, :]) % n).reshape(reps, k * b)[:, :n]


def bootstrap_means(
    x, reps: int = BOOT_REPS, seed: int = 0, block: int | None = None, idx: np.ndarray | None = None
) -> np.ndarray:
    """Means of circular block bootstrap resamples of x (or of the given resample indices)."""
    x = np.asarray(x, float)
    if len(x) == 0:
        return np.full(reps if idx is None else idx.shape[0], np.nan)
    if idx is None:
        idx = circular_block_indices(len(x), reps, seed, block)
    return x[idx].mean(axis=1)


def percentile_ci(means: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    m = np.asarray(means, float)
    m = m[np.isfinite(m)]
    if len(m) == 0:
        return float("nan"), float("nan")
    q = 100 * (1 - level) / 2
    return float(np.percentile(m, q)), float(np.percentile(m, 100 - q))


def within_noise(ci95) -> bool:
    """True when a difference's 95 % interval contains 0 (or is undefined)."""
    lo, hi = ci95
    return not (lo > 0 or hi < 0)


def combined_mean_ci(means: list[float], ses: list[float]) -> dict:
    """Mean over experiments of per-experiment means, with a normal 95 % interval from their bootstrap
    standard errors (experiments resampled independently): se = √Σ se_e² / k."""
    m = np.asarray(means, float)
    s = np.asarray(ses, float)
    ok = np.isfinite(m)
    if not ok.any():
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "se": float("nan"), "k": 0}
    k = int(ok.sum())
    mean = float(m[ok].mean())
    se = float(np.sqrt(np.nansum(s[ok] ** 2)) / k) if np.isfinite(s[ok]).any() else float("nan")
    return {"mean": mean, "ci95": [mean - 1.96 * se, mean + 1.96 * se], "se": se, "k": k}
