"""Paper-scale sweeps survive crashes, full disks, dead workers and each other (issue #12): the mmap image cache,
durable writes, kill points of a trial, a killed pool worker, a sweep killed three times, and two sweeps at once."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, call_main, make_image_folder
from PIL import Image

from kdbench import durable
from kdbench.data import decode
from kdbench.data.decode import cache_folder, load_images
from kdbench.data.index import scan_folder
from kdbench.errors import UserError, cli_main
from kdbench.records import to_json
from kdbench.sweep.__main__ import main as sweep_main

ABLATION = """
name = "soak"
[grid]
datasets = ["imagefolder:{folder}"]
methods = {methods}
teacher = {teacher}
seeds = [0]
temperatures = [2.0]
[data]
resolution = 16
[teacher]
model = "resnet18"
epochs = {epochs}
batch_size = 8
lr = 0.05
[student]
model = "mobilenet_v2"
epochs = {epochs}
batch_size = 8
lr = 0.05
[run]
device = "cpu"
"""


def write_ablation(tmp_path: Path, folder: Path, methods=("baseline", "kd_kl"), epochs=2, teacher=True) -> Path:
    path = tmp_path / "soak.toml"
    path.write_text(
        ABLATION.format(folder=folder, methods=json.dumps(list(methods)), epochs=epochs, teacher=str(teacher).lower())
    )
    return path


def store_rows(out: Path) -> dict[str, dict]:
    db = sqlite3.connect(out / "store.sqlite")
    db.row_factory = sqlite3.Row
    rows = {r["key"]: dict(r) for r in db.execute("SELECT * FROM trials")}
    db.close()
    return rows


def comparable(result) -> dict:
    """A trial result (a TrialResult, or its JSON as loaded) without what depends on the wall clock or the machine."""
    result = json.loads(to_json(result)) if dataclasses.is_dataclass(result) else result
    history = [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")} for h in result["history"]]
    return {"best": result["best"], "last": result["last"], "history": history}


def sweep_cmd(ablation: Path, out: Path, *extra: str) -> list[str]:
    args = ["--config", str(ablation), "--out", str(out), "--no-report", "--threads", "1", *extra]
    return [sys.executable, "-m", "kdbench.sweep", *args]


ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


# --- the memory-mapped image cache ---------------------------------------------------------------


def test_image_cache_appends_new_images_and_never_rewrites_old_rows(tmp_path):
    folder = make_image_folder(tmp_path / "d", classes=2, per_class=6, size=20)
    paths = scan_folder(folder).paths
    first, _ = load_images(folder, paths[:5], 16)
    cache = cache_folder(folder.resolve(), 16)
    data = cache / "images.u8"
    inode, head = data.stat().st_ino, data.read_bytes()
    assert data.stat().st_size == 5 * 3 * 16 * 16
    both, _ = load_images(folder, paths[3:], 16)  # 2 known, 7 new
    assert data.stat().st_ino == inode and data.read_bytes()[: len(head)] == head  # appended in place
    assert data.stat().st_size == 12 * 3 * 16 * 16 and json.loads((cache / "index.json").read_text())["rows"] == 12
    assert torch.equal(both[:2], first[3:5])
    assert torch.equal(both, torch.stack([decode.decode_image(folder / p, 16) for p in paths[3:]]))


def test_half_written_cache_is_detected_and_repaired(tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "d", classes=2, per_class=4, size=20)
    paths = scan_folder(folder).paths
    truth, _ = load_images(folder, paths, 16)
    cache = cache_folder(folder.resolve(), 16)
    data, index = cache / "images.u8", cache / "index.json"
    # a crash during an append: rows past the index's count; they are ignored, then cut off by the next append
    with open(data, "ab") as f:
        f.write(b"\xff" * (3 * 16 * 16 + 100))
    again, _ = load_images(folder, paths, 16)
    assert torch.equal(again, truth)
    flipped = torch.flip(decode.decode_image(folder / paths[4], 20), dims=(2,)).permute(1, 2, 0).numpy()
    Image.fromarray(flipped).save(folder / "class0" / "extra.png")  # a new image: appended after the cut
    more, _ = load_images(folder, [*paths, "class0/extra.png"], 16)
    assert data.stat().st_size == 9 * 3 * 16 * 16 and torch.equal(more[-1], decode.decode_image(folder / "class0/extra.png", 16))
    # an index naming rows the file lacks (file cut short), or a broken index: rebuilt from the images
    with open(data, "r+b") as f:
        f.truncate(3 * 3 * 16 * 16)
    calls = []
    real = decode.decode_image
    monkeypatch.setattr(decode, "decode_image", lambda p, r: calls.append(p) or real(p, r))
    rebuilt, _ = load_images(folder, paths, 16)
    assert torch.equal(rebuilt, truth) and len(calls) == 8
    index.write_text('{"format": "kdbench-image-cache-v2", "rows": ')
    assert torch.equal(load_images(folder, paths, 16)[0], truth) and len(calls) == 16


def test_cached_images_are_read_through_a_read_only_shared_map(tmp_path):
    folder = make_image_folder(tmp_path / "d", classes=2, per_class=5, size=20)
    paths = scan_folder(folder).paths
    truth, _ = load_images(folder, paths, 16)
    cache = cache_folder(folder.resolve(), 16)
    for f in cache.iterdir():
        f.chmod(0o444)
    cache.chmod(0o555)  # nobody may write: readers take no lock and write nothing
    try:
        stamp = {f.name: f.stat().st_mtime_ns for f in cache.iterdir()}
        code = (
            "import sys, torch; from pathlib import Path; from kdbench.data.decode import load_images; "
            f"x, _ = load_images(Path({str(folder)!r}), {paths[::-1]!r}, 16); torch.save(x, sys.argv[1])"
        )
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.pt")], env=ENV, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert torch.equal(torch.load(tmp_path / "x.pt"), truth.flip(0))
        mapped = np.memmap(cache / "images.u8", dtype=np.uint8, mode="r")
        assert not mapped.flags.writeable
        assert {f.name: f.stat().st_mtime_ns for f in cache.iterdir()} == stamp
    finally:
        cache.chmod(0o755)


# --- durable writes -----------------------------------------------------------------------------


def test_atomic_write_removes_its_temporary_file_on_any_error(tmp_path):
    target = tmp_path / "x.bin"
    durable.atomic_write_bytes(target, b"old")

    def fill_disk(f):
        f.write(b"partial" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as err:
        durable.atomic_write(target, fill_disk)
    assert durable.is_disk_full(err.value)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


class FullDisk:
    """A file on a disk with ``room`` bytes left: a write past them fails as a full disk does (ENOSPC)."""

    def __init__(self, f, room: int):
        self.f, self.room, self.written = f, room, 0

    def write(self, data):
        self.written += len(data)
        if self.written > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_a_full_disk_under_torch_save_is_reported_as_enospc(tmp_path, monkeypatch):
    monkeypatch.setattr(durable, "_open", lambda path, mode: FullDisk(open(path, mode), room=20_000))  # noqa: SIM115
    with pytest.raises(OSError) as err:  # torch.save itself would raise a RuntimeError ("unexpected pos")
        durable.atomic_torch_save({"w": torch.zeros(100_000)}, tmp_path / "last.pt")
    assert durable.is_disk_full(err.value) and err.value.filename == str(tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_during_a_checkpoint_fails_the_trial_in_one_line_and_a_rerun_resumes(tmp_path, capsys, monkeypatch):
    folder = make_image_folder(tmp_path / "d", classes=3, per_class=8, size=16)
    ablation, out = write_ablation(tmp_path, folder, methods=["baseline"], epochs=2, teacher=False), tmp_path / "out"
    real = durable.atomic_write
    writes = []

    def full_on_second_state_pt(path, write):
        if Path(path).name == "state.pt":
            writes.append(path)
            if len(writes) == 2:
                return real(path, lambda f: (f.write(b"x" * 4096), _raise_enospc(path)))
        return real(path, write)

    monkeypatch.setattr(durable, "atomic_write", full_on_second_state_pt)
    args = ["--config", str(ablation), "--out", str(out), "--no-report", "--threads", "1"]
    code = sweep_main(args)
    printed = capsys.readouterr()
    assert code == 1 and "Traceback" not in printed.out + printed.err
    failed = [line for line in printed.out.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "disk full while writing" in failed[0] and "rerun" in failed[0]
    (row,) = store_rows(out).values()
    assert row["status"] == "failed" and "disk full" in row["error"]
    trial = out / "trials" / row["key"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not (trial / "error.log").exists()
    monkeypatch.setattr(durable, "atomic_write", real)
    assert sweep_main(args) == 0
    capsys.readouterr()
    (row,) = store_rows(out).values()
    assert row["status"] == "done" and row["completions"] == 1
    assert "resuming from" in (trial / "train.log").read_text()


def _raise_enospc(path):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


# --- kill points of one trial ---------------------------------------------------------------------

KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
import torch
from kdbench import durable
from kdbench.config import DataConfig, Recipe, TrialConfig
from kdbench.engine.runner import run_trial

torch.set_num_threads(1)
folder, out, kill_at = sys.argv[1], sys.argv[2], sys.argv[3]
if kill_at != "none":
    n, phase = int(kill_at.split(":")[0]), kill_at.split(":")[1]
    real, calls = durable.atomic_write, []

    def dying(path, write):
        calls.append(path)
        if len(calls) != n:
            return real(path, write)
        if phase == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        if phase == "mid":  # the temporary file is half written
            with open(Path(path).with_name(f".{Path(path).name}.{os.getpid()}.tmp"), "wb") as f:
                f.write(b"half")
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, write)
        os.kill(os.getpid(), signal.SIGKILL)

    durable.atomic_write = dying
cfg = TrialConfig(
    method="baseline",
    data=DataConfig(dataset=f"imagefolder:{folder}", resolution=16),
    recipe=Recipe(model="mobilenet_v2", epochs=3, batch_size=8, lr=0.05, warmup_epochs=0),
    seed=0,
    device="cpu",
)
run_trial(cfg, out, progress=False, log=lambda m: None)
"""


