"""The sweep: ablation validation, planning, the results store, resume, kill -9, concurrency, failures."""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import REPO, assert_one_line_error, call_main, make_image_folder, run_cli
from PIL import Image

from kdbench.errors import UserError
from kdbench.sweep.__main__ import main as sweep_main
from kdbench.sweep.ablation import GRID_AXES, apply_overrides, parse_ablation
from kdbench.sweep.plan import plan_trials

TINY = """
name = "tiny"
[grid]
datasets = ["imagefolder:{folder}"]
methods = ["baseline", "kd_kl", "kd_kl_cos"]
seeds = [0]
temperatures = [2.0, 4.0]
[data]
resolution = 16
[teacher]
model = "resnet18"
epochs = {teacher_epochs}
batch_size = 8
lr = {teacher_lr}
[student]
model = "mobilenet_v2"
epochs = {student_epochs}
batch_size = 8
lr = 0.05
[loss]
temperature = 4.0
[run]
device = "cpu"
"""


def write_ablation(tmp_path: Path, folder: Path, teacher_epochs=1, student_epochs=1, teacher_lr=0.05) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(
        TINY.format(folder=folder, teacher_epochs=teacher_epochs, student_epochs=student_epochs, teacher_lr=teacher_lr)
    )
    return path


def store_rows(out: Path) -> list[dict]:
    db = sqlite3.connect(out / "store.sqlite")
    db.row_factory = sqlite3.Row
    # "method" is the report's row name: a teacher's row is "teacher" (it trains by the baseline's method, on hard labels)
    query = (
        "SELECT key, IIF(role = 'teacher', 'teacher', method) AS method, status, completions, attempts, error, flags FROM trials"
    )
    rows = [dict(r) for r in db.execute(query)]
    db.close()
    return rows


def base_raw(**grid) -> dict:
    """An ablation on eurosat with ``grid``; its default point is the last value of each swept axis."""
    loss = {name: grid[axis][-1] for name, axis in GRID_AXES.items() if axis in grid}
    return {"name": "t", "grid": {"datasets": ["eurosat"], **grid}, "teacher": {"model": "vgg16"}, "loss": loss}


def test_plan_varies_each_method_only_along_its_axes_and_orders_teachers_first():
    raw = base_raw(
        methods=["baseline", "kd_kl", "kd_cos", "kd_kl_cos"],
        temperatures=[1.0, 4.0],
        kl_weights=[0.5, 1.0],
        cos_weights=[1.0],
        seeds=[0, 1],
    )
    trials = plan_trials(parse_ablation(raw, "t"))
    count = {
        m: sum(t.config.method == m for t in trials if t.role == "student") for m in ("baseline", "kd_kl", "kd_cos", "kd_kl_cos")
    }
    count["teacher"] = sum(t.role == "teacher" for t in trials)
    assert count == {"teacher": 2, "baseline": 2, "kd_kl": 8, "kd_cos": 2, "kd_kl_cos": 8}
    assert [t.role for t in trials[:2]] == ["teacher", "teacher"] and all(t.role == "student" for t in trials[2:])
    teacher_keys = {t.key for t in trials[:2]}
    assert all(t.teacher_key in teacher_keys for t in trials if t.config.method.startswith("kd"))
    assert all(t.teacher_key is None for t in trials if t.config.method == "baseline")


def test_a_closed_stdout_pipe_ends_the_run_quietly(tmp_path):
    """``python -m kdbench.sweep --dry-run | head -1``: the reader goes away; no traceback, exit 141 like SIGPIPE."""
    folder = make_image_folder(tmp_path / "set")
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "kdbench.sweep", "--dry-run", "--set", f"grid.datasets=['imagefolder:{folder}']"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
    finally:
        os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr


