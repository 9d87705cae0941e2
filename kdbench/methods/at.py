"""AT: attention transfer (Zagoruyko and Komodakis, ICLR 2017, arXiv 1612.03928), activation-based.

Each stage's spatial attention map, ``A(F) = normalize(flatten(mean_c |F_c|^p))`` (``[B, H*W]``, unit L2 norm
per image), of the student is pulled to the teacher's::

    L = alpha * CE(s, y) + weight * sum_{i=1..4} mean_{b,j} (A(F_s^i)_{bj} - A(F_t^i)_{bj})^2

* ``F^i = stage:i`` ``[B, C_i, H_i, W_i]`` of student and teacher (kdbench.stages: strides 4 to 32, the same
  size in both; channel counts may differ, the attention map averages them out).  Stages 1-4, as mdistiller,
  which uses its feature maps 1-4 and leaves out map 0 (``feats[1:]``).  Where two maps differ in size the
  larger is average-pooled to the smaller (mdistiller's rule; kdbench.stages.check_pair makes them equal).
* ``p = 2`` (``AT.P``), ``weight = 1000`` (``AT.LOSS.FEAT_WEIGHT``: the paper's ``beta = 10^3``, "divided by
  the number of elements in the attention map and the batch size", the mean above), ``alpha = 1``
  (``CE_WEIGHT``): mdistiller's defaults for every pair (configs/cifar100/at.yaml keeps them).
* ``|F|^p``: the paper's definition; mdistiller (and the authors' code, at ``p = 2``) raise ``F`` itself to
  ``p``, the same for even ``p``.  No learnable parts.

Reference: mdistiller commit a08d46f, mdistiller/distillers/AT.py; tests/test_at.py checks this loss against a
re-derivation of it in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kdbench.methods import OwnParams, Params, register

if TYPE_CHECKING:
    import torch

STAGES = ("stage:1", "stage:2", "stage:3", "stage:4")


@dataclass(frozen=True)
class ATParams(Params):
    """mdistiller's AT defaults: the attention exponent ``p`` and the loss weight."""

    positive = ("p",)

    p: float = 2.0
    weight: float = 1000.0


def attention(features: torch.Tensor, p: float) -> torch.Tensor:
    """``[B, H*W]`` unit-norm spatial attention of ``[B, C, H, W]`` features: ``normalize(mean_c |F|^p)``."""
    import torch.nn.functional as F  # here, not at the top: the registry loads without torch (kdbench.machine)

    return F.normalize(features.abs().pow(p).mean(1).flatten(1))


def at_term(student: torch.Tensor, teacher: torch.Tensor, p: float) -> torch.Tensor:
    """One stage's ``mean (A(F_s) - A(F_t))^2``, the larger map average-pooled to the smaller's size first."""
    import torch.nn.functional as F

    if student.shape[2:] != teacher.shape[2:]:
        size = min(student.shape[2:], teacher.shape[2:])
        student, teacher = F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size)
    return (attention(student, p) - attention(teacher, p)).pow(2).mean()


@register
class AT(OwnParams):
    """Attention transfer: ``alpha * CE + weight * sum over stages 1-4 of the attention maps' mean squared difference``."""

    name = "at"
    label = "AT"
    rank = 85
    params = ATParams
    needs = frozenset({"logits", *STAGES})

    def distill(self, student, teacher, targets, p: ATParams):
        term = sum(at_term(student.features[s], teacher.features[s], p.p) for s in STAGES)
        return p.weight * term, {"at": term}
