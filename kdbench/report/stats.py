"""Statistics of a method against the baseline student, with both sources of noise: seeds and test images.

- :func:`summarize`: mean and sample standard deviation over seeds.
- :func:`paired_difference`: mean difference paired by seed with a Student-t interval over the seeds
  (``scipy.stats.t``); it sees seed-to-seed noise only, so the report keeps it in the CSV beside
- :func:`bootstrap_difference`: the paired two-way bootstrap interval over seeds *and* test images, the
  interval the report shows and judges by;
- :func:`mcnemar_exact`: the exact McNemar test of two classifiers on the same test images (one seed), a
  two-sided binomial test of the discordant pairs (``scipy.stats.binomtest``);
- :func:`holm`: Holm's adjustment of a table's family of p-values (``statsmodels``);
- :func:`disagreement`: where the bootstrap verdict and the per-seed McNemar tests disagree (a borderline case).

A difference is called a gain (or a loss) only when its bootstrap interval excludes 0, its (Holm-adjusted)
p-value is below 0.05 and at least :data:`MIN_SEEDS` seeds are paired (:func:`verdict`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 100_000  # Monte-Carlo resamples, only beyond EXACT_MAX_SEEDS seeds
BOOTSTRAP_SEED = 0  # fixed: rebuilding a report gives the same intervals
EXACT_MAX_SEEDS = 6  # up to this many seeds the bootstrap distribution is computed exactly (462 seed draws at 6)
MIN_SEEDS = 3  # fewer paired seeds: differences and intervals, but no gain/loss verdict
_CDF_TOLERANCE = 1e-9  # floating-point slack of the exact CDF at a quantile
POOLED_DRAWS = 400_000  # draws from each dataset's exact distribution for a pooled difference
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
    p: float = math.nan  # two-sided bootstrap p-value (bootstrap_difference); NaN for other intervals
    exact: bool = False  # the bootstrap distribution computed exactly, not sampled


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
    is the percentile interval of that bootstrap distribution and ``p`` its two-sided p-value,
    ``min(1, 2 min(P(D* <= 0), P(D* >= 0)))``: the interval excludes 0 exactly when ``p < 1 - confidence``.

    Up to :data:`EXACT_MAX_SEEDS` seeds the distribution is computed exactly, not sampled
    (:func:`_exact_distribution`), so no endpoint carries Monte-Carlo error and a verdict can never be
    decided by resampling noise.  Beyond that, ``resamples`` seeded resamples estimate it (``exact`` False).
    With one seed it is the ordinary paired percentile bootstrap over test images (``scipy.stats.bootstrap``
    resamples one axis only, hence the two-way resampling here).
    """
    seeds = sorted(correct.keys() & reference.keys())
    if not seeds:
        return Difference(math.nan, math.nan, math.nan, 0)
    d = np.stack([np.asarray(correct[s], dtype=float) - np.asarray(reference[s], dtype=float) for s in seeds])
    n_seeds, n_images = d.shape
    if n_images == 0:
        return Difference(math.nan, math.nan, math.nan, n_seeds)
    values, pmf = _distribution(d, resamples)
    return _from_distribution(100 * float(d.mean()), values, pmf, n_seeds, confidence, exact=pmf is not None)


