"""Where a trial runs: device choice, CUDA defaults, and a record of the hardware and libraries."""

from __future__ import annotations

import contextlib

import torch

from kdbench import machine
from kdbench.advice import setting
from kdbench.config import PRECISION
from kdbench.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if machine.gpu_visible() else "cpu")
    if name == "cuda" and not machine.gpu_visible():
        raise UserError(
            f"device cuda was asked for but no CUDA GPU is visible: use cpu or auto, e.g. {setting('run.device', 'cpu')}"
        )
    if name not in ("cpu", "cuda"):
        raise UserError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing on CPU (fp32 there)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def full_precision(outputs: torch.Tensor) -> torch.Tensor:
    """A model's outputs for losses and metrics: bf16/fp16 (autocast) raised to fp32, fp32 and fp64 as they are.

    Training follows torch's default dtype (models are built and images normalised in it): fp32
    normally; the tests that compare two code paths run in fp64 (``torch.set_default_dtype``), where
    kernel-order rounding stays far below what the comparison checks.
    """
    return outputs.float() if outputs.dtype in (torch.bfloat16, torch.float16) else outputs


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on every device: models, images and teacher inputs are all laid out NHWC.

    On CUDA it feeds tensor-core convolutions; on CPU it is never slower in fp32 training, measured
    per model (``benchmarks/cpu_formats.py``, BENCHMARKS.md "CPU memory format and precision"):
    MobileNetV2 1.68-1.80x and ResNet-18 1.12x on an AMD EPYC VM, MobileNetV2 1.44-2.0x on an
    Intel Xeon VM.  The format is not in a trial's key (it changes rounding, not the computation);
    each result records it (:func:`environment`).
    """
    return torch.channels_last


def layout(device: torch.device) -> str:
    """The name a record gives :func:`memory_format` on ``device``: ``channels_last`` or ``contiguous``."""
    return "channels_last" if memory_format(device) == torch.channels_last else "contiguous"


def environment(device: torch.device) -> dict:
    """Hardware and library versions (:func:`kdbench.machine.environment`) with this process's torch threads,
    and how the trial computed: its memory format and its precision (:data:`kdbench.config.PRECISION`)."""
    return {
        **machine.environment(str(device), torch.get_num_threads()),
        "memory_format": layout(device),
        "precision": PRECISION[device.type],
    }
