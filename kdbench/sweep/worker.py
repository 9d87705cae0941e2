"""Run one planned trial in its folder, safely against crashes and concurrent sweeps.

Each trial owns ``<out>/trials/<key>/``.  An exclusive ``flock`` on its ``.lock``
file means two sweeps sharing an output folder never train the same trial at
once (the kernel drops the lock when a process dies, even by ``kill -9``).  A
``metrics.json`` that is already there is a finished result whose store write was
lost: it is returned instead of training again.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from kdbench.errors import UserError, one_line
from kdbench.sweep.plan import PlannedTrial


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares (picklable, for worker processes and Ray tasks)."""

    out_dir: str
    data_root: str | None = None
    download: bool = True
    threads: int | None = None
    progress: bool = False


@dataclass
class Outcome:
    key: str
    status: str  # "done" or "failed"
    result: dict | None = None
    error: str | None = None
    seconds: float = 0.0
    recovered: bool = False  # finished earlier, store write was lost


def trial_dir(out_dir: str | Path, key: str) -> Path:
    return Path(out_dir) / "trials" / key


def execute_trial(trial: PlannedTrial, ctx: SweepContext) -> Outcome:
    """Train ``trial`` (resuming from its checkpoint if interrupted) and return its outcome; never raises for a trial's own failure."""
    from kdbench.engine.trial import METRICS_FILE, run_trial

    if ctx.threads:
        torch.set_num_threads(ctx.threads)
    folder = trial_dir(ctx.out_dir, trial.key)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        previous = _finished_result(folder / METRICS_FILE, trial.key)
        if previous is not None:
            return Outcome(trial.key, "done", previous, recovered=True)
        cfg = trial.config
        if trial.teacher_key:
            checkpoint = trial_dir(ctx.out_dir, trial.teacher_key) / "best.pt"
            if not checkpoint.exists():
                return Outcome(trial.key, "failed", error=f"teacher trial {trial.teacher_key} has no checkpoint (did it fail?)")
            cfg = dataclasses.replace(cfg, teacher_checkpoint=str(checkpoint))
        try:
            result = run_trial(cfg, folder, data_root=ctx.data_root, download=ctx.download, progress=ctx.progress, log=_logger(folder))
        except UserError as err:
            return Outcome(trial.key, "failed", error=one_line(err), seconds=time.perf_counter() - t0)
        except torch.OutOfMemoryError:
            return Outcome(trial.key, "failed", error="out of memory: lower batch_size or resolution", seconds=time.perf_counter() - t0)
        except Exception as err:  # any other crash is recorded, with its traceback beside the trial
            (folder / "error.log").write_text(traceback.format_exc())
            return Outcome(
                trial.key, "failed", error=f"{type(err).__name__}: {one_line(err)} (traceback in {folder / 'error.log'})",
                seconds=time.perf_counter() - t0,
            )  # fmt: skip
    return Outcome(trial.key, "done", result, seconds=time.perf_counter() - t0)


def _finished_result(path: Path, key: str) -> dict | None:
    if not path.exists():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return result if result.get("key") == key else None


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
    os.environ.setdefault("KDBENCH_WORKER", "1")