def _distribution(d: np.ndarray, resamples: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The bootstrap distribution of ``100 * mean(D*)``: exact (values, probabilities), or sampled (replicates, None)."""
    if d.shape[0] <= EXACT_MAX_SEEDS and np.array_equal(d, np.round(d)):
        return _exact_distribution(d.astype(np.int64))
    return _sampled_distribution(d, resamples), None


def _from_distribution(
    mean: float, values: np.ndarray, pmf: np.ndarray | None, n: int, confidence: float, exact: bool
) -> Difference:
    """The percentile interval and two-sided p-value of a bootstrap distribution (``pmf`` None: equally likely values)."""
    tail = (1 - confidence) / 2
    if pmf is None:
        values, pmf = np.unique(values, return_counts=True)
        pmf = pmf / pmf.sum()
    cdf = np.cumsum(pmf)
    low, high = (float(values[np.searchsorted(cdf, q - _CDF_TOLERANCE)]) for q in (tail, 1 - tail))
    below = float(pmf[values <= 0].sum())
    above = float(pmf[values >= 0].sum())
    return Difference(mean, low, high, n, p=min(1.0, 2 * min(below, above)), exact=exact)


def pooled_difference(
    pairs: list[tuple[Mapping[int, np.ndarray], Mapping[int, np.ndarray]]], confidence: float = CONFIDENCE
) -> Difference:
    """The mean over datasets of :func:`bootstrap_difference`'s statistic, with its interval: each dataset resampled
    on its own (its seeds and test images), the datasets weighted equally.

    ``pairs`` holds one ``(correct, reference)`` per dataset.  Each dataset's bootstrap distribution is computed
    exactly; the pooled one, the distribution of their mean, is estimated from :data:`POOLED_DRAWS` seeded draws
    of each (the endpoints' Monte-Carlo error is ~0.01 pp).  ``n`` is the fewest seeds paired on any dataset.
    """
    if not pairs:
        return Difference(math.nan, math.nan, math.nan, 0)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means, draws, seeds = [], [], []
    for correct, reference in pairs:
        shared = sorted(correct.keys() & reference.keys())
        if not shared:
            return Difference(math.nan, math.nan, math.nan, 0)
        d = np.stack([np.asarray(correct[s], dtype=float) - np.asarray(reference[s], dtype=float) for s in shared])
        values, pmf = _distribution(d, BOOTSTRAP_RESAMPLES)
        draws.append(rng.choice(values, size=POOLED_DRAWS, p=pmf))
        means.append(100 * float(d.mean()))
        seeds.append(len(shared))
    pooled = np.mean(draws, axis=0)
    return _from_distribution(float(np.mean(means)), pooled, None, min(seeds), confidence, exact=False)


def _exact_distribution(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact two-way bootstrap distribution of ``100 * mean(D*)`` for integer ``D`` ``[seeds, images]`` in
    ``[-m, m]`` (``m`` = 1 for correctness differences, 2 for differences of two such differences).

    A resample is a draw ``w`` of the ``S`` seeds with replacement (``w_s`` copies of seed ``s``; probability
    ``S! / prod(w_s!) / S^S``) and an independent draw of the ``n`` images with replacement, shared by the seeds.
    Given ``w``, the statistic is ``100 * sum_i v_i / (S n)`` over the drawn images, with the integer
    ``v_i = sum_s w_s D[s, i]`` in ``[-m S, m S]``: a sum of ``n`` independent draws from the empirical distribution
    of ``v``, whose distribution is that distribution's ``n``-fold convolution (one FFT, raised to the ``n``-th
    power, transformed back).  The mixture over the ``C(2S - 1, S)`` seed draws is exact up to floating-point
    rounding (~1e-15), on the lattice ``100 k / (S n)``.  Non-integer ``D`` is sampled instead.  Returns
    (values, probabilities), values ascending.
    """
    n_seeds, n_images = d.shape
    span = max(1, int(np.abs(d).max())) * n_seeds  # |v_i| <= span
    size = 2 * span * n_images + 1  # k = -span n .. span n
    fft_size = int(2 ** math.ceil(math.log2(size)))
    pmf = np.zeros(size)
    for drawn in itertools.combinations_with_replacement(range(n_seeds), n_seeds):
        w = np.bincount(drawn, minlength=n_seeds)
        weight = math.factorial(n_seeds) / math.prod(math.factorial(int(c)) for c in w) / n_seeds**n_seeds
        v = w @ d  # [images], integers in [-S, S]
        one = np.bincount(v + span, minlength=2 * span + 1) / n_images  # one image's value distribution
        pmf += weight * np.fft.irfft(np.fft.rfft(one, fft_size) ** n_images, fft_size)[:size]
    pmf = np.clip(pmf, 0.0, None)
    values = 100 * np.arange(-span * n_images, span * n_images + 1) / (n_seeds * n_images)
    return values, pmf / pmf.sum()


def _sampled_distribution(d: np.ndarray, resamples: int) -> np.ndarray:
    """``resamples`` seeded Monte-Carlo replicates of the two-way bootstrap of :func:`_exact_distribution`, in pp."""
    n_seeds, n_images = d.shape
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    replicates = []
    for lo in range(0, resamples, _CHUNK):
        b = min(_CHUNK, resamples - lo)
        counts = rng.multinomial(n_images, np.full(n_images, 1 / n_images), size=b)  # [b, images]
        per_seed = counts @ d.T / n_images  # [b, seeds]: each seed's mean difference on the drawn images
        drawn = rng.integers(0, n_seeds, size=(b, n_seeds))
        replicates.append(np.take_along_axis(per_seed, drawn, axis=1).mean(axis=1))
    return 100 * np.concatenate(replicates)


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


def verdict(diff: Difference, p_adjusted: float | None = None) -> str:
    """``gain`` or ``loss`` when the interval excludes 0 and the p-value (``p_adjusted``, e.g. Holm's, where
    given; else the difference's own) is below ``1 - CONFIDENCE``; ``no significant difference`` otherwise.

    No verdict with fewer than :data:`MIN_SEEDS` paired seeds (``too few seeds``): training noise, which such
    a difference cannot measure, can exceed its test-image interval (the same quick sweep on two CPUs has given
    one method a significant loss and no significant difference).  ``no interval`` where none could be computed.
    """
    if diff.n < MIN_SEEDS:
        return "too few seeds"
    if math.isnan(diff.low) or math.isnan(diff.high):
        return "no interval"
    p = diff.p if p_adjusted is None else p_adjusted
    significant = not math.isnan(p) and p < 1 - CONFIDENCE
    if diff.low > 0 and significant:
        return "gain"
    if diff.high < 0 and significant:
        return "loss"
    return "no significant difference"


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (``statsmodels.stats.multitest``); NaN stays NaN."""
    from statsmodels.stats.multitest import multipletests

    known = [i for i, p in enumerate(p_values) if not math.isnan(p)]
    adjusted = [math.nan] * len(p_values)
    if known:
        for i, p in zip(known, multipletests([p_values[i] for i in known], method="holm")[1]):
            adjusted[i] = float(p)
    return adjusted


def disagreement(call: str, mcnemar_p: tuple[float, ...]) -> str:
    """Why a verdict of the bootstrap rule is borderline against the per-seed exact McNemar tests, or ``""``.

    The verdict is the bootstrap's (seeds and test images); McNemar tests each seed's test images alone.  They
    disagree where the bootstrap calls a gain or loss that no seed's McNemar test finds significant, or calls
    no significant difference where every seed's McNemar test is significant.
    """
    alpha = 1 - CONFIDENCE
    if not mcnemar_p:
        return ""
    if call in ("gain", "loss") and all(p >= alpha for p in mcnemar_p):
        return f"a {call} by the bootstrap, but no seed's McNemar test has p < {alpha:g}"
    if call == "no significant difference" and all(p < alpha for p in mcnemar_p):
        return f"no significant difference by the bootstrap, but every seed's McNemar test has p < {alpha:g}"
    return ""
