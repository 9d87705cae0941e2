"""Typed records that cross layers as JSON: what planning decided about a trial, read back as written.

The sweep resolves each trial once (:mod:`kdbench.sweep.plan`): its role, method, the settings it
varies by, whether it is the ablation's default point.  The store keeps that resolution
(:class:`TrialPlan`, and the resolved ablation) beside the trial, and the report reads it from
there: a change to a planning rule never changes the report of a store made before it.

:func:`to_json` / :func:`from_json` turn frozen dataclasses (nested dataclasses, tuples, dicts,
optional and plain values) into JSON and back by their type hints, checking types only: no
defaults are filled in and no rule is applied, so a value comes back exactly as it was stored.
Torch-free and numpy-free: the sweep driver and the report use it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

from kdbench.errors import UserError

T = TypeVar("T")

PLAN_FORMAT = "kdbench-plan-v1"


@dataclass(frozen=True)
class GridPoint:
    """A point of an ablation's grid that planning resolved to a trial: the grid's method and its settings.

    ``axes`` are that method's settings (its settled hyperparameters' names) and ``point`` their
    ``(name, value)`` there; one trial can stand for several points (``kd_kl_cos`` at ``gamma = 0`` is the
    ``kd_kl`` trial of the same T and beta).
    """

    method: str
    label: str
    rank: int
    axes: tuple[str, ...]
    point: tuple[tuple[str, float | str], ...]


@dataclass(frozen=True)
class TrialPlan:
    """What planning decided about one trial of one sweep (the store's ``sweep_trials.plan``).

    ``method`` is the method the trial really is (a grid point with a zero soft-term weight is planned
    as the method it reduces to), ``grid_points`` the grid points it was planned from, before that
    resolution.  ``label``, ``rank`` (the order of tables and
    figures) and ``own_params`` (a method with its own hyperparameters) are the method's;
    ``settings`` is the text of its settled hyperparameters, ``axes`` their names (the settings its
    trials can vary along; none for the baseline and the teacher), and ``default``
    says whether it is the ablation's default point (the trial Table 1 reports).
    """

    role: str  # "teacher" or "student"
    method: str
    label: str
    rank: int
    own_params: bool
    settings: str
    axes: tuple[str, ...]
    default: bool
    grid_points: tuple[GridPoint, ...] = ()
    format: str = PLAN_FORMAT


def to_json(record) -> str:
    """A dataclass record as canonical JSON (sorted keys)."""
    return json.dumps(dataclasses.asdict(record), sort_keys=True)


def from_json(cls: type[T], text: str | dict, what: str) -> T:
    """The ``cls`` record stored as ``text`` (JSON, or the decoded dict), exactly as written.

    Raises:
        UserError: the JSON does not fit ``cls`` (a store of another kdbench version): one line naming ``what``.
    """
    try:
        data = json.loads(text) if isinstance(text, str) else text
        fmt = getattr(cls, "__dataclass_fields__", {}).get("format")
        if fmt is not None and data.get("format") != fmt.default:
            raise ValueError(f"format {data.get('format')!r}, this kdbench reads {fmt.default!r}")
        return _decode(cls, data)
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise UserError(
            f"{what} was written by another kdbench version ({err}): rebuild it with the kdbench that wrote it, "
            "or rerun the sweep with this one"
        ) from err


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _decode(hint: Any, value: Any) -> Any:
    """``value`` (decoded JSON) as type ``hint``: dataclasses, tuples, dicts, ``X | None``, str, int, float, bool."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise TypeError(f"{hint.__name__} must be an object, got {value!r}")
        names = {f.name for f in dataclasses.fields(hint)}
        unknown = set(value) - names
        if unknown:
            raise KeyError(f"unknown field {sorted(unknown)[0]} of {hint.__name__}")
        hints = _hints(hint)
        return hint(**{name: _decode(hints[name], v) for name, v in value.items()})
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        *others, last = [a for a in args if a is not type(None)]
        for inner in others:  # ``float | str``: the first that fits
            try:
                return _decode(inner, value)
            except (TypeError, ValueError, KeyError):
                pass
        return _decode(last, value)
    if origin is tuple:
        if not isinstance(value, list):
            raise TypeError(f"expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v) for v in value)
        if len(args) != len(value):
            raise TypeError(f"expected {len(args)} items, got {value!r}")
        return tuple(_decode(a, v) for a, v in zip(args, value))
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"expected an object, got {value!r}")
        return {k: _decode(args[1], v) for k, v in value.items()}
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is Any or (isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        return value
    raise TypeError(f"expected {getattr(hint, '__name__', hint)}, got {value!r}")


RESULT_FORMAT = "kdbench-result-v2"


@dataclass(frozen=True)
class SplitMetrics:
    """A model's metrics on one split (:func:`kdbench.engine.metrics.summarize` plus the mean cross-entropy).

    Accuracies and macro scores are fractions in [0, 1]; ``confusion_matrix[i][j]`` counts images of class
    ``i`` predicted ``j``; ``predictions`` (test split only) are the per-image class indices, in the order
    of :attr:`TrialResult.test_targets`.
    """

    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    per_class_accuracy: dict[str, float]
    confusion_matrix: tuple[tuple[int, ...], ...]
    n: int
    loss: float
    predictions: tuple[int, ...] = ()


@dataclass(frozen=True)
class WeightsResult:
    """The metrics of one set of weights of a trial: the best-on-validation epoch's, or the last epoch's."""

    epoch: int
    val: SplitMetrics
    test: SplitMetrics
    test_logits_file: str | None = None  # the best weights' test logits, beside the checkpoint


@dataclass(frozen=True)
class ChanceTest:
    """:func:`kdbench.engine.metrics.chance_test` of the best validation accuracy; ``allowed``: a chance-level teacher kept."""

    accuracy: float
    n: int
    chance: float
    p_value: float
    alpha: float
    powered: bool
    significant: bool
    at_chance: bool
    allowed: bool


@dataclass(frozen=True)
class Timings:
    total_s: float  # wall time of the runner call (a whole pack's for a pack member)
    train_s: float  # the epochs' summed training time (kept across a resume)
    train_images_per_s: float


@dataclass(frozen=True)
class TrialResult:
    """A finished trial, from the engine (``metrics.json``) through the store to the report.

    ``config`` is the trial's identity (:meth:`kdbench.config.TrialConfig.identity`), ``history`` one
    dict per epoch (training loss, accuracy and loss terms, validation metrics, LR, speed), ``data``
    the dataset folder, split counts and skipped files, ``teacher`` the record of the teacher it
    distilled from (None for a teacher or a baseline), ``pack`` the pack it trained in (None alone),
    ``method_parts`` its method's learnable parts, trained with the student and not deployed (``{"parameters":
    n}``; None for a method without any, e.g. FitNet's regressor is counted here and not with the student).
    """

    key: str
    loss_version: str
    results_version: str
    config: dict[str, Any]
    effective_loss: dict[str, Any]
    classes: tuple[str, ...]
    data: dict[str, Any]
    teacher: dict[str, Any] | None
    test_targets: tuple[int, ...]
    best: WeightsResult
    last: WeightsResult
    chance: ChanceTest
    history: tuple[dict[str, Any], ...]
    timings: Timings
    environment: dict[str, Any]
    pack: dict[str, Any] | None = None
    method_parts: dict[str, Any] | None = None
    format: str = RESULT_FORMAT


INT8_FORMAT = "kdbench-int8-v1"


@dataclass(frozen=True)
class Int8Settings:
    """How a trained model is quantized to INT8 (ONNX Runtime static quantization), the part of the ablation's ``[deploy]``
    that decides the INT8 model: a stored :class:`Int8Result` is reused only under equal settings.

    ``calibration_images`` training images of the trial's own split, drawn with ``calibration_seed`` and preprocessed like
    evaluation inputs (no augmentation), calibrate the activation ranges by ``calibration`` (ONNX Runtime's
    ``CalibrationMethod``: ``MinMax``, ``Percentile`` or ``Entropy``).
    """

    format: str = "QDQ"
    per_channel: bool = True
    activation_type: str = "QUInt8"
    weight_type: str = "QInt8"
    calibration: str = "MinMax"
    calibration_images: int = 256
    calibration_seed: int = 0


@dataclass(frozen=True)
class Int8Result:
    """The INT8 deployment of a trial's best-on-validation checkpoint (:mod:`kdbench.engine.int8`), a derived step:
    it is keyed by the trial's ``key`` and its ``settings``, never part of the trial key.

    ``test`` holds the INT8 model's metrics on the trial's test split, with per-image ``predictions`` in the order of
    :attr:`TrialResult.test_targets`; ``fp32_onnx_agreement`` is the share of test images on which the fp32 ONNX export
    predicts what the trained torch model predicted (a check of the export); sizes are the ONNX files' bytes.
    """

    key: str
    checkpoint_digest: str  # kdbench.digest.checkpoint_digest of the best.pt it quantized
    settings: Int8Settings
    calibration_count: int  # images actually used (fewer than asked on a small training split)
    test: SplitMetrics
    fp32_onnx_agreement: float
    bytes_fp32: int
    bytes_int8: int
    quantize_s: float  # export, calibration and quantization
    evaluate_s: float  # the INT8 and fp32 ONNX models on the test split
    onnxruntime: str  # its version
    format: str = INT8_FORMAT
