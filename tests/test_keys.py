"""Trial keys are complete: every field that can change a result changes the key, and nothing else does."""

import dataclasses
import os
import shutil

import pytest
from conftest import call_main, loss_config, make_image_folder

import kdbench.engine
import kdbench.losses
from kdbench.config import PRECISION, DataConfig, LossConfig, Recipe, TrialConfig
from kdbench.data.select import data_fingerprint
from kdbench.errors import UserError
from kdbench.sweep.__main__ import main as sweep_main
from kdbench.sweep.ablation import parse_ablation
from kdbench.sweep.packs import pack_trials
from kdbench.sweep.plan import plan_trials

BASE = TrialConfig(method="kd_kl", teacher_id="teacher-key", device="cpu", dataset_fingerprint="fp")


def test_identity_holds_exactly_the_result_fields():
    # run settings (output folder, workers, threads) are not TrialConfig fields; a new field must be placed here consciously
    assert set(BASE.identity()) == {
        "method",
        "role",
        "data",
        "recipe",
        "loss",
        "seed",
        "teacher_id",
        "device",
        "precision",
        "packed",
        "dataset_fingerprint",
    }
    assert "eval_batch_size" not in BASE.identity()["recipe"]


@pytest.mark.parametrize(
    "change",
    [
        {"method": "kd_kl_cos"},
        {"seed": 1},
        {"teacher_id": "another teacher"},
        {"device": "cuda"},  # and with it the precision: fp32 on CPU, bf16 autocast on CUDA
        {"packed": True},  # a packed student draws other dropout masks
        {"dataset_fingerprint": "other files"},
    ]
    + [{"data": dataclasses.replace(DataConfig(), **{f: v})} for f, v in [("dataset", "ucmerced"), ("resolution", 32)]]
    + [{"data": dataclasses.replace(DataConfig(), **{f: v})} for f, v in [("images_per_class", 5), ("classes", ("a", "b"))]]
    + [{"data": dataclasses.replace(DataConfig(), **{f: v})} for f, v in [("val_fraction", 0.2), ("test_fraction", 0.3)]]
    + [{"data": dataclasses.replace(DataConfig(), **{f: v})} for f, v in [("split_seed", 3), ("augment", "none")]]
    + [{"data": dataclasses.replace(DataConfig(), skip_bad_images=True)}]
    + [
        {"recipe": dataclasses.replace(Recipe(), **{f: v})}
        for f, v in [
            ("model", "resnet18"),
            ("pretrained", "imagenet"),
            ("epochs", 3),
            ("batch_size", 32),
            ("optimizer", "adamw"),
            ("lr", 0.01),
            ("momentum", 0.5),
            ("weight_decay", 0.0),
            ("schedule", "constant"),
            ("warmup_epochs", 0),
        ]
    ]
    + [
        {"method": "kd_kl_cos", "loss": loss_config(**{f: v})}  # every setting counts for it
        for f, v in [("alpha", 0.5), ("beta", 2.0), ("gamma", 0.5), ("temperature", 2.0), ("on", "probs")]
    ],
)
def test_each_result_field_changes_the_key(change):
    changed = dataclasses.replace(BASE, **change)
    assert changed.key() != BASE.key()
    if "device" in change:
        assert changed.identity()["precision"] == PRECISION["cuda"] == "bf16-autocast"
        assert BASE.identity()["precision"] == "fp32"


def test_a_loss_setting_the_method_ignores_leaves_its_key_alone():
    """TrialConfig settles the loss its method really uses (kdbench.methods.Method.resolve) when it is made."""
    assert dataclasses.replace(BASE, loss=loss_config(beta=1.0)).key() == BASE.key()  # the default written out
    cos = dataclasses.replace(BASE, method="kd_cos", loss=loss_config(gamma=2.0))
    assert dataclasses.replace(cos, loss=loss_config(gamma=2.0, temperature=9.0)).key() == cos.key()  # on logits: no T
    assert cos.loss == loss_config(gamma=2.0, on="logits")
    assert dataclasses.replace(cos, loss=loss_config(gamma=2.0, temperature=9.0, on="probs")).key() != cos.key()
    baseline = TrialConfig(method="baseline", loss=loss_config(alpha=0.5), device="cpu")
    assert baseline.loss == LossConfig(alpha=1.0, params=())
    with pytest.raises(UserError, match="baseline has no hyperparameters"):
        TrialConfig(method="baseline", loss=loss_config(temperature=8.0))


