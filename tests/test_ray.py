"""The Ray executor on a local Ray instance: the local executor's results, and a killed worker's trial resumed once."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, make_image_folder, run_cli
from test_sweep import store_rows, write_ablation

TEACHER_AND_KD = "grid.methods=['kd_kl']"  # a teacher and its two students (T = 2, 4)


@pytest.fixture
def ray_env() -> dict:
    """Environment for a sweep that starts its own local Ray; Ray missing fails in CI and skips elsewhere."""
    try:
        import ray  # noqa: F401
    except ImportError:
        message = 'Ray is not installed: pip install -e ".[ray]"'
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RAY_ADDRESS": "",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DISABLE_IMPORT_WARNING": "1",
    }


def start_sweep(env: dict, *args: str) -> subprocess.Popen:
    """``python -m kdbench.sweep`` in the background (its pid names the Ray session it starts)."""
    cmd = [sys.executable, "-m", "kdbench.sweep", "--no-report", "--threads", "1", *args]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def finish(proc: subprocess.Popen, timeout: float = 150) -> str:
    """Wait for the sweep; check it succeeded and left no Ray process of its own behind; returns its stdout."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the sweep did not finish in {timeout}s:\n{out}\n{err}")
    assert proc.returncode == 0, out + err
    deadline = time.time() + 15
    while (left := ray_processes_of(proc.pid)) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, f"Ray processes left running: {left}"
    return out


def processes() -> list[tuple[int, str]]:
    """(pid, command line) of every process."""
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    return [(int(pid), args) for pid, _, args in (line.strip().partition(" ") for line in listing.splitlines())]


def ray_processes_of(driver_pid: int) -> list[str]:
    """Ray's own processes (GCS, raylet, ...) of the local instance a driver started.

    Its session folder names the driver's pid."""
    return [f"{pid} {args[:120]}" for pid, args in processes() if "/session_" in args and f"_{driver_pid}/" in args]


def trial_results(out: Path) -> dict:
    """Per key: best test accuracy and each epoch's train and validation loss."""
    db = sqlite3.connect(out / "store.sqlite")
    rows = db.execute("SELECT key, best_test_accuracy, result FROM trials").fetchall()
    db.close()
    return {key: (acc, [(h["train_loss"], h["val_loss"]) for h in json.loads(result)["history"]]) for key, acc, result in rows}


def test_ray_sweep_matches_the_local_executor(tmp_path, ray_env):
    folder = make_image_folder(tmp_path / "d", classes=3, per_class=10)
    ablation = write_ablation(tmp_path, folder)
    methods = "grid.methods=['baseline','kd_kl']"
    local = run_cli(
        "kdbench.sweep",
        "--config",
        str(ablation),
        "--out",
        str(tmp_path / "local"),
        "--no-report",
        "--threads",
        "1",
        "--set",
        methods,
    )
    assert local.returncode == 0, local.stderr
    on_ray = start_sweep(
        ray_env,
        "--config",
        str(ablation),
        "--out",
        str(tmp_path / "ray"),
        "--set",
        methods,
        "--executor",
        "ray",
        "--workers",
        "2",
    )
    assert finish(on_ray).strip().splitlines()[-1] == "trials: 4 total, 4 done, 0 failed, 0 already done"
    rows = store_rows(tmp_path / "ray")
    assert len(rows) == 4 and all(r["status"] == "done" and r["completions"] == 1 for r in rows)
    assert trial_results(tmp_path / "ray") == trial_results(tmp_path / "local")


def running_teacher_worker(out: Path):
    """The pid of the Ray worker running the teacher trial once it is mid-trial (an epoch checkpointed), else None."""
    try:
        key = next(r["key"] for r in store_rows(out) if r["method"] == "teacher")
    except (sqlite3.Error, StopIteration):  # the store is not there yet
        return None
    folder = out / "trials" / key
    if not (folder / "state.pt").exists() or (folder / "metrics.json").exists():
        return None
    title = f"ray::kdbench-trial-{key}"  # the task's name: Ray sets it as the worker's process title
    return next((pid for pid, args in processes() if args.strip() == title), None)


def test_killed_ray_worker_is_retried_and_its_trial_resumes(tmp_path, ray_env):
    folder = make_image_folder(tmp_path / "d", classes=3, per_class=10)
    ablation, out = write_ablation(tmp_path, folder, teacher_epochs=20), tmp_path / "out"
    proc = start_sweep(ray_env, "--config", str(ablation), "--out", str(out), "--set", TEACHER_AND_KD, "--executor", "ray")
    victim, deadline = None, time.time() + 90
    while victim is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
        victim = running_teacher_worker(out)
    if victim is None:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("never found the Ray worker in the middle of the teacher trial")
    os.kill(victim, signal.SIGKILL)
    assert finish(proc).strip().splitlines()[-1] == "trials: 3 total, 3 done, 0 failed, 0 already done"
    rows = store_rows(out)
    assert len(rows) == 3 and all(r["status"] == "done" and r["completions"] == 1 for r in rows)
    teacher = next(r["key"] for r in rows if r["method"] == "teacher")
    assert "resuming from" in (out / "trials" / teacher / "train.log").read_text()
