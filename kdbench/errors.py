"""User-facing errors and the command-line guard that prints them as one line.

Anything a user can cause (missing data, a bad config, a corrupt image, a bad
checkpoint) raises :class:`UserError` with a message that says what is wrong and
what to do.  Entry points wrap their ``main`` in :func:`cli_main`, which turns such
an error into ``kdbench: error: <message>`` on stderr and exit status 2, never a
traceback.  Any other exception (a bug, a library failure) becomes one line too,
naming the log file that holds its full traceback, and exit status 1: under the
folder the command set with :func:`log_errors_to` (the sweep's or run's output
folder), else under ``$KDBENCH_CACHE/logs`` (default ``~/.cache/kdbench/logs``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import os
import platform
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

LOG_FOLDER = "logs"


class UserError(Exception):
    """An error the user can fix; its message is shown as one line."""


class NonFiniteError(UserError):
    """A loss or a teacher output became NaN or infinite during training."""


def one_line(message: str) -> str:
    return " ".join(str(message).split())


_log_dir: Path | None = None  # where the running command writes an unexpected error's traceback


def log_errors_to(folder: str | os.PathLike | None) -> None:
    """Make the running command write the traceback of an unexpected error under ``folder/logs/``."""
    global _log_dir
    _log_dir = Path(folder) if folder is not None else None


def default_log_dir() -> Path:
    """``$KDBENCH_CACHE/logs`` (default ``~/.cache/kdbench/logs``): for commands without an output folder."""
    return Path(os.environ.get("KDBENCH_CACHE") or Path.home() / ".cache" / "kdbench").expanduser() / LOG_FOLDER


def write_error_log(err: BaseException, folder: str | os.PathLike | None = None, what: str = "kdbench") -> Path:
    """Write ``err``'s full traceback, the command line and versions to a new log file; returns its path.

    The file is ``<folder>/logs/<what>-error-<UTC time>.log``; when ``folder`` is None
    or cannot be written, it goes under :func:`default_log_dir` (then the temp folder).
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    text = (
        f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}\n"
        f"cwd: {os.getcwd()}\npython {platform.python_version()} on {platform.platform()}\n\n"
        + "".join(traceback.format_exception(type(err), err, err.__traceback__))
    )
    candidates = [Path(folder) / LOG_FOLDER] if folder is not None else []
    candidates += [default_log_dir(), Path(os.environ.get("TMPDIR") or "/tmp") / "kdbench-logs"]
    for logs in candidates:
        try:
            logs.mkdir(parents=True, exist_ok=True)
            path = logs / f"{what}-error-{stamp}-{os.getpid()}.log"
            path.write_text(text)
            return path.resolve()
        except OSError:
            continue
    return Path("(no writable log folder)")


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` is a write refused for want of space (a full disk or an exhausted quota)."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_message(err: OSError, needed: int | None = None) -> str:
    """One line for a full disk: the file that could not be written, the space free there and, if known, needed.

    Written files are atomic (:mod:`kdbench.durable`): nothing half-written is kept, so rerunning resumes.
    """
    where = Path(err.filename) if err.filename else None
    folder = next((p for p in (where.parents if where else [Path.cwd()]) if p.is_dir()), Path.cwd())
    free = shutil.disk_usage(folder).free
    need = f", {_size(needed)} needed" if needed else ""
    return (
        f"disk full while writing {where or 'a file'} ({_size(free)} free on its disk{need}): free space "
        "there and rerun the same command (finished work is kept, it resumes)"
    )


def _size(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 100_000 else f"{n / 1e3:,.1f} kB"


def describe(err: BaseException) -> str:
    """``Type: message`` of an unexpected error, as one line."""
    message = one_line(err)
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's flush at exit does not fail on the closed pipe again."""
    with contextlib.suppress(OSError, ValueError, io.UnsupportedOperation):  # stdout is no file (captured): no flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def cli_main(main: Callable[..., int | None]) -> Callable[..., int]:
    """Decorate a CLI ``main``: any error and Ctrl-C become one line and a non-zero exit, never a traceback.

    UserError: its message, exit 2.  A full disk: the file and the free space (:func:`disk_full_message`),
    exit 1.  Anything else: ``unexpected <Type>: <message>`` and the log file holding the traceback, exit 1.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        log_errors_to(None)
        spec = main.__globals__.get("__spec__")  # under python -m, __module__ is __main__
        what = (spec.name if spec else main.__module__).removesuffix(".__main__").rsplit(".", 1)[-1]
        try:
            status = int(main(*args, **kwargs) or 0)
            sys.stdout.flush()  # here, not at exit: a closed pipe is then one of the errors below
            return status
        except UserError as err:
            print(f"kdbench: error: {one_line(err)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("kdbench: interrupted; rerun the same command to resume", file=sys.stderr)
            return 130
        except BrokenPipeError:  # the reader of stdout went away (``| head``): stop quietly, like any Unix tool
            _silence_stdout()
            return 141
        except SystemExit:  # argparse's usage errors and --help
            raise
        except Exception as err:
            if is_disk_full(err):  # no traceback to read: the file and the space say it all
                print(f"kdbench: error: {disk_full_message(err)}", file=sys.stderr)
                return 1
            log = write_error_log(err, _log_dir, what)
            print(f"kdbench: error: unexpected {describe(err)}; full traceback in {log}", file=sys.stderr)
            return 1
        finally:
            log_errors_to(None)

    return wrapper
