"""The report's statistics against independent computations: t intervals, bootstrap, McNemar, the gain rule, metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from kdbench.engine.metrics import confusion_matrix, summarize
from kdbench.report.stats import (
    Difference,
    _sampled_distribution,
    bootstrap_difference,
    disagreement,
    holm,
    mcnemar_exact,
    paired_difference,
    verdict,
)


def test_t_interval_uses_the_tabled_quantile():
    """3 pairs: mean ± t(0.975, 2) * sd / sqrt(3), with t(0.975, 2) = 4.302653 from printed tables."""
    d = paired_difference({0: 3.0, 1: 5.0, 2: 4.0}, {0: 1.0, 1: 1.0, 2: 1.0})
    half = 4.302653 * 1.0 / math.sqrt(3)
    assert (d.mean, d.n) == (3.0, 3)
    assert (d.low, d.high) == (pytest.approx(3 - half, abs=1e-5), pytest.approx(3 + half, abs=1e-5))
    assert math.isnan(paired_difference({0: 1.0}, {0: 0.5}).low)


def _pair(n: int, right_a: float, right_b: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random(n) < right_a, rng.random(n) < right_b


def test_one_seed_bootstrap_matches_scipy_percentile_bootstrap_over_images():
    a, b = _pair(600, 0.80, 0.75, seed=1)
    ours = bootstrap_difference({0: a}, {0: b}, resamples=4000)
    diff = 100 * (a.astype(float) - b.astype(float))
    ref = stats.bootstrap((diff,), np.mean, method="percentile", n_resamples=4000, rng=np.random.default_rng(5))
    assert ours.mean == pytest.approx(diff.mean())
    ci = ref.confidence_interval
    assert ours.low == pytest.approx(ci.low, abs=0.4) and ours.high == pytest.approx(ci.high, abs=0.4)


def test_bootstrap_holds_test_set_noise_that_seeds_alone_miss():
    """Three seeds that agree exactly: the t interval over seeds collapses, the bootstrap keeps the image noise."""
    a, b = _pair(200, 0.80, 0.75, seed=2)
    boot = bootstrap_difference(dict.fromkeys(range(3), a), dict.fromkeys(range(3), b))
    t = paired_difference({s: 100 * a.mean() for s in range(3)}, {s: 100 * b.mean() for s in range(3)})
    assert t.high - t.low == pytest.approx(0, abs=1e-9)
    assert boot.high - boot.low > 4  # about 2 x 1.96 x the binomial SE of the paired difference on 200 images
    assert boot.low < boot.mean < boot.high


def test_bootstrap_widens_with_disagreeing_seeds_and_is_reproducible():
    a0, b0 = _pair(1000, 0.80, 0.80, seed=3)
    a1, b1 = _pair(1000, 0.90, 0.80, seed=4)
    one = bootstrap_difference({0: a0}, {0: b0})
    two = bootstrap_difference({0: a0, 1: a1}, {0: b0, 1: b1})
    assert two.high - two.low > one.high - one.low
    assert bootstrap_difference({0: a0, 1: a1}, {0: b0, 1: b1}) == two
    only_shared = bootstrap_difference({0: a0, 1: a1}, {1: b1})
    assert only_shared.n == 1 and only_shared.mean == pytest.approx(100 * (a1.mean() - b1.mean()))


def test_identical_classifiers_have_a_zero_interval_and_mcnemar_p_of_one():
    a, _ = _pair(100, 0.7, 0.7, seed=5)
    d = bootstrap_difference(dict.fromkeys(range(3), a), dict.fromkeys(range(3), a.copy()))
    assert (d.mean, d.low, d.high, d.p) == (0.0, 0.0, 0.0, 1.0)
    assert verdict(d) == "no significant difference"
    assert mcnemar_exact(a, a) == 1.0


def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_images():
    # 9 images only the method gets right, 1 only the reference: p = 2 * P(X >= 9 | n=10, 1/2) = 22/1024
    reference = np.array([True] * 50 + [False] * 9 + [True] + [False] * 40)
    method = np.array([True] * 50 + [True] * 9 + [False] + [False] * 40)
    assert mcnemar_exact(method, reference) == pytest.approx(22 / 1024)
    assert mcnemar_exact(reference, method) == pytest.approx(22 / 1024)


def test_gain_only_when_the_interval_excludes_zero_the_adjusted_p_is_small_and_three_seeds_are_paired():
    assert verdict(Difference(2.0, 0.5, 3.5, 3, p=0.01)) == "gain"
    assert verdict(Difference(-2.0, -3.5, -0.5, 3, p=0.01)) == "loss"
    assert verdict(Difference(2.0, 0.5, 3.5, 3, p=0.01), p_adjusted=0.06) == "no significant difference"  # Holm
    assert verdict(Difference(5.83, -0.1, 11.0, 3, p=0.06)) == "no significant difference"
    assert verdict(Difference(1.0, math.nan, math.nan, 3)) == "no interval"
    # one or two seeds: the interval is shown, but no verdict, however far it is from 0
    assert verdict(Difference(9.0, 5.0, 13.0, 2, p=1e-6)) == verdict(Difference(9.0, 5.0, 13.0, 1, p=1e-6)) == "too few seeds"


def _brute_force(d: np.ndarray) -> dict[float, float]:
    """The two-way bootstrap distribution by enumerating every draw of seeds and of images (tiny ``d`` only)."""
    import itertools

    n_seeds, n_images = d.shape
    dist: dict[float, float] = {}
    for seeds in itertools.product(range(n_seeds), repeat=n_seeds):
        for images in itertools.product(range(n_images), repeat=n_images):
            value = round(100 * d[np.ix_(seeds, images)].mean(), 9)
            dist[value] = dist.get(value, 0.0) + 1 / (n_seeds**n_seeds * n_images**n_images)
    return dist


@pytest.mark.parametrize(
    "d",
    [
        np.array([[1, 0, 0, -1, 1]]),  # one seed
        np.array([[1, 1, 0, -1, 0], [0, 1, 0, 0, -1]]),  # two seeds, shared images
        np.array([[1, 0, -1, 0], [1, 1, 0, 0], [0, -1, 0, 1]]),  # three seeds
        np.array([[2, -1, 0, 1], [0, 1, -2, 1]]),  # differences of differences (INT8 drops): values in [-2, 2]
    ],
)
def test_the_exact_bootstrap_is_the_enumerated_distribution(d):
    """Every resample enumerated by brute force: quantiles and p-value equal the exact computation's."""
    dist = _brute_force(d)
    values = np.array(sorted(dist))
    cdf = np.cumsum([dist[v] for v in values])
    a = {s: np.clip(row, 0, None) for s, row in enumerate(d)}  # correct - reference = d
    b = {s: np.clip(-row, 0, None) for s, row in enumerate(d)}
    ours = bootstrap_difference(a, b)
    assert ours.exact and ours.mean == pytest.approx(100 * d.mean())
    assert ours.low == pytest.approx(values[np.searchsorted(cdf, 0.025 - 1e-9)])
    assert ours.high == pytest.approx(values[np.searchsorted(cdf, 0.975 - 1e-9)])
    below, above = sum(p for v, p in dist.items() if v <= 0), sum(p for v, p in dist.items() if v >= 0)
    assert ours.p == pytest.approx(min(1.0, 2 * min(below, above)), abs=1e-12)


