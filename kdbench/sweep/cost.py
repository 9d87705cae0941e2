"""Rough cost of a planned sweep, for ``--dry-run``.

A trial trains on ``epochs x n_train`` images, evaluates the validation split after every
epoch and the validation and test splits of its best and last weights at the end; a
teacher with distilled students also runs once over every training image in every view of
the augmentation to fill the logit cache, and once more for each set of features its students
need (the feature cache).  Seconds use fp32 channels_last training rates measured on the 2-core
AMD EPYC VM of BENCHMARKS.md: ResNet-18 and MobileNetV2 inside the sweep of ablations/cpu.toml at
96 px on 2026-11-30 (scaled to 64 px by the rule below), the VGGs in a plain PyTorch loop at batch 64
on 2026-11-28 (contiguous); a share :data:`FIXED_SHARE` of an image's time at 64 px does not depend
on its size and the rest scales with its pixel count (fitted to MobileNetV2 and ResNet-18 at 32, 48 and 64 px);
evaluation is :data:`EVAL_SPEEDUP` times faster than training.  These VMs vary 2-3x in speed from day to
day, so the estimate is good to that factor; a GPU is one to two orders of magnitude faster.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from kdbench.config import DataConfig
from kdbench.data.index import limit_per_class
from kdbench.data.presets import AUGMENTATIONS
from kdbench.data.select import find_images, split_images
from kdbench.methods import teacher_features
from kdbench.sweep.plan import PlannedTrial

CPU_TRAIN_IMAGES_PER_S_64PX = {"vgg16": 9.5, "vgg16_bn": 8.5, "resnet18": 169.0, "mobilenet_v2": 276.0}
INT8_SECONDS = 6.0  # ONNX export, static quantization and scoring of one trial ([deploy] int8; kdbench.engine.int8)
DEFAULT_RATE = 60.0
FIXED_SHARE = 0.33
EVAL_SPEEDUP = 3.0  # images/s of inference (no gradients, large batches) over images/s of training
TRIAL_OVERHEAD_S = 8.0  # data loading, checkpoints, complexity count
SMALL_CLASS_SHARE = 0.25  # a class with fewer images (used) than this share of the median class is worth a warning


@dataclass(frozen=True)
class DatasetCounts:
    """What a trial of a dataset trains on: its folder, classes, and images per class found and used."""

    folder: Path
    classes: list[str]
    found: list[int]  # images per class on disk
    used: list[int]  # after data.images_per_class
    train: int  # training images
    val: int
    test: int

    def small_classes(self) -> list[tuple[str, int]]:
        """``(class, images used)`` of the classes under :data:`SMALL_CLASS_SHARE` of the median class."""
        median = statistics.median(self.used)
        return [(c, n) for c, n in zip(self.classes, self.used) if n < SMALL_CLASS_SHARE * median]


def dataset_counts(d: DataConfig, root: str | None) -> DatasetCounts:
    """Scan ``d.dataset`` (never downloading), select and split its images as a trial does, and count them.

    Raises:
        UserError: what a trial would refuse before training: a missing dataset, stray files (without
            ``skip_bad_images``), a class too small for the split.
    """
    folder, everything = find_images(d, root, download=False)
    index = limit_per_class(everything, d.images_per_class, d.split_seed)
    split = split_images(d, index)
    found = [everything.labels.count(c) for c in range(len(everything.classes))]
    used = [index.labels.count(c) for c in range(len(index.classes))]
    return DatasetCounts(folder, index.classes, found, used, split.count("train"), split.count("val"), split.count("test"))


def counts_key(d: DataConfig) -> tuple:
    """What the images a trial uses depend on."""
    return (d.dataset, d.images_per_class, d.classes, d.val_fraction, d.test_fraction, d.split_seed, d.skip_bad_images)


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


def train_rate(trial: PlannedTrial) -> float:
    """Nominal CPU training images/s of the trial's model at its resolution."""
    rate = CPU_TRAIN_IMAGES_PER_S_64PX.get(trial.config.recipe.model, DEFAULT_RATE)
    return rate / (FIXED_SHARE + (1 - FIXED_SHARE) * (trial.config.data.resolution / 64) ** 2)


def estimate_seconds(trial: PlannedTrial, n: DatasetCounts) -> float:
    """Training, per-epoch validation and the final evaluations of one trial (each member of a pack)."""
    epochs = trial.config.recipe.epochs
    evaluated = epochs * n.val + 2 * (n.val + n.test)
    return sum((epochs * n.train + evaluated / EVAL_SPEEDUP) / train_rate(t) + TRIAL_OVERHEAD_S for t in trial.trials)


def online(teacher: PlannedTrial) -> bool:
    """Whether a student runs its teacher on every training batch: a continuous augmentation (kdbench.engine.trial.teacher_source;
    a feature cache that would not fit is not foreseen here)."""
    return AUGMENTATIONS[teacher.config.data.augment].views is None


def teacher_seconds(teacher: PlannedTrial, student: PlannedTrial, n: DatasetCounts, passes: int) -> float:
    """The teacher's inference for one distilled student: run online (:func:`online`), a forward pass on every
    training batch; otherwise ``passes`` passes over every training image in every view to fill its caches."""
    views = AUGMENTATIONS[teacher.config.data.augment].views
    images = n.train * student.config.recipe.epochs if online(teacher) else n.train * len(views) * passes
    return images / (EVAL_SPEEDUP * train_rate(teacher))


def sweep_seconds(trials: list[PlannedTrial], counts: dict[tuple, DatasetCounts], int8: bool = False) -> float:
    """Estimated seconds of ``trials`` on one 2-core CPU: every trial, its INT8 deployment (``int8``), and its teacher's
    inference: the logit cache once per teacher, and a feature-cache pass per set of features its students need."""
    teachers = {t.key: t for t in trials if t.role == "teacher"}
    total, filled = 0.0, set()
    for t in trials:
        n = counts[counts_key(t.config.data)]
        total += estimate_seconds(t, n) + (INT8_SECONDS * len(t.trials) if int8 else 0.0)
        for m in t.trials:
            teacher = teachers.get(m.teacher_key)
            if teacher is None:
                continue
            wanted = {("logits",)} | (
                {tuple(sorted(f))} if (f := teacher_features(m.config.method_impl.needs_from_teacher)) else set()
            )
            new = {(teacher.key, w) for w in wanted} - filled
            if online(teacher) or new:
                filled |= new
                total += teacher_seconds(teacher, m, n, len(new))
    return total
