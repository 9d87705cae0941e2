"""Statistics of a method against the baseline student, with both sources of noise: seeds and test images.

- :func:`summarize`: mean and sample standard deviation over seeds.
- :func:`paired_difference`: mean difference paired by seed with a Student-t interval over the seeds
  (``scipy.stats.t``); it sees seed-to-seed noise only, so the report keeps it in the CSV beside
- :func:`bootstrap_difference`: the paired two-way bootstrap interval over seeds *and* test images, the
  interval the report shows and judges by;
- :func:`mcnemar_exact`: the exact McNemar test of two classifiers on the same test images (one seed), a
  two-sided binomial test of the discordant pairs (``scipy.stats.binomtest``).

A difference is called a gain (or a loss) only when its bootstrap interval excludes 0 (:func:`verdict`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 4000
BOOTSTRAP_SEED = 0  # fixed: rebuilding a report gives the same intervals
_CHUNK = 250  # resamples drawn at once (memory: CHUNK x test images counts)


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation (``ddof=1``; NaN when ``n < 2``) of ``n`` values."""

    mean: float
    std: float
    n: int


@dataclass(frozen=True)
class Difference:
    """Mean of paired differences and its two-sided interval (NaN bounds where none can be given); ``n`` pairs."""

    mean: float
    low: float
    high: float
    n: int


def summarize(values: list[float]) -> Summary:
    """Mean and sample standard deviation; NaN for both when ``values`` is empty."""
    n = len(values)
    if n == 0:
        return Summary(math.nan, math.nan, 0)
    array = np.asarray(values, dtype=float)
    return Summary(float(array.mean()), float(array.std(ddof=1)) if n > 1 else math.nan, n)


def paired_difference(values: Mapping[int, float], reference: Mapping[int, float], confidence: float = CONFIDENCE) -> Difference:
    """``values - reference`` paired by seed (seeds in both only), with a Student-t interval over the pairs."""
    diffs = [values[seed] - reference[seed] for seed in sorted(values.keys() & reference.keys())]
    s = summarize(diffs)
    if s.n < 2:
        return Difference(s.mean, math.nan, math.nan, s.n)
    half = float(stats.t.ppf(0.5 + confidence / 2, s.n - 1)) * s.std / math.sqrt(s.n)
    return Difference(s.mean, s.mean - half, s.mean + half, s.n)


def bootstrap_difference(
    correct: Mapping[int, np.ndarray],
    reference: Mapping[int, np.ndarray],
    confidence: float = CONFIDENCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> Difference:
    """Accuracy difference in percentage points, ``correct - reference``, with a paired two-way bootstrap interval.

    ``correct[seed]`` and ``reference[seed]`` are boolean vectors over the same test images (seeds in both are
    paired).  With ``D[s, i] = correct[s][i] - reference[s][i]`` the statistic is the mean of ``D``.  Each
    resample draws the seeds with replacement and, independently, the test images with replacement; the
    images drawn are shared by every seed, because every seed is evaluated on the same test split (the
    split's sampling noise is common to all of them and does not average out over seeds).  The interval
    is the percentile interval of ``resamples`` resamples, seeded for a reproducible report.  With one
    seed it is the ordinary paired percentile bootstrap over test images (``scipy.stats.bootstrap``
    resamples one axis only, hence the two-way resampling here).
    """
    seeds = sorted(correct.keys() & reference.keys())
    if not seeds:
        return Difference(math.nan, math.nan, math.nan, 0)
    d = np.stack([np.asarray(correct[s], dtype=float) - np.asarray(reference[s], dtype=float) for s in seeds])
    n_seeds, n_images = d.shape
    mean = 100 * float(d.mean())
    if n_images == 0:
        return Difference(math.nan, math.nan, math.nan, n_seeds)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    replicates = []
    for lo in range(0, resamples, _CHUNK):
        b = min(_CHUNK, resamples - lo)
        counts = rng.multinomial(n_images, np.full(n_images, 1 / n_images), size=b)  # [b, images]
        per_seed = counts @ d.T / n_images  # [b, seeds]: each seed's mean difference on the drawn images
        drawn = rng.integers(0, n_seeds, size=(b, n_seeds))
        replicates.append(np.take_along_axis(per_seed, drawn, axis=1).mean(axis=1))
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(100 * np.concatenate(replicates), [tail, 100 - tail])
    return Difference(mean, float(low), float(high), n_seeds)


def mcnemar_exact(correct: np.ndarray, reference: np.ndarray) -> float:
    """Two-sided exact McNemar p-value of two classifiers on the same test images.

    Of the discordant images, ``b`` are right for ``reference`` only and ``c`` for ``correct`` only; under
    the null hypothesis of equal accuracy ``c ~ Binomial(b + c, 1/2)``.  ``p = 1`` without discordant images.
    """
    correct, reference = np.asarray(correct, dtype=bool), np.asarray(reference, dtype=bool)
    b = int((reference & ~correct).sum())
    c = int((correct & ~reference).sum())
    if b + c == 0:
        return 1.0
    return float(stats.binomtest(c, b + c, 0.5).pvalue)


def verdict(diff: Difference) -> str:
    """``gain`` or ``loss`` when the interval excludes 0, ``no significant difference`` otherwise (or without one)."""
    if math.isnan(diff.low) or math.isnan(diff.high):
        return "no interval"
    if diff.low > 0:
        return "gain"
    if diff.high < 0:
        return "loss"
    return "no significant difference"
