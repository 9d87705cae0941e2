"""What a model provides besides its logits, for the methods that need it (:data:`kdbench.methods.NEEDS`).

``embedding`` is the input of a model's last ``nn.Linear`` layer, flattened to ``[B, D]``: the
penultimate features of every torchvision classifier (MobileNetV2 ``D = 1280`` after its dropout's
input, ResNet-18 ``512``, VGG16 ``4096``), found from the module tree, with no per-family table.
A forward pre-hook records it during the model's own forward pass: no second pass, no copy.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from kdbench.errors import UserError

EXTRA = ("embedding",)  # the needs besides "logits" that a model can be asked for


def last_linear(model: nn.Module) -> nn.Module:
    """The model's last ``nn.Linear`` in module order (its classifier's output layer).

    Raises:
        UserError: the model has no linear layer.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"{type(model).__name__} has no linear layer, so no embedding: use a method that needs logits only")
    return linears[-1]


class FeatureTap:
    """Records the features ``needs`` asks for during each forward pass of ``model``; :meth:`take` returns them.

    Use as a context manager (the hook is removed on exit) or keep it for a frozen teacher's lifetime.
    """

    def __init__(self, model: nn.Module, needs: Iterable[str]):
        self.wanted = sorted(set(needs) & set(EXTRA))
        self.values: dict[str, torch.Tensor] = {}
        self.handle = last_linear(model).register_forward_pre_hook(self._record) if "embedding" in self.wanted else None

    def _record(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.values["embedding"] = inputs[0].flatten(1)

    def take(self) -> dict[str, torch.Tensor]:
        """The features of the last forward pass (``{}`` when none were asked for); the tap forgets them."""
        values, self.values = self.values, {}
        return values

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
