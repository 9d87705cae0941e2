"""The ``kdbench`` command: ``kdbench sweep|train|report|profile`` is ``python -m kdbench.<command>``.

Run here as ``python -m kdbench.cli`` (the console script exists only once installed;
tests/test_packaging.py runs the installed one).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

import pytest
from conftest import REPO, make_image_folder, run_cli
from test_sweep import HEAVY_MODULES, write_ablation

from kdbench import __version__ as kdbench_version
from kdbench.cli import COMMANDS


def kdbench(*args: str, cwd=None) -> tuple[subprocess.CompletedProcess, set[str]]:
    """``kdbench args`` through ``python -X importtime -m kdbench.cli``, and the top-level packages it imported."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "kdbench.cli", *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    imported = {
        line.rpartition("|")[2].strip().split(".")[0] for line in proc.stderr.splitlines() if line.startswith("import time:")
    }
    proc.stderr = "".join(line + "\n" for line in proc.stderr.splitlines() if not line.startswith("import time:"))
    return proc, imported


def test_the_console_script_is_declared():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"] == {"kdbench": "kdbench.cli:main"}


def test_help_lists_every_command_in_one_line_without_torch():
    proc, imported = kdbench("--help")
    assert proc.returncode == 0, proc.stderr
    listed = proc.stdout.split("commands:\n", 1)[1].splitlines()
    assert [line.split()[0] for line in listed] == ["sweep", "train", "report", "profile"] == list(COMMANDS)
    assert all(line.split(None, 1)[1] == COMMANDS[line.split()[0]][1] for line in listed)
    assert not imported & {*HEAVY_MODULES, "pandas"}, imported


def test_sweep_help_is_the_sweeps_own_without_torch():
    proc, imported = kdbench("sweep", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m kdbench.cli sweep ")  # as the user typed it
    assert proc.stdout.split("options:")[1] == run_cli("kdbench.sweep", "--help").stdout.split("options:")[1]
    assert not imported & set(HEAVY_MODULES), imported


@pytest.mark.parametrize("command", ["train", "report", "profile"])
def test_each_commands_help_is_its_own(command):
    proc, imported = kdbench(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: python -m kdbench.cli {command} ")  # as the user typed it
    assert "torch" not in imported, imported


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "the following arguments are required: COMMAND"),
        (("bogus", "--dry-run"), "invalid choice: 'bogus'"),
        (("--bogus", "sweep"), "unrecognized arguments: --bogus"),
    ],
)
def test_no_command_or_an_unknown_one_prints_usage_and_exits_2(args, message):
    proc, _ = kdbench(*args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    usage, error = proc.stderr.splitlines()  # argparse's: the usage line, then the error line; no traceback
    assert usage == "usage: kdbench [-h] [--version] COMMAND [ARGS ...]"
    assert error.startswith("kdbench: error: ") and message in error


def test_a_command_keeps_its_flags_and_exit_status(tmp_path):
    missing = str(tmp_path / "none.toml")
    proc, _ = kdbench("sweep", "--config", missing)
    direct = run_cli("kdbench.sweep", "--config", missing)
    assert proc.returncode == direct.returncode == 2
    assert proc.stderr == direct.stderr and direct.stderr.count("\n") == 1 and "not found" in direct.stderr
    folder = make_image_folder(tmp_path / "d", classes=3, per_class=10)
    ablation = str(write_ablation(tmp_path, folder))
    proc, imported = kdbench("sweep", "--config", ablation, "--dry-run", "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    assert "6 trials (1 teachers, 5 students)" in proc.stdout
    assert not imported & set(HEAVY_MODULES), imported  # the dry run plans without torch, as python -m kdbench.sweep does
    assert not (tmp_path / "o").exists()


def test_version():
    proc, _ = kdbench("--version")
    assert (proc.returncode, proc.stdout) == (0, f"kdbench {kdbench_version}\n")
