"""Read the latest sweep of a results store into one tidy trial table.

Every trial the latest sweep planned is one row, done or not, so later stages can
mark what is missing.  Accuracies and macro metrics become percentages.  What planning
decided is read as the store recorded it, never decided again: the ablation as it was
resolved, and each trial's :class:`~kdbench.records.TrialPlan` (its method's label and
order, the settings it varies by, whether it is the ablation's default point).  A store
written before kdbench recorded them is refused in one line.
Datasets are shown by their display names
(:func:`kdbench.data.specs.dataset_names`): the ``dataset`` column holds the display
name, ``source`` the grid's dataset string.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kdbench.advice import command
from kdbench.bench_summary import load_benchmark_json
from kdbench.data.specs import DatasetName, dataset_names
from kdbench.errors import UserError
from kdbench.records import Int8Result, TrialPlan, TrialResult, from_json
from kdbench.sweep.ablation import Ablation
from kdbench.sweep.store import STORE_FILE, Store

BENCH_FILE = "bench.json"
TEACHER_ROW = "teacher"  # the ``method`` column's name for teacher trials (trained on hard labels, as the baseline)


def row_name(plan: TrialPlan) -> str:
    """A trial's row in every table: its method, or :data:`TEACHER_ROW` for a teacher (a role, not a method)."""
    return TEACHER_ROW if plan.role == "teacher" else plan.method


LOSS_AXES = ("temperature", "beta", "gamma")
NOT_RECORDED = "not recorded"  # a record field a store of an older kdbench lacks
# What can change a finished trial's numbers without changing its key (code versions are in the key, but a store's
# rows may come from another kdbench): column -> what the report calls it.  ``teacher_source`` is None without a teacher.
COMPUTATION = {
    "results_version": "results version",
    "loss_version": "loss version",
    "torch_threads": "torch threads",
    "memory_format": "memory format",
    "teacher_source": "teacher source",
    "teacher_feature_format": "teacher features' memory format",
}
METRICS = {"accuracy": "acc", "macro_precision": "precision", "macro_recall": "recall", "macro_f1": "f1"}


@dataclass(frozen=True)
class ReportData:
    """Everything the report shows, read once from the output folder."""

    sweep: dict  # Store.latest_sweep()
    ablation: Ablation  # as the sweep resolved it (the store's sweeps.resolved)
    trials: pd.DataFrame  # one row per planned trial, see :func:`trial_frame`
    bench: pd.DataFrame | None  # kdbench.bench_summary.load_benchmark_json, None without bench.json
    plans: dict[str, TrialPlan]  # by trial key, as the sweep planned them

    @property
    def names(self) -> dict[str, DatasetName]:
        """Display name and slug of each dataset string of the grid, in grid order."""
        return dataset_names(self.ablation.grid.datasets)

    @property
    def datasets(self) -> list[str]:
        """The datasets' display names, in grid order (the ``dataset`` column of :attr:`trials`)."""
        return [n.display for n in self.names.values()]

    def name(self, display: str) -> DatasetName:
        """The :class:`DatasetName` of the dataset shown as ``display``."""
        return next(n for n in self.names.values() if n.display == display)

    @property
    def done(self) -> pd.DataFrame:
        return self.trials[self.trials["status"] == "done"]

    @property
    def seeds(self) -> list[int | str]:
        """The planned replicates: the seeds, or with several ``[grid] split_seeds`` each (split, seed) pair
        (:func:`replicate`)."""
        grid = self.ablation.grid
        if len(grid.split_seeds) < 2:
            return list(grid.seeds)
        return [replicate(split, seed) for split in grid.split_seeds for seed in grid.seeds]

    def plan(self, method: str) -> TrialPlan:
        """The plan of one of ``method``'s trials (label, rank, role, axes are the method's, the same for each);
        ``method`` is a row name (:func:`row_name`)."""
        return next(p for p in self.plans.values() if row_name(p) == method)

    def sweep_axes(self, method: str) -> tuple[str, ...]:
        """The grid axes (``temperature``, ``beta``, ``gamma``) along which ``method`` was swept."""
        return self.plan(method).axes

    def label(self, method: str) -> str:
        """How the report names ``method``: its plan's label, or a grid point's where it has no trial of its own."""
        grid = (g for p in self.plans.values() for g in p.grid_points)
        return next((p.label for p in self.plans.values() if row_name(p) == method), None) or next(
            (g.label for g in grid if g.method == method), method
        )

    @property
    def methods(self) -> list[str]:
        """The rows of every table and figure, in their order (rank): the teacher where one was trained
        (:data:`TEACHER_ROW`), then the ablation's methods that have planned trials.

        A method only planned as another's grid point (``kd_cos`` for ``kd_kl_cos`` at ``beta = 0``) is not one of them.
        """
        ranked = {
            row_name(p): p.rank for p in self.plans.values() if p.role == "teacher" or p.method in self.ablation.grid.methods
        }
        return sorted(ranked, key=ranked.get)


