"""User-facing errors and the command-line guard that prints them as one line.

Anything a user can cause (missing data, a bad config, a corrupt image, a bad
checkpoint) raises :class:`UserError` with a message that says what is wrong and
what to do.  Entry points wrap their ``main`` in :func:`cli_main`, which turns such
an error into ``kdbench: error: <message>`` on stderr and exit status 2, never a
traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


class UserError(Exception):
    """An error the user can fix; its message is shown as one line."""


class NonFiniteError(UserError):
    """A loss or a teacher output became NaN or infinite during training."""


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def cli_main(main: Callable[..., int | None]) -> Callable[..., int]:
    """Decorate a CLI ``main``: UserError and Ctrl-C become one line and a non-zero exit."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return int(main(*args, **kwargs) or 0)
        except UserError as err:
            print(f"kdbench: error: {one_line(err)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("kdbench: interrupted; rerun the same command to resume", file=sys.stderr)
            return 130

    return wrapper
