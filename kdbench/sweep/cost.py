"""Rough cost of a planned sweep, for ``--dry-run``.

A trial trains on ``epochs x n_train`` images, evaluates the validation split after every
epoch and the validation and test splits of its best and last weights at the end; a
teacher with distilled students also runs once over every training image in every view of
the augmentation to fill the logit cache.  Seconds use fp32 training rates at 64 px measured on
the 2-core x86 CPU of BENCHMARKS.md on 2026-11-28: ResNet-18 and MobileNetV2 inside the sweep of
ablations/cpu.toml, the VGGs in a plain PyTorch loop at batch 64 (where ResNet-18 ran 5% faster);
a share :data:`FIXED_SHARE` of an image's time at 64 px does not depend on its size and the
rest scales with its pixel count (fitted to MobileNetV2 and ResNet-18 at 32, 48 and 64 px);
evaluation is :data:`EVAL_SPEEDUP` times faster than training.  These VMs vary 2-3x in speed from day to
day, so the estimate is good to that factor; a GPU is one to two orders of magnitude faster.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from kdbench.config import DataConfig
from kdbench.data.index import scan_folder
from kdbench.data.locate import data_root, locate_dataset
from kdbench.data.presets import AUGMENTATIONS
from kdbench.data.specs import get_spec
from kdbench.methods import teacher_features
from kdbench.sweep.plan import PlannedTrial

CPU_TRAIN_IMAGES_PER_S_64PX = {"vgg16": 9.5, "vgg16_bn": 8.5, "resnet18": 66.0, "mobilenet_v2": 100.0}
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
    """Scan ``d.dataset`` (never downloading) and count the images a trial would use."""
    spec = get_spec(d.dataset)
    folder = locate_dataset(spec, data_root(root), download=False)
    index = scan_folder(folder, classes=list(d.classes) or None, skip_bad=True)
    found = [index.labels.count(c) for c in range(len(index.classes))]
    used = [min(n, d.images_per_class) for n in found] if d.images_per_class else list(found)
    val = spec.val_fraction if d.val_fraction is None else d.val_fraction
    test = spec.test_fraction if d.test_fraction is None else d.test_fraction
    n_val, n_test = int(sum(n * val for n in used)), int(sum(n * test for n in used))
    return DatasetCounts(folder, index.classes, found, used, sum(used) - n_val - n_test, n_val, n_test)


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


def train_rate(trial: PlannedTrial) -> float:
    """Nominal CPU training images/s of the trial's model at its resolution."""
    rate = CPU_TRAIN_IMAGES_PER_S_64PX.get(trial.config.recipe.model, DEFAULT_RATE)
    return rate / (FIXED_SHARE + (1 - FIXED_SHARE) * (trial.config.data.resolution / 64) ** 2)


def estimate_seconds(trial: PlannedTrial, n: DatasetCounts) -> float:
    """Training, per-epoch validation and the final evaluations of one trial (each member of a pack)."""
    epochs = trial.config.recipe.epochs
    evaluated = epochs * n.val + 2 * (n.val + n.test)
    return sum((epochs * n.train + evaluated / EVAL_SPEEDUP) / train_rate(t) + TRIAL_OVERHEAD_S for t in trial.trials)


def online(teacher: PlannedTrial, student: PlannedTrial) -> bool:
    """Whether the student runs its teacher on every training batch: a continuous augmentation, or a method that
    needs the teacher's features, which the logit cache does not hold (kdbench.engine.trial.teacher_source)."""
    features = teacher_features(student.config.method_impl.needs_from_teacher)
    return AUGMENTATIONS[teacher.config.data.augment].views is None or bool(features)


def teacher_seconds(teacher: PlannedTrial, student: PlannedTrial, n: DatasetCounts) -> float:
    """The teacher's inference for one distilled student: one pass over every training image in every view to
    fill the logit cache (shared by all its students, so counted for the first), or, run online (:func:`online`),
    a forward pass on every training batch (kdbench.engine.teacher)."""
    views = AUGMENTATIONS[teacher.config.data.augment].views
    images = n.train * student.config.recipe.epochs if online(teacher, student) else n.train * len(views)
    return images / (EVAL_SPEEDUP * train_rate(teacher))


def sweep_seconds(trials: list[PlannedTrial], counts: dict[tuple, DatasetCounts]) -> float:
    """Estimated seconds of a whole sweep on one 2-core CPU: every trial, plus its teacher's inference."""
    teachers = {t.key: t for t in trials if t.role == "teacher"}
    total, cached = 0.0, set()
    for t in trials:
        n = counts[counts_key(t.config.data)]
        total += estimate_seconds(t, n)
        for m in t.trials:
            teacher = teachers.get(m.teacher_key)
            if teacher is None or (teacher.key in cached and not online(teacher, m)):
                continue
            cached.add(teacher.key)
            total += teacher_seconds(teacher, m, n)
    return total