def test_teacher_seed_gives_every_student_seed_the_one_teacher():
    raw = base_raw(methods=["baseline", "kd_kl"], seeds=[0, 1, 2])
    shared = plan_trials(parse_ablation({**raw, "teacher": {"model": "vgg16", "seed": 1}}, "t"))
    teachers = [t for t in shared if t.role == "teacher"]
    assert [t.config.seed for t in teachers] == [1]
    kd = [t for t in shared if t.config.method == "kd_kl"]
    assert sorted(t.config.seed for t in kd) == [0, 1, 2] and {t.teacher_key for t in kd} == {teachers[0].key}
    # the teacher of seed 1 is the same trial whether or not the ablation shares it
    own = plan_trials(parse_ablation(raw, "t"))
    assert teachers[0].key in {t.key for t in own if t.role == "teacher"}
    assert len([t for t in own if t.role == "teacher"]) == 3
    with pytest.raises(UserError, match="teacher.seed must be an integer"):
        parse_ablation({**raw, "teacher": {"model": "vgg16", "seed": "one"}}, "t")


def test_grid_points_without_a_soft_term_are_planned_once_as_the_method_they_are():
    """weights.toml's grid: (beta, gamma) = (0, 0) is the baseline, beta = 0 is KD (Cos), gamma = 0 is KD (KL)."""
    raw = base_raw(methods=["baseline", "kd_kl_cos"], kl_weights=[0.0, 0.5, 1.0], cos_weights=[0.0, 1.0])
    trials = plan_trials(parse_ablation(raw, "t"))
    weights = lambda t: (dict(t.config.loss.params).get("beta", 0.0), dict(t.config.loss.params).get("gamma", 0.0))  # noqa: E731
    students = [(t.config.method, *weights(t)) for t in trials if t.role == "student"]
    assert sorted(students) == sorted(
        [("baseline", 0.0, 0.0), ("kd_cos", 0.0, 1.0), ("kd_kl", 0.5, 0.0), ("kd_kl", 1.0, 0.0)]
        + [("kd_kl_cos", b, 1.0) for b in (0.5, 1.0)]
    )
    assert len({t.key for t in trials}) == len(trials)
    kd = [t for t in trials if t.config.method.startswith("kd")]
    assert all(any(weights(t)) for t in kd)
    assert all(t.teacher_key is None for t in trials if t.config.method == "baseline")


def test_shipped_weights_ablation_lists_no_ce_only_kd_trial(shared_data):
    from kdbench.sweep.ablation import load_ablation

    trials = plan_trials(load_ablation("weights")[0])
    kd = [t.config for t in trials if t.config.method.startswith("kd")]
    soft = [dict(c.loss.params) for c in kd]
    assert kd and not [p for p in soft if p.get("beta", 0) == 0 and p.get("gamma", 0) == 0]
    assert sum(t.config.method == "baseline" and t.role == "student" for t in trials) == 9  # 3 datasets x 3 seeds, once each


@pytest.mark.parametrize(
    "loss, needle",
    [
        ({}, "grid.temperatures has 2 values: name the default one in [loss]"),
        ({"temperature": 3.0}, "loss.temperature = 3 is not in grid.temperatures (2, 4)"),
        ({"temperature": 4.0, "beta": 0.0}, "kd_kl is really baseline"),
    ],
)
def test_the_default_point_is_named_in_the_grid_and_not_degenerate(loss, needle):
    raw = {**base_raw(methods=["baseline", "kd_kl"], temperatures=[2.0, 4.0], kl_weights=[0.0, 1.0]), "loss": loss}
    with pytest.raises(UserError, match=re.escape(needle)):
        parse_ablation(raw, "t")
    named = parse_ablation({**raw, "loss": {"temperature": 2.0, "beta": 1.0}}, "t").loss
    assert (named.temperature, named.beta, named.gamma) == (2.0, 1.0, 1.0)  # gamma: its axis's only value


