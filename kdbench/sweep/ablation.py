"""Ablation files (TOML): load, apply ``--set`` overrides, validate once into a typed :class:`Ablation`.

Layout::

    name = "quick"
    description = "..."
    [grid]      # datasets, methods, seeds, split_seeds, teacher, temperatures, kl_weights (beta), cos_weights (gamma)
    [data]      # DataConfig fields except dataset (resolution, images_per_class, augment, ...)
    [data.ucmerced]  # a dataset's own values of those fields, over [data] (its resolution, test share, ...)
    [teacher]   # Recipe of the teacher; plus ``seed``: one teacher, trained with that seed, for every student seed
    [teacher.rsscn7]  # a dataset's own values of the teacher's recipe, over [teacher] (its epochs, model, ...)
    [student]   # Recipe of every student
    [loss]      # alpha (CE weight); shorthand: cosine_on and the default point (temperature, beta, gamma) on the grid
    [run]       # device, pack, allow_chance_teacher
    [deploy]    # int8 = true: each finished trial quantized to INT8 and scored (kdbench.engine.int8), and its settings
    [methods.dkd]   # a method's hyperparameters (kdbench.methods): fixed values / the default point
    [grid.dkd]      # lists of values of a method's hyperparameters: grid axes of that method only

Every method with hyperparameters (kd_kl, kd_cos, kd_kl_cos, dkd, dist, lskd, ...) takes them from
``[methods.<name>]`` (fixed values and the default point: ``--set methods.dkd.beta=4``) and sweeps them along
``[grid.<name>]`` (``--set grid.dkd.beta=[2,8]``); unset ones keep the method's published defaults.  Where a
method's axis has several values its default must be named in ``[methods.<name>]``; a one-value axis is its
own default.

``[loss] temperature/beta/gamma/cosine_on`` and ``[grid] temperatures/kl_weights/cos_weights`` are shorthand
for the paper's methods, expanded when the file is parsed (:func:`expand_shorthand`) into the tables of those
in ``grid.methods``: kd_kl gets temperature and beta, kd_cos gamma, on (``cosine_on``) and, with
``on = "probs"``, temperature, kd_kl_cos all four.  A value in an explicit ``[methods.<name>]`` or
``[grid.<name>]`` wins over the shorthand for that setting.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import re
import shlex
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from kdbench.advice import command
from kdbench.config import DataConfig, LossConfig, Recipe, check_recipe, from_dict
from kdbench.data.config import check_data
from kdbench.data.specs import BUILTIN_DATASETS, dataset_names
from kdbench.engine.int8 import check_settings
from kdbench.errors import UserError
from kdbench.losses import COSINE_ON
from kdbench.methods import Value, get_method
from kdbench.records import Int8Settings

# The shipped ablation files are package data (kdbench/ablations/, also reached as ./ablations in a
# checkout), so a regular `pip install` finds them from any folder.
ABLATIONS_DIR = Path(__file__).resolve().parents[1] / "ablations"
DEFAULT_ABLATION = "quick.toml"
TEACHER_DEFAULTS = {"model": "vgg16", "lr": 0.01}
# a word of a --set list or table that TOML reads only quoted: not a number, boolean, key (``name =``) or quoted already
BARE_WORD = re.compile(r"(?<![\w\"'.:/-])(?!(?:true|false|inf|nan)\b)[A-Za-z_][\w.:/-]*(?![\w\"'.:/-]|\s*=)")


@dataclass(frozen=True)
class Grid:
    datasets: tuple[str, ...] = ("eurosat", "ucmerced", "rsscn7")
    methods: tuple[str, ...] = ("baseline", "kd_kl", "kd_cos", "kd_kl_cos")  # students (kdbench.methods)
    seeds: tuple[int, ...] = (0,)
    # The teacher is a role, not a method: it is trained for every student that distils, and with ``teacher`` on
    # (the default) also where none does, so that the report compares the students with it.
    teacher: bool = True
    # The literature's "mean over N random splits" protocol: each split seed is a train/val/test split of its own, with
    # its own teacher, and each (split, seed) pair a replicate of the report.  Empty: one split, data.split_seed.
    split_seeds: tuple[int, ...] = ()
    temperatures: tuple[float, ...] = (4.0,)
    kl_weights: tuple[float, ...] = (1.0,)  # beta
    cos_weights: tuple[float, ...] = (1.0,)  # gamma


@dataclass(frozen=True)
class LossSettings:
    """``alpha``, the cross-entropy weight every student shares, and the paper methods' shorthand.

    ``cosine_on``, ``temperature``, ``beta`` and ``gamma`` name the paper methods' default point (the trials
    Table 1, its best-student star and the confusion matrices are about), expanded into their
    ``[methods.<name>]`` tables (:func:`expand_shorthand`).  Where a grid axis has several values, its default
    must be named here and be one of them; where it has one value, that value is the default (so ``--set
    grid.temperatures=[2.0]`` needs no matching ``--set loss.temperature``).
    """

    alpha: float = 1.0
    cosine_on: str = "logits"
    temperature: float | None = None
    beta: float | None = None
    gamma: float | None = None


@dataclass(frozen=True)
class MethodSettings:
    """A method's own hyperparameters in an ablation: every grid point's values and the default point."""

    axes: tuple[tuple[str, tuple[float | str, ...]], ...]  # (name, values) in the method's field order
    default: tuple[tuple[str, float | str], ...]  # (name, value): the point Table 1 reports

    def points(self) -> list[tuple[tuple[str, Value], ...]]:
        """Every combination of the axes' values, as ``LossConfig.params``."""
        names = [name for name, _ in self.axes]
        return [tuple(zip(names, values)) for values in itertools.product(*(v for _, v in self.axes))]


