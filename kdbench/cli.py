"""``kdbench COMMAND [ARGS]``: one command for kdbench's tools (``python -m kdbench.cli`` runs it uninstalled).

    kdbench sweep --config ablations/cpu.toml --dry-run
    kdbench train --dataset eurosat --model vgg16_bn --out runs/teacher
    kdbench report reports/quick
    kdbench profile --dataset eurosat --resolution 224

Each command is ``python -m kdbench.<command>``: the same flags (``kdbench COMMAND --help``) and the
same exit status.  A command's module is imported only to run it, so the help of
kdbench and of its sweep loads no torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kdbench import __version__
from kdbench.errors import cli_main

# command: (module whose ``main(argv)`` runs it, one line for ``kdbench --help``)
COMMANDS = {
    "sweep": ("kdbench.sweep.__main__", "run an ablation file into a resumable results store, then write its report"),
    "train": ("kdbench.train", "train one teacher, or one student by knowledge distillation"),
    "report": ("kdbench.report.__main__", "write the report of a sweep's output folder"),
    "profile": ("kdbench.profile", "parameters, FLOPs and checkpoint size of a teacher and a student"),
}


def build_parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS))
    p = argparse.ArgumentParser(
        prog="kdbench",
        usage="%(prog)s [-h] [--version] COMMAND [ARGS ...]",
        description=__doc__.replace("``", ""),  # the docstring, as plain text
        epilog="commands:\n" + "\n".join(f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"kdbench {__version__}")
    p.add_argument("command", metavar="COMMAND", choices=COMMANDS, help=argparse.SUPPRESS)  # listed in the epilog
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # the command alone is parsed here: its arguments, --help included, go to its own main
    command = build_parser().parse_args(argv[:1] if argv and not argv[0].startswith("-") else argv).command
    module = importlib.import_module(COMMANDS[command][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
