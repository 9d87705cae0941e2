"""ReviewKD: knowledge review (Chen, Liu, Zhao and Jia, CVPR 2021, arXiv 2104.09044).

Each of the student's levels, deepest first, is fused with what the deeper levels made of it (attention-based
fusion, ABF) and compared with the teacher's level of the same depth by the hierarchical context loss (HCL)::

    L = alpha * CE(s, y) + weight * sum_{l=1..5} hcl(O_l, T_l)

    (O_5, R_5) = abf_5(S_5),  (O_l, R_l) = abf_l(S_l, R_{l+1}) for l = 4 .. 1
    abf(S, R) = (conv2(X), X),  X = a_0 * conv1(S) + a_1 * up(R),  (a_0, a_1) = sigmoid(att([conv1(S), up(R)]))
    hcl(O, T) = (mse(O, T) + sum_{k in (4, 2, 1), k < H} w_k mse(pool_k(O), pool_k(T))) / (1 + sum_k w_k)

* Levels ``l = 1 .. 5``: ``stage:1`` .. ``stage:4`` (``[B, C_l, H_l, W_l]``, strides 4 to 32, kdbench.stages; the
  same size in student and teacher) and ``pooled`` as a ``1 x 1`` map: mdistiller's ``feats[1:]`` plus its
  ``pooled_feat`` (its ImageNet configs: five levels, ``SHAPES [1, 7, 14, 28, 56]`` at 224 px, which these are).
  ``S_l`` is the student's, ``T_l`` the teacher's (VGG16 -> MobileNetV2 at 224 px: 56, 28, 14, 7, 1 pixels;
  channels 24, 32, 96, 1280, 1280 in the student and 256, 512, 512, 512, 512 in the teacher).
* ``abf_l`` (learnable parts, :meth:`ReviewKD.make_parts`): ``conv1`` a 1x1 convolution (no bias) + batch norm from
  ``C_l`` of the student to ``mid = min(max_mid_channel, C_5)`` channels; ``att`` a 1x1 convolution (bias) from
  ``2 mid`` to 2 channels + sigmoid (not in ``abf_5``, which has no ``R``); ``up`` nearest-neighbour upsampling of
  ``R_{l+1}`` to ``S_l``'s size; ``conv2`` a 3x3 convolution (padding 1, no bias) + batch norm to the teacher's
  ``C_l`` (after resizing ``X`` nearest to the teacher's size where it differs, never with kdbench's stages).
  Both convolutions start Kaiming-uniform with ``a = 1``, as mdistiller's ``ABF``.
* ``hcl``: ``pool_k`` the adaptive average pool to ``k x k``; ``w = 1/2, 1/4, 1/8`` in turn over the ``k`` that
  are smaller than the map (``H = 8``: all three; ``H = 2``: ``k = 1`` with ``w = 1/2``; ``H = 1``: none).
* ``weight = 1`` (``REVIEWKD.REVIEWKD_WEIGHT``; its CIFAR-100 config uses 5, its ImageNet ones 8), ``alpha = 1``
  (``CE_WEIGHT``), ``max_mid_channel = 512`` (``MAX_MID_CHANNEL``): mdistiller's defaults.

kdbench's own choices, and why:

* No loss warm-up: mdistiller multiplies the term by ``min(epoch / WARMUP_EPOCHS, 1)`` (20 of 240 epochs).  As for
  DKD (kdbench.methods.dkd), kdbench recipes train 10 to 30 epochs, where it would cover most of training, and
  already warm the learning rate up; so the weight is constant.
* Post-activation stages in both models (``STU_PREACT = False`` is mdistiller's default; its teacher side takes
  pre-activation features, which torchvision's models do not expose as graph nodes: kdbench's stages are the
  blocks' outputs, kdbench.stages).
* ``mid`` honours ``max_mid_channel``: mdistiller's code reads ``MAX_MID_CHANNEL`` but builds ``min(512, C_5)``;
  with the default 512 the two are the same.

Reference: mdistiller commit a08d46f, mdistiller/distillers/ReviewKD.py (``hcl_loss``, ``ABF``, ``ReviewKD``) and
mdistiller/engine/cfg.py; tests/test_reviewkd.py checks the fusion and the loss against a re-derivation of them in
float64, on the same module weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kdbench.methods import OwnParams, Params, register
from kdbench.stages import POOLED

if TYPE_CHECKING:
    import torch
    from torch import nn

LEVELS = ("stage:1", "stage:2", "stage:3", "stage:4", POOLED)  # shallowest first
POOLS = (4, 2, 1)  # the HCL's pyramid of average pools


@dataclass(frozen=True)
class ReviewKDParams(Params):
    """mdistiller's ReviewKD defaults: the loss weight and the fusion's largest channel count."""

    integers = ("max_mid_channel",)

    weight: float = 1.0
    max_mid_channel: float = 512.0


def abf(in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> nn.ModuleDict:
    """One attention-based fusion module: ``conv1``, ``conv2`` and, where it fuses a deeper level's ``R``, ``att``."""
    from torch import nn  # here, not at the top: the registry loads without torch (kdbench.machine)

    parts = {
        "conv1": nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels)),
        "conv2": nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)),
    }
    if fuse:
        parts["att"] = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid())
    for name in ("conv1", "conv2"):
        nn.init.kaiming_uniform_(parts[name][0].weight, a=1)
    return nn.ModuleDict(parts)


