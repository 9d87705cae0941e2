"""DIST: "Knowledge Distillation from A Stronger Teacher" (Huang, You, Wang, Qian and Xu, NeurIPS 2022, arXiv 2205.10536)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kdbench.methods import OwnParams, Params, register

if TYPE_CHECKING:
    import torch


def pearson_distance(u: torch.Tensor, v: torch.Tensor, dim: int) -> torch.Tensor:
    """``d_p(u, v) = 1 - rho(u, v)`` along ``dim``, with Pearson's ``rho`` the cosine of the mean-centred vectors.

    ``rho`` is invariant to positive affine maps ``a * u + b`` (``a > 0``) of either argument, the
    property the paper builds on.  A constant vector has no correlation: ``rho = 0`` there (the
    cosine's ``eps`` guards the zero norm), so ``d_p = 1`` with a zero gradient.
    """
    import torch.nn.functional as F  # here, not at the top: the registry loads without torch (kdbench.machine)

    u = u - u.mean(dim, keepdim=True)
    v = v - v.mean(dim, keepdim=True)
    return 1.0 - F.cosine_similarity(u, v, dim=dim, eps=1e-8)


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    temperature: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``beta * L_inter + gamma * L_intra`` (paper eqs. 5-7) and the unweighted terms ``inter``, ``intra``.

    With predictions ``Y = softmax(z / tau)`` of the batch, ``[B, C]``:

        L_inter = tau^2 / B * sum_i d_p(Y^s_i,: , Y^t_i,:)   (each image's relation among the classes)
        L_intra = tau^2 / C * sum_j d_p(Y^s_:,j , Y^t_:,j)   (each class's relation among the images)

    ``d_p`` is :func:`pearson_distance`.  The intra-class term needs a batch of two or more: with a
    batch of one every class column is constant and the term is ``tau^2`` with no gradient.
    Since ``softmax`` ignores a constant added to a row of logits, so does the loss; scaling the
    logits changes the predictions (it is a change of temperature) and so the loss.
    """
    y_s = (student_logits / temperature).softmax(dim=1)
    y_t = (teacher_logits / temperature).softmax(dim=1)
    scale = temperature**2
    terms = {"inter": scale * pearson_distance(y_s, y_t, 1).mean(), "intra": scale * pearson_distance(y_s, y_t, 0).mean()}
    return beta * terms["inter"] + gamma * terms["intra"], terms


@dataclass(frozen=True)
class DISTParams(Params):
    """The paper's CIFAR-100 setting: ``beta = gamma = 2``, ``tau = 4`` (on ImageNet it uses 1, 1 and 1).

    The CIFAR setting is kdbench's default, as for DKD: land-use datasets are small and low-resolution.
    """

    positive = ("temperature",)

    beta: float = 2.0  # inter-class weight
    gamma: float = 2.0  # intra-class weight
    temperature: float = 4.0  # tau


@register
class DIST(OwnParams):
    """``alpha_CE * CE + beta * L_inter + gamma * L_intra`` (:func:`dist_loss`) with the CE weight of ``[loss] alpha``."""

    name = "dist"
    label = "DIST"
    rank = 60
    params = DISTParams

    def distill(self, student_logits, teacher_logits, targets, p: DISTParams):
        return dist_loss(student_logits, teacher_logits, beta=p.beta, gamma=p.gamma, temperature=p.temperature)
