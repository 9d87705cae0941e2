"""Ablation files (TOML): load, apply ``--set`` overrides, validate once into a typed :class:`Ablation`.

Layout::

    name = "quick"
    description = "..."
    [grid]      # datasets, methods, seeds, temperatures, kl_weights (beta), cos_weights (gamma)
    [data]      # DataConfig fields except dataset (resolution, images_per_class, augment, ...)
    [teacher]   # Recipe of the teacher; plus ``seed``: one teacher, trained with that seed, for every student seed
    [student]   # Recipe of every student
    [loss]      # alpha (CE weight), cosine_on, and the default point (temperature, beta, gamma) on the grid
    [run]       # device, pack, allow_chance_teacher
"""

from __future__ import annotations

import copy
import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from kdbench.config import DataConfig, LossConfig, Recipe, check_data, check_loss, check_recipe, from_dict
from kdbench.data.specs import dataset_names
from kdbench.errors import UserError

# The shipped ablation files are package data (kdbench/ablations/, also reached as ./ablations in a
# checkout), so a regular `pip install` finds them from any folder.
ABLATIONS_DIR = Path(__file__).resolve().parents[1] / "ablations"
DEFAULT_ABLATION = "quick.toml"
TEACHER_DEFAULTS = {"model": "vgg16", "lr": 0.01}


@dataclass(frozen=True)
class Grid:
    datasets: tuple[str, ...] = ("eurosat", "ucmerced", "rsscn7")
    methods: tuple[str, ...] = ("teacher", "baseline", "kd_kl", "kd_cos", "kd_kl_cos")
    seeds: tuple[int, ...] = (0,)
    temperatures: tuple[float, ...] = (4.0,)
    kl_weights: tuple[float, ...] = (1.0,)  # beta
    cos_weights: tuple[float, ...] = (1.0,)  # gamma


@dataclass(frozen=True)
class LossSettings:
    """The loss settings every trial shares, and the grid's default point.

    ``temperature``, ``beta`` and ``gamma`` name the default point: the trials Table 1, its best-student
    star and the confusion matrices are about.  Where a grid axis has several values, its default must be
    named here and be one of them; where it has one value, that value is the default (so ``--set
    grid.temperatures=[2.0]`` needs no matching ``--set loss.temperature``).
    """

    alpha: float = 1.0
    cosine_on: str = "logits"
    temperature: float | None = None
    beta: float | None = None
    gamma: float | None = None

    def default_point(self) -> LossConfig:
        """The default point as a loss config (``None`` fields are filled in by :func:`parse_ablation`)."""
        return LossConfig(
            alpha=self.alpha, beta=self.beta, gamma=self.gamma, temperature=self.temperature, cosine_on=self.cosine_on
        )


@dataclass(frozen=True)
class RunSettings:
    device: str = "auto"
    pack: int = 0  # students trained together on CUDA; 0 = automatic (8 on CUDA, 1 on CPU)
    allow_chance_teacher: bool = False  # a teacher at chance level is done and flagged, not failed (pipeline tests)


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
    # ``[teacher] seed``: every student seed distils from the one teacher trained with this seed (a teacher
    # costs many student trials on a CPU); None: each student seed has its own teacher, trained with that seed
    teacher_seed: int | None = None


def resolve_path(config: str | None) -> Path:
    """``--config`` as given, else a shipped ablation of that name (``quick`` or ``quick.toml``), else the default."""
    if config is None:
        return ABLATIONS_DIR / DEFAULT_ABLATION
    path = Path(config)
    shipped = ABLATIONS_DIR / (path.name if path.suffix == ".toml" else f"{path.name}.toml")
    if not path.is_file() and shipped.is_file():
        path = shipped
    if not path.is_file():
        shipped_names = ", ".join(sorted(p.stem for p in ABLATIONS_DIR.glob("*.toml")))
        raise UserError(f"ablation file {config} not found: pass a TOML file or a shipped ablation ({shipped_names})")
    return path


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
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        *parents, leaf = key.strip().split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {part} is not a table")
        node[leaf] = value
    return raw


def parse_ablation(raw: dict, source: str) -> Ablation:
    """Validate a raw mapping into an :class:`Ablation` (types, ranges, names; not the grid's products)."""
    if "dataset" in raw.get("data", {}):
        raise UserError(f"{source}: data.dataset is not an ablation key: list datasets in grid.datasets")
    if "name" not in raw:
        raise UserError(f"{source}: missing key name (the ablation's name, used for its output folder)")
    teacher = raw.get("teacher", {})
    if isinstance(teacher, dict):
        teacher = {**TEACHER_DEFAULTS, **teacher}
        if "seed" in teacher:
            raw = {**raw, "teacher_seed": teacher.pop("seed")}
        raw = {**raw, "teacher": teacher}
    if "teacher_seed" in raw and not isinstance(raw["teacher_seed"], int):
        raise UserError(f"{source}: teacher.seed must be an integer, got {raw['teacher_seed']!r}")
    ablation = from_dict(Ablation, raw, "ablation")
    check_grid(ablation.grid)
    ablation = dataclasses.replace(ablation, loss=default_point(ablation.loss, ablation.grid, source))
    for dataset in ablation.grid.datasets:
        check_data(dataclasses.replace(ablation.data, dataset=dataset), "data")
    dataset_names(ablation.grid.datasets)  # a dataset listed twice, two imagefolders with one label
    check_recipe(ablation.teacher, "teacher")
    check_recipe(ablation.student, "student")
    if ablation.run.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"run.device must be auto, cpu or cuda, got {ablation.run.device!r}")
    if ablation.run.pack < 0:
        raise UserError(f"run.pack must be >= 0, got {ablation.run.pack}")
    return ablation


# loss setting -> the grid axis that lists its values
GRID_AXES = {"temperature": "temperatures", "beta": "kl_weights", "gamma": "cos_weights"}


def default_point(loss: LossSettings, grid: Grid, source: str) -> LossSettings:
    """``loss`` with its default point checked against the grid and filled in where an axis has one value."""
    from kdbench.methods import get_method, resolve

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
    loss = dataclasses.replace(loss, **values)
    for name in grid.methods:
        method = get_method(name)
        check_loss(method.effective_loss(loss.default_point()), f"{source}: {name} at the default point: ")
        real, _ = resolve(method, loss.default_point())
        if real.name != method.name:
            raise UserError(
                f"{source}: at the default point (loss.beta = {loss.beta:g}, loss.gamma = {loss.gamma:g}) {name} is really "
                f"{real.name}: choose a default with non-zero weights for the terms {name} uses"
            )
    return loss


def check_grid(grid: Grid) -> None:
    from kdbench.methods import get_method

    for f in dataclasses.fields(grid):
        if not getattr(grid, f.name):
            raise UserError(f"grid.{f.name} is empty: the grid has no trials; give it at least one value")
    for name in grid.methods:
        get_method(name)
    for t in grid.temperatures:
        if t <= 0:
            raise UserError(f"grid.temperatures has {t:g}: a temperature must be > 0")
    for axis in ("kl_weights", "cos_weights"):
        for w in getattr(grid, axis):
            if w < 0:
                raise UserError(f"grid.{axis} has {w:g}: loss weights must be >= 0")


def load_ablation(config: str | None, overrides: list[str] | None = None) -> tuple[Ablation, Path, dict]:
    """Read, override and validate an ablation file; returns (ablation, path, raw mapping as used)."""
    path = resolve_path(config)
    raw = apply_overrides(load_raw(path), overrides or [])
    return parse_ablation(raw, str(path)), path, raw
