"""``python -m kdbench.report DIR``: write the report of the sweep whose results store is in DIR."""

from __future__ import annotations

import argparse

from kdbench.advice import command, spelled
from kdbench.errors import cli_main, log_errors_to
from kdbench.report import build_report


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=command("report"), description=spelled(__doc__))
    parser.add_argument("dir", help="sweep output folder holding store.sqlite (e.g. reports/quick)")
    args = parser.parse_args(argv)
    log_errors_to(args.dir)
    for path in build_report(args.dir):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
