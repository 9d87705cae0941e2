"""FitNet: hints from a middle stage (Romero, Ballas, Kahou, Chassang, Gatta and Bengio, ICLR 2015, arXiv 1412.6550).

The student's hint stage goes through a learnt regressor ``r`` to the teacher's channel count and is pulled to
the teacher's guided stage by mean squared error::

    L = alpha * CE(s, y) + weight * mean_{b,c,h,w} (r(F_s)_{bchw} - F_t_{bchw})^2

* ``F_s = stage:2`` of the student ``[B, C_s, H, W]``, ``F_t = stage:2`` of the teacher ``[B, C_t, H, W]``:
  the middle of the five stages (kdbench.stages: stride 8, ``resolution / 8`` pixels in both; VGG16
  ``features.22``, 512 channels; MobileNetV2 ``features.6``, 32 channels), as mdistiller's
  ``FITNET.HINT_LAYER = 2`` (the middle of its five feature maps).
* ``r = ReLU(BatchNorm2d(C_t)(Conv2d(C_s, C_t, 1x1, bias)))``: mdistiller's ``ConvReg`` for equal sizes (its
  kernel is ``1 + H_s - H_t`` square, so 1x1 here; with ``use_relu=True``, its default).  A learnable part
  (:meth:`FitNet.make_parts`): trained with the student, not deployed, not in ``best.pt``.
* ``weight = 100`` (``FITNET.LOSS.FEAT_WEIGHT``) and the shared CE weight ``alpha = 1`` (``CE_WEIGHT``):
  mdistiller's defaults, which its CIFAR-100 FitNet config keeps (configs/cifar100/fitnet.yaml; mdistiller has
  no VGG -> MobileNetV2 FitNet config).  The paper's two-stage training (hints first, then KD) is not used:
  mdistiller and the later literature train hint and CE jointly, as here.

Reference: mdistiller commit a08d46f, mdistiller/distillers/FitNet.py and _common.py (ConvReg);
tests/test_fitnet.py checks this loss against a re-derivation of it in float64.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kdbench.methods import OwnParams, Params, register

if TYPE_CHECKING:
    import torch
    from torch import nn

HINT = "stage:2"


@dataclass(frozen=True)
class FitNetParams(Params):
    """mdistiller's hint-loss weight (``FITNET.LOSS.FEAT_WEIGHT``)."""

    weight: float = 100.0


def regressor(student_channels: int, teacher_channels: int) -> nn.Module:
    """``ReLU(BN(conv 1x1))`` from the student's to the teacher's channel count (mdistiller's ``ConvReg``)."""
    from torch import nn  # here, not at the top: the registry loads without torch (kdbench.machine)

    return nn.Sequential(
        nn.Conv2d(student_channels, teacher_channels, kernel_size=1),
        nn.BatchNorm2d(teacher_channels),
        nn.ReLU(inplace=True),
    )


def hint_loss(student_hint: torch.Tensor, teacher_hint: torch.Tensor, regressor: nn.Module) -> torch.Tensor:
    """``mean (r(F_s) - F_t)^2`` over every element of the teacher's ``[B, C_t, H, W]`` hint."""
    import torch.nn.functional as F

    return F.mse_loss(regressor(student_hint), teacher_hint)


@register
class FitNet(OwnParams):
    """FitNet: ``alpha * CE + weight * MSE(r(student stage 2), teacher stage 2)`` with a learnt regressor ``r``."""

    name = "fitnet"
    label = "FitNet"
    rank = 80
    params = FitNetParams
    needs = frozenset({"logits", HINT})

    def make_parts(self, student: Mapping[str, tuple[int, ...]], teacher: Mapping[str, tuple[int, ...]], cfg):
        """The regressor, from the hint stages' shapes ``(C, H, W)``.

        Raises:
            ValueError: the hint stages differ in size (kdbench.stages.check_pair refuses such pairs when planning).
        """
        (c_s, *size_s), (c_t, *size_t) = student[HINT], teacher[HINT]
        if size_s != size_t:
            raise ValueError(f"fitnet: the student's hint is {size_s} pixels, the teacher's {size_t}: they must be equal")
        return regressor(c_s, c_t)

    def distill(self, student, teacher, targets, p: FitNetParams):
        term = hint_loss(student.features[HINT], teacher.features[HINT], self.built_parts("a regressor"))
        return p.weight * term, {"hint": term}