@dataclass(frozen=True)
class RunSettings:
    device: str = "auto"
    pack: int = 0  # students trained together on CUDA; 0 = automatic (8 on CUDA, 1 on CPU)
    allow_chance_teacher: bool = False  # a teacher at chance level is done and flagged, not failed (pipeline tests)


@dataclass(frozen=True)
class DeploySettings:
    """``[deploy]``: the deployment step after training, derived from each finished trial's best checkpoint.

    ``int8 = true`` quantizes every finished trial (teacher and students) to INT8 with ONNX Runtime's static
    quantization (QDQ, per-channel weights) calibrated by ``calibration`` on ``calibration_images`` of its training
    images drawn with ``calibration_seed``, and scores it on the test split.  None of it is in a trial's key.
    """

    int8: bool = False
    calibration: str = "MinMax"  # ONNX Runtime's CalibrationMethod: MinMax, Percentile or Entropy
    calibration_images: int = 256
    calibration_seed: int = 0

    def int8_settings(self) -> Int8Settings | None:
        """The quantization settings, None where ``int8`` is off."""
        if not self.int8:
            return None
        return Int8Settings(
            calibration=self.calibration, calibration_images=self.calibration_images, calibration_seed=self.calibration_seed
        )


@dataclass(frozen=True)
class Ablation:
    name: str
    description: str = ""
    grid: Grid = field(default_factory=Grid)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: Recipe = field(default_factory=lambda: Recipe(model="vgg16", lr=0.01))
    student: Recipe = field(default_factory=Recipe)
    loss: LossSettings = field(default_factory=LossSettings)
    run: RunSettings = field(default_factory=RunSettings)
    deploy: DeploySettings = field(default_factory=DeploySettings)
    # ``[teacher] seed``: every student seed distils from the one teacher trained with this seed (a teacher
    # costs many student trials on a CPU); None: each student seed has its own teacher, trained with that seed
    teacher_seed: int | None = None
    # every method with hyperparameters in grid.methods: from [methods.X] and [grid.X] and the shorthand; see the docstring
    methods: dict[str, MethodSettings] = field(default_factory=dict)
    # ``[data.<dataset>]``: each listed dataset's own DataConfig ([data] with that table's values over it; dataset set)
    dataset_data: tuple[tuple[str, DataConfig], ...] = ()
    # ``[teacher.<dataset>]``: each listed dataset's own teacher Recipe ([teacher] with that table's values over it)
    dataset_teachers: tuple[tuple[str, Recipe], ...] = ()
    # The --set overrides applied to the file, as given: load_ablation records them (not a key of a file), so the
    # report can say that ``description`` was written for the file's own settings, not for what ran
    overrides: tuple[str, ...] = ()

    def data_for(self, dataset: str) -> DataConfig:
        """The data settings of ``dataset``: its ``[data.<dataset>]`` table over ``[data]``, with ``dataset`` set."""
        own = dict(self.dataset_data)
        return own[dataset] if dataset in own else dataclasses.replace(self.data, dataset=dataset)

    def teacher_for(self, dataset: str) -> Recipe:
        """The teacher's recipe on ``dataset``: its ``[teacher.<dataset>]`` table over ``[teacher]``."""
        return dict(self.dataset_teachers).get(dataset, self.teacher)

    def points(self, name: str) -> list[LossConfig]:
        """The loss settings of every grid point of method ``name`` (before :meth:`kdbench.methods.Method.resolve`)."""
        if name in self.methods:
            return [LossConfig(alpha=self.loss.alpha, params=params) for params in self.methods[name].points()]
        return [LossConfig(alpha=self.loss.alpha)]

    def default_loss(self, name: str) -> LossConfig:
        """The effective loss of method ``name``'s default trial (``[loss] alpha`` and ``[methods.<name>]``)."""
        params = self.methods[name].default if name in self.methods else ()
        return get_method(name).effective_loss(LossConfig(alpha=self.loss.alpha, params=params))


