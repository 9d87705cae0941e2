"""FitNet, AT, RKD, CRD and ReviewKD end to end: planned, trained (online teacher, learnable parts) and reported by a
sweep; a resumed FitNet or CRD trial (CRD: its memory bank and negatives too) equals an uninterrupted one; a pair whose
stages cannot be matched is refused when planning."""

import dataclasses
import json
import sqlite3

import pytest
import torch
from conftest import assert_one_line_error, make_image_folder, run_cli

from kdbench.config import DataConfig, LossConfig, Recipe, TrialConfig
from kdbench.engine.runner import run_trial
from kdbench.models import load_model_checkpoint

ABLATION = """
name = "features"
[grid]
datasets = ["imagefolder:{folder}"]
methods = ["fitnet", "at", "rkd", "crd", "reviewkd"]  # and their teacher (a role: trained for them)
seeds = [0]
[data]
resolution = 32
[teacher]
model = "vgg16"
epochs = 1
batch_size = 8
lr = 0.01
[student]
model = "mobilenet_v2"
epochs = 2
batch_size = 8
[run]
device = "cpu"
allow_chance_teacher = true
"""

TERMS = {"fitnet": ["hint"], "at": ["at"], "rkd": ["distance", "angle"], "crd": ["crd"], "reviewkd": ["hcl"]}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    folder = make_image_folder(root / "data", classes=3, per_class=10, size=32)
    (root / "features.toml").write_text(ABLATION.format(folder=folder))
    proc = run_cli("kdbench.sweep", "--config", str(root / "features.toml"), "--out", str(root / "out"), "--threads", "1")
    return root, proc


def test_the_feature_methods_are_planned_trained_and_reported_by_a_sweep(sweep):
    root, proc = sweep
    out = root / "out"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "trials: 6 total, 6 done, 0 failed" in proc.stdout
    db = sqlite3.connect(out / "store.sqlite")
    rows = {m: json.loads(r) for m, r in db.execute("SELECT method, result FROM trials WHERE role = 'student'")}
    db.close()
    assert sorted(rows) == ["at", "crd", "fitnet", "reviewkd", "rkd"]
    for method, result in rows.items():
        # the teacher's features come from its feature cache (kdbench.engine.feature_cache), fp16 in fp32 training
        assert result["teacher"]["mode"] == "cache" and result["teacher"]["feature_cache_bytes"] > 0
        assert {f["dtype"] for f in result["teacher"]["features"].values()} == {"float16"}
        for term in TERMS[method]:
            assert all(torch.isfinite(torch.tensor(h[f"term_{term}"])) for h in result["history"]), method
    # FitNet's regressor (VGG16 stage 2: 512 channels; MobileNetV2's: 32): counted apart, not in the student
    assert rows["fitnet"]["method_parts"] == {"parameters": 32 * 512 + 512 + 2 * 512}
    assert rows["at"]["method_parts"] is None and rows["rkd"]["method_parts"] is None
    # CRD's embeddings of the pooled features (MobileNetV2: 1280-d, VGG16: 512-d) to 128-d; the memory bank is buffers
    assert rows["crd"]["method_parts"] == {"parameters": 1280 * 128 + 128 + 512 * 128 + 128}
    assert rows["reviewkd"]["method_parts"]["parameters"] > 0
    report = (out / "report.md").read_text()
    labels = ("FitNet", "AT", "RKD", "CRD", "ReviewKD", "weight 100", "distance 25, angle 50")
    settings = (r"CRD: weight 0.8, feat\_dim 128, nce\_k 16384", r"ReviewKD: weight 1, max\_mid\_channel 512")  # markdown
    assert all(label in report for label in (*labels, *settings))


def test_the_student_checkpoint_is_a_plain_student_and_the_resume_state_holds_the_regressor(sweep):
    root, proc = sweep
    assert proc.returncode == 0, proc.stdout + proc.stderr
    db = sqlite3.connect(root / "out" / "store.sqlite")
    ((key,),) = db.execute("SELECT key FROM trials WHERE method = 'fitnet'").fetchall()
    db.close()
    (folder,) = [p for p in (root / "out" / "trials").iterdir() if key.startswith(p.name)]
    model, ckpt = load_model_checkpoint(folder / "best.pt")  # loads strictly into a plain torchvision mobilenet_v2
    assert type(model).__name__ == "MobileNetV2" and not any(k.startswith(("0.", "1.")) for k in ckpt["state_dict"])
    state = torch.load(folder / "state.pt", weights_only=True)
    (parts,) = state["parts"]
    assert parts["0.weight"].shape == (512, 32, 1, 1) and "1.running_var" in parts


