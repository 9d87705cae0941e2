"""Logit-standardised KD: "Logit Standardization in Knowledge Distillation" (Sun, Ren, Li, Wang and Cao, CVPR 2024,
arXiv 2403.01427)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kdbench.methods import OwnParams, Params, register

if TYPE_CHECKING:
    import torch

VARIANCE_EPS = 1e-7  # keeps a constant logit vector (zero spread) finite, with a finite gradient


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """The Z-score of each row: ``Z(z) = (z - mean(z)) / std(z)`` over the classes.

    ``std`` is the population standard deviation, ``sqrt(mean((z - mean(z))^2))``, as the paper
    writes it (1/K over the K classes; the paper's text and an unbiased ``1/(K-1)`` estimate
    would differ by ``sqrt(K / (K-1))``, a constant factor of the temperature).  ``VARIANCE_EPS``
    is added to the variance so that a constant row maps to zeros instead of 0/0.
    """
    centred = logits - logits.mean(dim=1, keepdim=True)
    return centred / (centred.pow(2).mean(dim=1, keepdim=True) + VARIANCE_EPS).sqrt()


def lskd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, weight: float, temperature: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``weight * tau^2 * KL(softmax(Z(t) / tau) || softmax(Z(s) / tau))`` (paper Algorithm 1) and the term ``kl``.

    ``Z`` is :func:`standardize` and ``tau`` the base temperature: each logit vector gets its own
    effective temperature ``tau * std(z)``, so the student matches the teacher's logit relations,
    not their range.  The loss is unchanged when either logit vector is shifted or scaled by a
    positive factor (up to ``VARIANCE_EPS``), and it is 0 when the student's logits are any such
    map of the teacher's.  With two classes ``Z(z)`` is ``(1, -1)`` or ``(-1, 1)``: the loss only
    sees which class is ahead and has no gradient.  The KL is batchmean and ``tau^2``-scaled, as
    :func:`kdbench.losses.kl_term`.
    """
    import torch.nn.functional as F  # here, not at the top: the registry loads without torch (kdbench.machine)

    log_q = F.log_softmax(standardize(student_logits) / temperature, dim=1)
    log_p = F.log_softmax(standardize(teacher_logits) / temperature, dim=1)
    kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * temperature**2
    return weight * kl, {"kl": kl}


@dataclass(frozen=True)
class LSKDParams(Params):
    """The authors' default for KD with logit standardisation: base temperature 2, KD weight 9.

    The authors pair this with a cross-entropy weight of 0.1 (their KD recipe's); kdbench keeps the
    CE weight shared by every student (``[loss] alpha``, 1 by default), so that Table 1 compares
    distillation terms on top of the same CE: set ``methods.lskd.weight = 90`` for their CE : KD ratio.
    """

    positive = ("temperature",)

    weight: float = 9.0
    temperature: float = 2.0  # the base temperature tau


@register
class LSKD(OwnParams):
    """``alpha_CE * CE + weight * tau^2 * KL`` of Z-scored logits (:func:`lskd_loss`), CE weight ``[loss] alpha``."""

    name = "lskd"
    label = "KD (logit-std.)"
    rank = 70
    params = LSKDParams

    def distill(self, student_logits, teacher_logits, targets, p: LSKDParams):
        return lskd_loss(student_logits, teacher_logits, weight=p.weight, temperature=p.temperature)
