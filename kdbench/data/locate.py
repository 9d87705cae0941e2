"""Find a dataset on disk (plain or official-archive layout), downloading it where allowed."""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.request
import zipfile
from pathlib import Path

from kdbench.data.specs import IMAGE_SUFFIXES, DatasetSpec
from kdbench.errors import UserError

DOWNLOAD_TIMEOUT_S = 30


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """``--data-root``, else ``$KDBENCH_DATA``, else ``./data``."""
    return Path(explicit or os.environ.get("KDBENCH_DATA") or "data").expanduser()


def locate_dataset(spec: DatasetSpec, root: Path, *, download: bool = True) -> Path:
    """The folder that holds the dataset's class folders.

    Tries ``<root>/<name>/`` and the official archives' layouts under it (and under
    ``<root>`` itself); downloads, checks and unpacks the archive when none is there
    and the spec has a download location.
    """
    if spec.path is not None:
        if not _has_class_folders(spec.path):
            raise UserError(
                f"{spec.path} has no class folders with images: an imagefolder dataset needs <path>/<class>/<image> files"
            )
        return spec.path
    candidates = _candidates(spec, root)
    for folder in candidates:
        if _has_class_folders(folder):
            return folder
    if download and spec.url and spec.md5 and not os.environ.get("KDBENCH_NO_DOWNLOAD"):
        _download_and_extract(spec, root / spec.name)
        for folder in candidates:
            if _has_class_folders(folder):
                return folder
    how = f"download {spec.url} and unpack it into {root / spec.name}/, or " if spec.url else ""
    raise UserError(
        f"dataset {spec.name} not found under {root} (looked in {', '.join(str(c) for c in candidates)}): "
        f"{how}place its class folders at {root / spec.name}/<class>/<image>; set --data-root or KDBENCH_DATA to another root"
    )


def _candidates(spec: DatasetSpec, root: Path) -> list[Path]:
    under_name = [root / spec.name / layout for layout in spec.layouts]
    under_root = [root / layout for layout in spec.archive_layouts]
    return list(dict.fromkeys(under_name + under_root))


def _has_class_folders(folder: Path) -> bool:
    """True when some sub-folder holds image files directly (``<folder>/<class>/<image>``)."""
    if not folder.is_dir():
        return False
    return any(
        sub.is_dir() and not sub.name.startswith(".") and any(f.suffix.lower() in IMAGE_SUFFIXES for f in sub.iterdir())
        for sub in folder.iterdir()
    )


def _download_and_extract(spec: DatasetSpec, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    archive = target / Path(spec.url).name
    if not archive.exists():
        tmp = archive.with_suffix(".part")
        print(f"kdbench: downloading {spec.name} from {spec.url} ...", flush=True)
        try:
            with urllib.request.urlopen(spec.url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as err:  # URLError, timeouts and socket errors are all OSError
            tmp.unlink(missing_ok=True)
            print(f"kdbench: download of {spec.name} failed ({err}); looking for a local copy only", flush=True)
            return
        os.replace(tmp, archive)
    digest = _md5(archive)
    if digest != spec.md5:
        raise UserError(f"{archive} has MD5 {digest}, expected {spec.md5}: the download is damaged; delete the file and retry")
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(target)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
