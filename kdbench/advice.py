"""How kdbench spells its own commands in help texts and hints: the way the user runs them.

Typed as ``kdbench sweep`` (the console script), a usage line, a help example or an error's advice says
``kdbench sweep ...``; run as ``python -m kdbench.sweep``, it says that.  Every command line a message
advises is built by :func:`command` or :func:`setting` (tests/test_advice.py parses each of them).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

MODULE_SPELLING = re.compile(r"python -m kdbench\.(\w+)")


def command(name: str, *args: str) -> str:
    """The command line ``kdbench NAME ARGS`` as the running program is typed: ``kdbench NAME`` or ``python -m kdbench.NAME``.

    The program is ``sys.argv[0]``, which worker processes inherit: the console script ``kdbench`` (``kdbench.exe``),
    ``python -m kdbench.cli`` (then ``python -m kdbench.cli NAME``), else a module of its own.
    """
    program = Path(sys.argv[0] if sys.argv else "")
    if program.stem == "kdbench":
        prefix = f"kdbench {name}"
    elif program.name == "cli.py" and program.parent.name == "kdbench":
        prefix = f"python -m kdbench.cli {name}"
    else:
        prefix = f"python -m kdbench.{name}"
    return " ".join((prefix, *args))


def spelled(text: str) -> str:
    """``text`` with every ``python -m kdbench.NAME`` written as :func:`command` spells it (help examples)."""
    return MODULE_SPELLING.sub(lambda m: command(m.group(1)), text)


def setting(key: str, value: str) -> str:
    """A trial setting as the settings file writes it and as each command sets it, e.g. for ``data.skip_bad_images``:

    ``data.skip_bad_images = true (kdbench train --skip-bad-images; kdbench sweep --set data.skip_bad_images=true)``.
    ``value`` is TOML; the train flag is the key's last part with dashes, alone for ``true``.
    """
    flag = "--" + key.rsplit(".", 1)[-1].replace("_", "-")
    train = command("train", flag) if value == "true" else command("train", flag, value)
    return f"{key} = {value} ({train}; {command('sweep', '--set', f'{key}={value}')})"
