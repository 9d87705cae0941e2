"""Built-in land-use datasets: what each one is and where it comes from.

A :class:`DatasetSpec` is data, not code: class count, official download location
and checksum, the sub-folders an unpacked official archive puts the class folders
in, and the literature's default split.  ``imagefolder:<path>`` makes a spec for any
other set laid out as ``<class>/<image>`` (AID, NWPU-RESISC45, WHU-RS19, your own).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kdbench.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


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
            url="https://madm.dfki.de/files/sentinel/EuroSAT.zip",
            md5="c8fa014336c82ac7804f0398fcb19387",
            archive_layouts=("2750", "EuroSAT/2750", "EuroSAT_RGB"),
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


def get_spec(dataset: str) -> DatasetSpec:
    """The spec for a built-in name or ``imagefolder:<path>``; one-line error otherwise."""
    if dataset.startswith(IMAGEFOLDER_PREFIX):
        path = Path(dataset[len(IMAGEFOLDER_PREFIX) :]).expanduser()
        if not str(path):
            raise UserError("imagefolder: needs a path, e.g. imagefolder:/data/AID")
        return DatasetSpec(name=dataset, num_classes=None, title=f"ImageFolder {path}", path=path)
    if dataset in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[dataset]
    raise UserError(
        f"unknown dataset {dataset!r}: use one of {', '.join(BUILTIN_DATASETS)} or imagefolder:<path> "
        "for a folder of <class>/<image> files"
    )
