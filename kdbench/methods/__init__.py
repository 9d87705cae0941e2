"""Distillation methods: one module each in this package, found by the registry.

A method says which recipe it trains (teacher or student), whether it needs a teacher, its loss and
its hyperparameters.  Adding a method means adding one module here that defines a :class:`Method`
subclass decorated with :func:`register`; nothing else branches on method names.  The registry
(:data:`METHODS`) lists methods by their ``rank``: the order of every table and figure.

Hyperparameters come in two kinds:

* the paper's methods (``kd_kl``, ``kd_cos``, ``kd_kl_cos``) use the shared fields ``temperature``,
  ``beta`` and ``gamma`` of :class:`~kdbench.losses.LossConfig` (ablation axes ``grid.temperatures``,
  ``grid.kl_weights``, ``grid.cos_weights``; default point in ``[loss]``);
* any other distilling method owns its hyperparameters: a frozen :class:`Params` dataclass with the
  published defaults (class attribute ``params``), carried in ``LossConfig.params`` and so in its
  trial key (ablation axes ``[grid.<method>]``, default point ``[methods.<method>]``).

The cross-entropy weight ``alpha`` is shared by every student.  Methods import only data, models and
losses, never the engine, the sweep or the report; and torch only inside the functions that compute a
loss, so that the sweep driver plans with this registry without loading torch (kdbench.machine).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import pkgutil
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

from kdbench import losses
from kdbench.errors import UserError
from kdbench.losses import LossConfig, check_loss

if TYPE_CHECKING:
    import torch

METHODS: dict[str, type[Method]] = {}

# What a method can ask of the teacher (and gets of the student alike), besides nothing at all:
# "logits" ``[B, C]``; "embedding" ``[B, D]``, the input of the model's last linear layer (the
# penultimate features of every torchvision classifier), which only the online teacher provides.
NEEDS = ("logits", "embedding")
PLUGINS_ENV = "KDBENCH_METHODS"  # more method modules to register, comma-separated (importable module names)


@dataclasses.dataclass(frozen=True)
class Outputs:
    """What a model produced for one batch: its ``logits`` ``[B, C]`` and the ``features`` a method needs, by name."""

    logits: torch.Tensor
    features: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[name]()


@dataclasses.dataclass(frozen=True)
class Params:
    """A method's own hyperparameters: float fields whose defaults are the paper's.

    Fields named in ``positive`` (temperatures) must be > 0; every other field is a loss weight,
    >= 0, and not all of them 0 (with every distillation weight at 0 the student is the baseline).
    """

    positive: ClassVar[tuple[str, ...]] = ()

    def check(self, where: str) -> None:
        """Raise a one-line UserError naming ``where.<field>`` for a value out of range."""
        weights = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"{where}.{f.name} must be a finite number, got {value!r}")
            if f.name in self.positive and value <= 0:
                raise UserError(f"{where}.{f.name} must be > 0, got {value:g}")
            if f.name not in self.positive:
                if value < 0:
                    raise UserError(f"{where}.{f.name} must be >= 0 (a loss weight), got {value:g}")
                weights.append(value)
        if weights and not any(weights):
            raise UserError(f"{where}: every distillation weight is 0, so this is the baseline: make one weight > 0")

    def pairs(self) -> tuple[tuple[str, float], ...]:
        """``(name, value)`` in field order: the form ``LossConfig.params`` holds."""
        return tuple((f.name, float(getattr(self, f.name))) for f in dataclasses.fields(self))


class Method:
    """Base: CE, KL and cosine terms of :func:`kdbench.losses.distillation_loss`, switched on per method."""

    name: ClassVar[str]
    label: ClassVar[str]  # how reports name it
    rank: ClassVar[int]  # registry order: tables and figures list methods by it
    role: ClassVar[str] = "student"  # which recipe it trains: "teacher" or "student"
    uses_kl: ClassVar[bool] = False
    uses_cos: ClassVar[bool] = False
    params: ClassVar[type[Params] | None] = None  # own hyperparameters (see the module docstring)
    # What it needs from the teacher (:data:`NEEDS`); the student's outputs carry the same.  None: logits
    # where the loss has a soft term (the paper's methods), nothing otherwise.
    needs: ClassVar[frozenset[str] | None] = None
    # Bump when this method's own loss formula changes (not kdbench.losses, whose LOSS_VERSION keys every
    # trial): part of its trials' keys where not empty (TrialConfig.identity), so no other method's key moves.
    loss_version: ClassVar[str] = ""

    @property
    def needs_from_teacher(self) -> frozenset[str]:
        """What the engine must provide of the teacher (and of the student) for :meth:`loss`."""
        if self.needs is not None:
            return self.needs
        return frozenset({"logits"}) if self.uses_kl or self.uses_cos else frozenset()

    @property
    def needs_teacher(self) -> bool:
        return bool(self.needs_from_teacher)

    def sweep_axes(self, loss: LossConfig) -> tuple[str, ...]:
        """The shared grid axes (``temperature``, ``beta``, ``gamma``) that change this method's result."""
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
            params=(),
        )

    def check(self, loss: LossConfig, where: str, hint: str = "") -> None:
        """One-line UserError ``where`` + the problem + ``hint`` unless ``loss`` is valid for this method."""
        check_loss(loss, where, hint)

    def describe(self, loss: LossConfig) -> str:
        """The settings of an effective ``loss`` that this method's trials vary by, for logs and reports."""
        return f"T {loss.temperature:g}, β {loss.beta:g}, γ {loss.gamma:g}"

    def loss(
        self, student: Outputs, teacher: Outputs | None, targets: torch.Tensor, cfg: LossConfig
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        """The training loss and its unweighted terms by name; ``cfg`` is already :meth:`effective_loss`.

        ``student`` and ``teacher`` hold what :attr:`needs_from_teacher` asks for (``teacher`` is None
        for a method that needs nothing of it).
        """
        terms = losses.loss_terms(
            student.logits,
            teacher.logits if teacher is not None else None,
            targets,
            alpha=cfg.alpha,
            beta=cfg.beta,
            gamma=cfg.gamma,
            temperature=cfg.temperature,
            cosine_on=cfg.cosine_on,
        )
        return losses.combine(terms, alpha=cfg.alpha, beta=cfg.beta, gamma=cfg.gamma), terms._asdict()


class HardLabels(Method):
    """Plain supervised training: ``CE(s, y)`` with weight 1, whatever the grid's loss settings."""

    def effective_loss(self, loss: LossConfig) -> LossConfig:
        return LossConfig(alpha=1.0, beta=0.0, gamma=0.0, temperature=1.0)


class OwnParams(Method):
    """A distilling student with its own hyperparameters: ``alpha * CE(s, y) + distill(s, t, y, params)``.

    A subclass sets ``params`` (its :class:`Params` dataclass) and implements :meth:`distill`.  The
    shared ``temperature``, ``beta`` and ``gamma`` do not apply (canonical 1, 0, 0 in its key).
    """

    needs = frozenset({"logits"})

    def sweep_axes(self, loss: LossConfig) -> tuple[str, ...]:
        return ()

    def own(self, loss: LossConfig) -> Params:
        """This method's hyperparameters in ``loss`` (defaults for those not set), unchecked."""
        names = {f.name for f in dataclasses.fields(self.params)}
        unknown = sorted(set(dict(loss.params)) - names)
        if unknown:
            raise UserError(f"{self.name} has no hyperparameter {unknown[0]}: its hyperparameters are {', '.join(sorted(names))}")
        return self.params(**dict(loss.params))

    def effective_loss(self, loss: LossConfig) -> LossConfig:
        return LossConfig(alpha=loss.alpha, beta=0.0, gamma=0.0, temperature=1.0, params=self.own(loss).pairs())

    def check(self, loss: LossConfig, where: str, hint: str = "") -> None:
        try:
            losses.check_weight("alpha", loss.alpha)
        except ValueError as err:
            raise UserError(f"{where}{err}{hint}") from err
        self.own(loss).check(f"{where}{self.name}")

    def describe(self, loss: LossConfig) -> str:
        return ", ".join(f"{name} {value:g}" for name, value in self.own(loss).pairs())

    def loss(
        self, student: Outputs, teacher: Outputs | None, targets: torch.Tensor, cfg: LossConfig
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        if teacher is None:
            raise ValueError(f"{self.name} distils from a teacher: it needs the teacher's outputs")
        losses.check_logits(student.logits, teacher.logits, targets)
        total, terms = self.distill(student, teacher, targets, self.own(cfg))
        ce = losses.cross_entropy_term(student.logits, targets) if cfg.alpha > 0 else None
        if ce is not None:
            total = cfg.alpha * ce + total
        return total, {"ce": ce, **terms}

    def distill(
        self, student: Outputs, teacher: Outputs, targets: torch.Tensor, p: Params
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted distillation loss and its unweighted terms by name, from what :attr:`needs` asked for."""
        raise NotImplementedError


def resolve(method: Method, loss: LossConfig) -> tuple[Method, LossConfig]:
    """The method that ``method`` with ``loss`` really is, and its effective loss.

    A paper student whose soft-term weight is 0 does not use that term: ``kd_kl_cos`` with
    ``gamma = 0`` is ``kd_kl``, with ``beta = 0`` it is ``kd_cos``, and with both 0 it is the
    baseline (plain cross-entropy).  Planning and reporting such a grid point under the method it
    really is trains it once and never shows a CE-only student as KD.  A method with its own
    hyperparameters is always itself.
    """
    effective = method.effective_loss(loss)
    if method.role != "student":
        return method, effective
    uses = (method.uses_kl and effective.beta > 0, method.uses_cos and effective.gamma > 0)
    if uses == (method.uses_kl, method.uses_cos):
        return method, effective
    for cls in METHODS.values():
        if cls.role == "student" and cls.params is None and (cls.uses_kl, cls.uses_cos) == uses:
            real = cls()
            return real, real.effective_loss(effective)
    raise UserError(f"{method.name} with beta={loss.beta:g}, gamma={loss.gamma:g} is no registered method")


def _discover() -> None:
    """Import every module of this package and those named in ``$KDBENCH_METHODS`` (each registers its
    method), then order the registry by rank.

    ``KDBENCH_METHODS=mylab.fitnet,mylab.crd`` adds methods that live outside kdbench; the sweep's workers
    inherit the variable.  A module that cannot be imported is a one-line error.
    """
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    for name in filter(None, (n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise UserError(f"{PLUGINS_ENV} names {name}, which cannot be imported ({err}): fix the name or PYTHONPATH") from err
    ordered = sorted(METHODS.values(), key=lambda cls: cls.rank)
    METHODS.clear()
    METHODS.update((cls.name, cls) for cls in ordered)


_discover()
