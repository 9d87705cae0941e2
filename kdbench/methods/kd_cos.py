"""Cosine-similarity distillation: the paper's cosine term alone."""

from __future__ import annotations

from dataclasses import dataclass

from kdbench import losses
from kdbench.losses import COSINE_ON, LossConfig
from kdbench.methods import METHODS, OwnParams, Params, register


@dataclass(frozen=True)
class KDCosParams(Params):
    """Cosine weight ``gamma = 1`` on the logits; ``temperature`` softens the probabilities with ``on = "probs"``.

    On the logits the cosine is scale-free, so the temperature does not enter: it is then left out of the
    settled settings (:meth:`pairs`), and so of the trial key.
    """

    positive = ("temperature",)
    choices = {"on": COSINE_ON}
    reduces = True  # gamma = 0 is the baseline (KDCos.resolve)

    gamma: float = 1.0  # cosine weight
    on: str = "logits"  # "logits" or "probs" (softmax(./T))
    temperature: float = 4.0  # used only with on = "probs"

    def pairs(self):
        pairs = super().pairs()
        return tuple(p for p in pairs if p[0] != "temperature") if self.on == "logits" else pairs


@register
class KDCos(OwnParams):
    """Cosine-similarity KD: ``alpha * CE + gamma * (1 - cos)`` (:func:`kdbench.losses.cosine_term`)."""

    name = "kd_cos"
    label = "KD (Cos)"
    rank = 30
    params = KDCosParams

    def resolve(self, loss):
        if self.own(loss).gamma == 0:
            return METHODS["baseline"]().resolve(LossConfig(alpha=loss.alpha))
        return super().resolve(loss)

    def distill(self, student, teacher, targets, p: KDCosParams):
        cos = losses.cosine_term(student.logits, teacher.logits, on=p.on, temperature=p.temperature)
        return p.gamma * cos, {"cos": cos}
