"""Where a trial runs: device choice, CUDA defaults, and a record of the hardware and libraries."""

from __future__ import annotations

import contextlib

import torch

from kdbench import machine
from kdbench.errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if machine.gpu_visible() else "cpu")
    if name == "cuda" and not machine.gpu_visible():
        raise UserError("device cuda was asked for but no CUDA GPU is visible: use --device cpu or auto")
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
    """channels_last on CUDA (faster convolutions with tensor cores), contiguous on CPU."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def environment(device: torch.device) -> dict:
    """Hardware and library versions (:func:`kdbench.machine.environment`) with this process's torch threads."""
    return machine.environment(str(device), torch.get_num_threads())
