"""Executors run planned trials and report each outcome to the driver, which alone writes the store.

An executor has one method, ``run(trials, ctx, on_start, on_outcome)``: it runs every
trial it is given (teachers before the students that need them; a student whose
teacher failed is failed without running) and calls ``on_outcome`` in the driver's
process as each finishes.  ``local`` runs them in this process (``--workers 1``)
or in a pool of processes; ``ray`` (kdbench.sweep.ray_executor, built on this module) on a Ray
cluster.  The sweep's command line (kdbench.sweep.__main__) picks one.

Besides ``done`` and ``failed``, ``on_outcome`` may get ``busy`` (another process holds
the trial's lock: the driver revisits it at the end) and ``retry`` (a note: the
trial's worker process died and the trial runs again).

Worker deaths in the local pool: a worker killed by the kernel (out of memory, or
``kill -9``) breaks a ``ProcessPoolExecutor`` and every future in it.  The executor
then starts a fresh pool and resubmits what was in flight; each trial resumes from
its checkpoint.  Only the trial whose worker died is charged an attempt (each worker
notes its trial in ``<out>/.workers/<pid>``; the dead worker is the one whose exit
was not the pool's own SIGTERM to its siblings); when that cannot be told, every
trial that was running is charged, so a crash is never retried for ever.  A trial
charged ``MAX_ATTEMPTS`` times fails with ``worker process died (attempt 3 of 3)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Protocol

from kdbench.errors import UserError, one_line
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
        """Release the students of a finished teacher; returns failures for the students of a failed one.

        The students of a ``busy`` teacher (another sweep trains it) come back ``busy`` too.
        """
        students = self.waiting.pop(outcome.key, [])
        if outcome.status == "busy":
            return [Outcome(s.key, "busy") for s in students]
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
        charged: dict[str, int] = {}  # worker deaths charged to each unit
        queue: list[PlannedTrial] = []
        pool = self._new_pool()
        try:
            running: dict[Future, PlannedTrial] = {}
            while True:
                for trial in deps.take_ready():
                    on_start(trial)
                    queue.append(trial)
                for trial in queue:
                    running[pool.submit(_pool_task, trial, ctx)] = trial
                queue = []
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                lost: list[PlannedTrial] = []
                for future in done:
                    trial = running.pop(future)
                    try:
                        outcome = future.result()
                    except BrokenProcessPool:
                        lost.append(trial)
                        continue
                    except Exception as err:  # e.g. an outcome that cannot be pickled back
                        outcome = Outcome(trial.key, "failed", error=f"worker error: {type(err).__name__}: {one_line(err)}")
                    self._finish(outcome, deps, on_outcome)
                if not lost:
                    continue
                # the pool is broken: every future still in it fails too
                lost += [running.pop(f) for f in list(running)]
                culprits = _dead_workers_trials(pool, ctx.out_dir, [t.key for t in lost])
                pool.shutdown(wait=True, cancel_futures=True)
                pool = self._new_pool()
                for trial in lost:
                    if trial.key not in culprits:
                        queue.append(trial)  # an innocent bystander: resubmitted, not charged
                        continue
                    charged[trial.key] = n = charged.get(trial.key, 0) + 1
                    message = f"worker process died (attempt {n} of {MAX_ATTEMPTS})"
                    if n < MAX_ATTEMPTS:
                        on_outcome(Outcome(trial.key, "retry", error=f"{message}; retrying from its last checkpoint"))
                        on_start(trial)
                        queue.append(trial)
                    else:
                        error = f"{message}: killed by a signal, e.g. out of memory; lower batch_size, resolution or --workers"
                        self._finish(Outcome(trial.key, "failed", error=error), deps, on_outcome)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            with contextlib.suppress(OSError):  # empty once every worker has removed its note
                (Path(ctx.out_dir) / WORKER_NOTES).rmdir()

    def _new_pool(self) -> ProcessPoolExecutor:
        spawn = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(self.workers, mp_context=spawn, initializer=kill_with_parent)

    @staticmethod
    def _finish(outcome: Outcome, deps: Dependencies, on_outcome: OnOutcome) -> None:
        on_outcome(outcome)
        for cascaded in deps.finished(outcome):
            on_outcome(cascaded)


MAX_ATTEMPTS = 3  # a trial whose worker dies is run at most this many times
WORKER_NOTES = ".workers"  # <out>/.workers/<pid>: the trial each pool worker runs


def _pool_task(trial: PlannedTrial, ctx: SweepContext) -> Outcome:
    """``execute_trial`` in a pool worker, noting in ``<out>/.workers/<pid>`` which trial this process runs."""
    note = Path(ctx.out_dir) / WORKER_NOTES / str(os.getpid())
    with contextlib.suppress(OSError):  # best effort (another sweep may remove the folder): without a note, a
        note.parent.mkdir(parents=True, exist_ok=True)  # dead worker charges every trial that was in flight
        note.write_text(trial.key)
    try:
        return execute_trial(trial, ctx)
    finally:
        with contextlib.suppress(OSError):
            note.unlink()


def _dead_workers_trials(pool: ProcessPoolExecutor, out_dir: str, in_flight: list[str]) -> set[str]:
    """Keys of the trials whose worker died on its own (not by the pool's SIGTERM); all of ``in_flight`` if unknown."""
    processes = dict(getattr(pool, "_processes", None) or {})
    for p in processes.values():
        p.join(timeout=10)
    keys = set()
    for pid, p in processes.items():  # every note of the broken pool goes; a dead worker's names its trial
        note = Path(out_dir) / WORKER_NOTES / str(pid)
        with contextlib.suppress(OSError):
            key = note.read_text().strip()
            note.unlink()
            if p.exitcode not in (None, 0, -signal.SIGTERM):
                keys.add(key)
    return keys & set(in_flight) if keys & set(in_flight) else set(in_flight)
