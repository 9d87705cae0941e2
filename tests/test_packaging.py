"""The built wheel ships the ablation files, and a regular (non-editable) install runs from any folder."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

ABLATIONS = sorted(p.name for p in (REPO / "kdbench" / "ablations").glob("*.toml"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (path,) = out.glob("kdbench-*.whl")
    return path


def test_wheel_holds_every_ablation_file(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {"quick.toml", "paper.toml"} <= set(ABLATIONS)
    assert all(f"kdbench/ablations/{name}" in names for name in ABLATIONS)


def test_regular_install_finds_the_shipped_ablations_from_an_empty_folder(wheel, tmp_path, shared_data):
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "KDBENCH_DATA": str(shared_data)}
    for args in ([], ["--config", "quick"], ["--config", "paper.toml"], ["--config", "methods"]):  # methods: every module found
        proc = subprocess.run(
            [sys.executable, "-m", "kdbench.sweep", *args, "--dry-run"],
            cwd=empty,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        assert " trials (" in proc.stdout
    # the console script of [project.scripts], as pip installed it
    for args, usage in ((["--help"], "usage: kdbench "), (["sweep", "--help"], "usage: kdbench sweep ")):
        script = subprocess.run([site / "bin" / "kdbench", *args], cwd=empty, env=env, capture_output=True, text=True)
        assert script.returncode == 0, script.stderr
        assert script.stdout.startswith(usage)
    probe = "import kdbench, sys; print(kdbench.__file__)"
    where = subprocess.run([sys.executable, "-c", probe], cwd=empty, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(site))  # the installed copy ran, not the checkout
    assert not list(empty.iterdir())  # a dry run writes nothing
