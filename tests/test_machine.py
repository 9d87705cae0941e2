"""kdbench.machine: the GPU check and the record of the machine, answered without importing torch where it can."""

import subprocess
import sys

import torch
import torchvision
from conftest import REPO

from kdbench import machine


def probe(driver_paths: tuple[str, ...]) -> list[str]:
    """``gpu_visible()`` in a fresh process with these driver paths, and whether that imported torch."""
    code = (
        "import sys; from kdbench import machine; "
        f"machine.GPU_DRIVER_PATHS = {driver_paths!r}; print(machine.gpu_visible(), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True, timeout=120)
    return out.stdout.split()


def test_no_gpu_driver_means_no_gpu_and_no_torch_import():
    if sys.platform == "linux":
        assert probe(("/nonexistent/nvidia",)) == ["False", "False"]


def test_with_a_gpu_driver_torch_decides():
    assert probe((str(REPO),)) == [str(torch.cuda.is_available()), "True"]


def test_library_versions_carry_the_build_tag_without_importing():
    assert machine.library_version("torch") == torch.__version__
    assert machine.library_version("torchvision") == torchvision.__version__
    assert machine.library_version("no_such_package_kdbench") is None


def test_environment_records_the_workers_threads_and_the_device():
    env = machine.environment("cpu", 3)
    assert env["torch_threads"] == 3 and env["device"] == "cpu" and "gpu" not in env
    assert env["torch"] == torch.__version__ and env["cpu_count"] >= 1 and env["python"].count(".") == 2
