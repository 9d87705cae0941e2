"""The sweep driver: plan, skip what the store has, run the rest, record each outcome, report.

With ``[deploy] int8 = true`` a done trial without an INT8 result of the ablation's settings is run again: the
worker finds its ``metrics.json`` and only quantizes it (kdbench.sweep.worker).  Without ONNX Runtime the step is
skipped with one line, recorded in the sweep's summary (``int8_skipped``) for the report.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from tqdm import tqdm

from kdbench.config import device_type
from kdbench.data.locate import data_root, locate_dataset
from kdbench.data.specs import dataset_names, get_spec
from kdbench.engine.int8 import int8_unavailable
from kdbench.machine import environment
from kdbench.records import to_json
from kdbench.sweep.ablation import Ablation
from kdbench.sweep.executors import Executor
from kdbench.sweep.packs import pack_trials
from kdbench.sweep.plan import PlannedTrial
from kdbench.sweep.store import STORE_FILE, Store
from kdbench.sweep.worker import Outcome, SweepContext


def check_datasets(ablation: Ablation, root: str | None, download: bool) -> None:
    """Fail before any training when a dataset of the grid cannot be found."""
    for dataset in ablation.grid.datasets:
        locate_dataset(get_spec(dataset), data_root(root), download=download)


def run_sweep(
    ablation: Ablation,
    ablation_path: Path,
    raw: dict,
    trials: list[PlannedTrial],
    out_dir: Path,
    executor: Executor,
    ctx: SweepContext,
    *,
    pack: int = 1,
    log=print,
) -> dict:
    """Run the trials the store does not have as done (students in packs of ``pack``); returns the summary counts."""
    t0 = time.time()
    store = Store(out_dir / STORE_FILE)
    env = environment(device_type(ablation.run.device), ctx.threads)  # each trial's result records its own, too
    sweep_id = store.begin_sweep(ablation.name, str(ablation_path), raw, to_json(ablation), trials, env)
    by_key = {t.key: t for t in trials}
    names = {d: n.display for d, n in dataset_names(ablation.grid.datasets).items()}
    done = {t.key for t in trials if store.status(t.key) == "done"}
    int8 = ablation.deploy.int8_settings()
    skipped = int8 and int8_unavailable()
    if skipped:
        log(f"kdbench: note: {skipped}")
        int8 = None
    ctx = dataclasses.replace(ctx, int8=int8)
    done -= store.needs_int8(list(done), int8) if int8 else set()  # trained, not yet quantized: the worker only quantizes
    already = [t for t in trials if t.key in done]
    todo = [t for t in trials if t.key not in done]
    counts = {"total": len(trials), "done": 0, "failed": 0, "already": len(already)}
    if skipped:
        counts["int8_skipped"] = skipped
    bar = tqdm(total=len(trials), initial=len(already), desc=f"sweep {ablation.name}", unit="trial", dynamic_ncols=True)

    units = pack_trials(todo, pack)
    packs = {u.key: u for u in units if u.members}

    def on_start(unit: PlannedTrial) -> None:
        for trial in unit.trials:
            store.mark_running(trial.key)
        c = unit.config
        name = names.get(c.data.dataset, c.data.dataset)
        what = f"pack of {len(unit.members)} students" if unit.members else unit.name
        bar.set_postfix_str(f"{what} {name} seed {c.seed}")

    units_by_key = {u.key: u for u in units}
    busy: list[PlannedTrial] = []

    def on_outcome(outcome: Outcome) -> None:
        if outcome.status == "busy":  # another process holds its lock: revisit it at the end
            busy.append(units_by_key[outcome.key])
            return
        if outcome.status == "retry":
            for trial in units_by_key[outcome.key].trials:
                store.add_note(trial.key, outcome.error)
            bar.write(f"note   {outcome.error} [{outcome.key}]")
            return
        if outcome.key in packs:  # a pack: its members' outcomes, or one failure for all of them
            for member in outcome.members or [Outcome(t.key, "failed", error=outcome.error) for t in packs[outcome.key].members]:
                record(member)
        else:
            record(outcome)

    def record(outcome: Outcome) -> None:
        trial = by_key[outcome.key]
        c = trial.config
        name = names.get(c.data.dataset, c.data.dataset)
        if outcome.status == "done":
            fresh = store.record_done(outcome.key, outcome.result, outcome.complexity)
            counts["done" if fresh else "already"] += 1  # another sweep on this store may have recorded it first
            acc = outcome.result.best.test.accuracy
            how = "recovered from its metrics.json" if outcome.recovered else f"{outcome.seconds:.0f}s"
            bar.write(f"done   {trial.name:<10} {name:<10} seed {c.seed} test acc {acc:.4f} ({how}) [{outcome.key}]")
            if ctx.int8 is not None and (fresh or outcome.recovered):  # not of a retrained copy the store does not hold
                store.record_int8(outcome.key, outcome.int8, outcome.int8_error)
                if outcome.int8_error:
                    bar.write(f"no INT8 {trial.name:<9} {name:<10} seed {c.seed}: {outcome.int8_error} [{outcome.key}]")
        else:
            store.record_failed(outcome.key, outcome.error)
            counts["failed"] += 1
            bar.write(f"FAILED {trial.name:<10} {name:<10} seed {c.seed}: {outcome.error} [{outcome.key}]")
        bar.update(1)

    try:
        executor.run(units, ctx, on_start, on_outcome)
        if busy:  # usually finished by the other sweep by now: waiting for its lock finds the result
            bar.write(f"revisiting {len(busy)} trial(s) that another process was running")
            again, busy[:] = list(busy), []
            executor.run(again, dataclasses.replace(ctx, wait_for_locks=True), on_start, on_outcome)
    finally:
        bar.close()
        weak = store.flag_weak_teachers()
        for key in weak:
            log(f"note: teacher {key} is less accurate than one of its students (KD cannot be expected to help)")
        for row in store.rows(list(by_key)):
            if "student_at_chance" in (row["flags"] or ()):
                log(f"note: student {row['key']} ({row['method']}) is not significantly above chance (flag student_at_chance)")
        counts["wall_s"] = time.time() - t0
        store.finish_sweep(sweep_id, counts)
        store.close()
    return counts