def test_a_method_with_its_own_hyperparameters_varies_only_along_its_own_axes():
    raw = base_raw(methods=["dkd", "kd_kl"], temperatures=[2.0, 4.0], seeds=[0])
    raw["grid"]["dkd"] = {"beta": [2.0, 8.0]}
    raw["methods"] = {"dkd": {"beta": 8.0, "temperature": 3.0}}
    ablation = parse_ablation(raw, "t")
    assert ablation.default_loss("dkd").params == (("alpha", 1.0), ("beta", 8.0), ("temperature", 3.0))
    trials = plan_trials(ablation)
    dkd = [t for t in trials if t.config.method == "dkd"]
    assert sorted(dict(t.config.loss.params)["beta"] for t in dkd) == [2.0, 8.0]  # not doubled by grid.temperatures
    assert all(dict(t.config.loss.params)["temperature"] == 3.0 and t.teacher_key == trials[0].key for t in dkd)
    assert len({t.key for t in dkd}) == 2
    assert sum(t.config.method == "kd_kl" for t in trials) == 2
    # the same point through --set keeps the key; a changed hyperparameter changes it
    same = apply_overrides(base_raw(methods=["dkd"], temperatures=[2.0, 4.0]), ["methods.dkd.temperature=3"])
    keys = {t.key for t in plan_trials(parse_ablation(same, "t")) if t.config.method == "dkd"}
    assert keys == {t.key for t in dkd if dict(t.config.loss.params)["beta"] == 8.0}


def test_keys_are_stable_and_change_only_with_what_affects_a_result():
    def keys(raw):
        trials = plan_trials(parse_ablation(raw, "t"))
        return {(t.config.method, dict(t.config.loss.params).get("temperature", 1.0)): t.key for t in trials}

    a = keys(base_raw(methods=["baseline", "kd_kl"], temperatures=[4.0]))
    assert a == keys(base_raw(methods=["baseline", "kd_kl"], temperatures=[4.0]))
    b = keys(base_raw(methods=["baseline", "kd_kl"], temperatures=[2.0]))
    assert a[("baseline", 1.0)] == b[("baseline", 1.0)] and a[("kd_kl", 4.0)] != b[("kd_kl", 2.0)]
    c = keys({**base_raw(methods=["baseline"]), "student": {"epochs": 3}})
    assert c[("baseline", 1.0)] != a[("baseline", 1.0)]


def test_overrides_set_nested_typed_values():
    raw = apply_overrides({"grid": {}}, ["grid.seeds=[0,1,2]", "teacher.epochs=2", "teacher.model=vgg16_bn", "data.augment=none"])
    assert raw == {
        "grid": {"seeds": [0, 1, 2]},
        "teacher": {"epochs": 2, "model": "vgg16_bn"},
        "data": {"augment": "none"},
    }


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["grid.colour=1"], "unknown key ablation.grid.colour"),
        (["teacher.epoch=3"], "unknown key ablation.teacher.epoch"),
        (["grid.temperatures=[4.0, 0.0]"], "temperature must be > 0"),
        (["grid.temperatures=[-1.0]"], "temperature must be > 0"),
        (["grid.kl_weights=[-0.5]"], "loss weights must be >= 0"),
        (["loss.alpha=0.0", "grid.kl_weights=[0.0]", "grid.cos_weights=[0.0]"], "all 0"),
        (["grid.datasets=['mars']"], "unknown dataset 'mars'"),
        (["student.model=resnet9000"], "unknown model 'resnet9000'"),
        (["grid.seeds=[]"], "grid.seeds is empty"),
        (["grid.methods=['fitnets']"], "unknown method 'fitnets'"),
        (["methods.fitnets.beta=1"], "unknown method 'fitnets'"),
        (["methods.baseline.beta=2"], "baseline has no hyperparameters"),
        (["methods.dkd.gamma=1"], "unknown key methods.dkd.gamma"),
        (["grid.methods=['dkd']", "methods.dkd.beta=-1"], "methods.dkd.beta must be >= 0 (a loss weight)"),
        (["grid.methods=['dkd']", "grid.dkd.beta=[2.0,8.0]"], "name the default one in [methods.dkd]"),
        (["grid.dkd.beta=[2.0,8.0]", "methods.dkd.beta=4"], "methods.dkd.beta = 4 is not in grid.dkd.beta"),
        (["grid.dkd.temperature=[0.0]"], "dkd.temperature must be > 0"),
        (["teacher.epochs='ten'"], "teacher.epochs must be int"),
        (["nonsense"], "must look like key=value"),
        (["student.lr=nan"], "ablation.student.lr must be a finite number"),
        (["teacher.lr=1e6"], "teacher.lr must be in (0, 10]"),
        (["student.lr=0.0"], "student.lr must be in (0, 10]"),
        (["student.momentum=5"], "student.momentum must be in [0, 1)"),
        (["teacher.weight_decay=1.5"], "teacher.weight_decay must be in [0, 1)"),
        (["grid.temperatures=[inf]"], "must be a finite number"),
        (["data.val_fraction=0.5", "data.test_fraction=0.45"], "leaves images to train on"),
    ],
)
def test_bad_ablations_fail_in_one_line_before_training(tmp_path, capsys, overrides, needle):
    args = [a for o in overrides for a in ("--set", o)]
    proc = call_main(sweep_main, ["--out", str(tmp_path / "out"), *args], capsys)
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "out").exists()


