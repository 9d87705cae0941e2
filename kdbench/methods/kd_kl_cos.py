"""The combined loss of arXiv 2606.14886, "Improved Knowledge Distillation for Land-Use Image Classification"."""

from __future__ import annotations

from dataclasses import dataclass

from kdbench import losses
from kdbench.losses import COSINE_ON, LossConfig
from kdbench.methods import METHODS, OwnParams, Params, register


@dataclass(frozen=True)
class KDKLCosParams(Params):
    """The paper's default point: ``T = 4``, KL weight ``beta = 1``, cosine weight ``gamma = 1`` on the logits."""

    positive = ("temperature",)
    choices = {"on": COSINE_ON}
    reduces = True  # a zero weight makes it another method (KDKLCos.resolve)

    temperature: float = 4.0
    beta: float = 1.0  # KL weight
    gamma: float = 1.0  # cosine weight
    on: str = "logits"  # the cosine on "logits" or on "probs" (softmax(./T))


@register
class KDKLCos(OwnParams):
    """The paper's combined loss: ``alpha * CE + beta * T^2 * KL + gamma * (1 - cos)`` (:mod:`kdbench.losses`)."""

    name = "kd_kl_cos"
    label = "KD (KL+Cos)"
    rank = 40
    params = KDKLCosParams

    def resolve(self, loss):
        """``gamma = 0``: ``kd_kl`` (T, beta); ``beta = 0``: ``kd_cos`` (gamma, on, T); both: the baseline."""
        p = self.own(loss)
        if p.beta == 0 and p.gamma == 0:
            return METHODS["baseline"]().resolve(LossConfig(alpha=loss.alpha))
        if p.gamma == 0:
            return METHODS["kd_kl"]().resolve(LossConfig(loss.alpha, (("temperature", p.temperature), ("beta", p.beta))))
        if p.beta == 0:
            cos = (("gamma", p.gamma), ("on", p.on), ("temperature", p.temperature))
            return METHODS["kd_cos"]().resolve(LossConfig(loss.alpha, cos))
        return super().resolve(loss)

    def distill(self, student, teacher, targets, p: KDKLCosParams):
        terms = losses.loss_terms(
            student.logits,
            teacher.logits,
            targets,
            alpha=0.0,
            beta=p.beta,
            gamma=p.gamma,
            temperature=p.temperature,
            cosine_on=p.on,
        )
        return losses.combine(terms, alpha=0.0, beta=p.beta, gamma=p.gamma), {"kl": terms.kl, "cos": terms.cos}
