"""Durable files: atomic writes that survive a crash or a full disk, and the one file-lock helper.

:func:`atomic_write` writes into a temporary file in the target's folder, flushes and
``fsync``s it, renames it over the target and ``fsync``s the folder, so after a crash
(or a power cut) the target holds either its old or its new content, never half of
each.  On any error (``ENOSPC`` included) the temporary file is removed before the
error propagates: a full disk never leaves multi-GB ``.tmp`` files behind.

:func:`file_lock` is a :mod:`filelock` lock on a ``.lock`` file (``flock`` on POSIX, ``LockFileEx`` on
Windows: the kernel drops it when its process dies, even by ``kill -9``): blocking, or non-blocking where
a caller would rather do something else than wait (:class:`Busy`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import filelock

from kdbench.errors import is_disk_full


class Busy(Exception):
    """A non-blocking :func:`file_lock` is held by another process."""


def fsync_dir(folder: str | os.PathLike) -> None:
    """``fsync`` a folder so a rename or a new file in it is on disk (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Create or replace ``path`` with what ``write(f)`` writes into a binary file object, atomically and durably."""
    with atomic_file(path) as f:
        write(f)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file that replaces ``path`` atomically and durably when the block ends without an error.

    For writers that stream (several files at once, chunk by chunk); :func:`atomic_write` is its one-call form.
    On an error the temporary file is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    recording = None
    try:
        with _open(tmp, "wb") as f:
            recording = _Recording(f)
            yield recording
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        real = recording.error if recording is not None and recording.error is not None else err
        if is_disk_full(real) and not real.filename:  # name the file in the one-line error
            raise OSError(real.errno, real.strerror, str(path)) from err
        if real is not err:  # torch.save turns the OSError of a full disk into a RuntimeError: give the real one
            raise real from err
        raise
    fsync_dir(path.parent)


_open = open  # tests replace it to simulate a full disk


class _Recording:
    """A binary file that remembers the OSError its ``write`` raised (ENOSPC), whatever the writer makes of it."""

    def __init__(self, f: IO[bytes]):
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of :func:`atomic_write` in ``folder`` left by processes that died (``kill -9``)."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        pid = tmp.name[: -len(".tmp")].rpartition(".")[2]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs; on Windows always assumed (``os.kill`` there would terminate it, not probe it)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`: a crash or a full disk never leaves half a checkpoint."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, blocking: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) while the block runs.

    Args:
        path: the lock file.
        blocking: wait for the lock (True) or give up at once if another process holds it.

    Raises:
        Busy: ``blocking`` is False and another process holds the lock.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(path, timeout=-1 if blocking else 0)
    try:
        lock.acquire()
    except filelock.Timeout as err:
        raise Busy(str(path)) from err
    try:
        yield
    finally:
        lock.release()