def fuse(
    module: nn.ModuleDict, x: torch.Tensor, residual: torch.Tensor | None, out_size: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``abf(S, R)``: the output ``[B, C_t, *out_size]`` and the fused ``X`` ``[B, mid, H, W]`` passed to the next
    (shallower) level; ``residual`` is None for the deepest."""
    import torch
    import torch.nn.functional as F

    x = module["conv1"](x)
    if residual is not None:
        residual = F.interpolate(residual, size=x.shape[2:], mode="nearest")
        a = module["att"](torch.cat([x, residual], 1))
        x = x * a[:, :1] + residual * a[:, 1:]
    if tuple(x.shape[2:]) != tuple(out_size):
        x = F.interpolate(x, size=tuple(out_size), mode="nearest")
    return module["conv2"](x), x


def review(abfs: nn.ModuleList, student: Sequence[torch.Tensor], teacher_sizes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """``O_1 .. O_5`` (shallowest first) from the student's levels ``S_1 .. S_5`` and the teacher's map sizes."""
    outputs, residual = [], None
    for module, x, size in reversed(list(zip(abfs, student, teacher_sizes))):
        out, residual = fuse(module, x, residual, size)
        outputs.insert(0, out)
    return outputs


def hcl(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_l hcl(O_l, T_l)`` over pairs of ``[B, C, H, W]`` maps of equal shapes."""
    import torch.nn.functional as F

    total = 0.0
    for o, t in zip(student, teacher, strict=True):
        loss, w, norm = F.mse_loss(o, t), 1.0, 1.0
        for k in POOLS:
            if k < o.shape[2]:
                w /= 2
                loss = loss + w * F.mse_loss(F.adaptive_avg_pool2d(o, k), F.adaptive_avg_pool2d(t, k))
                norm += w
        total = total + loss / norm
    return total


def levels(features: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """The five levels ``[B, C, H, W]`` of a model's features, ``pooled`` as a ``1 x 1`` map."""
    return [features[name] if name != POOLED else features[name][:, :, None, None] for name in LEVELS]


@register
class ReviewKD(OwnParams):
    """ReviewKD: ``alpha * CE + weight * HCL(ABF-fused student levels, teacher levels)`` over stages 1-4 and pooled."""

    name = "reviewkd"
    label = "ReviewKD"
    rank = 100
    params = ReviewKDParams
    needs = frozenset({"logits", *LEVELS})

    def make_parts(self, student: Mapping[str, tuple[int, ...]], teacher: Mapping[str, tuple[int, ...]], cfg):
        """The five ABF modules (shallowest first), from the levels' channel counts (``pooled``: ``(C,)``)."""
        from torch import nn

        c_s, c_t = [student[name][0] for name in LEVELS], [teacher[name][0] for name in LEVELS]
        mid = min(int(self.own(cfg).max_mid_channel), c_s[-1])
        return nn.ModuleList(abf(c_s[i], mid, c_t[i], fuse=i < len(LEVELS) - 1) for i in range(len(LEVELS)))

    def distill(self, student, teacher, targets, p: ReviewKDParams):
        abfs = self.built_parts("fusion modules")
        t = levels(teacher.features)
        term = hcl(review(abfs, levels(student.features), [x.shape[2:] for x in t]), t)
        return p.weight * term, {"hcl": term}