def test_the_exact_bootstrap_agrees_with_a_large_monte_carlo_and_does_not_vary():
    rng = np.random.default_rng(7)
    a = {s: rng.random(400) < 0.80 for s in range(3)}
    b = {s: rng.random(400) < 0.77 for s in range(3)}
    exact = bootstrap_difference(a, b)
    sampled = _sampled_distribution(np.stack([a[s].astype(float) - b[s] for s in range(3)]), 200_000)
    low, high = np.percentile(sampled, [2.5, 97.5])
    one_image = 100 / 400 / 3  # the lattice step of the statistic
    assert abs(exact.low - low) <= 2 * one_image and abs(exact.high - high) <= 2 * one_image
    assert exact.p == pytest.approx(2 * min((sampled <= 0).mean(), (sampled >= 0).mean()), abs=0.005)
    assert bootstrap_difference(a, b) == exact  # nothing is sampled: the same numbers on any machine, any run


def test_an_endpoint_on_zero_is_no_gain():
    """One seed, 3 images right only for the method and none only for the reference out of 40: the exact 2.5 %
    quantile is 0 (P(no discordant image drawn) = (37/40)^40 = 4.4 % > 2.5 %), so the interval touches 0."""
    method = np.array([True] * 3 + [False] * 37)
    d = bootstrap_difference(dict.fromkeys(range(3), method), dict.fromkeys(range(3), np.zeros(40, dtype=bool)))
    assert d.low == 0.0 and d.p > 0.05 and verdict(d) == "no significant difference"


def test_holm_is_the_step_down_adjustment():
    # sorted p: 0.01, 0.02, 0.04 -> 3 * 0.01, max(0.03, 2 * 0.02), max(0.04, 1 * 0.04)
    assert holm([0.04, 0.01, math.nan, 0.02]) == pytest.approx([0.04, 0.03, math.nan, 0.04], nan_ok=True)


def test_a_verdict_at_odds_with_every_mcnemar_test_is_flagged():
    assert "no seed's McNemar" in disagreement("gain", (0.2, 0.06, 0.5))
    assert "every seed's McNemar" in disagreement("no significant difference", (0.01, 0.03, 0.001))
    assert disagreement("gain", (0.2, 0.01, 0.5)) == disagreement("too few seeds", (0.01,)) == ""


def test_macro_metrics_and_confusion_matrix_by_hand():
    """3 classes, 8 samples; swapping predictions and targets gives other numbers, so the argument order is checked."""
    targets = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    predictions = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])
    cm = confusion_matrix(targets, predictions, 3)
    assert cm.tolist() == [[3, 1, 0], [0, 2, 0], [0, 1, 1]]
    m = summarize(cm, ["a", "b", "c"])
    # recall: 3/4, 2/2, 1/2; precision: 3/3, 2/4, 1/1; F1 = 2PR / (P + R): 6/7, 2/3, 2/3
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["macro_recall"] == pytest.approx((0.75 + 1 + 0.5) / 3)
    assert m["macro_precision"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["macro_f1"] == pytest.approx((6 / 7 + 2 / 3 + 2 / 3) / 3)
    assert m["per_class_accuracy"] == {"a": 0.75, "b": 1.0, "c": 0.5}
    swapped = summarize(confusion_matrix(predictions, targets, 3), ["a", "b", "c"])
    assert swapped["confusion_matrix"] != m["confusion_matrix"]
    assert swapped["macro_recall"] != pytest.approx(m["macro_recall"])
