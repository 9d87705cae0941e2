"""Expand an ablation into trials with stable keys; teachers first, students pointing at them."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass

from kdbench.config import TEACHER_METHOD, DataConfig, LossConfig, TrialConfig, device_type
from kdbench.engine.pack_rules import packable
from kdbench.errors import UserError
from kdbench.methods import Method, get_method
from kdbench.records import GridPoint, TrialPlan
from kdbench.stages import check_pair, uses_stages
from kdbench.sweep.ablation import Ablation, same


@dataclass(frozen=True)
class PlannedTrial:
    """One trial, or a pack of student trials trained together (``members``; the pack's own
    ``config`` is its first member's, and ``key`` names the pack, not a store row).

    ``plan`` is what planning decided about the trial (role, method, settings, default point); the
    store records it and the report reads it from there.  A pack has none (its members do).
    """

    key: str
    config: TrialConfig
    teacher_key: str | None = None
    members: tuple[PlannedTrial, ...] = ()
    plan: TrialPlan | None = None

    @property
    def role(self) -> str:
        return self.config.role

    @property
    def name(self) -> str:
        """How logs name it: ``teacher``, or the student's method."""
        return "teacher" if self.role == "teacher" else self.config.method

    @property
    def trials(self) -> tuple[PlannedTrial, ...]:
        """The store's trials this unit runs: its members, or itself."""
        return self.members or (self,)


def plan_trials(
    ablation: Ablation, *, pack: int = 1, fingerprint: Callable[[DataConfig], str | None] | None = None
) -> list[PlannedTrial]:
    """All trials of the ablation, deduplicated by key, each teacher before its students.

    One teacher per (dataset, split, teacher recipe, seed), or per (dataset, split) where the ablation fixes the
    teacher's seed (``[teacher] seed``); the splits are ``[grid] split_seeds``, else the data's one ``split_seed``
    (then keys are those of a plan without the axis).  A teacher is planned where some student distils or the
    ablation reports the teacher (``[grid] teacher``); a method's trials vary only
    along its ``[grid.<method>]`` axes (:meth:`Ablation.points`), which the ``[grid] temperatures`` shorthand fills
    for the paper's methods only, so the baseline is trained once per (dataset, seed) whatever the temperature
    grid.  A grid point that is really another method is planned as that method, once
    (:meth:`kdbench.methods.Method.resolve`): ``kd_kl_cos`` at ``beta = gamma = 0`` is the baseline.

    Keys are complete (kdbench.config.TrialConfig.key): ``run.device`` is resolved here,
    ``fingerprint(data)`` (kdbench.data.select.data_fingerprint) names the dataset's files, and
    with ``pack > 1`` every packable student is planned ``packed`` (kdbench.sweep.packs
    then trains exactly those in packs, a lone one as a pack of one).

    Raises:
        UserError: a method's settings are invalid, a method distils stage features from a teacher/student
            pair whose stages cannot be matched (:func:`kdbench.stages.check_pair`), or there are no trials.
    """
    grid = ablation.grid
    methods = [get_method(m) for m in grid.methods]
    device = device_type(ablation.run.device)
    trials: dict[str, PlannedTrial] = {}
    splits = grid.split_seeds or (None,)  # None: the data's own split_seed
    for dataset, split, seed in itertools.product(grid.datasets, splits, grid.seeds):
        data = ablation.data_for(dataset)
        data = data if split is None else dataclasses.replace(data, split_seed=split)
        data_id = fingerprint(data) if fingerprint else None
        teacher = TrialConfig(
            method=TEACHER_METHOD,
            role="teacher",
            data=data,
            recipe=ablation.teacher_for(dataset),
            loss=LossConfig(),
            seed=seed if ablation.teacher_seed is None else ablation.teacher_seed,
            device=device,
            dataset_fingerprint=data_id,
            allow_chance_teacher=ablation.run.allow_chance_teacher,
        )
        teacher_key = teacher.key()
        if grid.teacher or any(m.needs_teacher for m in methods):
            trials.setdefault(teacher_key, PlannedTrial(teacher_key, teacher, plan=_teacher_plan()))
        for method in methods:
            if uses_stages(method.needs_from_teacher):  # a pair whose stages cannot be matched: refused here, in one line
                check_pair(method.name, teacher.recipe.model, ablation.student.model, data.resolution)
            for point in ablation.points(method.name):
                method.check(point, f"{method.name} on {dataset}: ", " (check loss.alpha and the grid's weights)")
                real, loss = method.resolve(point)
                cfg = TrialConfig(
                    method=real.name,
                    data=data,
                    recipe=ablation.student,
                    loss=loss,
                    seed=seed,
                    teacher_id=teacher_key if real.needs_teacher else None,
                    device=device,
                    dataset_fingerprint=data_id,
                )
                cfg = dataclasses.replace(cfg, packed=pack > 1 and packable(cfg))
                key = cfg.key()
                settled = method.effective_loss(point).params  # the grid point's own settings, before resolution
                where = GridPoint(method.name, method.label, method.rank, tuple(n for n, _ in settled), settled)
                if key in trials:  # another grid point of the same trial: the plan lists both
                    known = trials[key].plan
                    if where not in known.grid_points:
                        plan = dataclasses.replace(known, grid_points=(*known.grid_points, where))
                        trials[key] = dataclasses.replace(trials[key], plan=plan)
                    continue
                plan = _resolution(real, loss, (where,), ablation)
                trials[key] = PlannedTrial(key, cfg, teacher_key if real.needs_teacher else None, plan=plan)
    ordered = sorted(trials.values(), key=lambda t: t.role != "teacher")
    if not ordered:
        raise UserError("the ablation expands to no trials: add methods or datasets to [grid]")
    return ordered


def _teacher_plan() -> TrialPlan:
    """A teacher's plan: the report's first row, ``Teacher``, trained on hard labels with no settings."""
    return TrialPlan(
        role="teacher", method=TEACHER_METHOD, label="Teacher", rank=0, own_params=False, settings="", axes=(), default=True
    )


def _resolution(method: Method, loss: LossConfig, grid_points: tuple[GridPoint, ...], ablation: Ablation) -> TrialPlan:
    """What the report needs to know of a trial, decided here once: :class:`kdbench.records.TrialPlan`.

    ``loss`` is the trial's effective loss; it is the default point when it equals the effective loss of
    the ablation's default point for this method (``[loss]`` and ``[methods.<name>]``).
    """
    default = ablation.default_loss(method.name)
    is_default = len(loss.params) == len(default.params) and all(
        name == other and same(value, value_default) for (name, value), (other, value_default) in zip(loss.params, default.params)
    )
    return TrialPlan(
        role="student",
        method=method.name,
        label=method.label,
        rank=method.rank,
        own_params=method.params is not None,
        settings=method.describe(loss),
        axes=tuple(name for name, _ in loss.params),
        default=is_default,
        grid_points=grid_points,
    )
