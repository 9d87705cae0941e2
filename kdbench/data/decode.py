"""Decode images once per (dataset folder, resolution) into a memory-mapped uint8 cache.

Training reads ``[N, 3, R, R]`` uint8 tensors, never JPEGs.  The cache lives in
``$KDBENCH_CACHE`` (default ``~/.cache/kdbench``) because data folders are often
read-only, one folder per (dataset folder, resolution):

- ``images.u8``: the decoded images, one row of ``3*R*R`` bytes each, only ever
  appended to; processes map it read-only (``numpy.memmap``), so every worker of a
  sweep shares one copy through the page cache, and a run reads only its rows;
- ``index.json``: ``content digest -> row`` (SHA-256 of the image file's bytes,
  :func:`kdbench.digest.file_digests`) and the row count, replaced atomically
  (:mod:`kdbench.durable`) AFTER the rows it names are on disk.

A row is found by what the file holds, never by its name, size or time: an image
overwritten in place is decoded again into a new row, and two identical files share one.
A crash during an append leaves rows past the index's count: they are
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

from kdbench.advice import setting
from kdbench.data import pixels
from kdbench.data.index import content_digests
from kdbench.digest import text_digest
from kdbench.durable import atomic_write_json, file_lock, fsync_dir
from kdbench.errors import UserError, disk_full_message, is_disk_full

CACHE_FORMAT = "kdbench-image-cache-v3"  # v3: rows keyed by file content; kdbench.data.pixels' rule
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


def load_images(
    root: Path,
    rel_files: list[str],
    resolution: int,
    *,
    skip_bad: bool = False,
    digests: list[str] | None = None,
    names: list[str] | None = None,
) -> tuple[torch.Tensor, list[dict]]:
    """``([N, 3, R, R] uint8, bad)`` for ``rel_files`` under ``root``, from the cache where possible.

    ``digests`` are the files' :func:`~kdbench.digest.file_digests` (computed when not given) and
    ``names`` their portable names for messages (:func:`kdbench.data.index.portable_name`; the
    files' own names when not given).  An unreadable or truncated image is an error naming it,
    unless ``skip_bad``: then it is left out of the tensor and listed in ``bad``
    (``{"path", "reason"}``, by name), and the caller drops it from its index.

    Raises:
        UserError: a file that cannot be read at all, or a bad image without ``skip_bad``.
    """
    root = root.resolve()
    names = names or list(rel_files)
    digests = digests or content_digests(root, rel_files)
    folder = cache_folder(root, resolution)
    index = _read_index(folder, resolution)
    bad: list[dict] = []
    if any(d not in index["entries"] for d in digests):
        with file_lock(folder / ".lock"):
            index = _read_index(folder, resolution)  # another process may have added them meanwhile
            missing = {d: f for f, d in zip(rel_files, digests) if d not in index["entries"]}
            index, failed = _append(folder, root, index, missing, resolution)
        bad = [{"path": n, "reason": failed[d]} for n, d in zip(names, digests) if d in failed]
    if bad and not skip_bad:
        shown = "; ".join(f"{b['path']} ({b['reason']})" for b in bad[:3])
        raise UserError(
            f"{len(bad)} unreadable image(s) under {root}: {shown}{' ...' if len(bad) > 3 else ''}; "
            "replace or delete them, or leave them out and list them in the run record with "
            + setting("data.skip_bad_images", "true")
        )
    rows = np.array([index["entries"][d] for d in digests if d in index["entries"]], dtype=np.int64)
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
        and all(0 <= row < rows for row in index["entries"].values())
    )
    return index if valid else _empty_index(resolution)


def _append(folder: Path, root: Path, index: dict, missing: dict[str, str], resolution: int) -> tuple[dict, dict[str, str]]:
    """Decode ``missing`` (digest -> file), append them to ``images.u8`` (under the lock), then write the index.

    Returns the new index and, for each image that could not be decoded, digest -> reason.

    Raises:
        UserError: the disk is full (naming ``images.u8``, the space free and the space the images need).
    """
    if not missing:
        return index, {}
    folder.mkdir(parents=True, exist_ok=True)
    row_bytes = 3 * resolution * resolution
    entries, rows, failed = dict(index["entries"]), index["rows"], {}
    data_file = folder / "images.u8"
    if rows == 0 and (folder / "index.json").exists():  # a damaged cache: start it over
        with contextlib.suppress(OSError):
            (folder / "index.json").unlink()
    try:
        with open(data_file, "r+b" if data_file.exists() and rows else "wb") as f:
            f.truncate(rows * row_bytes)  # rows a crashed append left past the index
            f.seek(rows * row_bytes)
            for decoded, chunk_failed in _decode_chunks(root, list(missing.items()), resolution):
                failed |= chunk_failed
                for digest, array in decoded:
                    f.write(array.tobytes())
                    entries[digest] = rows
                    rows += 1
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:  # rows past the index are truncated by the next append: nothing half-written is read
        if is_disk_full(err):
            full = OSError(err.errno, err.strerror, str(data_file))
            raise UserError(disk_full_message(full, needed=len(missing) * row_bytes)) from err
        raise
    fsync_dir(folder)
    index = {"format": CACHE_FORMAT, "resolution": resolution, "rows": rows, "entries": entries}
    atomic_write_json(folder / "index.json", index)  # last: it names only rows that are on disk
    return index, failed


def _decode_chunks(root: Path, missing: list[tuple[str, str]], resolution: int):
    """Yield ``([(digest, [3, R, R] uint8 array)], {digest: reason})`` for chunks of ``missing``, decoded by threads."""

    def work(item):
        digest, file = item
        try:
            return digest, decode_image(root / file, resolution).numpy(), None
        except UserError as err:  # kdbench.data.pixels refuses a mode: its reason, without the path named beside it
            return digest, None, str(err).removeprefix(f"{root / file}: ")
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for broken files
            return digest, None, f"{type(err).__name__}: {err}"

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for lo in range(0, len(missing), CHUNK):
            decoded, failed = [], {}
            for digest, array, error in pool.map(work, missing[lo : lo + CHUNK]):
                if error is None:
                    decoded.append((digest, array))
                else:
                    failed[digest] = " ".join(error.split())
            yield decoded, failed


def _slug(root: Path) -> str:
    return f"{root.name}-{text_digest(str(root), 12)}"