@pytest.mark.parametrize(
    ("method", "params", "term", "parts"),
    [
        ("fitnet", (("weight", 10.0),), "hint", "4,480"),  # 32 -> 128 channels
        ("crd", (), "crd", f"{1280 * 128 + 128 + 512 * 128 + 128:,}"),  # pooled 1280-d and 512-d to 128-d; the bank is buffers
    ],
)
def test_a_resumed_trial_equals_an_uninterrupted_one(tmp_path, method, params, term, parts):
    """The resume state holds the learnable parts: FitNet's regressor; CRD's heads, memory bank, Z and generator."""
    folder = make_image_folder(tmp_path / "d", classes=3, per_class=8, size=32)
    data = DataConfig(dataset=f"imagefolder:{folder}", resolution=32)
    quiet = lambda m: None  # noqa: E731
    teacher = TrialConfig(
        role="teacher", method="baseline", data=data, recipe=Recipe(model="resnet18", epochs=1, batch_size=8), device="cpu"
    )
    run_trial(dataclasses.replace(teacher, allow_chance_teacher=True), tmp_path / "t", progress=False, log=quiet)
    cfg = TrialConfig(
        method=method,
        data=data,
        recipe=Recipe(model="mobilenet_v2", epochs=3, batch_size=8, lr=0.01),
        loss=LossConfig(params=params),
        device="cpu",
        teacher_checkpoint=str(tmp_path / "t" / "best.pt"),
    )
    lines = []
    a = run_trial(cfg, tmp_path / "a", progress=False, log=lines.append)
    assert f"{method}: learnable parts of {parts} parameters, trained with the student, not deployed" in lines

    def crash_after_epoch_1(message):  # an epoch is logged once its resume state is written
        if message.startswith("epoch 1/3"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_trial(cfg, tmp_path / "b", progress=False, log=crash_after_epoch_1)
    lines = []
    b = run_trial(cfg, tmp_path / "b", progress=False, log=lines.append)
    assert any(line.startswith("resuming") and "after epoch 1" in line for line in lines)
    assert [h[f"term_{term}"] for h in b.history] == [h[f"term_{term}"] for h in a.history]
    assert [h["train_loss"] for h in b.history] == [h["train_loss"] for h in a.history]
    assert b.last.test == a.last.test and b.best.test == a.best.test


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        (
            'teacher.model="efficientnet_b0"',
            "fitnet distils stage features, and kdbench maps no stages of the teacher efficientnet_b0",
        ),
        ("data.resolution=48", "data.resolution must be a multiple of 32"),
    ],
)
def test_a_pair_whose_stages_cannot_be_matched_is_refused_when_planning(tmp_path, override, needle):
    folder = make_image_folder(tmp_path / "data", classes=3, per_class=4, size=16)
    (tmp_path / "f.toml").write_text(ABLATION.format(folder=folder))
    proc = run_cli("kdbench.sweep", "--config", str(tmp_path / "f.toml"), "--dry-run", "--set", override)
    assert_one_line_error(proc, needle)


def test_the_cost_estimate_charges_each_set_of_teacher_features_one_cache_pass(tmp_path):
    """A student shares its teacher's logit cache; each distinct set of features adds one pass over the views
    (the feature cache), and nobody runs the teacher online with a finite augmentation."""
    from kdbench.sweep.ablation import load_ablation
    from kdbench.sweep.cost import DatasetCounts, counts_key, estimate_seconds, online, sweep_seconds, teacher_seconds
    from kdbench.sweep.plan import plan_trials

    (tmp_path / "f.toml").write_text(ABLATION.format(folder=tmp_path))
    methods = 'grid.methods=["kd_kl", "fitnet", "at", "rkd", "crd", "reviewkd"]'
    ablation, _, _ = load_ablation(str(tmp_path / "f.toml"), [methods])
    trials = plan_trials(ablation)
    teacher = next(t for t in trials if t.role == "teacher")
    assert not online(teacher)
    n = DatasetCounts(tmp_path, ["a", "b", "c"], [10] * 3, [10] * 3, train=21, val=3, test=6)
    counts = {counts_key(teacher.config.data): n}
    one_pass = teacher_seconds(teacher, trials[1], n, 1)
    # logits, then stage:2 (FitNet), stages 1-4 (AT), pooled (RKD and CRD: one set), stages 1-4 + pooled (ReviewKD)
    expected = sum(estimate_seconds(t, n) for t in trials) + 5 * one_pass
    assert sweep_seconds(trials, counts) == pytest.approx(expected)
    assert not any(t.config.packed for t in plan_trials(ablation, pack=4) if t.config.method != "kd_kl")