def test_a_trial_killed_at_any_write_resumes_to_the_uninterrupted_result(tmp_path):
    folder = make_image_folder(tmp_path / "d", classes=3, per_class=8, size=16)
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)

    def run(out: Path, kill_at: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(script), str(folder), str(out), kill_at]
        return subprocess.run(cmd, env=ENV, capture_output=True, text=True)

    assert run(tmp_path / "full", "none").returncode == 0
    truth = comparable(json.loads((tmp_path / "full" / "metrics.json").read_text()))
    # writes: state.pt (1), best.pt (2) of epoch 1, then state.pt (+ best.pt if it improved) of each later epoch, metrics.json
    for kill_at in ("1:after", "2:mid", "4:after"):  # between state.pt and best.pt; best.pt half written; later epoch
        out = tmp_path / kill_at.replace(":", "-")
        killed = run(out, kill_at)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        resumed = run(out, "none")
        assert resumed.returncode == 0, resumed.stderr
        assert comparable(json.loads((out / "metrics.json").read_text())) == truth, kill_at
        assert not list(out.glob(".*.tmp")), kill_at  # a dead process's temporary file is cleaned up on resume


def test_an_unreadable_resume_state_restarts_the_trial_with_a_warning(tmp_path):
    from kdbench.config import DataConfig, Recipe, TrialConfig
    from kdbench.engine.runner import run_trial

    folder = make_image_folder(tmp_path / "d", classes=3, per_class=8, size=16)
    cfg = TrialConfig(
        method="baseline",
        data=DataConfig(dataset=f"imagefolder:{folder}", resolution=16),
        recipe=Recipe(model="mobilenet_v2", epochs=1, batch_size=8, lr=0.05),
        device="cpu",
    )
    truth = run_trial(cfg, tmp_path / "a", progress=False, log=lambda m: None)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "state.pt").write_bytes(b"PK\x03\x04 truncated")
    lines = []
    result = run_trial(cfg, tmp_path / "b", progress=False, log=lines.append)
    assert any(line.startswith("warning: cannot read the resume state") and "from scratch" in line for line in lines)
    assert comparable(result) == comparable(truth)