def test_correct(result: TrialResult, checkpoint: str = "best") -> np.ndarray:
    """Per-test-image correctness (bool, in ``test_targets`` order) of a trial's ``checkpoint`` weights."""
    return np.asarray(getattr(result, checkpoint).test.predictions) == np.asarray(result.test_targets)


def int8_correct(int8: Int8Result, result: TrialResult) -> np.ndarray:
    """Per-test-image correctness of a trial's INT8 model, in ``test_targets`` order (pairs with :func:`test_correct`)."""
    return np.asarray(int8.test.predictions) == np.asarray(result.test_targets)


def load_report_data(out_dir: Path) -> ReportData:
    """Read ``out_dir/store.sqlite`` (latest sweep only) and ``out_dir/bench.json`` if present."""
    path = out_dir / STORE_FILE
    sweep_into = f"run a sweep into it first ({command('sweep', '--out', shlex.quote(str(out_dir)))})"
    if not path.is_file():
        raise UserError(f"no results store in {out_dir}: {sweep_into}")
    store = Store(path, read_only=True)
    try:
        sweep = store.latest_sweep()
        if sweep is None:
            raise UserError(f"the results store {path} records no sweep: {sweep_into}")
        rows = store.rows(sweep["keys"])
    finally:
        store.close()
    if sweep["resolved"] is None or None in sweep["plans"].values():
        raise UserError(
            f"the results store {path} was written by a kdbench older than its plan records (no resolved ablation or "
            "trial plans): rebuild its report with that kdbench, or rerun the sweep with this one (finished trials "
            "are found by key where keys did not change)"
        )
    ablation = from_json(Ablation, sweep["resolved"], f"the ablation recorded in {path}")
    plans = {key: from_json(TrialPlan, text, f"the plan of trial {key} in {path}") for key, text in sweep["plans"].items()}
    bench_path = out_dir / BENCH_FILE
    bench = load_benchmark_json(bench_path) if bench_path.is_file() else None
    return ReportData(sweep, ablation, trial_frame(rows, ablation, plans), bench, plans)


def replicate(split: int, seed: int) -> str:
    """The report's name of a replicate of a sweep over several splits: a (split seed, seed) pair."""
    return f"split {split}, seed {seed}"