def test_code_versions_change_the_key(monkeypatch):
    key = BASE.key()
    monkeypatch.setattr(kdbench.engine, "RESULTS_VERSION", kdbench.engine.RESULTS_VERSION + "x")
    assert BASE.key() != key
    monkeypatch.undo()
    monkeypatch.setattr(kdbench.losses, "LOSS_VERSION", kdbench.losses.LOSS_VERSION + "x")
    assert BASE.key() != key


def test_a_teacher_is_not_the_student_baseline_on_the_same_recipe():
    student = TrialConfig(method="baseline", device="cpu", dataset_fingerprint="fp")
    assert dataclasses.replace(student, role="teacher").key() != student.key()
    with pytest.raises(UserError, match="a teacher trains on hard labels"):
        dataclasses.replace(BASE, role="teacher")


@pytest.mark.parametrize(
    "change",
    [
        {"recipe": dataclasses.replace(Recipe(), eval_batch_size=7)},  # evaluation is per image in eval mode
        {"teacher_checkpoint": "/somewhere/else/best.pt"},  # a path; the teacher's content is teacher_id
        {"trust_teacher": True},  # allows a run, recorded in its result
        {"allow_teacher_resolution": True},  # the same; the teacher's resolution is in its identity
        {"allow_chance_teacher": True},  # whether a finished teacher counts as failed, not what it learnt
    ],
)
def test_run_settings_leave_the_key_alone(change):
    assert dataclasses.replace(BASE, **change).key() == BASE.key()


def test_auto_device_is_resolved_in_the_key_and_at_plan_time(monkeypatch):
    import kdbench.config

    monkeypatch.setattr(kdbench.config, "gpu_visible", lambda: False)
    assert dataclasses.replace(BASE, device="auto").key() == BASE.key()
    raw = {"name": "t", "grid": {"datasets": ["eurosat"], "methods": ["baseline"]}, "teacher": {"model": "vgg16"}}
    assert {t.config.device for t in plan_trials(parse_ablation(raw, "t"))} == {"cpu"}
    monkeypatch.setattr(kdbench.config, "gpu_visible", lambda: True)
    assert dataclasses.replace(BASE, device="auto").key() == dataclasses.replace(BASE, device="cuda").key()
    assert {t.config.device for t in plan_trials(parse_ablation(raw, "t"))} == {"cuda"}


def test_dataset_fingerprint_follows_the_files_not_the_folder(tmp_path):
    folder = make_image_folder(tmp_path / "a", classes=2, per_class=4, size=16)
    data = DataConfig(dataset=f"imagefolder:{folder}")
    fp = data_fingerprint(data)
    moved = shutil.copytree(folder, tmp_path / "b")
    assert data_fingerprint(DataConfig(dataset=f"imagefolder:{moved}")) == fp  # paths are relative to the dataset folder
    assert data_fingerprint(dataclasses.replace(data, images_per_class=3)) != fp  # only the images used count
    (folder / "class0" / "img000.png").write_bytes((folder / "class0" / "img000.png").read_bytes() + b"\0")
    assert data_fingerprint(data) != fp
    # the same size and modification time, other pixels (an image overwritten in place, its time restored)
    fp, target = data_fingerprint(data), folder / "class1" / "img000.png"
    before, other = target.stat(), (folder / "class1" / "img001.png").read_bytes()
    if len(other) == before.st_size:
        target.write_bytes(other)
    else:
        target.write_bytes(bytes(b ^ 1 for b in target.read_bytes()))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert target.stat().st_size == before.st_size and target.stat().st_mtime_ns == before.st_mtime_ns
    assert data_fingerprint(data) != fp
    make_image_folder(moved, classes=3, per_class=4, size=16)  # adds class2
    assert data_fingerprint(DataConfig(dataset=f"imagefolder:{moved}")) != fp


