"""RKD: relational knowledge distillation, distance and angle (Park, Kim, Lu and Cho, CVPR 2019, arXiv 1904.05068).

The student's pooled features ``s`` ``[B, D_s]`` and the teacher's ``t`` ``[B, D_t]`` (``pooled``: the global
average of stage 4, kdbench.stages; ``D`` may differ) are compared through the relations among the batch's
images, not the features themselves::

    L = alpha * CE(s, y) + distance * mean_{i,j} huber(psi_D(s)_ij, psi_D(t)_ij)
                         + angle * mean_{i,j,k} huber(psi_A(s)_ijk, psi_A(t)_ijk)

* ``psi_D(x)_ij = ||x_i - x_j|| / mu``, ``mu`` the mean over ``i != j`` of ``||x_i - x_j||``; the diagonal is 0.
  The distances are ``sqrt(max(|x_i|^2 + |x_j|^2 - 2 x_i.x_j, 1e-12))`` (mdistiller's ``_pdist``, not squared).
* ``psi_A(x)_ijk = <e_ij, e_ik>`` with ``e_ij = (x_j - x_i) / ||x_j - x_i||`` (0 where ``x_j = x_i``): the
  cosine of the angle at ``x_i``, over all ``B^3`` triples.
* ``huber``: ``F.smooth_l1_loss`` (beta 1), averaged over the ``B^2`` pairs and the ``B^3`` triples.
* ``distance = 25``, ``angle = 50`` (``RKD.DISTANCE_WEIGHT``, ``ANGLE_WEIGHT``; the paper's ``lambda_D = 25``,
  ``lambda_A = 50``), ``alpha = 1`` (``CE_WEIGHT``); mdistiller's outer ``RKD.LOSS.FEAT_WEIGHT = 1`` is folded
  into the two weights (kdbench's choice: one weight per term, so a grid sweeps each).  The teacher's relations
  carry no gradient.  No learnable parts.
* The input is mdistiller's ``pooled_feat``: for MobileNetV2 and ResNet students and teachers exactly the
  classifier's input (before dropout); for VGG, which pools to 7x7 and has two hidden linear layers,
  kdbench's analogue, the global average of its last stage (``features.30``, after its last max-pool; 512-d;
  mdistiller's CIFAR VGG averages its last block, before any pool, and has no hidden layers).

Reference: mdistiller commit a08d46f, mdistiller/distillers/RKD.py; tests/test_rkd.py checks this loss against a
re-derivation of it in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kdbench.methods import OwnParams, Params, register
from kdbench.stages import POOLED

if TYPE_CHECKING:
    import torch

EPS = 1e-12  # the floor of the squared distances (mdistiller's RKD.PDIST.EPSILON)


@dataclass(frozen=True)
class RKDParams(Params):
    """The paper's and mdistiller's weights of the distance and angle terms."""

    distance: float = 25.0
    angle: float = 50.0


def distances(x: torch.Tensor) -> torch.Tensor:
    """``[B, B]`` Euclidean distances among the rows of ``x`` ``[B, D]``, divided by their mean off the diagonal."""
    import torch  # here, not at the top: the registry loads without torch (kdbench.machine)

    norms = x.pow(2).sum(1)
    squared = (norms[:, None] + norms[None, :] - 2 * x @ x.T).clamp(min=EPS)
    off = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    d = squared.sqrt() * off
    return d / d[off].mean()


def angles(x: torch.Tensor) -> torch.Tensor:
    """``[B, B, B]``: ``[i, j, k]`` is the cosine of the angle at ``x_i`` between ``x_j`` and ``x_k``."""
    import torch.nn.functional as F

    e = F.normalize(x[None, :, :] - x[:, None, :], dim=2)  # e[i, j] = unit vector from x_i to x_j
    return e @ e.transpose(1, 2)


def rkd_terms(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unweighted ``(distance, angle)`` terms of ``[B, D_s]`` student and ``[B, D_t]`` teacher features."""
    import torch
    import torch.nn.functional as F

    s, t = student.flatten(1), teacher.flatten(1)
    with torch.no_grad():
        t_d, t_a = distances(t), angles(t)
    return F.smooth_l1_loss(distances(s), t_d), F.smooth_l1_loss(angles(s), t_a)


@register
class RKD(OwnParams):
    """RKD-DA: ``alpha * CE + distance * huber(distance relations) + angle * huber(angle relations)`` of pooled features."""

    name = "rkd"
    label = "RKD"
    rank = 90
    params = RKDParams
    needs = frozenset({"logits", POOLED})

    def distill(self, student, teacher, targets, p: RKDParams):
        distance, angle = rkd_terms(student.features[POOLED], teacher.features[POOLED])
        return p.distance * distance + p.angle * angle, {"distance": distance, "angle": angle}
