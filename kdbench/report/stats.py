"""Summary statistics across seeds: mean, sample standard deviation, paired differences with t-intervals.

The t quantile is computed exactly for integer degrees of freedom from the closed-form
Student t distribution function (Abramowitz & Stegun 26.7.3-4) and bisection, so the
report needs no SciPy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation (``ddof=1``; NaN when ``n < 2``) of ``n`` values."""

    mean: float
    std: float
    n: int


@dataclass(frozen=True)
class Difference:
    """Mean of paired differences and its two-sided t-interval (NaN bounds when ``n < 2``)."""

    mean: float
    low: float
    high: float
    n: int


def summarize(values: list[float]) -> Summary:
    """Mean and sample standard deviation; NaN for both when ``values`` is empty."""
    n = len(values)
    if n == 0:
        return Summary(math.nan, math.nan, 0)
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return Summary(mean, std, n)


def t_two_sided_probability(t: float, df: int) -> float:
    """``P(|T| < t)`` for Student's t with ``df`` (a positive integer) degrees of freedom."""
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:
        term, total = math.cos(theta), 0.0
        for k in range(1, (df - 1) // 2 + 1):  # cos, 2/3 cos^3, (2*4)/(3*5) cos^5, ...
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + s * total)
    term, total = 1.0, 0.0
    for k in range(1, df // 2 + 1):  # 1, 1/2 cos^2, (1*3)/(2*4) cos^4, ...
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return s * total


def t_quantile(confidence: float, df: int) -> float:
    """The ``t`` with ``P(|T| < t) = confidence`` (e.g. 12.706 for 0.95 and ``df = 1``)."""
    low, high = 0.0, 1.0
    while t_two_sided_probability(high, df) < confidence:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if t_two_sided_probability(mid, df) < confidence:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def paired_difference(values: dict[int, float], reference: dict[int, float], confidence: float = CONFIDENCE) -> Difference:
    """``values - reference`` paired by seed (seeds in both only), with a t-interval over the pairs."""
    diffs = [values[seed] - reference[seed] for seed in sorted(values.keys() & reference.keys())]
    s = summarize(diffs)
    if s.n < 2:
        return Difference(s.mean, math.nan, math.nan, s.n)
    half = t_quantile(confidence, s.n - 1) * s.std / math.sqrt(s.n)
    return Difference(s.mean, s.mean - half, s.mean + half, s.n)
