"""Content digests: every hash kdbench computes (trial keys, checkpoint and cache names, dataset fingerprints).

All are SHA-256, shown as the first ``n`` hex digits (16 by default, 64 bits: ample for the
thousands of trials or files a benchmark names).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

DIGITS = 16


def text_digest(text: str, n: int = DIGITS) -> str:
    """SHA-256 of a string (UTF-8)."""
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def json_digest(obj, n: int = DIGITS) -> str:
    """SHA-256 of ``obj`` as canonical JSON (sorted keys, no spaces): equal values give equal digests."""
    return text_digest(json.dumps(obj, sort_keys=True, separators=(",", ":")), n)


def file_sha256(path: str | os.PathLike, n: int = DIGITS) -> str:
    """SHA-256 of a file's bytes: a checkpoint's content identity."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def checkpoint_digest(path: str | os.PathLike) -> str:
    """``sha256:<digest>`` of a checkpoint file: how a teacher is named in a student's identity and result."""
    return f"sha256:{file_sha256(path)}"


def file_digests(root: str | os.PathLike, rel_files: Iterable[str]) -> list[str]:
    """:func:`file_sha256` of each file below ``root``: what an image cache or a fingerprint is keyed by.

    Reading every byte (about 1.5 s for all 27,000 EuroSAT images on a 2-core VM, 5 s from a cold disk: BENCHMARKS.md)
    is what makes a file overwritten in place, at the same size and even with its modification
    time restored, a different image to every cache.
    """
    root = Path(root)
    return [file_sha256(root / f) for f in rel_files]


def dataset_fingerprint(paths: Iterable[str], digests: Iterable[str]) -> str:
    """The image files a trial uses: their sorted names (relative to the dataset folder) with their content digests.

    Independent of where the dataset folder lives; an image added, removed, renamed or changed in
    any byte changes it.
    """
    return json_digest(sorted(zip(paths, digests)))
