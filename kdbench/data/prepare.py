"""A dataset ready for training: :func:`prepare_data` selects, decodes and splits the images of a config."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from kdbench.data.config import DataConfig
from kdbench.data.decode import load_images
from kdbench.data.index import ImageIndex, content_digests, write_manifest
from kdbench.data.select import select_images, split_images
from kdbench.digest import dataset_fingerprint, json_digest


@dataclass
class PreparedData:
    """A dataset ready for training: decoded images, labels, and each image's split."""

    folder: Path
    index: ImageIndex
    split: list[str]
    images: torch.Tensor  # [N, 3, R, R] uint8
    labels: torch.Tensor  # [N] int64
    digests: list[str]  # each image's content digest (kdbench.digest.file_digests), in index order
    fingerprint: str = ""  # :func:`data_fingerprint` of the images selected (before unreadable ones are dropped)

    @property
    def classes(self) -> list[str]:
        return self.index.classes

    def indices(self, split: str) -> torch.Tensor:
        return torch.tensor([i for i, s in enumerate(self.split) if s == split], dtype=torch.long)

    def counts(self) -> dict[str, int]:
        return {s: self.split.count(s) for s in ("train", "val", "test")}

    def write_manifest(self, path: Path) -> None:
        write_manifest(path, self.index, self.split)

    def paths(self, *splits: str) -> list[str]:
        """Relative paths of the images in ``splits``."""
        return [p for p, s in zip(self.index.paths, self.split) if s in splits]

    def digests_of(self, split: str) -> list[str]:
        """Content digests of the images of ``split``, in the order of :meth:`indices`."""
        return [self.digests[i] for i in self.indices(split).tolist()]

    def manifest_digest(self) -> str:
        """Digest of the split manifest (each image's path, class and split)."""
        return json_digest([self.index.paths, self.index.labels, self.classes, self.split])


def prepare_data(cfg: DataConfig, root: str | os.PathLike | None = None, *, download: bool = True) -> PreparedData:
    folder, index = select_images(cfg, root, download)
    digests = content_digests(folder, index.files)
    fingerprint = dataset_fingerprint(index.paths, digests)
    images, bad = load_images(
        folder, index.files, cfg.resolution, skip_bad=cfg.skip_bad_images, digests=digests, names=index.paths
    )
    if bad:
        dropped = {b["path"] for b in bad}
        keep = [i for i, p in enumerate(index.paths) if p not in dropped]
        index, digests = index.subset(keep, bad), [digests[i] for i in keep]
    split = split_images(cfg, index)
    return PreparedData(
        folder=folder,
        index=index,
        split=split,
        images=images,
        labels=torch.tensor(index.labels),
        digests=digests,
        fingerprint=fingerprint,
    )