def trial_frame(rows: list[dict], ablation: Ablation, plans: dict[str, TrialPlan]) -> pd.DataFrame:
    """One row per trial, ordered by dataset (grid order), method (registry order), loss settings and seed.

    ``seed`` is the replicate the statistics pair trials by: the seed, or with several ``[grid] split_seeds`` the
    (split, seed) pair (:func:`replicate`); ``split`` is the trial's split seed.

    Columns: the store's identity columns (key, role, dataset, method (the row name, :func:`row_name`), model, seed,
    temperature, beta, gamma, params, teacher_key, status, error, flags) with ``dataset`` the
    display name, ``source`` (the dataset string of the grid), ``label`` (the
    method's report name), ``settings`` (the loss settings the method varies by, as
    text), ``default`` (the ablation's default point), all three as planned
    (:class:`~kdbench.records.TrialPlan`), ``best_<m>`` and
    ``last_<m>`` for m in acc, precision, recall, f1 (percent of the test split; NaN
    unless done), ``best_epoch``, ``last_epoch``, the decoded ``result`` and
    ``complexity`` dicts, ``int8`` (the :class:`~kdbench.records.Int8Result` of a done
    trial, else None), ``int8_acc`` (its test accuracy in percent, else NaN) and ``int8_error``.
    """
    names = {d: n.display for d, n in dataset_names(ablation.grid.datasets).items()}
    records = [
        _record(row, plans[row["key"]]) | {"dataset": names.get(row["dataset"], row["dataset"]), "source": row["dataset"]}
        for row in rows
    ]
    columns = [
        "key",
        "role",
        "dataset",
        "source",
        "method",
        "label",
        "model",
        "seed",
        "split",
        *LOSS_AXES,
        "params",
        "settings",
        "default",
        "teacher_key",
        "status",
        "error",
        "flags",
        "best_epoch",
        "last_epoch",
        *(f"{ckpt}_{m}" for ckpt in ("best", "last") for m in METRICS.values()),
        "result",
        "complexity",
        "int8",
        "int8_acc",
        "int8_error",
        "started_at",
        "finished_at",
        *COMPUTATION,
    ]
    frame = pd.DataFrame(records, columns=columns)
    frame = frame.assign(
        _d=frame["dataset"].map({v: i for i, v in enumerate(names.values())}), _m=[plans[k].rank for k in frame["key"]]
    )
    if len(ablation.grid.split_seeds) > 1:
        frame["seed"] = [replicate(split, seed) for split, seed in zip(frame["split"], frame["seed"])]
    frame = frame.sort_values(["_d", "_m", *LOSS_AXES, "settings", "split", "seed"], ignore_index=True)
    return frame.drop(columns=["_d", "_m"])


def _record(row: dict, plan: TrialPlan) -> dict:
    record = {
        **{
            k: row[k]
            for k in ("key", "role", "dataset", "method", "model", "seed", *LOSS_AXES, "params", "teacher_key", "status", "error")
        },
        "split": row["config"]["data"]["split_seed"],
        "method": row_name(plan),
        "label": plan.label,
        "settings": plan.settings,
        "flags": tuple(row["flags"] or ()),
        "default": plan.default,
        "result": row["result"],
        "complexity": row["complexity"],
        "int8": row["int8"] if row["status"] == "done" else None,
        "int8_acc": 100 * row["int8"].test.accuracy if row["status"] == "done" and row["int8"] else math.nan,
        "int8_error": row["int8_error"],
        "started_at": row.get("started_at"),
        "finished_at": row.get("finished_at"),
    }
    result = row["result"] if row["status"] == "done" else None
    record |= computation(result)
    for ckpt in ("best", "last"):
        weights = getattr(result, ckpt) if result else None
        record[f"{ckpt}_epoch"] = weights.epoch if weights else math.nan
        for metric, short in METRICS.items():
            record[f"{ckpt}_{short}"] = 100 * getattr(weights.test, metric) if weights else math.nan
    return record


def computation(result: TrialResult | None) -> dict[str, str | None]:
    """What could change a finished trial's numbers beside its key (:data:`COMPUTATION`), as text; a field its
    record lacks (an older kdbench) is :data:`NOT_RECORDED`; all None for an unfinished trial."""
    if result is None:
        return dict.fromkeys(COMPUTATION)
    env, teacher = result.environment, result.teacher or {}
    feature_format = teacher.get("feature_memory_format", NOT_RECORDED if "features" in teacher else None)
    return {
        "results_version": result.results_version,
        "loss_version": result.loss_version,
        "torch_threads": str(env.get("torch_threads", NOT_RECORDED)),
        "memory_format": str(env.get("memory_format", NOT_RECORDED)),
        "teacher_source": str(teacher.get("mode", NOT_RECORDED)) if teacher else None,
        "teacher_feature_format": feature_format,
    }