def resolve_path(config: str | None) -> Path:
    """``--config`` as given, else a shipped ablation of that name (``quick`` or ``quick.toml``), else the default."""
    if config is None:
        return ABLATIONS_DIR / DEFAULT_ABLATION
    path = Path(config)
    shipped = ABLATIONS_DIR / (path.name if path.suffix == ".toml" else f"{path.name}.toml")
    if not path.is_file() and shipped.is_file():
        path = shipped
    if not path.is_file():
        raise UserError(
            f"ablation file {config} not found: pass a TOML file or a shipped ablation ({', '.join(shipped_ablations())})"
        )
    return path


def shipped_ablations() -> list[str]:
    """Names of the ablation files that ship with kdbench (``kdbench/ablations/*.toml``), sorted."""
    return sorted(p.stem for p in ABLATIONS_DIR.glob("*.toml"))


def load_raw(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path} is not valid TOML ({err}): fix the syntax") from err


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` overrides (dotted keys, TOML values; bare words are strings)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r} must look like key=value, e.g. --set teacher.epochs=2")
        value = override_value(key.strip(), text)
        *parents, leaf = key.strip().split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {part} is not a table")
        node[leaf] = value
    return raw


def override_value(key: str, text: str):
    """The TOML value of ``--set key=text``; a bare word is a string, but a list or table must be valid TOML.

    Raises:
        UserError: a list or table that is not TOML (``[eurosat]``), naming the quoted form (``["eurosat"]``).
    """
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if not text.lstrip().startswith(("[", "{")):
            return text
    quoted = BARE_WORD.sub(lambda m: f'"{m.group(0)}"', text)
    raise UserError(
        f"--set {key}={text}: {text} is not a TOML value: strings in a list or table need TOML quotes, e.g. "
        + command("sweep", "--set", shlex.quote(f"{key}={quoted}"))
    )


def parse_ablation(raw: dict, source: str) -> Ablation:
    """Validate a raw mapping into an :class:`Ablation` (types, ranges, names; not the grid's products)."""
    if "dataset" in raw.get("data", {}):
        raise UserError(f"{source}: data.dataset is not an ablation key: list datasets in grid.datasets")
    if "name" not in raw:
        raise UserError(f"{source}: missing key name (the ablation's name, used for its output folder)")
    raw, own_data = _dataset_tables(raw, "data")
    raw, own_teacher = _dataset_tables(raw, "teacher")
    teacher = raw.get("teacher", {})
    if isinstance(teacher, dict):
        teacher = {**TEACHER_DEFAULTS, **teacher}
        if "seed" in teacher:
            raw = {**raw, "teacher_seed": teacher.pop("seed")}
        raw = {**raw, "teacher": teacher}
    if "teacher_seed" in raw and not isinstance(raw["teacher_seed"], int):
        raise UserError(f"{source}: teacher.seed must be an integer, got {raw['teacher_seed']!r}")
    raw, fixed, axes = _method_tables(raw)
    ablation = from_dict(Ablation, raw, "ablation")
    check_grid(ablation.grid)
    ablation = dataclasses.replace(ablation, loss=default_point(ablation.loss, ablation.grid, source))
    fixed, axes = expand_shorthand(ablation.loss, ablation.grid, fixed, axes)
    methods = method_settings(fixed, axes, ablation.grid, source, alpha=ablation.loss.alpha)
    ablation = dataclasses.replace(ablation, methods=methods)
    for section, tables in (("data", own_data), ("teacher", own_teacher)):
        # a built-in dataset's table may stay in a file whose grid was narrowed (--set grid.datasets=[...])
        stray = sorted(set(tables) - set(ablation.grid.datasets) - set(BUILTIN_DATASETS))
        if stray:
            listed = ", ".join(ablation.grid.datasets)
            raise UserError(f"{source}: [{section}.{stray[0]}] names no dataset of grid.datasets ({listed})")
    own_data = {k: v for k, v in own_data.items() if k in ablation.grid.datasets}
    own_teacher = {k: v for k, v in own_teacher.items() if k in ablation.grid.datasets}
    data, teacher = dataclasses.asdict(ablation.data), dataclasses.asdict(ablation.teacher)
    ablation = dataclasses.replace(
        ablation,
        dataset_data=tuple(
            (name, from_dict(DataConfig, {**data, **table, "dataset": name}, f"data.{name}")) for name, table in own_data.items()
        ),
        dataset_teachers=tuple(
            (name, from_dict(Recipe, {**teacher, **table}, f"teacher.{name}")) for name, table in own_teacher.items()
        ),
    )
    for dataset in ablation.grid.datasets:
        check_data(ablation.data_for(dataset), f"data.{dataset}" if dataset in own_data else "data")
        check_recipe(ablation.teacher_for(dataset), f"teacher.{dataset}" if dataset in own_teacher else "teacher")
    dataset_names(ablation.grid.datasets)  # a dataset listed twice, two imagefolders with one label
    check_recipe(ablation.teacher, "teacher")
    check_recipe(ablation.student, "student")
    if ablation.run.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"run.device must be auto, cpu or cuda, got {ablation.run.device!r}")
    if ablation.run.pack < 0:
        raise UserError(f"run.pack must be >= 0, got {ablation.run.pack}")
    check_settings(dataclasses.replace(ablation.deploy, int8=True).int8_settings(), "deploy")  # checked even while off
    return ablation


# loss setting -> the grid axis that lists its values
GRID_AXES = {"temperature": "temperatures", "beta": "kl_weights", "gamma": "cos_weights"}


def default_point(loss: LossSettings, grid: Grid, source: str) -> LossSettings:
    """``loss`` with its default point checked against the grid and filled in where an axis has one value."""
    values = {}
    for name, axis in GRID_AXES.items():
        given, options = getattr(loss, name), getattr(grid, axis)
        if len(options) == 1:
            given = options[0]
        elif given is None:
            raise UserError(
                f"{source}: grid.{axis} has {len(options)} values: name the default one in [loss] "
                f"(e.g. loss.{name} = {options[0]:g}); Table 1 reports that point"
            )
        elif not any(math.isclose(given, o) for o in options):
            raise UserError(f"{source}: loss.{name} = {given:g} is not in grid.{axis} ({', '.join(f'{o:g}' for o in options)})")
        values[name] = float(given)
    if loss.cosine_on not in COSINE_ON:
        raise UserError(f"{source}: loss.cosine_on must be one of {', '.join(COSINE_ON)}, got {loss.cosine_on!r}")
    return dataclasses.replace(loss, **values)


# The shorthand: paper method -> (its setting, the [grid] axis listing its values or None, the [loss] key of its default)
SHORTHAND = {
    "kd_kl": (("temperature", "temperatures", "temperature"), ("beta", "kl_weights", "beta")),
    "kd_cos": (("gamma", "cos_weights", "gamma"), ("on", None, "cosine_on"), ("temperature", "temperatures", "temperature")),
    "kd_kl_cos": (
        ("temperature", "temperatures", "temperature"),
        ("beta", "kl_weights", "beta"),
        ("gamma", "cos_weights", "gamma"),
        ("on", None, "cosine_on"),
    ),
}


def expand_shorthand(loss: LossSettings, grid: Grid, fixed: dict, axes: dict) -> tuple[dict, dict]:
    """``[methods.<m>]`` and ``[grid.<m>]`` with the ``[loss]``/``[grid]`` shorthand of the paper methods of the grid.

    A setting named in the method's own ``[methods.<m>]`` or ``[grid.<m>]`` keeps that (explicit wins); ``kd_cos``
    takes a temperature only with ``on = "probs"`` (on the logits it has none).
    """
    fixed = {name: dict(table) for name, table in fixed.items()}
    axes = {name: dict(table) for name, table in axes.items()}
    for name in grid.methods:
        for setting, axis, key in SHORTHAND.get(name, ()):
            if setting in fixed.get(name, {}) or setting in axes.get(name, {}):
                continue
            if name == "kd_cos" and setting == "temperature" and fixed.get(name, {}).get("on", loss.cosine_on) != "probs":
                continue
            fixed.setdefault(name, {})[setting] = getattr(loss, key)
            if axis is not None:
                axes.setdefault(name, {})[setting] = list(getattr(grid, axis))
    return fixed, axes


def _method_tables(raw: dict) -> tuple[dict, dict, dict]:
    """``raw`` without the method tables, and those tables: ``[methods.X]`` and ``[grid.X]`` by method name."""
    fixed = raw.get("methods", {})
    grid = raw.get("grid", {})
    if not isinstance(fixed, dict) or not all(isinstance(t, dict) for t in fixed.values()):
        raise UserError("methods must hold one table per method, e.g. [methods.dkd] with beta = 8.0")
    if not isinstance(grid, dict):
        return {k: v for k, v in raw.items() if k != "methods"}, fixed, {}
    axes = {k: v for k, v in grid.items() if isinstance(v, dict)}
    grid = {k: v for k, v in grid.items() if k not in axes}
    return {**{k: v for k, v in raw.items() if k != "methods"}, "grid": grid}, fixed, axes


def _dataset_tables(raw: dict, section: str) -> tuple[dict, dict]:
    """``raw`` without the ``[<section>.<dataset>]`` tables, and those tables by dataset."""
    values = raw.get(section, {})
    if not isinstance(values, dict):
        return raw, {}
    own = {k: v for k, v in values.items() if isinstance(v, dict)}
    for name, table in own.items():
        for key in ("dataset", "seed"):
            if key in table:
                raise UserError(f"{section}.{name}.{key} is not a key of a dataset's table: set it in [{section}]")
    return {**raw, section: {k: v for k, v in values.items() if k not in own}}, own


def method_settings(fixed: dict, axes: dict, grid: Grid, source: str, alpha: float = 1.0) -> dict[str, MethodSettings]:
    """The hyperparameters of every method of the grid that has them, checked against the method's ``Params``."""
    for table, names in (("methods", fixed), ("grid", axes)):
        for name in names:
            if get_method(name).params is None:
                raise UserError(f"{source}: [{table}.{name}]: {name} has no hyperparameters")
    settings = {}
    for name in [*grid.methods, *fixed, *axes]:
        method = get_method(name)
        if method.params is None or name in settings:
            continue
        given = from_dict(method.params, fixed.get(name, {}), f"methods.{name}")
        lists = from_dict(_axes_type(method.params), axes.get(name, {}), f"grid.{name}")
        values, default = [], []
        for f in dataclasses.fields(method.params):
            options = getattr(lists, f.name) or (getattr(given, f.name),)
            value = getattr(given, f.name)
            if len(options) > 1 and f.name not in fixed.get(name, {}):
                raise UserError(
                    f"{source}: grid.{name}.{f.name} has {len(options)} values: name the default one in [methods.{name}] "
                    f"(e.g. methods.{name}.{f.name} = {_text(options[0])}); Table 1 reports that point"
                )
            if f.name in fixed.get(name, {}) and not any(same(value, o) for o in options):
                raise UserError(
                    f"{source}: methods.{name}.{f.name} = {_text(value)} is not in grid.{name}.{f.name} "
                    f"({', '.join(_text(o) for o in options)})"
                )
            value = value if f.name in fixed.get(name, {}) else options[0]
            values.append((f.name, tuple(_scalar(o) for o in options)))
            default.append((f.name, _scalar(value)))
        settings[name] = MethodSettings(tuple(values), tuple(default))
        for point in settings[name].points():
            method.params(**dict(point)).check(f"{source}: {name} at {_point_text(point)}: methods.{name}")
        method.check(LossConfig(alpha, settings[name].default), f"{source}: {name} at the default point: ")
        real, _ = method.resolve(LossConfig(alpha, settings[name].default))
        if real.name != name and name in grid.methods:
            raise UserError(
                f"{source}: at the default point ({_point_text(settings[name].default)}) {name} is really {real.name}: "
                f"choose a default with non-zero weights for the terms {name} uses"
            )
    return settings


def same(a: Value, b: Value) -> bool:
    """Whether two setting values are equal (numbers up to rounding)."""
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return math.isclose(a, b)


def _scalar(value: Value) -> Value:
    return value if isinstance(value, str) else float(value)


def _text(value: Value) -> str:
    return value if isinstance(value, str) else f"{value:g}"


def _point_text(point: tuple[tuple[str, Value], ...]) -> str:
    return ", ".join(f"{k} = {_text(v)}" for k, v in point)


def _axes_type(params: type) -> type:
    """A dataclass with the fields of ``params`` as optional lists (the layout of ``[grid.<method>]``)."""
    hints = typing.get_type_hints(params)
    fields = [(f.name, tuple[hints[f.name], ...], field(default=())) for f in dataclasses.fields(params)]
    return dataclasses.make_dataclass(f"{params.__name__}Axes", fields, frozen=True)


def check_grid(grid: Grid) -> None:
    for f in dataclasses.fields(grid):
        if f.name not in ("teacher", "split_seeds") and not getattr(grid, f.name):
            raise UserError(f"grid.{f.name} is empty: the grid has no trials; give it at least one value")
    for name in grid.methods:
        if name == "teacher":
            raise UserError(
                "grid.methods lists teacher: the teacher is a role, not a method (it is trained for every student that "
                "distils, and reported unless grid.teacher = false): remove it from grid.methods"
            )
        get_method(name)
    if len(set(grid.split_seeds)) != len(grid.split_seeds) or any(s < 0 for s in grid.split_seeds):
        raise UserError(f"grid.split_seeds must be different integers >= 0, got {list(grid.split_seeds)}")
    for t in grid.temperatures:
        if t <= 0:
            raise UserError(f"grid.temperatures has {t:g}: a temperature must be > 0")
    for axis in ("kl_weights", "cos_weights"):
        for w in getattr(grid, axis):
            if w < 0:
                raise UserError(f"grid.{axis} has {w:g}: loss weights must be >= 0")


def load_ablation(config: str | None, overrides: list[str] | None = None) -> tuple[Ablation, Path, dict]:
    """Read, override and validate an ablation file; returns (ablation, path, raw mapping as used).

    The raw mapping records the overrides under ``overrides`` (the results store keeps it; the report names them).
    """
    path = resolve_path(config)
    raw = load_raw(path)
    if "overrides" in raw:
        raise UserError(f"{path}: overrides is not an ablation key: it records the --set options a sweep was given")
    raw = apply_overrides(raw, overrides or [])
    if overrides:
        raw["overrides"] = list(overrides)
    return parse_ablation(raw, str(path)), path, raw
