"""Which images a :class:`~kdbench.data.config.DataConfig` selects, and their fingerprint (no decoding, no torch)."""

from __future__ import annotations

import os
from pathlib import Path

from kdbench.data.config import DataConfig
from kdbench.data.index import ImageIndex, content_digests, limit_per_class, scan_folder, stratified_split
from kdbench.data.locate import data_root, locate_dataset
from kdbench.data.specs import get_spec
from kdbench.digest import dataset_fingerprint


def find_images(cfg: DataConfig, root, download: bool) -> tuple[Path, ImageIndex]:
    """The dataset folder and every image of ``cfg``'s classes, not yet decoded.

    Raises:
        UserError: the dataset is missing, or its folder is not a usable ``<class>/<image>`` set (scan_folder).
    """
    spec = get_spec(cfg.dataset)
    folder = locate_dataset(spec, data_root(root), download=download)
    index = scan_folder(folder, classes=list(cfg.classes) or None, skip_bad=cfg.skip_bad_images)
    if spec.num_classes is not None and not cfg.classes and len(index.classes) != spec.num_classes:
        print(
            f"kdbench: warning: {folder} has {len(index.classes)} classes, the official {spec.name} has {spec.num_classes}",
            flush=True,
        )
    return folder, index


def select_images(cfg: DataConfig, root, download: bool) -> tuple[Path, ImageIndex]:
    """The dataset folder and the images ``cfg`` selects (class subset, per-class limit), not yet decoded."""
    folder, index = find_images(cfg, root, download)
    return folder, limit_per_class(index, cfg.images_per_class, cfg.split_seed)


def split_images(cfg: DataConfig, index: ImageIndex) -> list[str]:
    """Each image's split (train, val or test) under ``cfg``'s fractions (the dataset's by default) and split seed.

    Raises:
        UserError: a class with too few images for the fractions (kdbench.data.index.stratified_split).
    """
    spec = get_spec(cfg.dataset)
    return stratified_split(
        index,
        val_fraction=spec.val_fraction if cfg.val_fraction is None else cfg.val_fraction,
        test_fraction=spec.test_fraction if cfg.test_fraction is None else cfg.test_fraction,
        seed=cfg.split_seed,
    )


def data_fingerprint(cfg: DataConfig, root: str | os.PathLike | None = None, *, download: bool = False) -> str:
    """Fingerprint of the image files ``cfg`` selects (names and content digests; see kdbench.digest): part of a trial's key."""
    _, index = select_images(cfg, root, download)
    return dataset_fingerprint(index.paths, content_digests(index.root, index.files))
