"""Hinton et al. (2015), "Distilling the Knowledge in a Neural Network": the paper's KL term alone."""

from __future__ import annotations

from dataclasses import dataclass

from kdbench import losses
from kdbench.losses import LossConfig
from kdbench.methods import METHODS, OwnParams, Params, register


@dataclass(frozen=True)
class KDKLParams(Params):
    """Hinton's temperature 4 (the paper's default point) and KL weight ``beta = 1``."""

    positive = ("temperature",)
    reduces = True  # beta = 0 is the baseline (KDKL.resolve)

    temperature: float = 4.0
    beta: float = 1.0  # KL weight


@register
class KDKL(OwnParams):
    """Hinton KD: ``alpha * CE + beta * T^2 * KL`` (:func:`kdbench.losses.kl_term`)."""

    name = "kd_kl"
    label = "KD (KL)"
    rank = 20
    params = KDKLParams

    def resolve(self, loss):
        p = self.own(loss)
        if p.beta == 0:
            return METHODS["baseline"]().resolve(LossConfig(alpha=loss.alpha))
        return super().resolve(loss)

    def distill(self, student, teacher, targets, p: KDKLParams):
        kl = losses.kl_term(student.logits, teacher.logits, p.temperature)
        return p.beta * kl, {"kl": kl}