# --- workers and sweeps ---------------------------------------------------------------------------


def test_a_killed_pool_worker_is_replaced_and_its_trial_retried(tmp_path):
    folder = make_image_folder(tmp_path / "d", classes=3, per_class=8, size=16)
    ablation, out = write_ablation(tmp_path, folder, methods=["baseline"], epochs=2), tmp_path / "out"
    proc = subprocess.Popen(
        sweep_cmd(ablation, out, "--workers", "2"), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    victim, deadline = None, time.time() + 120
    while victim is None and time.time() < deadline and proc.poll() is None:
        for note in (out / ".workers").glob("*") if (out / ".workers").exists() else []:
            try:
                key = note.read_text().strip()
            except OSError:
                continue
            if key and (out / "trials" / key / "state.pt").exists():  # mid-trial: one epoch checkpointed
                victim = (int(note.name), key)
                break
        time.sleep(0.05)
    assert victim is not None, "no worker reached the middle of a trial"
    os.kill(victim[0], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout + stderr
    assert "Traceback" not in stdout + stderr
    rows = store_rows(out)
    assert len(rows) == 2 and all(r["status"] == "done" and r["completions"] == 1 for r in rows.values())
    assert rows[victim[1]]["notes"].startswith("worker process died (attempt 1 of 3)")
    assert rows[victim[1]]["attempts"] == 2
    assert all(r["notes"] is None for k, r in rows.items() if k != victim[1])  # the bystander was not charged
    assert "resuming from" in (out / "trials" / victim[1] / "train.log").read_text()
    assert not (out / ".workers").exists()


def test_soak_a_sweep_killed_three_times_equals_an_uninterrupted_one(tmp_path):
    folder = make_image_folder(tmp_path / "d", classes=3, per_class=8, size=16)
    ablation = write_ablation(tmp_path, folder, epochs=2)
    clean = subprocess.run(sweep_cmd(ablation, tmp_path / "clean"), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    out = tmp_path / "soak"

    def reached(moment: str) -> bool:
        if not (out / "store.sqlite").exists():
            return False
        try:
            rows = list(store_rows(out).values())
        except sqlite3.Error:
            return False
        done = sum(r["status"] == "done" for r in rows)
        if moment == "first epoch":  # the teacher is mid-trial
            return any((out / "trials" / r["key"] / "state.pt").exists() for r in rows if r["status"] == "running")
        if moment == "teacher done":
            return done >= 1
        return done >= 2 and any(r["status"] == "running" for r in rows)  # the last student has started

    for moment in ("first epoch", "teacher done", "last trial"):
        proc = subprocess.Popen(sweep_cmd(ablation, out), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while not reached(moment) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    final = subprocess.run(sweep_cmd(ablation, out), cwd=REPO, env=ENV, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    a, b = store_rows(tmp_path / "clean"), store_rows(out)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key]["status"] == b[key]["status"] == "done" and b[key]["completions"] == 1
        assert comparable(json.loads(a[key]["result"])) == comparable(json.loads(b[key]["result"])), key


def test_two_sweeps_on_one_folder_train_each_trial_once(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "d", classes=3, per_class=8, size=16)
    ablation, out = write_ablation(tmp_path, folder, methods=["baseline"], epochs=2), tmp_path / "out"
    procs = [
        subprocess.Popen(sweep_cmd(ablation, out), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    rows = store_rows(out)
    assert len(rows) == 2 and all(r["status"] == "done" and r["completions"] == 1 for r in rows.values())
    for key in rows:  # trained once: each epoch appears once in its log, and nothing was resumed
        log = (out / "trials" / key / "train.log").read_text()
        assert log.count("epoch 1/2:") == 1 and log.count("epoch 2/2:") == 1 and "resuming" not in log
    assert call_main(sweep_main, ["--config", str(ablation), "--out", str(out), "--no-report"], capsys).returncode == 0


# --- the file lock, and every module without fcntl (Windows) -----------------------------------------------------------
def test_a_non_blocking_file_lock_held_by_another_process_is_busy_and_free_after(tmp_path):
    lock = tmp_path / "x.lock"
    holder = f"from kdbench.durable import file_lock\nwith file_lock({str(lock)!r}):\n    print('held', flush=True)\n    input()"
    proc = subprocess.Popen([sys.executable, "-c", holder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout.readline() == "held\n"
        with pytest.raises(durable.Busy), durable.file_lock(lock, blocking=False):
            pass
    finally:
        proc.communicate("\n", timeout=60)
    with durable.file_lock(lock, blocking=False):
        pass


def test_every_module_imports_without_fcntl_as_on_windows():
    """The CI step of ``.ci/run`` that imports every kdbench module with ``fcntl`` unavailable passes."""
    (step,) = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if "sys.modules['fcntl'] = None" in line]
    done = subprocess.run(["bash", "-c", step], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_full_disk_under_a_command_is_one_line_naming_the_file_and_the_free_space(tmp_path, capsys):
    @cli_main
    def train(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    assert train(tmp_path / "run" / "best.pt") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unexpected" not in err and "Traceback" not in err
    assert f"disk full while writing {tmp_path / 'run' / 'best.pt'}" in err and "MB free" in err and "rerun" in err


def test_a_full_disk_while_filling_the_image_cache_names_the_cache_file_and_the_space_needed(tmp_path, monkeypatch):
    folder = make_image_folder(tmp_path / "d", classes=2, per_class=3, size=16)
    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))

    monkeypatch.setattr(decode, "open", lambda path, mode: FullDisk(open(path, mode), room=0), raising=False)  # noqa: SIM115
    files = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*.png"))]
    with pytest.raises(UserError, match=r"disk full while writing .*images\.u8 \(.* MB free on its disk, 4.6 kB needed\)"):
        decode.load_images(folder, files, 16)