def test_a_pretrained_state_dict_file_is_keyed_by_its_content_not_its_path(tmp_path):
    import torch

    first, copy = tmp_path / "a.pt", tmp_path / "elsewhere" / "b.pt"
    torch.save({"w": torch.zeros(3)}, first)
    copy.parent.mkdir()
    shutil.copy(first, copy)
    keyed = {p: dataclasses.replace(BASE, recipe=Recipe(pretrained=str(p))).key() for p in (first, copy)}
    assert keyed[first] == keyed[copy] != BASE.key()
    torch.save({"w": torch.ones(3)}, first)  # overwritten in place: the same path, another trial
    assert dataclasses.replace(BASE, recipe=Recipe(pretrained=str(first))).key() != keyed[first]
    assert (
        dataclasses.replace(BASE, recipe=Recipe(pretrained=str(first))).identity()["recipe"]["pretrained"].startswith("sha256:")
    )
    with pytest.raises(UserError, match=r"pretrained state-dict file .*missing.pt cannot be read"):
        dataclasses.replace(BASE, recipe=Recipe(pretrained=str(tmp_path / "missing.pt"))).key()


def test_plan_decides_packing_and_pack_trials_follows_it():
    raw = {
        "name": "t",
        "grid": {"datasets": ["eurosat"], "methods": ["baseline", "kd_kl"], "temperatures": [2.0, 4.0]},
        "teacher": {"model": "vgg16"},
        "loss": {"temperature": 4.0},
    }
    ablation = parse_ablation(raw, "t")
    single, packed = plan_trials(ablation), plan_trials(ablation, pack=4)
    assert not any(t.config.packed for t in single)
    assert {(t.role, t.config.method): t.config.packed for t in packed} == {
        ("teacher", "baseline"): False,
        ("student", "baseline"): True,
        ("student", "kd_kl"): True,
    }
    assert {t.key for t in single}.isdisjoint({t.key for t in packed if t.config.packed})
    units = pack_trials(packed, 4)
    # the baseline (no teacher) is a pack of one; the two kd_kl trials a pack of two; the teacher runs alone
    assert sorted(len(u.members) for u in units) == [0, 1, 2]
    assert all(m.config.packed for u in units for m in u.members) and not any(u.config.packed for u in units if not u.members)
    assert pack_trials(single, 4) == single


def test_dry_run_keys_ignore_workers_threads_and_output_folder(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "d", classes=3, per_class=10, size=16)
    common = ["--dry-run", "--set", f"grid.datasets=['imagefolder:{folder}']", "--set", "run.device='cpu'"]
    a = call_main(sweep_main, [*common, "--out", str(tmp_path / "a")], capsys)
    b = call_main(sweep_main, [*common, "--out", str(tmp_path / "b"), "--workers", "2", "--threads", "1"], capsys)
    assert a.returncode == b.returncode == 0, a.stderr
    keys = lambda out: [line.split()[0] for line in out.splitlines()[1:-1]]  # noqa: E731
    assert keys(a.stdout) == keys(b.stdout) and len(keys(a.stdout)) > 1
    c = call_main(sweep_main, [*common, "--set", "student.eval_batch_size=16"], capsys)
    assert keys(c.stdout) == keys(a.stdout)


