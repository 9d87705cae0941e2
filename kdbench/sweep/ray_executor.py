"""Run a sweep's trials as Ray tasks: on a local Ray instance or on a Ray cluster.

Each trial is one Ray task running :func:`kdbench.sweep.worker.execute_trial`; it
asks for ``ctx.threads`` CPUs, and one GPU when the cluster has GPUs and the
trial may use one.  A task whose worker process dies (killed, or its node lost) is
retried up to ``MAX_RETRIES`` times, and since a trial resumes from its resume
state (``state.pt``) in the shared output folder, a retried trial resumes where it stopped.
Students wait for their teacher through a task dependency: the teacher task's
result is an argument of theirs, so Ray starts them once it is done, and a student
of a failed teacher fails without training.  The driver gathers results with
``ray.wait`` and alone writes the store; ``on_start`` is called when a task is
submitted (Ray has accepted it; a student may still be waiting for its teacher).

Data travels through the filesystem, never through Ray's object store:

* the dataset is read from ``ctx.data_root`` (resolved to an absolute path on the
  driver), which on a cluster must be the same path on every node (a shared
  filesystem);
* decoded images are cached in ``$KDBENCH_CACHE``, the driver's value given to every
  worker, so each node decodes a dataset once for all its trials (a path on local
  disk of each node, or a shared one);
* a teacher's logit cache sits beside its checkpoint in the output folder, which
  must be shared too: it is computed once and read by every student of that teacher.

With no address (and no ``$RAY_ADDRESS``) a local Ray instance with
``workers * ctx.threads`` CPUs is started for the sweep and stopped after it; with
one, the sweep connects to that cluster, whose resources decide how many trials
run at once, and disconnects at the end.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from pathlib import Path

from kdbench.data.locate import data_root
from kdbench.errors import UserError, one_line
from kdbench.sweep.executors import Dependencies, OnOutcome, OnStart, failed_by_teacher
from kdbench.sweep.plan import PlannedTrial
from kdbench.sweep.worker import Outcome, SweepContext, execute_trial

MAX_RETRIES = 2  # times a trial is rerun after its worker process dies
REPO_ROOT = Path(__file__).resolve().parents[2]
FORWARDED_ENV = ("KDBENCH_CACHE", "KDBENCH_NO_DOWNLOAD")  # the driver's values, given to every worker


def run_student(trial: PlannedTrial, ctx: SweepContext, teacher: Outcome) -> Outcome:
    """Train a student once its teacher's task is done; a failed teacher fails it without training."""
    if teacher.status == "busy":  # another sweep trains the teacher: revisit both at the end
        return Outcome(trial.key, "busy")
    if teacher.status != "done":
        return failed_by_teacher(trial.key, teacher)
    return execute_trial(trial, ctx)


def _check_reachable(address: str) -> None:
    """Fail in one line for a ``host:port`` nobody listens on (Ray itself would retry for ever)."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # "auto", or a ray:// client address: Ray reports those itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as err:
        raise UserError(f"cannot reach the Ray cluster at {address} ({err}): is `ray start --head` running there?") from None


class RayExecutor:
    """Trials as Ray tasks; see the module docstring."""

    def __init__(self, address: str | None = None, workers: int = 1):
        try:
            import ray
        except ImportError:
            raise UserError('the ray executor needs Ray: pip install -e ".[ray]"') from None
        if workers < 1:
            raise UserError(f"--workers must be >= 1, got {workers}")
        self.ray = ray
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.workers = workers

    def run(self, trials: list[PlannedTrial], ctx: SweepContext, on_start: OnStart, on_outcome: OnOutcome) -> None:
        ray = self.ray
        ctx = dataclasses.replace(ctx, data_root=str(data_root(ctx.data_root).resolve()), progress=False)
        started = not ray.is_initialized()  # else the caller connected, and disconnects
        if started:
            self._connect(ctx)
        try:
            gpus = ray.cluster_resources().get("GPU", 0) > 0
            train, train_student = ray.remote(execute_trial), ray.remote(run_student)

            def submit(fn, trial: PlannedTrial, *args):
                on_start(trial)
                return fn.options(
                    num_cpus=ctx.threads or 1,
                    num_gpus=1 if gpus and trial.config.device != "cpu" else 0,
                    max_retries=MAX_RETRIES,
                    retry_exceptions=False,
                    name=f"kdbench-trial-{trial.key}",
                ).remote(trial, ctx, *args)

            deps = Dependencies(trials)
            refs = {trial.key: submit(train, trial) for trial in deps.take_ready()}  # teachers, students of no teacher here
            for teacher_key, students in deps.waiting.items():
                refs.update({s.key: submit(train_student, s, refs[teacher_key]) for s in students})
            pending = {ref: key for key, ref in refs.items()}
            by_key = {t.key: t for t in trials}
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                trial = by_key[pending.pop(ref)]
                on_outcome(self._outcome(ref, trial, refs.get(trial.teacher_key)))
        finally:
            if started:
                ray.shutdown()

    def _connect(self, ctx: SweepContext) -> None:
        """Connect to the cluster, or start a local instance of ``workers * threads`` CPUs."""
        env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
        # workers import kdbench from the driver's checkout when it is not installed on their node
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
        options = dict(runtime_env={"env_vars": env}, log_to_driver=False)
        if self.address:
            _check_reachable(self.address)
        try:
            if self.address:
                self.ray.init(address=self.address, **options)
            else:
                self.ray.init(address="local", num_cpus=self.workers * (ctx.threads or 1), include_dashboard=False, **options)
        except (ConnectionError, RuntimeError, ValueError) as err:
            hint = " (a cluster with token authentication also needs RAY_AUTH_MODE=token here)" if self.address else ""
            raise UserError(f"cannot start or reach Ray at {self.address or 'a local instance'}: {one_line(err)}{hint}") from None
        largest = max((n["Resources"].get("CPU", 0) for n in self.ray.nodes() if n["Alive"]), default=0)
        if (ctx.threads or 1) > largest:
            print(
                f"note: each trial asks for {ctx.threads or 1} CPUs but the largest Ray node has {largest:g}: lower --threads",
                file=sys.stderr,
            )

    def _outcome(self, ref, trial: PlannedTrial, teacher_ref) -> Outcome:
        """The task's Outcome; a task Ray could not finish (its worker died beyond retries) becomes a failed one."""
        error = self._ray_error(ref)
        if error is None:
            return self.ray.get(ref)
        if teacher_ref is not None and self._ray_error(teacher_ref):  # the student never ran
            error = f"teacher trial {trial.teacher_key} failed: {error}"
        return Outcome(trial.key, "failed", error=error)

    def _ray_error(self, ref) -> str | None:
        """One line for a finished task that Ray failed, else None."""
        try:
            self.ray.get(ref)
        except self.ray.exceptions.RayError as err:
            text = str(getattr(err, "cause", None) or err).strip()
            return f"Ray task failed: {one_line(text.splitlines()[0]) if text else type(err).__name__}"
        return None
