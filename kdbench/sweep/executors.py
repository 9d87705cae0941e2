"""Executors run planned trials and report each outcome to the driver, which alone writes the store.

An executor has one method, ``run(trials, ctx, on_start, on_outcome)``: it runs every
trial it is given (teachers before the students that need them; a student whose
teacher failed is failed without running) and calls ``on_outcome`` in the driver's
process as each finishes.  ``local`` runs them in this process (``--workers 1``)
or in a pool of processes; ``ray`` (kdbench.sweep.ray_executor) on a Ray cluster.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Protocol

from kdbench.errors import UserError
from kdbench.sweep.plan import PlannedTrial
from kdbench.sweep.worker import Outcome, SweepContext, execute_trial, kill_with_parent

OnStart = Callable[[PlannedTrial], None]
OnOutcome = Callable[[Outcome], None]


class Executor(Protocol):
    def run(self, trials: list[PlannedTrial], ctx: SweepContext, on_start: OnStart, on_outcome: OnOutcome) -> None: ...


def failed_by_teacher(key: str, teacher: Outcome) -> Outcome:
    """The outcome of a trial that cannot run because its teacher trial failed."""
    return Outcome(key, "failed", error=f"teacher trial {teacher.key} failed: {teacher.error}")


class Dependencies:
    """Which trials can start: teachers at once, students once their teacher (if it is in this run) is done."""

    def __init__(self, trials: list[PlannedTrial]):
        keys = {t.key for t in trials}
        self.waiting: dict[str, list[PlannedTrial]] = {}
        self.ready: list[PlannedTrial] = []
        for t in trials:
            if t.teacher_key in keys:
                self.waiting.setdefault(t.teacher_key, []).append(t)
            else:
                self.ready.append(t)

    def take_ready(self) -> list[PlannedTrial]:
        ready, self.ready = self.ready, []
        return ready

    def finished(self, outcome: Outcome) -> list[Outcome]:
        """Release the students of a finished teacher; returns failures for the students of a failed one."""
        students = self.waiting.pop(outcome.key, [])
        if outcome.status == "done":
            self.ready += students
            return []
        return [failed_by_teacher(s.key, outcome) for s in students]


class LocalExecutor:
    """Trials on this machine: in-process for one worker, else a process pool."""

    def __init__(self, workers: int = 1):
        if workers < 1:
            raise UserError(f"--workers must be >= 1, got {workers}")
        self.workers = workers

    def run(self, trials: list[PlannedTrial], ctx: SweepContext, on_start: OnStart, on_outcome: OnOutcome) -> None:
        deps = Dependencies(trials)
        if self.workers == 1:
            self._run_inline(deps, ctx, on_start, on_outcome)
        else:
            self._run_pool(deps, ctx, on_start, on_outcome)

    def _run_inline(self, deps: Dependencies, ctx: SweepContext, on_start: OnStart, on_outcome: OnOutcome) -> None:
        while ready := deps.take_ready():
            for trial in ready:
                on_start(trial)
                outcome = execute_trial(trial, ctx)
                on_outcome(outcome)
                for cascaded in deps.finished(outcome):
                    on_outcome(cascaded)

    def _run_pool(self, deps: Dependencies, ctx: SweepContext, on_start: OnStart, on_outcome: OnOutcome) -> None:
        ctx = dataclasses.replace(ctx, progress=False)
        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(self.workers, mp_context=spawn, initializer=kill_with_parent) as pool:
            running: dict[Future, PlannedTrial] = {}
            while True:
                for trial in deps.take_ready():
                    on_start(trial)
                    running[pool.submit(execute_trial, trial, ctx)] = trial
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    trial = running.pop(future)
                    error = future.exception()
                    outcome = (
                        future.result() if error is None else Outcome(trial.key, "failed", error=f"worker process died: {error}")
                    )
                    on_outcome(outcome)
                    for cascaded in deps.finished(outcome):
                        on_outcome(cascaded)


def make_executor(name: str, workers: int, ray_address: str | None = None) -> Executor:
    if name == "local":
        return LocalExecutor(workers)
    if name == "ray":
        from kdbench.sweep.ray_executor import RayExecutor

        return RayExecutor(address=ray_address, workers=workers)
    raise UserError(f"unknown executor {name!r}: use local or ray")
