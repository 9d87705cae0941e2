"""Run one planned trial in its folder, safely against crashes and concurrent sweeps.

Each trial owns ``<out>/trials/<key>/``.  An exclusive ``flock`` on its ``.lock``
file means two sweeps sharing an output folder never train the same trial at
once (the kernel drops the lock when a process dies, even by ``kill -9``).  The
lock is taken without waiting: a trial another process holds comes back as
``busy`` and the sweep revisits it at its end (``SweepContext.wait_for_locks``),
when it usually finds that trial's result.  A
``metrics.json`` that is already there is a finished result whose store write was
lost: it is returned instead of training again.

With ``SweepContext.int8`` set, every done trial is then quantized to INT8 (:mod:`kdbench.engine.int8`) under the
same lock; a trial whose ``metrics.json`` is there only needs that step, so a sweep killed while quantizing redoes only
the quantization.  A failed INT8 step never fails its trial: the outcome carries why (``int8_error``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from kdbench.digest import checkpoint_digest
from kdbench.durable import Busy, file_lock
from kdbench.errors import UserError, disk_full_message, is_disk_full, one_line
from kdbench.records import Int8Result, Int8Settings, TrialResult, from_json
from kdbench.sweep.plan import PlannedTrial


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares (picklable, for worker processes and Ray tasks)."""

    out_dir: str
    data_root: str | None = None
    download: bool = True
    threads: int | None = None
    progress: bool = False
    wait_for_locks: bool = False  # False: a trial locked by another process comes back "busy" at once
    int8: Int8Settings | None = None  # quantize each done trial to INT8 with these settings ([deploy] int8); None: not


@dataclass
class Outcome:
    key: str
    status: str  # "done", "failed", or "busy" (another process holds its lock; not run, nothing recorded)
    result: TrialResult | None = None
    error: str | None = None
    seconds: float = 0.0
    recovered: bool = False  # finished earlier, store write was lost
    members: list[Outcome] | None = None  # a pack's per-trial outcomes
    complexity: dict | None = None  # a done trial's model: params, FLOPs, size (kdbench.profile); None without fvcore
    int8: Int8Result | None = None  # its INT8 deployment (SweepContext.int8)
    int8_error: str | None = None  # why a done trial has no INT8 result although one was asked for


def trial_dir(out_dir: str | Path, key: str) -> Path:
    return Path(out_dir) / "trials" / key


def execute_trial(trial: PlannedTrial, ctx: SweepContext) -> Outcome:
    """Train ``trial`` (or every member of a pack) and return its outcome; never raises for a trial's own failure.

    Each member's folder is locked for the whole run (``busy`` if another process holds
    one, unless ``ctx.wait_for_locks``); members whose ``metrics.json``
    is already there are returned as recovered, the rest train (resuming from their
    state) in one call of :func:`kdbench.engine.runner.run_trials`: a trial alone, or a pack.
    A pack's outcome lists its members' outcomes in ``members``.  Each done trial carries its model's
    complexity, counted here so that the sweep driver never imports torch (kdbench.machine).
    """
    import torch

    from kdbench.engine.trial import METRICS_FILE

    if ctx.threads:
        torch.set_num_threads(ctx.threads)
    members = list(trial.members) or [trial]
    folders = [trial_dir(ctx.out_dir, m.key) for m in members]
    t0 = time.perf_counter()
    with ExitStack() as stack:
        try:
            for folder in sorted(folders):
                stack.enter_context(file_lock(folder / ".lock", blocking=ctx.wait_for_locks))
        except Busy:
            return Outcome(trial.key, "busy")
        outcomes = {}
        teacher = trial_dir(ctx.out_dir, trial.teacher_key) / "best.pt" if trial.teacher_key else None
        teacher_digest = functools.cache(functools.partial(_digest, teacher)) if teacher else None  # read once a pack
        for m, folder in zip(members, folders):
            previous = _finished_result(folder / METRICS_FILE, m.key, teacher_digest if m.config.teacher_id else None)
            if previous is not None:
                outcomes[m.key] = Outcome(m.key, "done", previous, recovered=True)
        todo = [(m, f) for m, f in zip(members, folders) if m.key not in outcomes]
        if todo:
            outcomes.update(_train([m for m, _ in todo], [f for _, f in todo], trial.teacher_key, ctx, t0))
        if ctx.int8 is not None:
            for m, folder in zip(members, folders):
                if outcomes[m.key].status == "done":
                    outcomes[m.key].int8, outcomes[m.key].int8_error = deploy_int8(m, outcomes[m.key].result, folder, ctx)
    results = [outcomes[m.key] for m in members]
    for m, outcome in zip(members, results):
        if outcome.status == "done":
            outcome.complexity = trial_complexity(m, outcome.result)
    if not trial.members:
        return results[0]
    status = "done" if all(o.status == "done" for o in results) else "failed"
    return Outcome(trial.key, status, members=results, seconds=time.perf_counter() - t0)


