"""The frozen teacher's outputs for KD: looked up in a precomputed cache, or run online.

With a finite augmentation (the D4 group by default), a KD batch is a set of
(training image, view) pairs, and the frozen teacher in eval mode maps each pair
to fixed logits.  :func:`build_logit_cache` runs the teacher once over every
training image in every view and stores ``[N_train, V, C]`` logits next to the
teacher checkpoint; :class:`CachedTeacher` then answers a batch by indexing,
exactly what :class:`OnlineTeacher` computes on the same augmented batch.  The
teacher's features are cached alike (:mod:`kdbench.engine.feature_cache`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdbench.data.decode import CACHE_FORMAT
from kdbench.data.presets import Augmentation, apply_view, normalize
from kdbench.digest import json_digest
from kdbench.durable import atomic_torch_save, file_lock
from kdbench.engine.features import FeatureTap, feature_shapes
from kdbench.engine.runtime import autocast, full_precision, memory_format
from kdbench.finite import check_finite_logits
from kdbench.methods import Outputs


class OnlineTeacher:
    """Runs the teacher on each augmented batch (any augmentation); provides its logits and the features ``needs`` names.

    ``model_name`` (the torchvision name) is needed for stage features (:class:`FeatureTap`).
    """

    def __init__(
        self, model: nn.Module, source: str, needs: frozenset[str] = frozenset({"logits"}), model_name: str | None = None
    ):
        self.model = model.eval()
        self.source = source
        self.tap = FeatureTap(self.model, needs, model_name)

    @torch.no_grad()
    def __call__(self, train_positions: torch.Tensor, views: torch.Tensor, inputs: torch.Tensor) -> Outputs:
        with autocast(inputs.device):
            logits = full_precision(self.tap(inputs))
        check_finite_teacher(logits, self.source)
        return Outputs(logits, {name: full_precision(v) for name, v in self.tap.take().items()})

    def feature_shapes(self, resolution: int, device: torch.device) -> dict[str, tuple[int, ...]]:
        """The shape (without the batch dimension) of each feature it provides, from one blank eval-mode pass."""
        return feature_shapes(self.tap, resolution, device)


class CachedTeacher:
    """Looks the teacher's logits ``[N_train, V, C]`` up by (position in the training split, view), and its features
    (:mod:`kdbench.engine.feature_cache`: read-only arrays ``[N_train, V, *shape]``, fp16 or fp32) alike."""

    def __init__(self, logits: torch.Tensor, views: tuple[int, ...], features: Mapping[str, np.ndarray] | None = None):
        self.logits = logits  # [N_train, V, C]
        self.features = dict(features or {})
        self.view_slot = torch.full((8,), -1, dtype=torch.long)
        self.view_slot[list(views)] = torch.arange(len(views))

    def __call__(self, train_positions: torch.Tensor, views: torch.Tensor, inputs: torch.Tensor) -> Outputs:
        positions, slots = train_positions.cpu(), self.view_slot[views.cpu()]
        logits = self.logits[positions.to(self.logits.device), slots.to(self.logits.device)]
        rows = positions.numpy(), slots.numpy()
        dtype = torch.get_default_dtype()
        features = {name: torch.from_numpy(a[rows]).to(inputs.device, dtype) for name, a in self.features.items()}
        return Outputs(logits, features)

    def feature_shapes(self, resolution: int, device: torch.device) -> dict[str, tuple[int, ...]]:
        """The shape (without the batch dimension) of each cached feature."""
        return {name: tuple(a.shape[2:]) for name, a in self.features.items()}


def check_finite_teacher(logits: torch.Tensor, source: str) -> None:
    check_finite_logits(
        logits, f"the logits of teacher {source}", "the teacher is broken; re-train it or pass another checkpoint"
    )


def cache_path(
    teacher_checkpoint: Path,
    teacher_digest: str,
    train_digests: list[str],
    resolution: int,
    aug: Augmentation,
    device: torch.device,
) -> Path:
    """Where the cache for this teacher, training set, resolution and view group lives.

    Its name is a digest of everything its logits depend on: the teacher checkpoint's content
    digest, each training image's content digest in training order (an image overwritten in
    place gets a new cache), the image decoding rule (:data:`kdbench.data.decode.CACHE_FORMAT`),
    the resolution, the views and the device type (its precision).
    """
    what = [teacher_digest, train_digests, CACHE_FORMAT, resolution, aug.views, device.type]
    return teacher_checkpoint.parent / f"logits-{json_digest(what)}.pt"


def build_logit_cache(
    teacher: nn.Module,
    train_images: torch.Tensor,
    aug: Augmentation,
    *,
    batch_size: int,
    device: torch.device,
    source: str,
) -> torch.Tensor:
    """``[N, V, C]`` teacher logits of every training image in every view of ``aug`` (fp32, or the default dtype)."""
    teacher.eval()
    views = aug.views
    chunks = []
    with torch.no_grad():
        for start in range(0, len(train_images), batch_size):
            x = train_images[start : start + batch_size].to(device)
            per_view = []
            for v in views:
                inputs = normalize(apply_view(x, v)).contiguous(memory_format=memory_format(device))
                with autocast(device):
                    per_view.append(full_precision(teacher(inputs)))
            chunks.append(torch.stack(per_view, dim=1))
    logits = torch.cat(chunks)
    check_finite_teacher(logits, source)
    return logits


def cached_teacher(
    teacher: nn.Module,
    path: Path,
    train_images: torch.Tensor,
    aug: Augmentation,
    *,
    batch_size: int,
    device: torch.device,
    source: str,
) -> CachedTeacher:
    """Load the cache at ``path`` or build it (under a file lock, so concurrent trials build it once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.with_name(path.name + ".lock")):
        logits = _load(path, len(train_images), len(aug.views))
        if logits is None:
            logits = build_logit_cache(teacher, train_images, aug, batch_size=batch_size, device=device, source=source)
            atomic_torch_save({"logits": logits.cpu(), "views": list(aug.views)}, path)
    return CachedTeacher(logits.to(device), aug.views)


def _load(path: Path, n: int, v: int) -> torch.Tensor | None:
    if not path.exists():
        return None
    try:
        logits = torch.load(path, map_location="cpu", weights_only=True)["logits"]
    except Exception:  # a damaged cache is rebuilt, never trusted
        return None
    if logits.shape[:2] != (n, v):
        return None
    # a cache is only written finite (build_logit_cache): NaN/inf on disk is a damaged or foreign file, never used
    check_finite_logits(logits, f"the teacher logit cache {path}", "delete it to rebuild it from the teacher")
    return logits
