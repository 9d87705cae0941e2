"""Distillation methods: one small class each, in a registry.

A method says which recipe it trains (teacher or student), whether it needs a
teacher, which loss terms it uses and which sweep axes change its result.  Adding
a method means adding one class here; nothing else branches on method names.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from kdbench import losses
from kdbench.config import LossConfig
from kdbench.errors import UserError

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[name]()


class Method:
    """Base: CE, KL and cosine terms of :func:`kdbench.losses.distillation_loss`, switched on per method."""

    name: ClassVar[str]
    label: ClassVar[str]  # how reports name it
    role: ClassVar[str] = "student"  # which recipe it trains: "teacher" or "student"
    uses_kl: ClassVar[bool] = False
    uses_cos: ClassVar[bool] = False

    @property
    def needs_teacher(self) -> bool:
        return self.uses_kl or self.uses_cos

    def sweep_axes(self, loss: LossConfig) -> tuple[str, ...]:
        """The grid axes (``temperature``, ``beta``, ``gamma``) that change this method's result."""
        axes = []
        if self.uses_kl or (self.uses_cos and loss.cosine_on == "probs"):
            axes.append("temperature")
        if self.uses_kl:
            axes.append("beta")
        if self.uses_cos:
            axes.append("gamma")
        return tuple(axes)

    def effective_loss(self, loss: LossConfig) -> LossConfig:
        """``loss`` with unused terms zeroed and irrelevant settings canonical, so equal trials share a key."""
        axes = self.sweep_axes(loss)
        return dataclasses.replace(
            loss,
            beta=loss.beta if "beta" in axes else 0.0,
            gamma=loss.gamma if "gamma" in axes else 0.0,
            temperature=loss.temperature if "temperature" in axes else 1.0,
            cosine_on=loss.cosine_on if self.uses_cos else "logits",
        )

    def loss(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor, cfg: LossConfig
    ) -> tuple[torch.Tensor, losses.LossTerms]:
        """The training loss and its unweighted terms; ``cfg`` is already :meth:`effective_loss`."""
        terms = losses.loss_terms(
            student_logits,
            teacher_logits,
            targets,
            alpha=cfg.alpha,
            beta=cfg.beta,
            gamma=cfg.gamma,
            temperature=cfg.temperature,
            cosine_on=cfg.cosine_on,
        )
        return losses.combine(terms, alpha=cfg.alpha, beta=cfg.beta, gamma=cfg.gamma), terms


def resolve(method: Method, loss: LossConfig) -> tuple[Method, LossConfig]:
    """The method that ``method`` with ``loss`` really is, and its effective loss.

    A distillation student whose soft-term weight is 0 does not use that term: ``kd_kl_cos`` with
    ``gamma = 0`` is ``kd_kl``, with ``beta = 0`` it is ``kd_cos``, and with both 0 it is the
    baseline (plain cross-entropy).  Planning and reporting such a grid point under the method it
    really is trains it once and never shows a CE-only student as KD.
    """
    effective = method.effective_loss(loss)
    if method.role != "student":
        return method, effective
    uses = (method.uses_kl and effective.beta > 0, method.uses_cos and effective.gamma > 0)
    if uses == (method.uses_kl, method.uses_cos):
        return method, effective
    for cls in METHODS.values():
        if cls.role == "student" and (cls.uses_kl, cls.uses_cos) == uses:
            real = cls()
            return real, real.effective_loss(effective)
    raise UserError(f"{method.name} with beta={loss.beta:g}, gamma={loss.gamma:g} is no registered method")


class HardLabels(Method):
    """Plain supervised training: ``CE(s, y)`` with weight 1, whatever the grid's loss settings."""

    def effective_loss(self, loss: LossConfig) -> LossConfig:
        return LossConfig(alpha=1.0, beta=0.0, gamma=0.0, temperature=1.0)


@register
class Teacher(HardLabels):
    """The teacher network trained on hard labels."""

    name = "teacher"
    label = "Teacher"
    role = "teacher"


@register
class Baseline(HardLabels):
    """The student trained alone on hard labels."""

    name = "baseline"
    label = "Student baseline (CE)"


@register
class KDKL(Method):
    """Hinton KD: ``alpha * CE + beta * T^2 * KL``."""

    name = "kd_kl"
    label = "KD (KL)"
    uses_kl = True


@register
class KDCos(Method):
    """Cosine-similarity KD: ``alpha * CE + gamma * (1 - cos)``."""

    name = "kd_cos"
    label = "KD (Cos)"
    uses_cos = True


@register
class KDKLCos(Method):
    """The paper's combined loss: ``alpha * CE + beta * T^2 * KL + gamma * (1 - cos)``."""

    name = "kd_kl_cos"
    label = "KD (KL+Cos)"
    uses_kl = True
    uses_cos = True
