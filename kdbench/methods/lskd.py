"""Logit-standardised KD: "Logit Standardization in Knowledge Distillation" (Sun, Ren, Li, Wang and Cao, CVPR 2024,
arXiv 2403.01427)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kdbench.methods import OwnParams, Params, register

if TYPE_CHECKING:
    import torch

STD_EPS = 1e-7  # added to the standard deviation, as in the authors' code: a constant logit vector maps to zeros


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """The Z-score of each row over the classes, ``Z(z) = (z - mean(z)) / (std(z) + STD_EPS)``.

    ``std`` is the unbiased sample standard deviation, ``sqrt(sum((z - mean(z))^2) / (K - 1))`` over the
    K classes (``torch.std``), and ``STD_EPS`` is added to it, not to the variance: the authors' code
    (sunshangquan/logit-standardization-KD, ``mdistiller/distillers/KD.py``, ``normalize``) computes it
    so, and their published numbers come from it (torchdistill's ``LogitStdKDLoss`` does the same).
    Before ``LSKD.loss_version`` 2 kdbench divided by the population (1/K) deviation: on 7 to 30 classes
    that is a factor ``sqrt(K / (K-1))`` on the effective temperature and 3 to 17 % on the loss.  A
    constant row maps to zeros; its gradient is finite but of order ``1 / STD_EPS`` (the Z-score of a
    nearly constant row depends on the direction it leaves the constant in, not on how far).
    """
    centred = logits - logits.mean(dim=1, keepdim=True)
    return centred / (logits.std(dim=1, keepdim=True) + STD_EPS)


def lskd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, weight: float, temperature: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``weight * tau^2 * KL(softmax(Z(t) / tau) || softmax(Z(s) / tau))`` (paper Algorithm 1) and the term ``kl``.

    ``Z`` is :func:`standardize` and ``tau`` the base temperature: each logit vector gets its own
    effective temperature ``tau * std(z)``, so the student matches the teacher's logit relations,
    not their range.  The loss is unchanged when either logit vector is shifted or scaled by a
    positive factor (up to ``STD_EPS``), and it is 0 when the student's logits are any such
    map of the teacher's.  With two classes ``Z(z)`` is ``±(1, -1) / sqrt(2)``: the loss only
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
    loss_version = "2"  # 2: the authors' unbiased std + 1e-7 (:func:`standardize`); 1 (keyed as "") used the 1/K std

    def distill(self, student, teacher, targets, p: LSKDParams):
        return lskd_loss(student.logits, teacher.logits, weight=p.weight, temperature=p.temperature)
