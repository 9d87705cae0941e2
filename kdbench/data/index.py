"""Scan a ``<class>/<image>`` folder and make the seeded, stratified split manifest."""

from __future__ import annotations

import csv
import os
import random
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from kdbench.advice import setting
from kdbench.data.specs import IMAGE_SUFFIXES
from kdbench.digest import file_digests
from kdbench.errors import UserError


@dataclass
class ImageIndex:
    """Images of a dataset folder: their names, on-disk files, class indices, and what was left out and why.

    ``paths`` are the images' names, the same on every OS (:func:`portable_name`): manifests, split
    seeds, provenance and fingerprints use them.  ``files`` are the same images as the file system
    spells them (relative to ``root``), to open them.  ``classes`` are portable names too.
    """

    root: Path
    classes: list[str]
    paths: list[str]
    labels: list[int]
    skipped: list[dict] = field(default_factory=list)  # {"path": ..., "reason": ...}
    files: list[str] = field(default_factory=list)  # on-disk relative paths; == paths for plain names

    def __post_init__(self):
        if not self.files:
            self.files = list(self.paths)

    def subset(self, keep: list[int], skipped: list[dict] = ()) -> ImageIndex:
        """The images at positions ``keep`` (in that order), with ``skipped`` added to the record."""
        return ImageIndex(
            root=self.root,
            classes=self.classes,
            paths=[self.paths[i] for i in keep],
            labels=[self.labels[i] for i in keep],
            skipped=self.skipped + list(skipped),
            files=[self.files[i] for i in keep],
        )


def portable_name(name: str) -> str:
    """A file or folder name as text that is the same on every OS: Unicode NFC, undecodable bytes as ``\\xNN``.

    macOS writes accented names decomposed (NFD), Linux keeps what it is given (usually NFC), and a
    name unpacked from an old Windows zip can hold bytes that are not UTF-8 (``caf\\xe9.jpg``): Python
    reads those as lone surrogates, which no JSON, CSV or SQLite text can hold.
    """
    if any("\udc80" <= ch <= "\udcff" for ch in name):
        name = os.fsencode(name).decode("utf-8", "backslashreplace")
    return unicodedata.normalize("NFC", name)


def scan_folder(root: Path, *, classes: list[str] | None = None, skip_bad: bool = False) -> ImageIndex:
    """List the images of ``root/<class>/`` (any depth below a class folder), sorted by portable name.

    Class folders and sub-folders may be symbolic links (followed; a real folder reached twice in one
    class is read once and the second way listed); the order, the names and so the split are the same
    on every OS (:func:`portable_name`).  Each real folder belongs to one class: a link that leads to
    a folder of another class (or to a folder holding one, such as the dataset's own root) would read
    its images under two labels, and a link to a folder it is in is a loop; both are bad data.  Bad
    data (stray non-image files, broken symbolic links, class-folder links included, empty class
    folders, such links) are errors naming them, unless ``skip_bad`` is set: then they are left out
    and listed in ``skipped``.  Hidden files and
    folders (``.name``) and files beside the class folders are not part of a dataset: always left
    out, and listed.  Two names that differ only in their Unicode form are an error.

    Raises:
        UserError: a missing class, a bad file (without ``skip_bad``), a name clash, fewer than 2 classes.
    """
    index = ImageIndex(root=root, classes=[], paths=[], labels=[])
    found: dict[str, str] = {}  # portable class name -> on-disk name
    broken: list[str] = []
    for entry in os.scandir(root):
        if entry.name.startswith("."):
            continue
        if entry.is_symlink() and not os.path.exists(entry.path):
            broken.append(portable_name(entry.name) + "/")
        elif entry.is_dir():
            _claim(found, portable_name(entry.name), entry.name, root)
        else:
            index.skipped.append({"path": portable_name(entry.name), "reason": "not in a class folder"})
    all_classes = sorted(found)
    if classes:
        missing = [c for c in classes if portable_name(c) not in found]
        if missing:
            raise UserError(f"class(es) {', '.join(missing)} not in {root}: available are {', '.join(all_classes)}")
        wanted = {portable_name(c) for c in classes}
        all_classes = [c for c in all_classes if c in wanted]
    stray: list[str] = []
    empty: list[str] = []
    crossing: list[dict] = []
    owners = [(os.path.realpath(root / disk), name) for name, disk in sorted(found.items())]
    for name in all_classes:
        files = _class_files(root, found[name], name, index.skipped, owners, crossing)
        images = [(p, f) for p, f in files if _suffix(p) in IMAGE_SUFFIXES and os.path.exists(root / f)]
        broken += [p for p, f in files if not os.path.exists(root / f)]
        stray += [p for p, f in files if _suffix(p) not in IMAGE_SUFFIXES and os.path.exists(root / f)]
        if not images:
            empty.append(name)
            continue
        label = len(index.classes)
        index.classes.append(name)
        index.paths += [p for p, _ in images]
        index.files += [f for _, f in images]
        index.labels += [label] * len(images)
    if (stray or empty or broken or crossing) and not skip_bad:
        what = []
        if crossing:
            first = crossing[0]
            what.append(f"{len(crossing)} folder link(s) that read images twice ({first['path']}: {first['reason']})")
        if empty:
            what.append(f"empty class folder(s) {', '.join(empty)}")
        if stray:
            what.append(f"{len(stray)} non-image file(s) ({', '.join(stray[:3])}{' ...' if len(stray) > 3 else ''})")
        if broken:
            what.append(f"{len(broken)} broken symbolic link(s) ({', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''})")
        raise UserError(
            f"{root}: {' and '.join(what)}; remove them, or leave them out and list them in the run record with "
            + setting("data.skip_bad_images", "true")
        )
    index.skipped += [{"path": p, "reason": "not an image file"} for p in stray]
    index.skipped += [{"path": p, "reason": "broken symbolic link"} for p in broken]
    index.skipped += [{"path": c + "/", "reason": "empty class folder"} for c in empty]
    index.skipped += crossing
    if len(index.classes) < 2:
        raise UserError(f"{root} has {len(index.classes)} class folder(s) with images: classification needs at least 2")
    return index