def test_bad_ablation_file(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("name = 'x'\n[grid\n")
    assert_one_line_error(call_main(sweep_main, ["--config", str(tmp_path / "bad.toml")], capsys), "not valid TOML")
    # one real subprocess: the exit status and stderr a user sees
    assert_one_line_error(run_cli("kdbench.sweep", "--config", str(tmp_path / "none.toml")), "not found")


HEAVY_MODULES = ("torch", "torchvision", "fvcore", "numpy", "PIL")


def torch_free_sweep(*args: str) -> subprocess.CompletedProcess:
    """``python -m kdbench.sweep args`` that fails unless the driver process ends without having imported torch."""
    check = (
        "import sys; from kdbench.sweep.__main__ import main; code = main(sys.argv[1:]); "
        f"heavy = [m for m in {HEAVY_MODULES!r} if m in sys.modules]; "
        "print('the sweep driver imported', heavy, file=sys.stderr) if heavy else None; sys.exit(code or 3 * bool(heavy))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", check, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_the_report_modules_load_without_torch():
    code = f"import sys, kdbench.report.__main__; print([m for m in {HEAVY_MODULES[:3]!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_dry_run_lists_trials_and_cost_without_training(tmp_path):
    folder = make_image_folder(tmp_path / "d", classes=3, per_class=10)
    proc = torch_free_sweep("--config", str(write_ablation(tmp_path, folder)), "--dry-run", "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    assert "6 trials (1 teachers, 5 students)" in proc.stdout and "of a 2-core CPU VM" in proc.stdout
    assert not (tmp_path / "o").exists()


def test_sweep_runs_records_and_skips_finished_trials(tmp_path):
    folder = make_image_folder(tmp_path / "d", classes=3, per_class=10)
    ablation, out = write_ablation(tmp_path, folder), tmp_path / "out"
    first = run_cli("kdbench.sweep", "--config", str(ablation), "--out", str(out), "--no-report")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().splitlines()[-1] == "trials: 6 total, 6 done, 0 failed, 0 already done"
    rows = store_rows(out)
    assert len(rows) == 6 and all(r["status"] == "done" and r["completions"] == 1 for r in rows)
    started = time.time()
    again = run_cli("kdbench.sweep", "--config", str(ablation), "--out", str(out), "--no-report")
    assert again.stdout.strip().splitlines()[-1] == "trials: 6 total, 0 done, 0 failed, 6 already done"
    assert time.time() - started < 60
    assert all(r["completions"] == 1 for r in store_rows(out))
    for key in (r["key"] for r in rows):
        assert (out / "trials" / key / "metrics.json").exists()
    # the dry run estimates what is left to do in that store
    dry = run_cli("kdbench.sweep", "--config", str(ablation), "--out", str(out), "--dry-run")
    assert (
        "all 6 already done in the store: nothing to train; afresh (another --out) about" in dry.stdout.strip().splitlines()[-1]
    )


@pytest.mark.parametrize("override", ["student.lr=nan", "student.momentum=5"])
def test_invalid_recipe_is_refused_by_the_dry_run_in_one_line(tmp_path, override):
    proc = run_cli("kdbench.sweep", "--set", override, "--dry-run", "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, override.split("=")[0])
    assert not (tmp_path / "o").exists()


def make_noise_folder(root: Path, classes: int = 3, per_class: int = 20, size: int = 16) -> Path:
    """Images whose class cannot be told: every class draws from the same noise."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"class{c}" / f"img{i:03d}.png")
    return root


def test_teacher_at_chance_fails_its_students_and_the_exit_status(tmp_path, capsys):
    """A teacher that learns nothing (the classes are indistinguishable) fails as "teacher at chance level"; its
    students fail by teacher; a student at chance level is done but flagged."""
    folder = make_noise_folder(tmp_path / "d")
    ablation, out = write_ablation(tmp_path, folder), tmp_path / "out"
    # 15 validation images of 3 classes: enough for the binomial test to tell a good model from chance
    sets = ["grid.methods=['baseline','kd_kl']", "grid.temperatures=[4.0]", "data.val_fraction=0.25"]
    proc = call_main(
        sweep_main,
        ["--config", str(ablation), "--out", str(out), "--no-report", *[a for s in sets for a in ("--set", s)]],
        capsys,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "trials: 3 total, 1 done, 2 failed, 0 already done"
    rows = {r["method"]: r for r in store_rows(out)}
    assert rows["teacher"]["status"] == "failed" and rows["teacher"]["error"].startswith("teacher at chance level")
    assert rows["kd_kl"]["status"] == "failed"
    assert rows["kd_kl"]["error"].startswith(f"teacher trial {rows['teacher']['key']} failed: teacher at chance level")
    assert rows["baseline"]["status"] == "done" and json.loads(rows["baseline"]["flags"]) == ["student_at_chance"]
    assert not (out / "trials" / rows["teacher"]["key"] / "metrics.json").exists()
    # kept on request (a pipeline test): the same trials (the setting is not keyed), now done, the teacher flagged
    sets.append("run.allow_chance_teacher=true")
    proc = call_main(
        sweep_main,
        ["--config", str(ablation), "--out", str(out), "--no-report", *[a for s in sets for a in ("--set", s)]],
        capsys,
    )
    assert proc.stdout.strip().splitlines()[-1] == "trials: 3 total, 2 done, 0 failed, 1 already done", proc.stderr
    rows = {r["method"]: r for r in store_rows(out)}
    assert json.loads(rows["teacher"]["flags"]) == ["teacher_at_chance"] and rows["kd_kl"]["status"] == "done"


def test_sigkill_mid_trial_then_rerun_does_every_trial_exactly_once(tmp_path):
    folder = make_image_folder(tmp_path / "d", classes=3, per_class=16)
    ablation, out = write_ablation(tmp_path, folder, teacher_epochs=3, student_epochs=3), tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "kdbench.sweep", "--config", str(ablation), "--out", str(out), "--no-report"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    # wait until one trial is done and a later one has checkpointed an epoch: we are mid-trial
    while time.time() < deadline:
        try:  # the store may exist before its tables do
            rows = store_rows(out) if (out / "store.sqlite").exists() else []
        except sqlite3.OperationalError:
            rows = []
        if any(r["status"] == "done" for r in rows):
            running = [r for r in rows if r["status"] == "running"]
            if running and (out / "trials" / running[0]["key"] / "state.pt").exists():
                break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the sweep never reached the middle of a trial")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted = [r["key"] for r in store_rows(out) if r["status"] == "running"]
    assert interrupted
    rerun = run_cli("kdbench.sweep", "--config", str(ablation), "--out", str(out), "--no-report")
    assert rerun.returncode == 0, rerun.stderr
    rows = store_rows(out)
    assert len(rows) == 6 and all(r["status"] == "done" and r["completions"] == 1 for r in rows)
    log = (out / "trials" / interrupted[0] / "train.log").read_text()
    assert "resuming from" in log


def test_two_sweeps_on_one_store_stay_consistent(tmp_path):
    folder = make_image_folder(tmp_path / "d", classes=3, per_class=10)
    ablation, out = write_ablation(tmp_path, folder), tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "kdbench.sweep", "--config", str(ablation), "--out", str(out), "--no-report"]
    procs = [
        subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    rows = store_rows(out)
    assert len(rows) == 6 and all(r["status"] == "done" and r["completions"] == 1 for r in rows)


def test_process_pool_workers_give_the_same_results(tmp_path):
    folder = make_image_folder(tmp_path / "d", classes=3, per_class=10)
    ablation = write_ablation(tmp_path, folder)
    serial = run_cli(
        "kdbench.sweep",
        "--config",
        str(ablation),
        "--out",
        str(tmp_path / "a"),
        "--no-report",
        "--threads",
        "1",
        "--set",
        "grid.methods=['kd_kl']",
    )
    pooled = torch_free_sweep(  # the driver plans, dispatches and records; the workers train and count FLOPs
        "--config",
        str(ablation),
        "--out",
        str(tmp_path / "b"),
        "--no-report",
        "--workers",
        "2",
        "--threads",
        "1",
        "--set",
        "grid.methods=['kd_kl']",
    )
    assert serial.returncode == 0 and pooled.returncode == 0, pooled.stderr

    def acc(out):
        return dict(sqlite3.connect(out / "store.sqlite").execute("SELECT key, best_test_accuracy FROM trials"))

    def complexity(out):
        return dict(sqlite3.connect(out / "store.sqlite").execute("SELECT key, complexity FROM trials"))

    assert acc(tmp_path / "a") == acc(tmp_path / "b")
    assert complexity(tmp_path / "a") == complexity(tmp_path / "b") and "null" not in complexity(tmp_path / "b").values()
    assert not (tmp_path / "b" / ".workers").exists()  # the workers' notes are gone with them


def test_without_fvcore_a_trial_is_stored_without_complexity(monkeypatch):
    import kdbench.profile
    from kdbench.sweep.worker import trial_complexity

    trial = plan_trials(parse_ablation(base_raw(methods=["baseline"]), "t"))[0]
    result = SimpleNamespace(classes=("a", "b", "c"))  # the one field of a TrialResult it reads
    assert trial_complexity(trial, result)["model"] == trial.config.recipe.model
    kdbench.profile._measure.cache_clear()
    monkeypatch.setitem(sys.modules, "fvcore.nn", None)  # as on a GPU box without fvcore: importing it fails
    assert trial_complexity(trial, result) is None


def test_pack_grouping_and_default():
    from kdbench.sweep.packs import default_pack_size, pack_trials

    raw = base_raw(methods=["baseline", "kd_kl", "kd_cos", "kd_kl_cos"], temperatures=[2.0, 4.0], seeds=[0, 1])
    trials = plan_trials(parse_ablation(raw, "t"), pack=4)
    units = pack_trials(trials, 4)
    assert [u.role for u in units[:2]] == ["teacher", "teacher"]
    packs = [u for u in units if u.members]
    # per seed: 5 KD students sharing a teacher -> a pack of 4 and a pack of 1; the baseline (no teacher) a pack of 1
    assert sorted(len(p.members) for p in packs) == [1, 1, 1, 1, 4, 4]
    assert sorted(t.key for u in units for t in u.trials) == sorted(t.key for t in trials)
    for p in packs:
        assert len({m.teacher_key for m in p.members}) == 1 and {m.config.seed for m in p.members} == {p.config.seed}
    single = plan_trials(parse_ablation(raw, "t"))
    assert pack_trials(single, 4) == single  # only trials planned packed are packed
    assert default_pack_size(0, "cpu") == 1 and default_pack_size(0, "cuda") == 8 and default_pack_size(3, "cpu") == 3


def test_sweep_with_packed_students_on_request(tmp_path):
    folder = make_image_folder(tmp_path / "d", classes=3, per_class=10)
    ablation, out = write_ablation(tmp_path, folder), tmp_path / "out"
    proc = run_cli("kdbench.sweep", "--config", str(ablation), "--out", str(out), "--no-report", "--pack", "3")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "trials: 6 total, 6 done, 0 failed, 0 already done"
    rows = store_rows(out)
    assert all(r["status"] == "done" and r["completions"] == 1 for r in rows)
    results = [json.loads((out / "trials" / r["key"] / "metrics.json").read_text()) for r in rows]
    k = {
        (r["config"]["method"] if r["config"]["role"] == "student" else "teacher")
        + str(r["config"]["loss"]["params"].get("temperature", 1.0)): (r.get("pack") or {}).get("k")
        for r in results
    }
    # the four KD students train as a pack of 3 and a pack of 1; the baseline (no teacher) as a pack of 1, as planned
    assert k.pop("teacher1.0") is None and k.pop("baseline1.0") == 1 and sorted(k.values()) == [1, 3, 3, 3], k
    assert all(r["config"]["packed"] == (r.get("pack") is not None) for r in results)


def test_split_seeds_give_each_split_its_own_teacher_and_leave_keys_of_one_split_alone():
    raw = base_raw(methods=["baseline", "kd_kl"], seeds=[0, 1])
    raw = {**raw, "teacher": {"model": "vgg16", "seed": 0}}
    one = plan_trials(parse_ablation(raw, "t"))
    assert one == plan_trials(parse_ablation({**raw, "grid": {**raw["grid"], "split_seeds": [0]}}, "t"))
    both = plan_trials(parse_ablation({**raw, "grid": {**raw["grid"], "split_seeds": [0, 3]}}, "t"))
    teachers = {t.config.data.split_seed: t for t in both if t.role == "teacher"}
    assert sorted(teachers) == [0, 3] and teachers[0].key in {t.key for t in one}
    kd = [t for t in both if t.config.method == "kd_kl"]
    assert sorted((t.config.data.split_seed, t.config.seed) for t in kd) == [(0, 0), (0, 1), (3, 0), (3, 1)]
    assert all(t.teacher_key == teachers[t.config.data.split_seed].key for t in kd)  # a student distils from its split's teacher
    with pytest.raises(UserError, match=r"^grid.split_seeds must be different integers >= 0, got \[1, 1\]"):
        parse_ablation({**raw, "grid": {**raw["grid"], "split_seeds": [1, 1]}}, "t")


def test_a_dataset_table_overrides_data_for_that_dataset_only():
    raw = base_raw(methods=["baseline"], seeds=[0])
    raw = {**raw, "grid": {**raw["grid"], "datasets": ["eurosat", "rsscn7"]}, "data": {"resolution": 64}}
    plain = {t.config.data.dataset: t for t in plan_trials(parse_ablation(raw, "t"))}
    own = parse_ablation({**raw, "data": {"resolution": 64, "rsscn7": {"resolution": 96, "test_fraction": 0.5}}}, "t")
    tables = {t.config.data.dataset: t for t in plan_trials(own)}
    assert tables["eurosat"].key == plain["eurosat"].key  # unchanged where no table is given
    assert (tables["rsscn7"].config.data.resolution, tables["rsscn7"].config.data.test_fraction) == (96, 0.5)
    with pytest.raises(UserError, match=r"^t: \[data.ucmercd\] names no dataset of grid.datasets \(eurosat, rsscn7\)$"):
        parse_ablation({**raw, "data": {"ucmercd": {"resolution": 96}}}, "t")
    # a built-in dataset's table outside the grid is kept for when the grid lists it (a grid narrowed with --set)
    narrowed = parse_ablation({**raw, "data": {"ucmerced": {"resolution": 96}}}, "t")
    assert {t.config.data.resolution for t in plan_trials(narrowed)} == {64}
    with pytest.raises(UserError, match=r"^unknown key data.rsscn7.size"):
        parse_ablation({**raw, "data": {"rsscn7": {"size": 96}}}, "t")


def test_a_dataset_teacher_table_changes_that_datasets_teacher_and_its_students_only():
    raw = base_raw(methods=["baseline", "kd_kl"], seeds=[0])
    raw = {**raw, "grid": {**raw["grid"], "datasets": ["eurosat", "rsscn7"]}, "teacher": {"model": "resnet18", "epochs": 16}}
    plain = {(t.config.data.dataset, t.name): t for t in plan_trials(parse_ablation(raw, "t"))}
    own = {**raw, "teacher": {"model": "resnet18", "epochs": 16, "rsscn7": {"epochs": 40}}}
    tables = {(t.config.data.dataset, t.name): t for t in plan_trials(parse_ablation(own, "t"))}
    assert all(tables[("eurosat", n)].key == plain[("eurosat", n)].key for n in ("teacher", "baseline", "kd_kl"))
    assert tables[("rsscn7", "teacher")].config.recipe.epochs == 40
    assert tables[("rsscn7", "kd_kl")].teacher_key == tables[("rsscn7", "teacher")].key != plain[("rsscn7", "teacher")].key
    assert tables[("rsscn7", "baseline")].key == plain[("rsscn7", "baseline")].key  # a student without a teacher is unchanged
    with pytest.raises(UserError, match=r"^teacher.rsscn7.seed is not a key of a dataset's table: set it in \[teacher\]$"):
        parse_ablation({**raw, "teacher": {"model": "resnet18", "rsscn7": {"seed": 1}}}, "t")
    with pytest.raises(UserError, match=r"^unknown key teacher.rsscn7.epoch"):
        parse_ablation({**raw, "teacher": {"model": "resnet18", "rsscn7": {"epoch": 1}}}, "t")


def test_dry_run_counts_the_split_and_refuses_what_the_run_refuses(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "d", classes=3, per_class=13)
    out = ["--config", str(write_ablation(tmp_path, folder)), "--dry-run", "--out", str(tmp_path / "o")]
    proc = call_main(sweep_main, out, capsys)
    assert proc.returncode == 0, proc.stderr
    assert "39 used (13 per class), 27 for training" in proc.stdout  # 13 per class: 3 test, 1 val, 9 train
    assert "epochs x train imgs" in proc.stdout
    (folder / "class0" / "notes.txt").write_text("not an image")
    error = assert_one_line_error(call_main(sweep_main, out, capsys), "notes.txt")
    assert "kdbench sweep --set data.skip_bad_images=true" in error or "kdbench.sweep --set data.skip_bad_images=true" in error
    (folder / "class0" / "notes.txt").unlink()
    make_image_folder(tmp_path / "tiny2", classes=1, per_class=2)
    (tmp_path / "tiny2" / "class0").rename(folder / "small")
    assert_one_line_error(call_main(sweep_main, out, capsys), "class small has 2 image(s)")
    assert not (tmp_path / "o").exists()


def test_durations_are_in_units_a_reader_can_picture():
    from kdbench.sweep.__main__ import format_duration

    assert [format_duration(s) for s in (42, 90, 3 * 3600, 18450 * 60)] == [
        "42 s",
        "1.5 min",
        "3.0 h (180 min)",
        "12.8 days (308 h)",
    ]


def test_a_set_list_of_bare_words_says_strings_need_toml_quotes():
    with pytest.raises(
        UserError, match=r"strings in a list or table need TOML quotes, e\.g\. .* --set 'grid\.datasets=\[\"eurosat\"\]'"
    ):
        apply_overrides({}, ["grid.datasets=[eurosat]"])
