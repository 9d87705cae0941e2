"""Distillation methods: one module each in this package, found by the registry.

A method is how a student learns: what it needs of the teacher, its loss and its hyperparameters.  The
teacher is a role, not a method (``TrialConfig.role``): a teacher trains on hard labels, as the baseline
does.  Adding a method means adding one module here that defines a :class:`Method` subclass decorated
with :func:`register`; nothing else branches on method names.  The registry (:data:`METHODS`) lists
methods by their ``rank``: the order of every table and figure.

Every distilling student owns its hyperparameters: a frozen :class:`Params` dataclass with the published
defaults (class attribute ``params``), carried in ``LossConfig.params`` and so in its trial key (ablation
axes ``[grid.<method>]``, default point ``[methods.<method>]``; ``python -m kdbench.train --param``).  The
paper's methods (``kd_kl``, ``kd_cos``, ``kd_kl_cos``) are no exception: ``[loss] temperature`` and
``[grid] temperatures`` are only shorthand for their tables (kdbench.sweep.ablation).  A method resolves a
degenerate point itself (:meth:`Method.resolve`): ``kd_kl_cos`` with ``gamma = 0`` is ``kd_kl``.  The
baseline has no hyperparameters.

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
from kdbench.losses import LossConfig
from kdbench.stages import POOLED, STAGE_NEEDS

if TYPE_CHECKING:
    import torch
    from torch import nn

METHODS: dict[str, type[Method]] = {}

# What a method can ask of the teacher (and gets of the student alike), besides nothing at all:
# "logits" ``[B, C]``; "embedding" ``[B, D]``, the input of the model's last linear layer (the
# penultimate features of every torchvision classifier); "stage:0" .. "stage:4" ``[B, C_i, H_i, W_i]``,
# the outputs of the model's downsampling stages (kdbench.stages, strides 2 to 32), and "pooled"
# ``[B, C_4]``, the global average of stage 4.  The teacher's features come from its feature cache or the teacher
# run online (kdbench.engine.feature_cache); a method needing stages is refused at planning for a teacher/student
# pair whose stages kdbench cannot match.
# "index" is not a model's: the batch's positions in the training split ``[B]`` (int64, on the CPU, where the
# engine draws them), which the engine puts in the student's features (CRD's memory bank is indexed by them;
# :meth:`Method.make_parts` then gets the training split's labels in the same order).
INDEX = "index"
NEEDS = ("logits", "embedding", POOLED, *STAGE_NEEDS, INDEX)
PLUGINS_ENV = "KDBENCH_METHODS"  # more method modules to register, comma-separated (importable module names)


def teacher_features(needs: frozenset[str]) -> frozenset[str]:
    """What of ``needs`` are the teacher's features: not its logits, nor the batch's index (the engine's)."""
    return frozenset(needs) - {"logits", INDEX}


@dataclasses.dataclass(frozen=True)
class Outputs:
    """What a model produced for one batch: its ``logits`` ``[B, C]`` and the ``features`` a method needs, by name."""

    logits: torch.Tensor
    features: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)


def register(cls: type[Method]) -> type[Method]:
    """Add ``cls`` to the registry (a class decorator).

    Raises:
        UserError: ``cls.needs`` names something no model provides (:data:`NEEDS`).
    """
    unknown = sorted(set(cls.needs or ()) - set(NEEDS))
    if unknown:
        raise UserError(f"method {cls.name} needs {unknown[0]!r}, which no model provides: use {', '.join(NEEDS)}")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[name]()


Value = float | str  # a setting's value: a number, or one of a fixed set of words (Params.choices)


