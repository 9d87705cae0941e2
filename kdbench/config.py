"""Typed configuration of a trial: validated once at load, then passed around as frozen dataclasses.

Configs come from TOML ablation files (``ablations/*.toml``) or command-line flags.
:func:`from_dict` builds a dataclass from a mapping, naming the bad key in a
one-line :class:`~kdbench.errors.UserError` for unknown keys and wrong types.

A trial's settings: :class:`~kdbench.data.config.DataConfig` (defined in the data layer, which knows
datasets), :class:`Recipe`, :class:`~kdbench.losses.LossConfig` (defined with the losses, which check
it), all three importable from here, and :class:`TrialConfig`, whose key holds the results version of
the engine, the losses' version and the method's own.  So this module sits in the engine's layer
(tests/test_layers.py): above data, models, losses and methods, below the sweep.  No torch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kdbench import engine, losses
from kdbench.data.config import DataConfig
from kdbench.digest import checkpoint_digest, json_digest
from kdbench.errors import UserError
from kdbench.losses import LossConfig
from kdbench.machine import gpu_visible
from kdbench.methods import METHODS, Method, get_method

SCHEDULES = ("cosine", "onecycle", "constant")
OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class Recipe:
    """How one model is trained (SGD with momentum or AdamW, per-step LR schedule with warm-up)."""

    model: str = "mobilenet_v2"
    pretrained: str = "none"  # "none", "imagenet" or a state-dict path
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"  # "sgd" (with momentum) or "adamw" (momentum is then beta1)
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: int = 1  # linear LR warm-up; from-scratch training at high LR diverges without it
    eval_batch_size: int = 256  # a run setting: evaluation in eval mode is per image, so it is not part of the key


ROLES = ("teacher", "student")
TEACHER_METHOD = "baseline"  # how a teacher trains: on hard labels

# How a trial computes on each device type (kdbench.engine.runtime.autocast): part of its key.
PRECISION = {"cpu": "fp32", "cuda": "bf16-autocast"}


def device_type(name: str) -> str:
    """``cpu`` or ``cuda`` for a device setting (``auto``: cuda when a GPU is visible)."""
    if name == "auto":
        return "cuda" if gpu_visible() else "cpu"
    if name not in PRECISION:
        raise UserError(f"device must be auto, cpu or cuda, got {name!r}")
    return name


@dataclass(frozen=True)
class TrialConfig:
    """Everything that determines one training run's result, and a few run settings that do not.

    ``role`` is which model the trial trains: the ``teacher`` (on hard labels: method ``baseline``, the
    ablation's teacher recipe) or a ``student`` by ``method``.

    The key (:meth:`key`) covers :meth:`identity`: role, method, data (and the fingerprint of its
    files), recipe (a ``pretrained`` state-dict file by its content digest, not its path), loss,
    seed, teacher identity, device type and its precision, packed or single training, the method's
    own loss version where it has one, plus the results and loss-code versions.  Not in the key: the
    teacher checkpoint's path (its content is ``teacher_id``), ``trust_teacher``, ``allow_teacher_resolution``,
    ``allow_chance_teacher``, the recipe's ``eval_batch_size``, and everything outside this class
    (output folder, workers, threads).
    """

    method: str
    role: str = "student"  # "teacher" or "student" (ROLES)
    data: DataConfig = field(default_factory=DataConfig)
    recipe: Recipe = field(default_factory=Recipe)
    loss: LossConfig = field(default_factory=LossConfig)
    seed: int = 0
    teacher_checkpoint: str | None = None
    teacher_id: str | None = None  # identity of the teacher: its trial key (sweep) or checkpoint content digest
    device: str = "auto"  # resolved to cpu or cuda in the key
    packed: bool = False  # trained in a pack of students (kdbench.engine.packed): other dropout masks than alone
    dataset_fingerprint: str | None = None  # kdbench.data.select.data_fingerprint; run_trial fills it in when None
    trust_teacher: bool = False  # accept a teacher checkpoint without provenance (recorded in the result)
    allow_teacher_resolution: bool = False  # accept a teacher trained at another resolution (recorded in the result)
    allow_chance_teacher: bool = False  # a teacher at chance level is done (flagged), not failed: for pipeline tests

    def __post_init__(self):
        if self.role not in ROLES:
            raise UserError(f"a trial's role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.role == "teacher" and self.method != TEACHER_METHOD:
            raise UserError(f"a teacher trains on hard labels (method {TEACHER_METHOD}), not by {self.method}: drop the method")
        # The method and loss settings a trial really is, settled once, here (kdbench.methods.Method.resolve: defaults
        # filled in, settings the others make irrelevant left out, a degenerate point as the method it reduces to);
        # the key, the engine and the result take them as they are.
        method, loss = get_method(self.method).resolve(self.loss)
        object.__setattr__(self, "method", method.name)
        object.__setattr__(self, "loss", loss)

    @property
    def method_impl(self) -> Method:
        """The registered method this trial trains by (its loss, what it needs of the teacher)."""
        return METHODS[self.method]()

    def identity(self) -> dict:
        """The fields that affect the result, with the device resolved and its precision."""
        d = dataclasses.asdict(self)
        d.pop("teacher_checkpoint")  # a path; the teacher's identity is teacher_id
        d.pop("trust_teacher")  # allows a run, changes nothing in it; recorded in the result's teacher record
        d.pop("allow_teacher_resolution")  # the same: a teacher's resolution is in its identity, teacher_id
        d.pop("allow_chance_teacher")  # decides whether a finished teacher counts as failed, not what it learnt
        d["recipe"].pop("eval_batch_size")
        d["recipe"]["pretrained"] = pretrained_identity(self.recipe.pretrained)
        d["loss"]["params"] = dict(self.loss.params)  # the method's settled hyperparameters (none: {})
        d["device"] = device_type(self.device)
        d["precision"] = PRECISION[d["device"]]
        version = method_loss_version(self.method)
        if version:  # a method whose loss formula changed since it was added; absent for every other method, as before
            d["method_loss_version"] = version
        return d

    def key(self) -> str:
        versions = {"results_version": engine.RESULTS_VERSION, "loss_version": losses.LOSS_VERSION}
        return json_digest({"trial": self.identity(), **versions})


PRETRAINED_NAMES = ("", "none", "imagenet")  # any other ``pretrained`` value is a state-dict file


def pretrained_identity(pretrained: str) -> str:
    """What a recipe's ``pretrained`` contributes to a trial key: ``none``, ``imagenet`` (torchvision's
    weights, hash-checked by torchvision) or ``sha256:<digest>`` of a state-dict file's bytes, so a file
    overwritten in place is another trial and two copies of one file are the same.

    Raises:
        UserError: the state-dict file cannot be read.
    """
    if pretrained in PRETRAINED_NAMES:
        return pretrained
    path = Path(pretrained).expanduser()
    try:
        st = path.stat()
        return _file_digest(str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    except OSError as err:
        raise UserError(f"pretrained state-dict file {pretrained} cannot be read ({err.strerror}): check the path") from err


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, *stat) -> str:
    """:func:`kdbench.digest.checkpoint_digest`, once per (file, size, times, inode): keys are computed often.

    Any write to a file changes its ``ctime``, which no user tool can set back, so a changed file is hashed anew.
    """
    return checkpoint_digest(path)


def method_loss_version(name: str) -> str:
    """``Method.loss_version`` of the registered method ``name`` ("" for none, or for an unknown name)."""
    cls = METHODS.get(name)
    return cls.loss_version if cls is not None else ""


T = TypeVar("T")


def from_dict(cls: type[T], raw: Any, where: str) -> T:
    """Build dataclass ``cls`` from ``raw``; unknown keys and wrong types are one-line errors naming ``where.key``."""
    if not isinstance(raw, dict):
        raise UserError(f"{where} must be a table of settings, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise UserError(f"unknown key {where}.{unknown[0]}: valid keys are {', '.join(sorted(names))}")
    values = {name: coerce(hints[name], value, f"{where}.{name}") for name, value in raw.items()}
    return cls(**values)


def coerce(hint: Any, value: Any, where: str) -> Any:
    """Check ``value`` against a type hint (int, float, str, bool, X | None, tuple[X, ...], dataclass)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return coerce(inner, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            example = f": write [{json.dumps(value)}] (strings in a list need TOML quotes)" if isinstance(value, str) else ""
            raise UserError(f"{where} must be a list, got {value!r}{example}")
        (inner, _) = typing.get_args(hint)
        return tuple(coerce(inner, v, where) for v in value)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise UserError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    raise UserError(f"{where} must be {getattr(hint, '__name__', hint)}, got {value!r}")


# (name, low, high, high included and low excluded): lr in (0, 10], momentum (AdamW beta1) and weight decay in [0, 1).
RECIPE_RANGES = (("lr", 0.0, 10.0, True), ("momentum", 0.0, 1.0, False), ("weight_decay", 0.0, 1.0, False))


# torchvision classifiers that every supported torchvision (>= 0.19) has: a recipe naming one is checked
# without importing torchvision, so that the sweep driver plans without torch (kdbench.machine)
COMMON_MODELS = frozenset(
    {"alexnet", "densenet121", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3"}
    | {"mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "shufflenet_v2_x1_0", "squeezenet1_1"}
    | {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152"}
    | {f"vgg{depth}{bn}" for depth in (11, 13, 16, 19) for bn in ("", "_bn")}
)


def check_recipe(recipe: Recipe, where: str) -> None:
    """Range checks that types alone do not catch."""
    if recipe.model not in COMMON_MODELS:
        from kdbench.models import check_model_name  # any other name: torchvision's registry (imports torch)

        check_model_name(recipe.model)
    for name in ("epochs", "batch_size", "eval_batch_size"):
        if getattr(recipe, name) < 1:
            raise UserError(f"{where}.{name} must be >= 1, got {getattr(recipe, name)}")
    if not 0 <= recipe.warmup_epochs <= recipe.epochs:
        raise UserError(f"{where}.warmup_epochs must be between 0 and epochs ({recipe.epochs}), got {recipe.warmup_epochs}")
    for name, lo, hi, closed_hi in RECIPE_RANGES:
        value = getattr(recipe, name)
        if not (lo < value <= hi if closed_hi else lo <= value < hi):  # also false for NaN
            interval = f"({lo:g}, {hi:g}]" if closed_hi else f"[{lo:g}, {hi:g})"
            raise UserError(f"{where}.{name} must be in {interval}, got {value!r}")
    pretrained_identity(recipe.pretrained)  # a state-dict file must be readable where the trial is planned
    if recipe.optimizer not in OPTIMIZERS:
        raise UserError(f"{where}.optimizer must be one of {', '.join(OPTIMIZERS)}, got {recipe.optimizer!r}")
    if recipe.schedule not in SCHEDULES:
        raise UserError(f"{where}.schedule must be one of {', '.join(SCHEDULES)}, got {recipe.schedule!r}")
