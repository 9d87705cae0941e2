"""Shared fixtures: tiny synthetic image folders for unit tests, the real datasets for integration tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "datasets"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session decodes into its own tensor cache, never the user's."""
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "kdbench-cache"))
    monkeypatch.setenv("KDBENCH_NO_DOWNLOAD", "1")


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A sweep run in-process sets torch's thread count (``--threads``): every test starts with the count the run began with.

    Training at these tiny sizes is chaotic enough that the thread count (another kernel partition) changes a
    trajectory; a test must not depend on which tests ran before it.
    """
    torch = sys.modules.get("torch")  # not imported here: the torch-free tests must stay so
    threads = torch.get_num_threads() if torch else None
    yield
    if torch and threads:
        torch.set_num_threads(threads)


@pytest.fixture
def float64():
    """Train in float64 (torch's default dtype; kdbench builds models and normalises images in it).

    For tests that compare two float computations along different code paths (cached vs online
    teacher, other batch shapes or kernels) after training: in float32 their rounding differences
    (1e-7) grow through the training trajectory to 1e-3 and more, and differ by CPU; in float64 they
    start at 1e-16 and stay orders of magnitude below the tolerance.
    """
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def make_image_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 24, fmt: str = "png", seed: int = 0) -> Path:
    """``root/<class>/<n>.<fmt>`` with learnable images: each class has its own mean colour plus noise."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        base = np.array([(c * 97) % 256, (c * 53 + 80) % 256, (c * 151 + 40) % 256], dtype=np.float64)
        for i in range(per_class):
            pixels = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img{i:03d}.{fmt}")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "data" / "tiny")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets: ``$KDBENCH_DATA`` or ``../shared/datasets``; missing data fails in CI and skips elsewhere."""
    root = Path(os.environ.get("KDBENCH_DATA") or SHARED_DATA)
    if not all((root / name).is_dir() for name in ("eurosat", "ucmerced", "rsscn7")):
        message = f"real datasets not found under {root}: set KDBENCH_DATA to the folder holding eurosat/, ucmerced/, rsscn7/"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return root


def run_cli(
    module: str, *args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` as a user would, returning the completed process."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def call_main(main, args: list[str], capsys) -> subprocess.CompletedProcess:
    """Run a CLI ``main`` in this process (faster than a subprocess), captured like ``run_cli``."""
    code = main(args)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """A non-zero exit with exactly one ``kdbench: error:`` line on stderr, no traceback, naming each needle."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("kdbench: error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


_SKIPPED: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped:
        _SKIPPED.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    """In CI every test must run: a skipped test (a missing extra, missing data) fails the run."""
    if os.environ.get("CI") and _SKIPPED and exitstatus == 0:
        print(f"\nCI: {len(_SKIPPED)} test(s) skipped, which CI does not allow: {', '.join(_SKIPPED[:5])}")
        session.exitstatus = 1


def loss_config(alpha: float = 1.0, **settings):
    """A LossConfig of the CE weight ``alpha`` and a method's settings by name (issue 22: one vocabulary)."""
    from kdbench.losses import LossConfig

    return LossConfig(alpha=alpha, params=tuple((k, v if isinstance(v, str) else float(v)) for k, v in settings.items()))