# Keys of the paper's methods, pinned: a key changes only on purpose. They moved once with RESULTS_VERSION 3
# (issues 21-22: data fingerprints of file contents, typed results); before, they had not moved since issue 13.
# They moved once more with issue 22's one vocabulary: a key's loss is {alpha, params} where params are the
# method's settled hyperparameters (kd_kl: temperature, beta; kd_cos: gamma, on and, on probs, temperature;
# kd_kl_cos: all four; the baseline and the teacher: {}), no longer the shared temperature/beta/gamma/cosine_on,
# and the trial's role (the teacher is a role, trained on hard labels, not a method named "teacher").
GOLDEN_KEYS = [
    ("baseline", {}, {"role": "teacher"}, "f0fe4e6641d969d6"),
    ("baseline", {}, {}, "b2c63b2230f77469"),
    ("kd_kl", {"temperature": 4.0, "beta": 1.0}, {}, "4cb6060659dbbb24"),
    ("kd_kl", {"temperature": 2.0, "beta": 0.5}, {"seed": 2}, "1620fa4838f4f4f4"),
    ("kd_cos", {"gamma": 1.0}, {}, "403cef058ef370cd"),
    ("kd_cos", {"gamma": 2.0, "temperature": 8.0, "on": "probs"}, {}, "44df67c9669c50cb"),
    ("kd_kl_cos", {}, {}, "d15e606839b64ae7"),
    ("kd_kl_cos", {"temperature": 1.0, "beta": 2.0, "gamma": 0.5, "on": "probs"}, {"packed": True}, "6d4b1fadd012571d"),
]
GOLDEN_PLANS = {"quick": (15, "ed2cb64f041b694e"), "temperature": (144, "f0d9ff5a2b99d488"), "weights": (153, "21d2c81c0a2e1754")}


@pytest.mark.parametrize(("method", "loss", "extra", "key"), GOLDEN_KEYS)
def test_keys_of_the_paper_methods_are_pinned(method, loss, extra, key):
    from kdbench.methods import get_method

    m = get_method(method)
    cfg = TrialConfig(
        method=method,
        data=DataConfig(dataset="eurosat", resolution=32, images_per_class=30),
        recipe=Recipe(epochs=2),
        loss=m.effective_loss(loss_config(**loss)),
        teacher_id="teacher-key" if m.needs_teacher else None,
        device="cpu",
        dataset_fingerprint="fp",
        **extra,
    )
    assert cfg.key() == key


@pytest.mark.parametrize("name", sorted(GOLDEN_PLANS))
def test_plans_of_the_shipped_ablations_are_pinned(name):
    import hashlib

    from kdbench.sweep.ablation import load_ablation

    ablation, _, _ = load_ablation(name, ['run.device="cpu"'])
    keys = sorted(t.key for t in plan_trials(ablation))
    assert (len(keys), hashlib.sha256(" ".join(keys).encode()).hexdigest()[:16]) == GOLDEN_PLANS[name]


def test_a_method_with_its_own_hyperparameters_is_keyed_by_them_and_not_by_the_paper_settings():
    from kdbench.methods import get_method

    dkd = get_method("dkd")

    def key(loss: LossConfig) -> str:
        return dataclasses.replace(BASE, method="dkd", loss=dkd.effective_loss(loss)).key()

    default = key(LossConfig())
    with pytest.raises(UserError, match="dkd has no hyperparameter gamma: its hyperparameters are alpha, beta, temperature"):
        key(loss_config(gamma=0.0))
    assert key(LossConfig(params=(("beta", 8.0),))) == default  # the default value written out
    assert key(LossConfig(params=(("beta", 4.0),))) != default
    assert key(LossConfig(alpha=0.5)) != default  # the shared cross-entropy weight
    identity = dataclasses.replace(BASE, method="dkd", loss=dkd.effective_loss(LossConfig())).identity()
    assert identity["loss"]["params"] == {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}
    assert BASE.identity()["loss"] == {"alpha": 1.0, "params": {"temperature": 4.0, "beta": 1.0}}  # issue 22: every method


def test_a_method_loss_version_keys_that_method_only(monkeypatch):
    """LSKD's formula changed (unbiased deviation, issue 21): its own ``loss_version`` moves its keys, no other method's."""
    from kdbench.methods import METHODS, get_method

    def config(method: str) -> TrialConfig:
        return dataclasses.replace(BASE, method=method, loss=get_method(method).effective_loss(LossConfig()))

    lskd = config("lskd")
    assert lskd.identity()["method_loss_version"] == METHODS["lskd"].loss_version == "2"
    assert lskd.key() == "fef3e135243c7337"
    assert not any("method_loss_version" in config(m).identity() for m in METHODS if m != "lskd")
    others = {m: config(m).key() for m in METHODS if m != "lskd"}
    monkeypatch.setattr(METHODS["lskd"], "loss_version", "3")
    assert lskd.key() != "fef3e135243c7337"
    assert {m: config(m).key() for m in others} == others
