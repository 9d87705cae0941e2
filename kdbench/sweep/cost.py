"""Rough cost of a planned sweep, for ``--dry-run``.

Training images per trial are ``epochs x n_train``.  Seconds use nominal fp32 training
rates measured on a 2-core x86 CPU at 64 px (BENCHMARKS.md), scaled by pixel count;
a GPU is one to two orders of magnitude faster.  On the quick ablation the
estimate was within a factor of 1.5 of the measured wall time.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from kdbench.config import DataConfig
from kdbench.data.index import scan_folder
from kdbench.data.locate import data_root, locate_dataset
from kdbench.data.specs import get_spec
from kdbench.sweep.plan import PlannedTrial

CPU_TRAIN_IMAGES_PER_S_64PX = {"vgg16": 28.0, "vgg16_bn": 25.0, "resnet18": 90.0, "mobilenet_v2": 300.0}
DEFAULT_RATE = 150.0
TRIAL_OVERHEAD_S = 8.0  # data loading, per-epoch evaluation, checkpoints, complexity count
SMALL_CLASS_SHARE = 0.25  # a class with fewer images (used) than this share of the median class is worth a warning


@dataclass(frozen=True)
class DatasetCounts:
    """What a trial of a dataset trains on: its folder, classes, and images per class found and used."""

    folder: Path
    classes: list[str]
    found: list[int]  # images per class on disk
    used: list[int]  # after data.images_per_class
    train: int  # training images (the rest are val and test)

    def small_classes(self) -> list[tuple[str, int]]:
        """``(class, images used)`` of the classes under :data:`SMALL_CLASS_SHARE` of the median class."""
        median = statistics.median(self.used)
        return [(c, n) for c, n in zip(self.classes, self.used) if n < SMALL_CLASS_SHARE * median]


def dataset_counts(d: DataConfig, root: str | None) -> DatasetCounts:
    """Scan ``d.dataset`` (never downloading) and count the images a trial would use."""
    spec = get_spec(d.dataset)
    folder = locate_dataset(spec, data_root(root), download=False)
    index = scan_folder(folder, classes=list(d.classes) or None, skip_bad=True)
    found = [index.labels.count(c) for c in range(len(index.classes))]
    used = [min(n, d.images_per_class) for n in found] if d.images_per_class else list(found)
    val = spec.val_fraction if d.val_fraction is None else d.val_fraction
    test = spec.test_fraction if d.test_fraction is None else d.test_fraction
    return DatasetCounts(folder, index.classes, found, used, int(sum(n * (1 - val - test) for n in used)))


def counts_key(d: DataConfig) -> tuple:
    """What the images a trial uses depend on."""
    return (d.dataset, d.images_per_class, d.classes, d.val_fraction, d.test_fraction)


def train_images(
    trials: list[PlannedTrial], root: str | None, counts: dict[tuple, DatasetCounts] | None = None
) -> dict[str, int]:
    """``key -> epochs x training images``; each dataset is scanned once, into ``counts`` (by :func:`counts_key`).

    A dataset that is not there is a UserError naming where it was looked for.
    """
    counts = {} if counts is None else counts
    out = {}
    for t in trials:
        d = t.config.data
        if counts_key(d) not in counts:
            counts[counts_key(d)] = dataset_counts(d, root)
        out[t.key] = counts[counts_key(d)].train * t.config.recipe.epochs
    return out


def estimate_seconds(trial: PlannedTrial, images: int) -> float:
    rate = CPU_TRAIN_IMAGES_PER_S_64PX.get(trial.config.recipe.model, DEFAULT_RATE)
    rate *= (64 / trial.config.data.resolution) ** 2
    return images / rate + TRIAL_OVERHEAD_S
