"""What a model provides besides its logits, for the methods that need it (:data:`kdbench.methods.NEEDS`).

``embedding`` is the input of a model's last ``nn.Linear`` layer, flattened to ``[B, D]``: the
penultimate features of every torchvision classifier (MobileNetV2 ``D = 1280`` after its dropout's
input, ResNet-18 ``512``, VGG16 ``4096``), found from the module tree, with no per-family table.
A forward pre-hook records it during the model's own forward pass: no second pass, no copy.

``stage:i`` (``[B, C_i, H_i, W_i]``) and ``pooled`` (``[B, C_4]``, the global average of stage 4) come
from the stage table (:mod:`kdbench.stages`, by model name): the model runs as torchvision's
``create_feature_extractor`` of it, which returns the logits and the stage nodes from one forward pass
of the same modules (the same parameters: training it trains the model).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from kdbench.errors import UserError
from kdbench.stages import N_STAGES, POOLED, STAGE_NEEDS, stage_index, stage_nodes

EXTRA = ("embedding", POOLED, *STAGE_NEEDS)  # the needs besides "logits" that a model can be asked for


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
    """Runs ``model`` (``tap(x)`` returns its logits) and records the features ``needs`` asks for; :meth:`take`
    returns them.

    ``model_name`` (a torchvision model name) is required for stage features.  Calling the model itself
    records the embedding too (a hook), not the stages.  Use as a context manager (the hook is removed on exit)
    or keep it for a model's lifetime.

    Raises:
        UserError: stage features asked of a model without a stage table entry (or without ``model_name``).
    """

    def __init__(self, model: nn.Module, needs: Iterable[str], model_name: str | None = None):
        self.model = model
        self.wanted = sorted(set(needs) & set(EXTRA))
        self.values: dict[str, torch.Tensor] = {}
        self.handle = last_linear(model).register_forward_pre_hook(self._record) if "embedding" in self.wanted else None
        self.stages = sorted(
            {stage_index(n) for n in self.wanted if n in STAGE_NEEDS} | ({N_STAGES - 1} if POOLED in self.wanted else set())
        )
        self.extractor = _extractor(model, model_name, self.stages) if self.stages else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The model's logits for ``x``, recording the features asked for."""
        if self.extractor is None:
            return self.model(x)
        if self.extractor.training != self.model.training:
            self.extractor.train(self.model.training)
        out = self.extractor(x)
        for i in self.stages:
            if STAGE_NEEDS[i] in self.wanted:
                self.values[STAGE_NEEDS[i]] = out[STAGE_NEEDS[i]]
        if POOLED in self.wanted:
            self.values[POOLED] = out[STAGE_NEEDS[-1]].mean((2, 3))
        return out["logits"]

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


def _extractor(model: nn.Module, model_name: str | None, stages: list[int]) -> nn.Module:
    """``create_feature_extractor`` of ``model`` returning ``logits`` (its output node) and ``stage:i`` for ``stages``."""
    nodes = stage_nodes(model_name) if model_name else None
    if nodes is None:
        raise UserError(f"kdbench maps no stages of {model_name or type(model).__name__}: see kdbench/stages.py")
    output = get_graph_node_names(model)[0][-1]  # the node of the model's output (its classifier's last layer)
    return create_feature_extractor(model, {nodes[i]: STAGE_NEEDS[i] for i in stages} | {output: "logits"})


@torch.no_grad()
def feature_shapes(tap: FeatureTap, resolution: int, device: torch.device) -> dict[str, tuple[int, ...]]:
    """The shape (without the batch dimension) of each feature ``tap`` records, from one eval-mode pass of a
    blank batch of two ``resolution``-pixel images (consumes no random numbers, leaves the model's mode as it was)."""
    training = tap.model.training
    tap.model.eval()
    try:
        tap(torch.zeros(2, 3, resolution, resolution, device=device))
    finally:
        tap.model.train(training)
    return {name: tuple(v.shape[1:]) for name, v in tap.take().items()}
