"""A trial's data settings (:class:`DataConfig`: which images it sees, how they are prepared) and their checks.

Here, in the data layer that knows datasets and augmentations, so that data modules and everything above
them can name a configuration; :mod:`kdbench.config` gathers it with the other settings of a trial.
No torch: the sweep driver checks and plans with it (kdbench.machine).
"""

from __future__ import annotations

from dataclasses import dataclass

from kdbench.data.presets import AUGMENTATIONS
from kdbench.data.specs import get_spec
from kdbench.errors import UserError

MIN_TRAIN_FRACTION = 0.1  # val_fraction + test_fraction <= 0.9


@dataclass(frozen=True)
class DataConfig:
    """Which images a trial sees and how they are prepared."""

    dataset: str = "eurosat"
    resolution: int = 64
    images_per_class: int | None = None  # seeded subset per class for quick runs
    classes: tuple[str, ...] = ()  # class subset; empty = all
    val_fraction: float | None = None  # None: the dataset's default
    test_fraction: float | None = None
    split_seed: int = 0
    augment: str = "d4"
    skip_bad_images: bool = False


def check_data(data: DataConfig, where: str) -> None:
    """Range checks that types alone do not catch, as one-line UserErrors naming ``where.<field>``."""
    spec = get_spec(data.dataset)
    if data.resolution < 16:
        raise UserError(f"{where}.resolution must be >= 16 pixels, got {data.resolution}")
    if data.augment not in AUGMENTATIONS:
        raise UserError(f"{where}.augment must be one of {', '.join(AUGMENTATIONS)}, got {data.augment!r}")
    if data.images_per_class is not None and data.images_per_class < 3:
        raise UserError(f"{where}.images_per_class must be >= 3 (one image each for train, val and test)")
    for name in ("val_fraction", "test_fraction"):
        value = getattr(data, name)
        if value is not None and not 0 < value < 1:
            raise UserError(
                f"{where}.{name} must be in (0, 1), got {value}: model selection needs a val split, results a test split"
            )
    val = spec.val_fraction if data.val_fraction is None else data.val_fraction
    test = spec.test_fraction if data.test_fraction is None else data.test_fraction
    if val + test > 1 - MIN_TRAIN_FRACTION + 1e-9:
        raise UserError(
            f"{where}: val_fraction + test_fraction is {val + test:g}; at most {1 - MIN_TRAIN_FRACTION:g} "
            "leaves images to train on: lower them"
        )
