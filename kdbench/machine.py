"""The machine a run uses: whether a GPU is visible, and a record of the hardware and libraries.

None of this imports torch unless it must (a GPU's name): the sweep driver only plans and
coordinates, so with ``--workers 2`` or more it never imports torch, whose import alone holds
about 0.5 GiB of resident memory (BENCHMARKS.md, issue #12); the workers do.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

from kdbench import __version__

# What a loaded GPU driver leaves on Linux: NVIDIA (/proc/driver/nvidia, /dev/nvidiactl), ROCm (/dev/kfd,
# which torch.cuda also drives) and WSL2's GPU bridge (/dev/dxg)
GPU_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def gpu_visible() -> bool:
    """``torch.cuda.is_available()``, answered without importing torch on a Linux machine with no GPU driver."""
    if sys.platform == "linux" and not any(os.path.exists(p) for p in GPU_DRIVER_PATHS):
        return False
    import torch

    return torch.cuda.is_available()


def environment(device: str, torch_threads: int | None) -> dict:
    """Hardware and library versions of a run on ``device`` (``cpu`` or ``cuda[:i]``), saved with every result and sweep."""
    env = {
        "kdbench": __version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": library_version("torch"),
        "torchvision": library_version("torchvision"),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch_threads,
        "device": device,
    }
    if device.startswith("cuda"):
        import torch

        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def library_version(name: str) -> str | None:
    """A package's ``__version__`` with its build tag (``2.14.1+cu130``), read from its ``version.py`` without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        return None
    for folder in spec.submodule_search_locations or ():
        with contextlib.suppress(OSError):
            found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", (Path(folder) / "version.py").read_text(), re.M)
            if found:
                return found.group(1)
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"
