"""Classification metrics from a confusion matrix."""

from __future__ import annotations

import math

import torch


def confusion_matrix(targets: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``cm[i, j]`` = number of samples of true class ``i`` predicted as ``j``."""
    flat = targets.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def summarize(cm: torch.Tensor, classes: list[str]) -> dict:
    """Top-1 accuracy, macro precision / recall / F1, per-class accuracy, and the matrix itself.

    Per-class precision of a class never predicted is 0 (as in scikit-learn's
    ``zero_division=0``); macro averages weigh every class equally.
    """
    cm = cm.double()
    tp = cm.diag()
    support = cm.sum(1)
    predicted = cm.sum(0)
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    return {
        "accuracy": float(tp.sum() / cm.sum().clamp(min=1)),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "per_class_accuracy": {c: float(r) for c, r in zip(classes, recall)},
        "confusion_matrix": cm.long().tolist(),
        "n": int(cm.sum()),
    }


CHANCE_ALPHA = 0.01


def chance_test(accuracy: float, n: int, chance: float, alpha: float = CHANCE_ALPHA) -> dict:
    """Is ``accuracy`` on ``n`` images significantly above ``chance``? One-sided exact binomial test.

    ``chance`` is the best constant predictor's accuracy (1/C, or the majority class's share
    where larger).  ``at_chance`` is true when ``p >= alpha`` AND the test has the power to
    tell: a model halfway between chance and perfect (accuracy ``(1 + chance) / 2``) would
    reach ``p < alpha`` on ``n`` images.  A val split too small for that (e.g. 3 images of 3
    classes) is ``powered: false`` and never ``at_chance``; the store flags it instead.
    """
    from scipy.stats import binomtest

    correct = round(accuracy * n)
    p_value = float(binomtest(correct, n, chance, alternative="greater").pvalue) if n else 1.0
    halfway = math.ceil(n * (1 + chance) / 2)
    powered = n > 0 and float(binomtest(halfway, n, chance, alternative="greater").pvalue) < alpha
    return {
        "accuracy": accuracy,
        "n": n,
        "chance": chance,
        "p_value": p_value,
        "alpha": alpha,
        "powered": powered,
        "significant": p_value < alpha,
        "at_chance": powered and p_value >= alpha,
    }
