"""Model registry: torchvision classifiers with heads sized to the dataset.

Any torchvision classification model name works (``vgg16``, ``vgg16_bn``,
``mobilenet_v2``, ``resnet18`` ...).  ``pretrained`` is ``"none"``, ``"imagenet"``
(torchvision's weights API; cached under ``$TORCH_HOME``) or a path to a local
state dict / kdbench checkpoint.  When the stored classifier's shape differs from
the requested class count, the classifier is re-initialised and the backbone loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision
from torch import nn

from kdbench import durable
from kdbench.errors import UserError
from kdbench.finite import check_finite_state

CHECKPOINT_FORMAT = "kdbench-checkpoint-v1"


def available_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_model_name(name: str) -> None:
    if name not in available_models():
        raise UserError(
            f"unknown model {name!r}: use a torchvision classification model name such as vgg16, vgg16_bn, mobilenet_v2, resnet18"
        )


def build_model(name: str, num_classes: int, pretrained: str = "none") -> nn.Module:
    """A torchvision classifier with ``num_classes`` outputs, optionally with pretrained weights."""
    check_model_name(name)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if pretrained in ("", "none", None):
        return model
    state = _imagenet_state(name) if pretrained == "imagenet" else load_state_dict_file(pretrained)
    load_backbone(model, state, source=pretrained)
    return model


def _imagenet_state(name: str) -> dict[str, torch.Tensor]:
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, AttributeError) as err:
        raise UserError(
            f'torchvision has no ImageNet weights for {name!r}: use pretrained = "none" or a state-dict path'
        ) from err
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # network errors come in many types (URLError, OSError, HTTPError)
        hub = torch.hub.get_dir()
        raise UserError(
            f"could not load ImageNet weights for {name} ({weights.url}): {type(err).__name__}. "
            f"Offline? Download the file once and place it in {hub}/checkpoints/ "
            f"(TORCH_HOME={os.environ.get('TORCH_HOME', '~/.cache/torch')}), or pass a local state-dict path"
        ) from err


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a plain state dict or a kdbench checkpoint's weights (``weights_only=True``)."""
    obj = load_checkpoint_file(path)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path} holds no state dict (a mapping of parameter names to tensors): pass a torch state-dict file")
    check_finite_state(obj, f"of the weights file {path}", "the weights are broken: pass another file")
    return obj


def load_checkpoint_file(path: str | os.PathLike):
    """``torch.load(path, weights_only=True)`` with one-line errors for missing or broken files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors all mean "not a loadable checkpoint"
        raise UserError(
            f"checkpoint {path} cannot be read ({type(err).__name__}): it is truncated, corrupt or not a torch file; "
            "delete it and re-train, or point to another file"
        ) from err


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> list[str]:
    """Load ``state`` into ``model``; tensors whose shape differs (the classifier) keep their fresh init.

    Returns the names that were re-initialised.  A state dict that shares no
    parameter with the model is an error, not a silent no-op.
    """
    own = model.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    reinit = sorted(k for k in own if k not in matching)
    if not matching:
        raise UserError(f"weights from {source} share no parameter with {type(model).__name__}: wrong model name or file?")
    unexpected = [k for k in state if k not in own]
    if unexpected:
        raise UserError(
            f"weights from {source} have {len(unexpected)} parameters the model lacks (e.g. {unexpected[0]}): "
            "they belong to a different architecture"
        )
    model.load_state_dict(matching, strict=False)
    return reinit


def save_checkpoint(path: Path, model: nn.Module, *, model_name: str, classes: list[str], extra: dict | None = None) -> None:
    """Write a kdbench checkpoint (weights plus the metadata needed to rebuild the model) atomically."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": model_name,
        "classes": list(classes),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **(extra or {}),
    }
    durable.atomic_torch_save(payload, path)  # never half a checkpoint


def load_model_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Rebuild a model from a kdbench checkpoint; returns ``(model, checkpoint)``.

    Weights or buffers holding NaN/inf are refused (NonFiniteError naming the tensor): never scored, never a teacher.
    """
    ckpt = load_checkpoint_file(path)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"{path} is not a kdbench checkpoint (no '{CHECKPOINT_FORMAT}' header): pass a best.pt from a kdbench run"
        )
    model = build_model(ckpt["model"], num_classes=len(ckpt["classes"]))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise UserError(
            f"{path}: weights do not fit {ckpt['model']} with {len(ckpt['classes'])} classes; the file is damaged"
        ) from err
    epoch = f" (epoch {ckpt['epoch']})" if isinstance(ckpt.get("epoch"), int) else ""
    hint = "its weights are broken: re-train it, or pass another checkpoint"
    check_finite_state(ckpt["state_dict"], f"of checkpoint {path}{epoch}", hint)
    return model, ckpt
