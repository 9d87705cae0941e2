"""Built-in land-use datasets: what each one is and where it comes from.

A :class:`DatasetSpec` is data, not code: class count, official download location
and checksum, the sub-folders an unpacked official archive puts the class folders
in, and the literature's default split.  ``imagefolder:<path>`` makes a spec for any
other set laid out as ``<class>/<image>`` (AID, NWPU-RESISC45, WHU-RS19, your own), and
``imagefolder:NAME=<path>`` gives such a set an explicit name.

:func:`dataset_names` is the one place that names datasets for people and for files:
each dataset string of a sweep gets a short display name and a file-safe slug.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from kdbench.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


@dataclass(frozen=True)
class Published:
    """A test accuracy published for a dataset, under its own protocol: never a result of this code.

    The report shows it beside its own numbers, labelled as not from this run, with what differs.
    """

    accuracy: float  # percent of the test split
    model: str
    protocol: str  # weights, image size, training share: how it differs from a from-scratch kdbench run
    source: str  # authors, year, venue


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int | None  # None: whatever the folder holds (imagefolder)
    title: str
    url: str | None = None
    md5: str | None = None
    archive_layouts: tuple[str, ...] = ()  # sub-paths of <root>/<name>/ that hold the class folders
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    path: Path | None = None  # imagefolder: the folder itself
    label: str | None = None  # imagefolder:NAME=<path>: the explicit name
    # Published accuracies, each checked against its source; none is listed where none could be checked
    published: tuple[Published, ...] = ()

    @property
    def layouts(self) -> tuple[str, ...]:
        """Candidate sub-folders of the dataset folder, the plain layout first."""
        return ("",) + self.archive_layouts


BUILTIN_DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="eurosat",
            num_classes=10,
            title="EuroSAT RGB (Helber et al., 2019)",
            # torchvision's mirror (pytorch/vision#8563; torchvision/datasets/eurosat.py): the same archive, same MD5,
            # as the authors' madm.dfki.de/files/sentinel/EuroSAT.zip, whose TLS certificate expired (phelber/EuroSAT#10)
            url="https://huggingface.co/datasets/torchgeo/eurosat/resolve/c877bcd43f099cd0196738f714544e355477f3fd/EuroSAT.zip",
            md5="c8fa014336c82ac7804f0398fcb19387",
            archive_layouts=("2750", "EuroSAT/2750", "EuroSAT_RGB"),
            published=(
                Published(
                    98.57,
                    "ResNet-50",
                    "ImageNet weights fine-tuned, RGB at 64 px, 80/20 train/test split",
                    "Helber et al., IEEE JSTARS 2019",
                ),
            ),
        ),
        DatasetSpec(
            name="ucmerced",
            num_classes=21,
            title="UC Merced Land Use (Yang & Newsam, 2010)",
            url="http://weegee.vision.ucmerced.edu/datasets/UCMerced_LandUse.zip",
            md5="5b7ec56793786b6dc8a908e8854ac0e4",
            archive_layouts=("UCMerced_LandUse/Images", "Images"),
        ),
        DatasetSpec(
            name="rsscn7",
            num_classes=7,
            title="RSSCN7 (Zou et al., 2015)",
            # Distributed by its authors through file-hosting links with no stable checksum:
            # kdbench does not download it; place it by hand (see the README).
            url=None,
            md5=None,
            archive_layouts=("RSSCN7", "RSSCN7-master"),
            test_fraction=0.5,
        ),
    )
}

IMAGEFOLDER_PREFIX = "imagefolder:"


def _split_imagefolder(dataset: str) -> tuple[str | None, str]:
    """``(label, path text)`` of ``imagefolder:[NAME=]<path>``.

    ``NAME=`` is a label when the text before the first ``=`` holds no path separator,
    so ``imagefolder:/data/a=b`` is still a path.
    """
    rest = dataset[len(IMAGEFOLDER_PREFIX) :]
    label, sep, path = rest.partition("=")
    if sep and "/" not in label and os.sep not in label:
        return label.strip(), path
    return None, rest


def get_spec(dataset: str) -> DatasetSpec:
    """The spec for a built-in name or ``imagefolder:[NAME=]<path>``; one-line error otherwise."""
    if dataset.startswith(IMAGEFOLDER_PREFIX):
        label, text = _split_imagefolder(dataset)
        if label == "":
            raise UserError(f"{dataset!r}: the name before '=' is empty; write imagefolder:NAME=<path> or imagefolder:<path>")
        if not text.strip():
            raise UserError("imagefolder: needs a path, e.g. imagefolder:/data/AID or imagefolder:AID=/data/AID")
        path = Path(text).expanduser()
        return DatasetSpec(name=dataset, num_classes=None, title=f"ImageFolder {path}", path=path, label=label)
    if dataset in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[dataset]
    raise UserError(
        f"unknown dataset {dataset!r}: use one of {', '.join(BUILTIN_DATASETS)} or imagefolder:<path> "
        "for a folder of <class>/<image> files"
    )


@dataclass(frozen=True)
class DatasetName:
    """How a dataset is named: ``display`` in tables, figures and messages; ``slug`` in file names."""

    dataset: str  # the grid's string: a built-in name or imagefolder:[NAME=]<path>
    display: str
    slug: str


def dataset_names(datasets: list[str] | tuple[str, ...]) -> dict[str, DatasetName]:
    """Display names and file-safe slugs of a sweep's datasets, by dataset string (in the given order).

    A built-in dataset is its name; ``imagefolder:NAME=<path>`` is ``NAME``;
    ``imagefolder:<path>`` is the folder's name.  Folder names that clash with another
    dataset's name get their parent folders in front (``B/SetA``, ``C/SetA``) until they
    differ, then ``(2)``, ``(3)``.  Two datasets with the same label, or a dataset listed
    twice, are an error.  Slugs keep ASCII letters, digits, ``-`` and ``_`` (accents
    dropped, anything else becomes ``-``) and are unique too.
    """
    seen: set[str] = set()
    fixed: dict[str, str] = {}  # built-in names and labels, as given
    folders: dict[str, list[str]] = {}  # path components, innermost first
    for dataset in datasets:
        if dataset in seen:
            raise UserError(f"dataset {dataset!r} is listed twice in grid.datasets")
        seen.add(dataset)
        spec = get_spec(dataset)
        if spec.path is None:
            fixed[dataset] = spec.name
        elif spec.label:
            fixed[dataset] = spec.label
        else:
            parts = [p for p in Path(os.path.normpath(spec.path)).parts if p not in ("", "/", os.sep)]
            folders[dataset] = list(reversed(parts)) or ["imagefolder"]
    clashing = [name for name in set(fixed.values()) if list(fixed.values()).count(name) > 1]
    if clashing:
        raise UserError(f"two datasets are named {clashing[0]!r}: give each imagefolder a different NAME= label")
    display = dict(fixed)
    depth = dict.fromkeys(folders, 1)
    while True:
        names = {d: "/".join(reversed(folders[d][: depth[d]])) for d in folders}
        taken = [n.casefold() for n in fixed.values()] + [n.casefold() for n in names.values()]
        clash = [d for d, n in names.items() if taken.count(n.casefold()) > 1 and depth[d] < len(folders[d])]
        if not clash:
            break
        for d in clash:
            depth[d] += 1
    used = {n.casefold() for n in fixed.values()}
    for dataset in folders:
        name, k = names[dataset], 2
        while name.casefold() in used:
            name, k = f"{names[dataset]} ({k})", k + 1
        used.add(name.casefold())
        display[dataset] = name
    slugs: set[str] = set()
    out = {}
    for dataset in datasets:
        base = slugify(display[dataset])
        slug, k = base, 2
        while slug in slugs:
            slug, k = f"{base}-{k}", k + 1
        slugs.add(slug)
        out[dataset] = DatasetName(dataset, display[dataset], slug)
    return out


def slugify(name: str) -> str:
    """A file-safe form of ``name``: ASCII letters, digits, ``-`` and ``_`` (``Forêt dense`` -> ``Foret-dense``)."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^A-Za-z0-9_]+", "-", ascii_name).strip("-_")
    return slug or "dataset-" + hashlib.sha1(name.encode()).hexdigest()[:8]


def display_name(dataset: str) -> str:
    """The display name of one dataset on its own (in a sweep, :func:`dataset_names` also keeps names unique)."""
    return dataset_names([dataset])[dataset].display