def _class_files(
    root: Path, disk_name: str, name: str, skipped: list[dict], owners: list[tuple[str, str]], crossing: list[dict]
) -> list[tuple[str, str]]:
    """``(portable path, on-disk path)`` of every file below one class folder, sorted by portable path.

    Walks with ``followlinks=True`` (pathlib's ``rglob`` follows links to folders on some Python
    versions and not on others).  A folder that is a loop (:func:`_crossing`) or shares images with
    another class's folder (``owners``: each class folder's real path and its class) is not entered and
    goes to ``crossing`` (bad data); one reached a second way within the class is listed in ``skipped``
    instead of being read twice.  Hidden files and folders are listed there too.
    """
    out: dict[str, str] = {}
    seen: set[str] = set()
    for top, dirs, files in os.walk(root / disk_name, followlinks=True):
        rel_top = Path(top).relative_to(root)
        portable_top = "/".join([name, *(portable_name(part) for part in rel_top.parts[1:])])
        real = os.path.realpath(top)
        reason = _crossing(real, name, owners)
        if reason:
            crossing.append({"path": portable_top + "/", "reason": reason})
            dirs[:] = []
            continue
        for d in list(dirs):
            if _is_within(real, os.path.realpath(os.path.join(top, d))):
                crossing.append(
                    {"path": f"{portable_top}/{portable_name(d)}/", "reason": "a link loop (it leads to a folder it is in)"}
                )
                dirs.remove(d)
        if real in seen:
            skipped.append({"path": portable_top + "/", "reason": "folder already read through another link"})
            dirs[:] = []
            continue
        seen.add(real)
        for d in [d for d in dirs if d.startswith(".")]:
            skipped.append({"path": f"{portable_top}/{portable_name(d)}/", "reason": "hidden folder"})
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in files:
            portable = f"{portable_top}/{portable_name(f)}"
            if f.startswith("."):
                skipped.append({"path": portable, "reason": "hidden file"})
                continue
            _claim(out, portable, (rel_top / f).as_posix(), root)
    return sorted(out.items())


def _is_within(path: str, folder: str) -> bool:
    """Whether real path ``path`` is ``folder`` or inside it."""
    return os.path.commonpath([path, folder]) == folder


def _crossing(real: str, name: str, owners: list[tuple[str, str]]) -> str | None:
    """Why a folder of class ``name`` at real path ``real`` would read another class's images, or None."""
    for folder, owner in owners:
        if owner != name and (_is_within(real, folder) or _is_within(folder, real)):
            return f"the same images as class folder {owner}/ (through a symbolic link)"
    return None


def _claim(names: dict[str, str], portable: str, disk: str, root: Path) -> None:
    """Record ``disk`` under its portable name; two files with one portable name (NFC and NFD) are an error."""
    if portable in names and names[portable] != disk:
        raise UserError(
            f"{root}: {names[portable]!a} and {disk!a} are the same name in two Unicode forms (or byte spellings): "
            "rename one of them (e.g. with convmv --nfc)"
        )
    names[portable] = disk


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def content_digests(root: Path, rel_files: list[str]) -> list[str]:
    """:func:`kdbench.digest.file_digests` of dataset files, with an unreadable file as a one-line error.

    Raises:
        UserError: a file that cannot be read (permissions, removed meanwhile).
    """
    try:
        return file_digests(root, rel_files)
    except OSError as err:
        raise UserError(f"cannot read {err.filename!a}: {err.strerror}; check the dataset folder") from err


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