@dataclasses.dataclass(frozen=True)
class Params:
    """A method's hyperparameters: fields whose defaults are the published ones.

    A field named in ``choices`` is a word, one of the listed values (e.g. ``on``: ``logits`` or ``probs``);
    every other field is a float.  Fields named in ``positive`` (temperatures) must be > 0, those in
    ``integers`` (sizes and counts: CRD's embedding size) whole numbers >= 1, those in ``fractions``
    (CRD's memory momentum) in ``[0, 1)``; every other float field is a loss weight, >= 0.  With every
    weight at 0 the student is the baseline: a method that says so itself (``reduces``: it resolves such a
    point to the baseline, :meth:`Method.resolve`) accepts it, any other refuses it.
    """

    positive: ClassVar[tuple[str, ...]] = ()
    integers: ClassVar[tuple[str, ...]] = ()
    fractions: ClassVar[tuple[str, ...]] = ()
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}
    reduces: ClassVar[bool] = False

    def check(self, where: str) -> None:
        """Raise a one-line UserError naming ``where.<field>`` for a value out of range or not among its choices."""
        weights = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in self.choices:
                if value not in self.choices[f.name]:
                    raise UserError(f"{where}.{f.name} must be one of {', '.join(self.choices[f.name])}, got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UserError(f"{where}.{f.name} must be a finite number, got {value!r}")
            if f.name in self.integers:
                if value < 1 or value != int(value):
                    raise UserError(f"{where}.{f.name} must be a whole number >= 1, got {value:g}")
                continue
            if f.name in self.fractions:
                if not 0 <= value < 1:
                    raise UserError(f"{where}.{f.name} must be in [0, 1), got {value:g}")
                continue
            if f.name in self.positive and value <= 0:
                raise UserError(f"{where}.{f.name} must be > 0, got {value:g}")
            if f.name not in self.positive:
                if value < 0:
                    raise UserError(f"{where}.{f.name} must be >= 0 (a loss weight), got {value:g}")
                weights.append(value)
        if weights and not any(weights) and not self.reduces:
            raise UserError(f"{where}: every distillation weight is 0, so this is the baseline: make one weight > 0")

    def pairs(self) -> tuple[tuple[str, Value], ...]:
        """``(name, value)`` of the settings that change the result, in field order: the form ``LossConfig.params``
        holds and the trial key has.  A subclass leaves out a setting that its other settings make irrelevant."""
        return tuple((f.name, _value(getattr(self, f.name))) for f in dataclasses.fields(self))

    def weights(self) -> dict[str, float]:
        """The loss weights (fields neither positive, integers, fractions nor choices) by name."""
        others = {*self.positive, *self.integers, *self.fractions, *self.choices}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in others}


def _value(value: Value) -> Value:
    return value if isinstance(value, str) else float(value)


def settings_text(params: tuple[tuple[str, Value], ...]) -> str:
    """``name value, ...`` of settled params, for logs and reports."""
    return ", ".join(f"{name} {value}" if isinstance(value, str) else f"{name} {value:g}" for name, value in params)