def _train(
    members: list[PlannedTrial], folders: list[Path], teacher_key: str | None, ctx: SweepContext, t0: float
) -> dict[str, Outcome]:
    """Run ``members`` (one trial, or a pack) in ``folders``; a failure fails them all, with one message."""
    import torch

    from kdbench.engine.runner import MemberFailed, run_trials

    def failed(error: str) -> dict[str, Outcome]:
        return {m.key: Outcome(m.key, "failed", error=error, seconds=time.perf_counter() - t0) for m in members}

    cfgs = [m.config for m in members]
    if teacher_key:
        checkpoint = trial_dir(ctx.out_dir, teacher_key) / "best.pt"
        if not checkpoint.exists():
            return failed(f"teacher trial {teacher_key} has no checkpoint (did it fail?)")
        cfgs = [dataclasses.replace(c, teacher_checkpoint=str(checkpoint)) if c.teacher_id else c for c in cfgs]
    logs = [_logger(f) for f in folders]

    def log(message: str) -> None:
        for write in logs:
            write(message)

    options = dict(data_root=ctx.data_root, download=ctx.download, progress=ctx.progress, log=log)
    try:
        results = run_trials(cfgs, folders, **options)  # planned packed (kdbench.sweep.plan): a pack, even of one
    except UserError as err:
        return failed(one_line(err))
    except torch.OutOfMemoryError:
        return failed("out of memory: lower batch_size, resolution or --pack")
    except OSError as err:
        if not is_disk_full(err):
            return crashed(folders, failed)
        return failed(disk_full_message(err))
    except Exception:  # any other crash is recorded, with its traceback beside the trial
        return crashed(folders, failed)
    seconds = time.perf_counter() - t0
    for m, r in zip(members, results):
        if not isinstance(r, MemberFailed) and r.key != m.key:  # the planned key must describe how it was trained
            return failed(
                f"trained as trial {r.key}, planned as {m.key}: a file it depends on (a pretrained state dict) "
                "changed since the sweep was planned: rerun the sweep to plan it anew"
            )
    return {
        m.key: Outcome(m.key, "failed", error=str(r), seconds=seconds)
        if isinstance(r, MemberFailed)
        else Outcome(m.key, "done", r, seconds=seconds)
        for m, r in zip(members, results)
    }


def deploy_int8(
    trial: PlannedTrial, result: TrialResult, folder: Path, ctx: SweepContext
) -> tuple[Int8Result | None, str | None]:
    """The INT8 deployment of a done trial (:func:`kdbench.engine.int8.quantize_trial`), or None and why it failed (one
    line; an unexpected error's traceback goes to ``int8_error.log`` in the trial's folder)."""
    from kdbench.engine.int8 import quantize_trial

    try:
        record = quantize_trial(
            trial.config,
            result,
            folder,
            ctx.int8,
            data_root=ctx.data_root,
            download=ctx.download,
            threads=ctx.threads,
            log=_logger(folder),
        )
    except UserError as err:
        return None, one_line(err)
    except Exception as err:
        log = folder / "int8_error.log"
        with contextlib.suppress(OSError):
            log.write_text(traceback.format_exc())
        return None, f"{type(err).__name__}: {one_line(err)} (traceback in {log})"
    return record, None


def trial_complexity(trial: PlannedTrial, result: TrialResult) -> dict | None:
    """The trained model's params, FLOPs and size (kdbench.profile); None where fvcore is not installed."""
    from kdbench.profile import complexity

    try:
        return complexity(trial.config.recipe.model, len(result.classes), trial.config.data.resolution)
    except ImportError:  # fvcore is a dependency, but a bare GPU box may run without it
        return None


def crashed(folders: list[Path], failed) -> dict[str, Outcome]:
    """The outcome of an unexpected exception (being handled): its traceback goes to each folder's ``error.log``."""
    import sys

    err = sys.exc_info()[1]
    for folder in folders:
        with contextlib.suppress(OSError):
            (folder / "error.log").write_text(traceback.format_exc())
    return failed(f"{type(err).__name__}: {one_line(err)} (traceback in {folders[0] / 'error.log'})")


def _finished_result(path: Path, key: str, teacher_digest: Callable[[], str | None] | None) -> TrialResult | None:
    """The finished result at ``path`` if it is this trial's and was distilled from the teacher checkpoint there now.

    A student's key names its teacher by trial key; the checkpoint's content digest, recorded in the
    result, tells a teacher re-trained or replaced in its folder since: then the student trains again.
    """
    if not path.exists():
        return None
    try:
        result = from_json(TrialResult, path.read_text(), str(path))
    except (OSError, json.JSONDecodeError, UserError):  # unreadable, or another kdbench's: trained again
        return None
    if result.key != key:
        return None
    if teacher_digest is not None and (result.teacher or {}).get("digest") != teacher_digest():
        return None
    return result


def _digest(path: Path) -> str | None:
    """:func:`kdbench.digest.checkpoint_digest`, as kdbench.engine.trial records it, or None if it cannot be read."""
    try:
        return checkpoint_digest(path)
    except OSError:
        return None


def _logger(folder: Path):
    log_file = folder / "train.log"

    def log(message: str) -> None:
        with open(log_file, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    return log


def kill_with_parent() -> None:
    """Worker-process initializer: die when the sweep process dies (Linux ``PR_SET_PDEATHSIG``)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: workers end when their pipe closes
        pass
