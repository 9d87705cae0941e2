"""Decode images once per (dataset folder, resolution) into a memory-mapped uint8 cache.

Training reads ``[N, 3, R, R]`` uint8 tensors, never JPEGs.  The cache lives in
``$KDBENCH_CACHE`` (default ``~/.cache/kdbench``) because data folders are often
read-only, one folder per (dataset folder, resolution):

- ``images.u8``: the decoded images, one row of ``3*R*R`` bytes each, only ever
  appended to; processes map it read-only (``numpy.memmap``), so every worker of a
  sweep shares one copy through the page cache, and a run reads only its rows;
- ``index.json``: ``path -> [row, size, mtime_ns]`` and the row count, replaced
  atomically (:mod:`kdbench.durable`) AFTER the rows it names are on disk.

An image changed on disk (other size or modification time) is decoded again into a
new row.  A crash during an append leaves rows past the index's count: they are
ignored and cut off by the next append.  An index that names more rows than the file
holds, or that cannot be read, means a damaged cache: it is rebuilt.  Only appends
take the folder's lock; reads of images already in the cache take none (rows named by
an index are never rewritten).  Images are decoded by threads (PIL releases the GIL
while decoding and resizing), in chunks written as they come, so decoding a whole
dataset never holds it in memory.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from kdbench.data import pixels
from kdbench.digest import text_digest
from kdbench.durable import atomic_write_json, file_lock, fsync_dir
from kdbench.errors import UserError

CACHE_FORMAT = "kdbench-image-cache-v2"
CHUNK = 512  # images decoded and appended at a time


def cache_dir() -> Path:
    return Path(os.environ.get("KDBENCH_CACHE") or Path.home() / ".cache" / "kdbench").expanduser()


def decode_image(path: Path, resolution: int) -> torch.Tensor:
    """One image as ``[3, R, R]`` uint8 RGB (by :mod:`kdbench.data.pixels`'s rule), resized with antialiased bilinear."""
    with open(path, "rb") as f:  # a file object, not a path: see pixels.to_rgb
        try:
            img = Image.open(f)
        except UnidentifiedImageError as err:
            reason = pixels.unopenable(path)
            if reason is None:
                raise
            raise UserError(reason) from err
        with img:
            rgb = pixels.to_rgb(img, path)
    if rgb.size != (resolution, resolution):
        rgb = rgb.resize((resolution, resolution), Image.BILINEAR)
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def load_images(root: Path, rel_paths: list[str], resolution: int, *, skip_bad: bool = False) -> tuple[torch.Tensor, list[dict]]:
    """``([N, 3, R, R] uint8, bad)`` for ``rel_paths`` under ``root``, from the cache where possible.

    An unreadable or truncated image is an error naming it, unless ``skip_bad``:
    then it is left out of the tensor and listed in ``bad`` (``{"path", "reason"}``),
    and the caller drops it from its index.
    """
    root = root.resolve()
    stamps = {p: _stamp(root / p) for p in rel_paths}
    folder = cache_folder(root, resolution)
    index = _read_index(folder, resolution)
    bad: list[dict] = []
    if any(not _known(index, p, stamps[p]) for p in rel_paths):
        with file_lock(folder / ".lock"):
            index = _read_index(folder, resolution)  # another process may have added them meanwhile
            missing = [p for p in dict.fromkeys(rel_paths) if not _known(index, p, stamps[p])]
            index, bad = _append(folder, root, index, missing, stamps, resolution)
    if bad and not skip_bad:
        shown = "; ".join(f"{b['path']} ({b['reason']})" for b in bad[:3])
        raise UserError(
            f"{len(bad)} unreadable image(s) under {root}: {shown}{' ...' if len(bad) > 3 else ''}; "
            "replace or delete them, or pass --skip-bad-images to leave them out and list them in the run record"
        )
    bad_paths = {b["path"] for b in bad}
    rows = np.array([index["entries"][p][0] for p in rel_paths if p not in bad_paths], dtype=np.int64)
    return torch.from_numpy(gather_rows(folder, index["rows"], rows, resolution)), bad


def cache_folder(root: Path, resolution: int) -> Path:
    return cache_dir() / f"{_slug(root)}-r{resolution}"


def gather_rows(folder: Path, n_rows: int, rows: np.ndarray, resolution: int) -> np.ndarray:
    """A private ``[len(rows), 3, R, R]`` copy of ``rows`` of the mapped cache (read in file order, touching only those).

    The file is mapped read-only and shared through the page cache; after each chunk the
    mapped pages are released from this process (``MADV_DONTNEED`` keeps them in the page
    cache), so its resident memory holds the copy, not the mapped file as well.
    """
    out = np.empty((len(rows), 3, resolution, resolution), dtype=np.uint8)
    if len(rows) == 0:
        return out
    row_bytes = 3 * resolution * resolution
    with open(folder / "images.u8", "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        mapped = np.frombuffer(mm, dtype=np.uint8, count=n_rows * row_bytes).reshape(n_rows, 3, resolution, resolution)
        order = np.argsort(rows, kind="stable")
        for lo in range(0, len(order), CHUNK):  # bounded temporaries; sorted rows read the file forwards
            part = order[lo : lo + CHUNK]
            out[part] = mapped[rows[part]]
            if hasattr(mm, "madvise"):
                start = int(rows[part[0]]) * row_bytes // mmap.PAGESIZE * mmap.PAGESIZE
                mm.madvise(mmap.MADV_DONTNEED, start, (int(rows[part[-1]]) + 1) * row_bytes - start)
        del mapped
    return out


def _known(index: dict, path: str, stamp: tuple[int, int]) -> bool:
    entry = index["entries"].get(path)
    return entry is not None and (entry[1], entry[2]) == stamp


def _empty_index(resolution: int) -> dict:
    return {"format": CACHE_FORMAT, "resolution": resolution, "rows": 0, "entries": {}}


def _read_index(folder: Path, resolution: int) -> dict:
    """The cache's index; an empty one when there is none or it is damaged (index and rows disagree)."""
    try:
        index = json.loads((folder / "index.json").read_text())
        rows = int(index["rows"])
        size = (folder / "images.u8").stat().st_size
    except (OSError, ValueError, KeyError, TypeError):
        return _empty_index(resolution)
    row_bytes = 3 * resolution * resolution
    valid = (
        index.get("format") == CACHE_FORMAT
        and index.get("resolution") == resolution
        and size >= rows * row_bytes
        and all(0 <= e[0] < rows for e in index["entries"].values())
    )
    return index if valid else _empty_index(resolution)


def _append(folder: Path, root: Path, index: dict, missing: list[str], stamps: dict, resolution: int) -> tuple[dict, list[dict]]:
    """Decode ``missing``, append them to ``images.u8`` (under the lock), then write the index; returns it, bad images."""
    if not missing:
        return index, []
    folder.mkdir(parents=True, exist_ok=True)
    row_bytes = 3 * resolution * resolution
    entries, rows, bad = dict(index["entries"]), index["rows"], []
    data_file = folder / "images.u8"
    if rows == 0 and (folder / "index.json").exists():  # a damaged cache: start it over
        with contextlib.suppress(OSError):
            (folder / "index.json").unlink()
    with open(data_file, "r+b" if data_file.exists() and rows else "wb") as f:
        f.truncate(rows * row_bytes)  # rows a crashed append left past the index
        f.seek(rows * row_bytes)
        for decoded, chunk_bad in _decode_chunks(root, missing, resolution):
            bad += chunk_bad
            for p, array in decoded:
                f.write(array.tobytes())
                entries[p] = [rows, *stamps[p]]
                rows += 1
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(folder)
    index = {"format": CACHE_FORMAT, "resolution": resolution, "rows": rows, "entries": entries}
    atomic_write_json(folder / "index.json", index)  # last: it names only rows that are on disk
    return index, bad


def _decode_chunks(root: Path, rel_paths: list[str], resolution: int):
    """Yield ``([(path, [3, R, R] uint8 array)], bad)`` for chunks of ``rel_paths``, decoded by a thread pool."""

    def work(p: str):
        try:
            return p, decode_image(root / p, resolution).numpy(), None
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for broken files
            return p, None, f"{type(err).__name__}: {err}"

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for lo in range(0, len(rel_paths), CHUNK):
            decoded, bad = [], []
            for p, array, error in pool.map(work, rel_paths[lo : lo + CHUNK]):
                if error is None:
                    decoded.append((p, array))
                else:
                    bad.append({"path": p, "reason": " ".join(error.split())})
            yield decoded, bad


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}; check the dataset folder") from err
    return (st.st_size, st.st_mtime_ns)


def _slug(root: Path) -> str:
    return f"{root.name}-{text_digest(str(root), 12)}"
