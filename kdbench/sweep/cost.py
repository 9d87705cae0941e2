"""Rough cost of a planned sweep, for ``--dry-run``.

Training images per trial are ``epochs x n_train``.  Seconds use nominal fp32 training
rates measured on a 2-core x86 CPU at 64 px (BENCHMARKS.md), scaled by pixel count;
a GPU is one to two orders of magnitude faster.  On the quick ablation the
estimate was within a factor of 1.5 of the measured wall time.
"""

from __future__ import annotations

from kdbench.data.index import scan_folder
from kdbench.data.locate import data_root, locate_dataset
from kdbench.data.specs import get_spec
from kdbench.sweep.plan import PlannedTrial

CPU_TRAIN_IMAGES_PER_S_64PX = {"vgg16": 28.0, "vgg16_bn": 25.0, "resnet18": 90.0, "mobilenet_v2": 300.0}
DEFAULT_RATE = 150.0
TRIAL_OVERHEAD_S = 8.0  # data loading, per-epoch evaluation, checkpoints, complexity count


def train_images(trials: list[PlannedTrial], root: str | None) -> dict[str, int]:
    """``key -> epochs x training images`` (datasets are scanned once each; missing ones count as 0)."""
    sizes: dict[tuple, int] = {}
    out = {}
    for t in trials:
        d = t.config.data
        ident = (d.dataset, d.images_per_class, d.classes, d.val_fraction, d.test_fraction)
        if ident not in sizes:
            sizes[ident] = _train_size(t, root)
        out[t.key] = sizes[ident] * t.config.recipe.epochs
    return out


def _train_size(trial: PlannedTrial, root: str | None) -> int:
    d = trial.config.data
    spec = get_spec(d.dataset)
    folder = locate_dataset(spec, data_root(root), download=False)
    index = scan_folder(folder, classes=list(d.classes) or None, skip_bad=True)
    per_class = [index.labels.count(c) for c in range(len(index.classes))]
    if d.images_per_class:
        per_class = [min(n, d.images_per_class) for n in per_class]
    val = spec.val_fraction if d.val_fraction is None else d.val_fraction
    test = spec.test_fraction if d.test_fraction is None else d.test_fraction
    return int(sum(n * (1 - val - test) for n in per_class))


def estimate_seconds(trial: PlannedTrial, images: int) -> float:
    rate = CPU_TRAIN_IMAGES_PER_S_64PX.get(trial.config.recipe.model, DEFAULT_RATE)
    rate *= (64 / trial.config.data.resolution) ** 2
    return images / rate + TRIAL_OVERHEAD_S
