"""Statistics across seeds: summaries, paired tests chosen by normality, Holm correction."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05


@dataclass
class Summary:
    """Mean, sample sd, 95% t confidence interval and Shapiro-Wilk p of n values."""

    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float
    shapiro_p: float


def summarize(values: list[float]) -> Summary:
    """Summary of finite values (nan sd/CI below 2 values, nan Shapiro below 3 or constant)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Summary(n, mean, math.nan, math.nan, math.nan, math.nan)
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n))
    shapiro = float(stats.shapiro(x).pvalue) if n >= 3 and np.ptp(x) > 0 else math.nan
    return Summary(n, mean, sd, mean - half, mean + half, shapiro)


@dataclass
class Paired:
    """A comparison a - b: paired over the same seeds, or unpaired (see ``test``)."""

    n: int  # seeds (pairs) with a finite value on both sides
    mean_diff: float
    test: str  # "paired t", "wilcoxon", "welch t", "mann-whitney" or "none"
    statistic: float
    p: float
    p_holm: float = math.nan
    n_effective: int = 0  # observations the test used (Wilcoxon drops zero differences)


def paired_test(a: list[float], b: list[float]) -> Paired:
    """Paired t-test when the differences pass Shapiro-Wilk (p > 0.05), else Wilcoxon.

    a, b: values per seed in the same seed order (pairs with a non-finite side are dropped).
    ``n_effective``: the pairs the test used (Wilcoxon drops zero differences).
    """
    pairs = [(x, y) for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
    n = len(pairs)
    if n < 3:
        return Paired(n, math.nan, "none", math.nan, math.nan, n_effective=n)
    d = np.array([x - y for x, y in pairs])
    if np.all(d == 0):
        return Paired(n, 0.0, "none", 0.0, 1.0, n_effective=0)
    normal = np.ptp(d) == 0 or stats.shapiro(d).pvalue > ALPHA
    if normal and np.ptp(d) > 0:
        res = stats.ttest_rel([x for x, _ in pairs], [y for _, y in pairs])
        return Paired(
            n, float(d.mean()), "paired t", float(res.statistic), float(res.pvalue), n_effective=n
        )
    res = stats.wilcoxon(d)
    nonzero = int(np.count_nonzero(d))
    return Paired(
        n, float(d.mean()), "wilcoxon", float(res.statistic), float(res.pvalue), n_effective=nonzero
    )


def unpaired_test(a: list[float], b: list[float]) -> Paired:
    """Welch's t-test when both samples pass Shapiro-Wilk (p > 0.05), else Mann-Whitney U.

    For arms whose seeds share nothing worth pairing. ``n``: the smaller sample size;
    ``n_effective``: both sizes together.
    """
    x = np.array([v for v in a if math.isfinite(v)])
    y = np.array([v for v in b if math.isfinite(v)])
    n = min(len(x), len(y))
    if n < 3:
        return Paired(n, math.nan, "none", math.nan, math.nan, n_effective=len(x) + len(y))
    diff = float(x.mean() - y.mean())
    varies = np.ptp(x) > 0 or np.ptp(y) > 0
    if not varies and diff == 0:
        return Paired(n, 0.0, "none", 0.0, 1.0, n_effective=len(x) + len(y))
    if varies and _normal(x) and _normal(y):
        res = stats.ttest_ind(x, y, equal_var=False)
        test = "welch t"
    else:
        res = stats.mannwhitneyu(x, y, alternative="two-sided")
        test = "mann-whitney"
    return Paired(
        n, diff, test, float(res.statistic), float(res.pvalue), n_effective=len(x) + len(y)
    )


def _normal(x: np.ndarray) -> bool:
    """Shapiro-Wilk does not reject (constant samples count as normal)."""
    return bool(np.ptp(x) == 0 or stats.shapiro(x).pvalue > ALPHA)


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (nan stays nan and is not counted)."""
    idx = [i for i, p in enumerate(pvalues) if math.isfinite(p)]
    m = len(idx)
    order = sorted(idx, key=lambda i: pvalues[i])
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def wilcoxon_floor(n: int) -> float:
    """Smallest two-sided exact Wilcoxon signed-rank p-value possible with n pairs."""
    return min(1.0, 2.0 / 2**n)


def mannwhitney_floor(n1: int, n2: int) -> float:
    """Smallest two-sided exact Mann-Whitney U p-value possible with samples of n1 and n2."""
    return min(1.0, 2.0 / math.comb(n1 + n2, n1)) if n1 and n2 else 1.0
