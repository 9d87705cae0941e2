"""Finiteness checks of everything a result is computed from: weights, buffers, logits, checkpoints.

A NaN or an infinity in a model's state or outputs would still give an arg-max (class 0)
and so a plausible-looking accuracy; these checks turn it into a one-line
:class:`~kdbench.errors.NonFiniteError` naming the tensor instead.  One device sync per
check, whatever the number of tensors.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping

import torch
from torch import nn

from kdbench.errors import NonFiniteError

TRAINING_HINT = "lower the learning rate or check the teacher and data"


@torch.no_grad()
def non_finite(named: Iterable[tuple[Hashable, torch.Tensor]]) -> list:
    """The keys of the floating-point tensors of ``named`` that hold a NaN or an infinity, in order.

    One fused norm per tensor (``torch._foreach_norm``) and a single read of all of them;
    only a tensor whose norm is not finite (a NaN or inf in it, or a finite overflow of
    the norm) is then looked at element by element.
    """
    keys, tensors = [], []
    for key, t in named:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            keys.append(key)
            tensors.append(t.detach())
    if not tensors:
        return []
    norms = torch._foreach_norm(tensors)
    device = norms[0].device
    finite = torch.stack([n.to(device, torch.float32) for n in norms]).isfinite().tolist()
    return [k for k, t, ok in zip(keys, tensors, finite) if not ok and not bool(torch.isfinite(t).all())]


def named_state(model: nn.Module | Mapping[str, torch.Tensor]) -> Iterable[tuple[str, torch.Tensor]]:
    """A model's parameters and buffers (its ``state_dict``), or a state dict's items."""
    return (model.state_dict() if isinstance(model, nn.Module) else model).items()


def tensors_phrase(names: list) -> str:
    """``name`` or ``name (and 6 more tensors)``."""
    more = f" (and {len(names) - 1} more tensor{'s' if len(names) > 2 else ''})" if len(names) > 1 else ""
    return f"{names[0]}{more}"


def check_finite_state(model: nn.Module | Mapping[str, torch.Tensor], where: str, hint: str = TRAINING_HINT) -> None:
    """Raise ``NaN or infinite values in <tensor> <where>: <hint>`` if a weight or buffer is not finite."""
    bad = non_finite(named_state(model))
    if bad:
        raise NonFiniteError(f"NaN or infinite values in {tensors_phrase(bad)} {where}: {hint}")


def check_finite_logits(logits: torch.Tensor, what: str, hint: str = TRAINING_HINT) -> None:
    """Raise ``NaN or infinite values in <what> (n of N images): <hint>`` if ``logits`` ``[N, C]`` are not finite."""
    if non_finite([(what, logits)]):
        rows = int((~torch.isfinite(logits)).flatten(1).any(1).sum()) if logits.dim() > 1 else 1
        raise NonFiniteError(f"NaN or infinite values in {what} ({rows} of {len(logits)} images): {hint}")