class Method:
    """Base of every method: its name, what it needs of the teacher, its hyperparameters and its loss."""

    name: ClassVar[str]
    label: ClassVar[str]  # how reports name it
    rank: ClassVar[int]  # registry order: tables and figures list methods by it
    params: ClassVar[type[Params] | None] = None  # its hyperparameters (see the module docstring); None: it has none
    # What it needs from the teacher (:data:`NEEDS`); the student's outputs carry the same.  None: logits
    # for a method with hyperparameters (a distilling student), nothing otherwise.
    needs: ClassVar[frozenset[str] | None] = None
    # Bump when this method's own loss formula changes (not kdbench.losses, whose LOSS_VERSION keys every
    # trial): part of its trials' keys where not empty (TrialConfig.identity), so no other method's key moves.
    loss_version: ClassVar[str] = ""

    # This method's learnable parts (FitNet's regressor), trained with the student but not part of it: set by
    # the engine to what :meth:`make_parts` returned, on the method instance of one trial.
    parts: nn.Module | None = None

    @property
    def needs_from_teacher(self) -> frozenset[str]:
        """What the engine must provide of the teacher (and of the student) for :meth:`loss`."""
        if self.needs is not None:
            return self.needs
        return frozenset({"logits"}) if self.params is not None else frozenset()

    @property
    def needs_teacher(self) -> bool:
        return bool(self.needs_from_teacher)

    def settings(self) -> tuple[str, ...]:
        """The names of this method's hyperparameters (``--param`` names, ``[methods.<name>]`` keys)."""
        return tuple(f.name for f in dataclasses.fields(self.params)) if self.params is not None else ()

    def own(self, loss: LossConfig) -> Params:
        """This method's hyperparameters in ``loss`` (defaults for those not set), unchecked."""
        if self.params is None:
            raise UserError(f"{self.name} has no hyperparameters: it takes no {loss.params[0][0] if loss.params else 'setting'}")
        names = self.settings()
        unknown = sorted(set(dict(loss.params)) - set(names))
        if unknown:
            raise UserError(f"{self.name} has no hyperparameter {unknown[0]}: its hyperparameters are {', '.join(names)}")
        return self.params(**dict(loss.params))

    def effective_loss(self, loss: LossConfig) -> LossConfig:
        """``loss`` settled: every hyperparameter given (defaults for the unset ones), those the others make
        irrelevant left out (:meth:`Params.pairs`), so equal trials share a key.  The method stays the same."""
        if self.params is None:
            if loss.params:
                self.own(loss)  # a setting given to a method without any: a one-line error
            return LossConfig(alpha=1.0)
        return LossConfig(alpha=loss.alpha, params=self.own(loss).pairs())

    def resolve(self, loss: LossConfig) -> tuple[Method, LossConfig]:
        """The method that this one with ``loss`` really is, and its effective loss.

        Itself by default; a method whose settings can switch its distillation terms off says what it then
        is (``kd_kl_cos`` with ``gamma = 0`` is ``kd_kl``), so planning trains such a point once and the
        report never shows a CE-only student as KD.
        """
        return self, self.effective_loss(loss)

    def check(self, loss: LossConfig, where: str, hint: str = "") -> None:
        """One-line UserError ``where`` + the problem + ``hint`` unless ``loss`` is valid for this method."""
        try:
            losses.check_weight("alpha", loss.alpha)
        except ValueError as err:
            raise UserError(f"{where}{err}{hint}") from err
        if self.params is None:
            self.effective_loss(loss)
            return
        p = self.own(loss)
        p.check(f"{where}{self.name}")
        if loss.alpha == 0 and not any(p.weights().values()):
            raise UserError(f"{where}{self.name}: loss weights alpha and {', '.join(p.weights())} are all 0: make one > 0{hint}")

    def describe(self, loss: LossConfig) -> str:
        """The settings of an effective ``loss`` that this method's trials vary by, for logs and reports."""
        return settings_text(loss.params)

    def make_parts(
        self,
        student: Mapping[str, tuple[int, ...]],
        teacher: Mapping[str, tuple[int, ...]],
        cfg: LossConfig,
        *,
        train_labels: torch.Tensor | None = None,
    ) -> nn.Module | None:
        """This method's learnable parts, or None (the default: it has none).

        ``student`` and ``teacher`` map each feature :attr:`needs` names to its shape without the batch
        dimension; ``cfg`` is already :meth:`effective_loss`, so every setting a part has comes from this
        method's :class:`Params` (and so is in the trial key).  A method that needs ``"index"`` also gets
        ``train_labels``, the training split's labels ``[N]`` (int64, on the CPU) in the order the index refers to
        (CRD's memory bank and negatives); no other method is passed it.  The engine builds the parts once per trial,
        right after the seeded student (the same seed gives the same initial weights and whatever a part draws from
        torch's global generator), sets :attr:`parts`, trains them with the student (same optimiser), saves them,
        buffers included, in the resume state and never in ``best.pt``: they are not deployed, and their parameters
        are counted apart from the student's (``method_parts`` of the result).
        """
        return None

    def built_parts(self, what: str) -> nn.Module:
        """:attr:`parts`, for a method's loss; ValueError naming ``what`` (``"a regressor"``) when they are not set."""
        if self.parts is None:
            raise ValueError(f"{self.name} trains {what}: build its parts with make_parts and set them as its parts first")
        return self.parts

    def loss(
        self, student: Outputs, teacher: Outputs | None, targets: torch.Tensor, cfg: LossConfig
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
        """The training loss and its unweighted terms by name; ``cfg`` is already :meth:`effective_loss`.

        ``student`` and ``teacher`` hold what :attr:`needs_from_teacher` asks for (``teacher`` is None
        for a method that needs nothing of it).
        """
        raise NotImplementedError


class OwnParams(Method):
    """A distilling student: ``alpha * CE(s, y) + distill(s, t, y, params)``.

    A subclass sets ``params`` (its :class:`Params` dataclass) and implements :meth:`distill`.  ``alpha``
    (``[loss] alpha``) is shared by every student.
    """

    needs = frozenset({"logits"})

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
    """``method.resolve(loss)``: the method that ``method`` with ``loss`` really is, and its effective loss."""
    return method.resolve(loss)


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
