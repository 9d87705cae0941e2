"""Tensor transforms: augmentation presets for aerial scenes and input normalisation.

Aerial scenes have no canonical "up", so the default augmentation is the dihedral
group D4: the 8 symmetries of the square (4 rotations by 90 degrees, each with or
without a horizontal flip).  A *finite* preset draws one of its ``views`` per
sample, so a frozen teacher's outputs can be precomputed for every (image, view)
pair (the teacher-logit cache).  A *random* preset (``d4_crop``) has no finite
view set: KD trials using it run the teacher online.

torch is imported inside the functions that compute: the sweep driver reads the presets
(names, views) to check and cost a plan without loading torch (kdbench.machine).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def apply_view(x: torch.Tensor, view: int) -> torch.Tensor:
    """D4 element ``view`` in 0..7 of ``[..., H, W]``: flip horizontally if ``view >= 4``, then rotate by ``90 * (view % 4)``."""
    if view >= 4:
        x = x.flip(-1)
    return x.rot90(view % 4, dims=(-2, -1))


def apply_views(x: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """Per-sample D4 elements of square images: ``out[i] = apply_view(x[i], views[i])``.

    One gather over the flattened pixels with a precomputed source index per view
    (``apply_view`` applied to the grid of pixel indices): no host sync, so it stays
    asynchronous on a GPU.
    """
    b, c, h, w = x.shape
    index = _view_indices(h, w, x.device)[views.to(x.device)]  # [B, H*W]
    return x.flatten(2).gather(2, index.unsqueeze(1).expand(b, c, h * w)).view_as(x)


@functools.lru_cache(maxsize=16)
def _view_indices(h: int, w: int, device: torch.device) -> torch.Tensor:
    """``[8, H*W]``: for each view, the source pixel of every output pixel."""
    import torch

    if h != w:
        raise ValueError(f"D4 views need square images, got {h}x{w}")
    grid = torch.arange(h * w, device=device).view(h, w)
    return torch.stack([apply_view(grid, v).flatten() for v in range(8)])


def normalize(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` to torch's default float dtype (fp32 unless set), scaled to [0, 1] and standardised
    with ImageNet statistics."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN, device=x_uint8.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x_uint8.device).view(1, 3, 1, 1)
    return (x_uint8.to(torch.get_default_dtype()) / 255.0 - mean) / std


@dataclass(frozen=True)
class Augmentation:
    """An augmentation preset; ``views`` is the finite group it draws from, or ``None`` if continuous."""

    name: str
    views: tuple[int, ...] | None
    crop_scale: tuple[float, float] | None = None

    @property
    def cacheable(self) -> bool:
        return self.views is not None

    def sample_views(self, n: int, generator: torch.Generator) -> torch.Tensor:
        import torch

        group = torch.tensor(self.views if self.views is not None else range(8))
        return group[torch.randint(len(group), (n,), generator=generator)]

    def __call__(self, x: torch.Tensor, views: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a uint8 batch with the drawn ``views`` (and a random crop for continuous presets)."""
        x = apply_views(x, views.to(x.device))
        if self.crop_scale is not None:
            x = random_resized_crop(x, self.crop_scale, generator)
        return x


def random_resized_crop(x: torch.Tensor, scale: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """Per-sample square crop covering ``scale`` of the area, resized back to the input size."""
    import torch
    import torch.nn.functional as F

    b, _, h, w = x.shape
    out = torch.empty_like(x)
    areas = torch.empty(b).uniform_(*scale, generator=generator)
    for i in range(b):
        side = max(1, int(round(h * areas[i].sqrt().item())))
        top = int(torch.randint(h - side + 1, (1,), generator=generator))
        left = int(torch.randint(w - side + 1, (1,), generator=generator))
        crop = x[i : i + 1, :, top : top + side, left : left + side].float()
        out[i] = (
            F.interpolate(crop, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
            .round()
            .clamp(0, 255)
            .to(x.dtype)[0]
        )
    return out


AUGMENTATIONS: dict[str, Augmentation] = {
    a.name: a
    for a in (
        Augmentation("d4", views=tuple(range(8))),
        Augmentation("hflip", views=(0, 4)),
        Augmentation("none", views=(0,)),
        Augmentation("d4_crop", views=None, crop_scale=(0.6, 1.0)),
    )
}
