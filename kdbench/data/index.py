"""Scan a ``<class>/<image>`` folder and make the seeded, stratified split manifest."""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass, field
from pathlib import Path

from kdbench.data.specs import IMAGE_SUFFIXES
from kdbench.errors import UserError


@dataclass
class ImageIndex:
    """Images of a dataset folder: relative paths, class indices, and what was left out and why."""

    root: Path
    classes: list[str]
    paths: list[str]
    labels: list[int]
    skipped: list[dict] = field(default_factory=list)  # {"path": ..., "reason": ...}

    def subset(self, keep: list[int], skipped: list[dict] = ()) -> ImageIndex:
        """The images at positions ``keep`` (in that order), with ``skipped`` added to the record."""
        return ImageIndex(
            root=self.root,
            classes=self.classes,
            paths=[self.paths[i] for i in keep],
            labels=[self.labels[i] for i in keep],
            skipped=self.skipped + list(skipped),
        )


def scan_folder(root: Path, *, classes: list[str] | None = None, skip_bad: bool = False) -> ImageIndex:
    """List the images of ``root/<class>/`` (sorted; hidden files are not part of a dataset).

    Stray non-image files and empty class folders are errors naming them, unless
    ``skip_bad`` is set: then they are left out and listed in ``skipped``.
    """
    all_classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        missing = [c for c in classes if c not in all_classes]
        if missing:
            raise UserError(f"class(es) {', '.join(missing)} not in {root}: available are {', '.join(all_classes)}")
        all_classes = [c for c in all_classes if c in set(classes)]
    index = ImageIndex(root=root, classes=[], paths=[], labels=[])
    stray: list[str] = []
    empty: list[str] = []
    for name in all_classes:
        files = sorted(p for p in (root / name).rglob("*") if p.is_file() and not _hidden(p, root))
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        stray += [p.relative_to(root).as_posix() for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
        if not images:
            empty.append(name)
            continue
        label = len(index.classes)
        index.classes.append(name)
        index.paths += [p.relative_to(root).as_posix() for p in images]
        index.labels += [label] * len(images)
    if (stray or empty) and not skip_bad:
        what = []
        if empty:
            what.append(f"empty class folder(s) {', '.join(empty)}")
        if stray:
            what.append(f"{len(stray)} non-image file(s) ({', '.join(stray[:3])}{' ...' if len(stray) > 3 else ''})")
        raise UserError(
            f"{root}: {' and '.join(what)}; remove them or pass --skip-bad-images "
            f"(skip_bad_images = true) to leave them out and list them in the run record"
        )
    index.skipped += [{"path": p, "reason": "not an image file"} for p in stray]
    index.skipped += [{"path": c + "/", "reason": "empty class folder"} for c in empty]
    if len(index.classes) < 2:
        raise UserError(f"{root} has {len(index.classes)} class folder(s) with images: classification needs at least 2")
    return index


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def limit_per_class(index: ImageIndex, images_per_class: int | None, seed: int) -> ImageIndex:
    """Keep a seeded random subset of at most ``images_per_class`` images of each class."""
    if not images_per_class:
        return index
    keep: list[int] = []
    for label, name in enumerate(index.classes):
        members = [i for i, y in enumerate(index.labels) if y == label]
        random.Random(f"subset:{seed}:{name}").shuffle(members)
        keep += sorted(members[:images_per_class])
    return index.subset(sorted(keep))


def stratified_split(index: ImageIndex, *, val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """A split name per image: each class shuffled with its own seeded RNG, then cut.

    Python's ``random.Random`` seeded with a string is the same on every platform and
    version, so the same seed gives the same split anywhere.
    """
    split = [""] * len(index.paths)
    for label, name in enumerate(index.classes):
        members = [i for i, y in enumerate(index.labels) if y == label]
        random.Random(f"split:{seed}:{name}").shuffle(members)
        n = len(members)
        n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
        n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
        if n - n_test - n_val < 1:
            raise UserError(
                f"class {name} has {n} image(s), too few for val {val_fraction:g} and test {test_fraction:g} "
                "fractions (each split needs one image and train at least one): add images, raise images_per_class "
                "or lower the fractions"
            )
        for rank, i in enumerate(members):
            split[i] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return split


def write_manifest(path: Path, index: ImageIndex, split: list[str]) -> None:
    """CSV of ``path,class,split`` (paths relative to the dataset folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "class", "split"])
        for p, y, s in zip(index.paths, index.labels, split):
            writer.writerow([p, index.classes[y], s])
