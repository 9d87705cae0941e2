"""Decode images once per (dataset folder, resolution) into a cached uint8 tensor file.

Training reads ``[N, 3, R, R]`` uint8 tensors, never JPEGs.  The cache lives in
``$KDBENCH_CACHE`` (default ``~/.cache/kdbench``) because data folders are often
read-only; each entry remembers the size and modification time of its source
files, so an image changed on disk is decoded again.  Requests for images not yet
in the cache decode only those and add them.
"""

from __future__ import annotations

import fcntl
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdbench.digest import text_digest
from kdbench.errors import UserError


def cache_dir() -> Path:
    return Path(os.environ.get("KDBENCH_CACHE") or Path.home() / ".cache" / "kdbench").expanduser()


def decode_image(path: Path, resolution: int) -> torch.Tensor:
    """One image as ``[3, R, R]`` uint8 RGB, resized with antialiased bilinear filtering."""
    with Image.open(path) as img:
        img.load()
        rgb = img.convert("RGB")
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
    cache_file = cache_dir() / f"{_slug(root)}-r{resolution}.pt"
    with _locked(cache_file):
        cached = _read_cache(cache_file)
        known = {p: i for i, p in enumerate(cached["paths"]) if cached["stamps"][i] == stamps.get(p)}
        missing = [p for p in rel_paths if p not in known]
        decoded, bad = _decode_many(root, missing, resolution)
        if bad and not skip_bad:
            shown = "; ".join(f"{b['path']} ({b['reason']})" for b in bad[:3])
            raise UserError(
                f"{len(bad)} unreadable image(s) under {root}: {shown}{' ...' if len(bad) > 3 else ''}; "
                "replace or delete them, or pass --skip-bad-images to leave them out and list them in the run record"
            )
        if decoded:
            cached = _extend(cached, decoded, stamps)
            _write_cache(cache_file, cached)
            known = {p: i for i, p in enumerate(cached["paths"])}
    bad_paths = {b["path"] for b in bad}
    order = torch.tensor([known[p] for p in rel_paths if p not in bad_paths], dtype=torch.long)
    images = (
        cached["images"].index_select(0, order) if len(order) else torch.empty(0, 3, resolution, resolution, dtype=torch.uint8)
    )
    return images, bad


def _decode_many(root: Path, rel_paths: list[str], resolution: int) -> tuple[dict[str, torch.Tensor], list[dict]]:
    def work(p: str):
        try:
            return p, decode_image(root / p, resolution), None
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for broken files
            return p, None, f"{type(err).__name__}: {err}"

    decoded, bad = {}, []
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for p, tensor, error in pool.map(work, rel_paths):
            if error is None:
                decoded[p] = tensor
            else:
                bad.append({"path": p, "reason": " ".join(error.split())})
    return decoded, bad


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}; check the dataset folder") from err
    return (st.st_size, st.st_mtime_ns)


def _slug(root: Path) -> str:
    return f"{root.name}-{text_digest(str(root), 12)}"


def _read_cache(path: Path) -> dict:
    empty = {"paths": [], "stamps": [], "images": None}
    if not path.exists():
        return empty
    try:
        data = torch.load(path, weights_only=True)
        data["stamps"] = [tuple(s) for s in data["stamps"]]
        return data
    except Exception:  # a damaged cache is only a cache: rebuild it
        return empty


def _extend(cached: dict, decoded: dict[str, torch.Tensor], stamps: dict) -> dict:
    paths = list(decoded)
    new = torch.stack([decoded[p] for p in paths])
    images = new if cached["images"] is None else torch.cat([cached["images"], new])
    return {"paths": cached["paths"] + paths, "stamps": cached["stamps"] + [stamps[p] for p in paths], "images": images}


def _write_cache(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"paths": data["paths"], "stamps": [list(s) for s in data["stamps"]], "images": data["images"]}, tmp)
    os.replace(tmp, path)


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
