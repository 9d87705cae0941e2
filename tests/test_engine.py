"""Training and evaluation end to end on tiny synthetic data: outputs, resume, determinism, failures, teacher cache."""

import dataclasses
import json
import os

import pytest
import torch
from conftest import assert_one_line_error, call_main, loss_config, make_image_folder, run_cli
from PIL import Image

from kdbench.config import DataConfig, LossConfig, Recipe, TrialConfig
from kdbench.data.decode import decode_image
from kdbench.data.presets import AUGMENTATIONS, apply_views, normalize
from kdbench.digest import file_sha256
from kdbench.engine.runner import run_trial
from kdbench.engine.teacher import OnlineTeacher, build_logit_cache, cached_teacher
from kdbench.models import build_model, load_model_checkpoint, save_checkpoint
from kdbench.records import TrialResult, from_json
from kdbench.train import main as train_main


def tiny_trial(folder, method=None, epochs=3, **kw) -> TrialConfig:
    """A teacher trial (``method`` None) or a student trial by ``method`` on a tiny image folder."""
    return TrialConfig(
        method=method or "baseline",
        role="teacher" if method is None else "student",
        data=DataConfig(dataset=f"imagefolder:{folder}", resolution=16, augment=kw.pop("augment", "d4")),
        recipe=Recipe(model=kw.pop("model", "mobilenet_v2"), epochs=epochs, batch_size=8, lr=kw.pop("lr", 0.05)),
        loss=LossConfig(),
        seed=kw.pop("seed", 0),
        device="cpu",
        **kw,
    )


def test_teacher_then_kd_student_with_the_cli(image_folder, tmp_path):
    teacher = run_cli(
        "kdbench.train",
        "--dataset",
        f"imagefolder:{image_folder}",
        "--model",
        "resnet18",
        "--resolution",
        "16",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--out",
        str(tmp_path / "teacher"),
    )
    assert teacher.returncode == 0, teacher.stderr
    assert "best-on-val" in teacher.stdout and "last epoch" in teacher.stdout
    for name in ("best.pt", "state.pt", "metrics.json", "manifest.csv"):
        assert (tmp_path / "teacher" / name).exists()
    student = run_cli(
        "kdbench.train",
        "--dataset",
        f"imagefolder:{image_folder}",
        "--teacher",
        str(tmp_path / "teacher" / "best.pt"),
        "--resolution",
        "16",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--param",
        "temperature=2",
        "--param",
        "on=probs",
        "--out",
        str(tmp_path / "kd"),
    )
    assert student.returncode == 0, student.stderr
    result = from_json(TrialResult, (tmp_path / "kd" / "metrics.json").read_text(), "metrics.json")  # the typed record
    assert result.config["method"] == "kd_kl_cos" and result.config["recipe"]["model"] == "mobilenet_v2"
    # --param sets the method's settings (issue 22), the others keep kd_kl_cos's published defaults
    assert result.config["loss"] == {"alpha": 1.0, "params": {"temperature": 2.0, "beta": 1.0, "gamma": 1.0, "on": "probs"}}
    assert result.teacher["mode"] == "cache"
    # the student names its teacher by content digest, and that digest is part of its identity
    digest = "sha256:" + file_sha256(tmp_path / "teacher" / "best.pt")
    assert result.teacher["digest"] == digest == result.config["teacher_id"]
    assert result.teacher["trusted_without_provenance"] is False
    assert result.teacher["provenance"]["trial_key"] == json.loads((tmp_path / "teacher" / "metrics.json").read_text())["key"]
    other = torch.load(tmp_path / "teacher" / "best.pt", weights_only=True) | {"note": "same weights, other file"}
    torch.save(other, tmp_path / "teacher2.pt")
    args = [
        "--dataset",
        f"imagefolder:{image_folder}",
        "--resolution",
        "16",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--param",
        "temperature=2",
    ]
    proc = run_cli("kdbench.train", *args, "--teacher", str(tmp_path / "teacher2.pt"), "--out", str(tmp_path / "kd"))
    assert_one_line_error(proc, "holds a different run")
    # a teacher trained on another split has seen this run's val/test images: refused, counted, with the fix
    proc = run_cli(
        "kdbench.train",
        *args,
        "--split-seed",
        "5",
        "--teacher",
        str(tmp_path / "teacher" / "best.pt"),
        "--out",
        str(tmp_path / "s5"),
    )
    line = assert_one_line_error(proc, "was trained on", "validation/test images", "--split-seed 5")
    manifest = (tmp_path / "s5" / "manifest.csv").read_text().splitlines()[1:]
    held_out = {row.split(",")[0] for row in manifest if not row.endswith(",train")}
    teacher_train = set(torch.load(tmp_path / "teacher" / "best.pt", weights_only=True)["provenance"]["train_paths"])
    assert f"on {len(held_out & teacher_train)} of this run's {len(held_out)} " in line and held_out & teacher_train
    assert {"term_ce", "term_kl", "term_cos"} <= set(result.history[0])
    for which in ("best", "last"):
        test = getattr(result, which).test
        assert (
            0 <= test.accuracy <= 1
            and len(test.confusion_matrix) == 3
            and set(test.per_class_accuracy) == {"class0", "class1", "class2"}
        )
        assert all(0 <= v <= 1 for v in (test.macro_precision, test.macro_recall, test.macro_f1))


def test_learns_the_synthetic_task(tmp_path):
    # 40 images per class (24 test images) and a moderate LR: every seed tried reaches 100%, so
    # no single image, and no CPU's rounding, decides the assertion.
    folder = make_image_folder(tmp_path / "d", classes=3, per_class=40)
    result = run_trial(
        tiny_trial(folder, method="baseline", model="resnet18", epochs=6, lr=0.01),
        tmp_path / "run",
        progress=False,
        log=lambda m: None,
    )
    assert result.best.test.accuracy >= 0.75  # classes differ by colour: chance is 0.33


def test_same_seed_same_metrics_and_resume_after_interruption(image_folder, tmp_path):
    cfg = tiny_trial(image_folder, method="baseline", epochs=3)
    quiet = lambda m: None  # noqa: E731
    a = run_trial(cfg, tmp_path / "a", progress=False, log=quiet)
    b = run_trial(cfg, tmp_path / "b", progress=False, log=quiet)
    # per-image test predictions (for the paired statistics) agree with the metrics, and the logits file with both
    targets = torch.tensor(a.test_targets)
    for ckpt in ("best", "last"):
        test = getattr(a, ckpt).test
        hits = (torch.tensor(test.predictions) == targets).double().mean()
        assert float(hits) == pytest.approx(test.accuracy) and len(targets) == test.n
    saved = torch.load(tmp_path / "a" / a.best.test_logits_file, weights_only=True)
    assert tuple(saved["targets"].tolist()) == a.test_targets
    assert tuple(saved["logits"].argmax(1).tolist()) == a.best.test.predictions
    assert a.best.test == b.best.test and a.history[-1]["train_loss"] == b.history[-1]["train_loss"]

    def crash_after_epoch_1(message):  # an epoch is logged once its resume state is written
        if message.startswith("epoch 1/3"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_trial(cfg, tmp_path / "c", progress=False, log=crash_after_epoch_1)
    lines = []
    c = run_trial(cfg, tmp_path / "c", progress=False, log=lines.append)
    assert any(line.startswith("resuming") and "after epoch 1" in line for line in lines)
    assert [h["train_loss"] for h in c.history] == [h["train_loss"] for h in a.history]
    assert c.last.test == a.last.test and c.best.test == a.best.test


# What run_trial gave for the trials of the test below (CPU, float64) before every trial trained with the one
# runner (kdbench.engine.runner), by the code of commit 9a63183: its own run_trial and last.pt.
def _reference_train_losses(cfg: TrialConfig, cache: str | None = None) -> list[float]:
    """Each epoch's mean training loss of ``cfg`` from a plain loop written here: seed, build, then for every batch of
    ``epoch_batches`` one loss, one backward, one optimiser and one scheduler step (and the cached teacher's logits)."""
    from kdbench.data.prepare import prepare_data
    from kdbench.engine.loop import epoch_batches, make_optimizer
    from kdbench.engine.runtime import memory_format
    from kdbench.engine.teacher import CachedTeacher
    from kdbench.engine.trial import make_scheduler
    from kdbench.methods import Outputs, get_method

    data = prepare_data(cfg.data)
    train = data.indices("train")
    images, labels = data.images[train], data.labels[train]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.recipe.model, len(data.classes), cfg.recipe.pretrained)
    model = model.to(memory_format=memory_format(torch.device("cpu")))  # as the runner lays it out (channels_last)
    optimizer = make_optimizer(model.parameters(), cfg.recipe)
    scheduler = make_scheduler(optimizer, cfg.recipe, len(images))
    aug, method = AUGMENTATIONS[cfg.data.augment], get_method(cfg.method)
    teacher = CachedTeacher(torch.load(cache, weights_only=True)["logits"], aug.views) if cache else None
    losses = []
    for epoch in range(cfg.recipe.epochs):
        model.train()
        total, seen = 0.0, 0
        batches = epoch_batches(
            images, labels, aug, batch_size=cfg.recipe.batch_size, seed=cfg.seed, epoch=epoch, device=torch.device("cpu")
        )
        for positions, views, x, y in batches:
            loss, _ = method.loss(Outputs(model(x)), teacher(positions, views, x) if teacher else None, y, cfg.loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total, seen = total + float(loss.detach()) * len(positions), seen + len(positions)
        losses.append(total / seen)
    return losses


def test_a_trial_alone_trains_as_a_plain_loop_does(tmp_path, float64):
    """A teacher, a KD student (teacher-logit cache) and an AdamW one-cycle baseline, each trained alone by the runner,
    give the training losses of a plain loop (:func:`_reference_train_losses`) in the same process.

    Compared with the loop rather than pinned numbers: at 16 px, train-mode batch norm over 1x1 feature maps makes
    these runs chaotic, so another thread count or kernel set (``ATEN_CPU_CAPABILITY``) moves a student's losses
    by percents, even in float64; the same kernels in one process agree to rounding (the ``float64`` fixture).
    """
    folder = make_image_folder(tmp_path / "d", classes=3, per_class=16, size=16)
    quiet = lambda m: None  # noqa: E731
    teacher_cfg = tiny_trial(folder, model="resnet18", epochs=2, lr=0.01)
    teacher = run_trial(teacher_cfg, tmp_path / "t", progress=False, log=quiet)
    kd = tiny_trial(folder, method="kd_kl_cos", seed=3, lr=0.01, teacher_checkpoint=str(tmp_path / "t" / "best.pt"))
    kd = dataclasses.replace(kd, loss=loss_config(temperature=2.0, gamma=0.5))
    student = run_trial(kd, tmp_path / "s", progress=False, log=quiet)
    base = tiny_trial(folder, method="baseline", epochs=2, seed=1, lr=0.01)
    base = dataclasses.replace(base, recipe=dataclasses.replace(base.recipe, optimizer="adamw", schedule="onecycle"))
    baseline = run_trial(base, tmp_path / "b", progress=False, log=quiet)
    assert student.teacher["mode"] == "cache" and student.pack is None
    runs = ((teacher_cfg, teacher, None), (kd, student, student.teacher["cache"]), (base, baseline, None))
    for cfg, result, cache in runs:
        reference = _reference_train_losses(cfg, cache)
        assert [h["train_loss"] for h in result.history] == pytest.approx(reference, rel=1e-9), cfg.method


def test_a_folder_of_another_run_is_refused(image_folder, tmp_path):
    run_trial(tiny_trial(image_folder, method="baseline", epochs=1), tmp_path / "r", progress=False, log=lambda m: None)
    proc = run_cli(
        "kdbench.train",
        "--dataset",
        f"imagefolder:{image_folder}",
        "--method",
        "baseline",
        "--resolution",
        "16",
        "--epochs",
        "2",
        "--out",
        str(tmp_path / "r"),
    )
    assert_one_line_error(proc, "holds a different run")


def test_a_teacher_trained_at_another_resolution_is_refused_unless_asked_for(image_folder, tmp_path, capsys):
    data = ["--dataset", f"imagefolder:{image_folder}", "--epochs", "1", "--batch-size", "8"]
    teacher = [*data, "--resolution", "64", "--allow-chance-teacher", "--out", str(tmp_path / "t")]
    assert call_main(train_main, teacher, capsys).returncode == 0
    kd = [*data, "--teacher", str(tmp_path / "t" / "best.pt"), "--method", "kd_kl", "--resolution", "32"]
    assert_one_line_error(run_cli("kdbench.train", *kd, "--out", str(tmp_path / "s")), "trained at 64 px", "at 32 px")
    proc = call_main(train_main, [*kd, "--allow-teacher-resolution", "--out", str(tmp_path / "s")], capsys)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "s" / "metrics.json").read_text())["teacher"]
    assert record["trained_resolution"] == 64 and record["resolution_mismatch_allowed"]


def test_nan_teacher_stops_the_student_with_a_clear_error(image_folder, tmp_path, capsys):
    teacher = build_model("mobilenet_v2", 3)
    with torch.no_grad():  # finite weights whose logits overflow to inf: features of 1 (batch-norm shift) times 3e38
        teacher.features[-1][1].bias.fill_(1.0)
        teacher.classifier[-1].weight.fill_(3e38)
    save_checkpoint(tmp_path / "inf.pt", teacher, model_name="mobilenet_v2", classes=["class0", "class1", "class2"])
    args = ["--dataset", f"imagefolder:{image_folder}", "--teacher", str(tmp_path / "inf.pt"), "--resolution", "16"]
    # a checkpoint without provenance (foreign, or from an older kdbench) is refused unless trusted explicitly
    assert_one_line_error(run_cli("kdbench.train", *args, "--out", str(tmp_path / "kd")), "no provenance", "--trust-teacher")
    proc = run_cli("kdbench.train", *args, "--trust-teacher", "--epochs", "1", "--out", str(tmp_path / "kd"))
    assert_one_line_error(proc, "NaN or infinite values in the logits of teacher", "inf.pt")
    assert not (tmp_path / "kd" / "metrics.json").exists()
    # a teacher checkpoint holding a NaN weight is refused when loaded, naming the tensor
    with torch.no_grad():
        teacher.classifier[-1].weight[0, 0] = float("nan")
    save_checkpoint(tmp_path / "nan.pt", teacher, model_name="mobilenet_v2", classes=["class0", "class1", "class2"])
    args[3] = str(tmp_path / "nan.pt")
    proc = call_main(train_main, [*args, "--trust-teacher", "--epochs", "1", "--out", str(tmp_path / "kd2")], capsys)
    assert_one_line_error(proc, "NaN or infinite values in classifier.1.weight of checkpoint", "nan.pt")
    assert not (tmp_path / "kd2" / "state.pt").exists()


def _poison_at(monkeypatch, spoil):
    """Run trials whose models pass through ``spoil(model, stage)``: stage ``("trained", epoch)`` after each
    epoch's training (epoch from 1), ``("eval", epoch)`` on each evaluation forward (epoch 0: final scoring),
    whose output it returns."""
    from kdbench.engine import runner
    from kdbench.engine import trial as trial_engine

    stage = {"epoch": 0}
    real_epoch, real_build, real_result, real_load = (
        runner.train_members_epoch,
        runner.build_model,
        runner.build_result,
        trial_engine.load_model_checkpoint,
    )

    def hook(model, inputs, output):
        return output if model.training else spoil(output, ("eval", stage["epoch"]))

    def train_members_epoch(model, *args, epoch, **kwargs):
        stats = real_epoch(model, *args, epoch=epoch, **kwargs)
        stage["epoch"] = epoch + 1
        spoil(model, ("trained", epoch + 1))
        return stats

    def build_model(*args, **kwargs):
        model = real_build(*args, **kwargs)
        model.register_forward_hook(hook)
        return model

    def build_result(*args, **kwargs):
        stage["epoch"] = 0
        return real_result(*args, **kwargs)

    def load_model_checkpoint(path):
        model, ckpt = real_load(path)
        model.register_forward_hook(hook)
        return model, ckpt

    monkeypatch.setattr(runner, "train_members_epoch", train_members_epoch)
    monkeypatch.setattr(runner, "build_model", build_model)
    monkeypatch.setattr(runner, "build_result", build_result)
    monkeypatch.setattr(trial_engine, "load_model_checkpoint", load_model_checkpoint)  # best.pt, scored by build_result


def _epoch_of(path):
    return torch.load(path, weights_only=True)["epoch"]


def test_nan_validation_logits_fail_the_epoch_and_never_become_best(image_folder, tmp_path, monkeypatch):
    """Logits that are NaN at evaluation only (all predicted class 0) stop the trial at that epoch, before any save."""
    from kdbench.errors import NonFiniteError

    _poison_at(monkeypatch, lambda out, stage: out * float("nan") if stage == ("eval", 2) else out)
    with pytest.raises(NonFiniteError) as err:
        run_trial(tiny_trial(image_folder, method="baseline", epochs=3), tmp_path / "r", progress=False, log=lambda m: None)
    assert str(err.value).startswith("NaN or infinite values in validation logits at epoch 2 (")
    assert "\n" not in str(err.value)
    assert _epoch_of(tmp_path / "r" / "state.pt") == 1 and _epoch_of(tmp_path / "r" / "best.pt") == 1
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_nan_test_logits_are_never_scored(image_folder, tmp_path, monkeypatch):
    from kdbench.errors import NonFiniteError

    calls = []

    def second_final_forward(out, stage):  # final scoring: best weights' validation, then their test split
        calls.append(stage)
        return out * float("nan") if calls.count(("eval", 0)) == 2 and stage == ("eval", 0) else out

    _poison_at(monkeypatch, second_final_forward)
    with pytest.raises(
        NonFiniteError, match=r"^NaN or infinite values in test logits of the best-on-validation weights \(epoch \d\)"
    ):
        run_trial(tiny_trial(image_folder, method="baseline", epochs=1), tmp_path / "r", progress=False, log=lambda m: None)
    assert not (tmp_path / "r" / "metrics.json").exists() and not (tmp_path / "r" / "test_logits.pt").exists()


def test_infinite_batch_norm_statistics_fail_the_epoch_and_the_resume(image_folder, tmp_path, monkeypatch):
    """A running_var that went inf in epoch 2's training: the trial fails naming it, and state.pt/best.pt stay epoch 1's."""
    from kdbench.errors import NonFiniteError

    name = "features.3.conv.1.1.running_var"

    def spoil(model, stage):
        if stage == ("trained", 2):
            model.get_buffer(name)[:3] = float("inf")
        return model

    cfg = tiny_trial(image_folder, method="baseline", epochs=3)
    with monkeypatch.context() as mp, pytest.raises(NonFiniteError) as err:
        _poison_at(mp, spoil)
        run_trial(cfg, tmp_path / "r", progress=False, log=lambda m: None)
    assert str(err.value) == (
        f"NaN or infinite values in {name} of the model after training epoch 2: "
        "lower the learning rate or check the teacher and data"
    )
    state = torch.load(tmp_path / "r" / "state.pt", weights_only=True)
    assert state["epoch"] == 1 and torch.isfinite(state["state_dict"][name]).all()
    assert _epoch_of(tmp_path / "r" / "best.pt") == 1 and not (tmp_path / "r" / "metrics.json").exists()
    # a resume state holding an infinite buffer (written by a kdbench without this check) is refused, not resumed
    state["state_dict"][name][0] = float("inf")
    torch.save(state, tmp_path / "r" / "state.pt")
    with pytest.raises(NonFiniteError, match=rf"^NaN or infinite values in {name} of the resume state .*state.pt \(epoch 1\)"):
        run_trial(cfg, tmp_path / "r", progress=False, log=lambda m: None)


def test_exploding_or_non_finite_loss_fails_the_trial(image_folder, tmp_path, monkeypatch):
    """An epoch mean loss over 100x the first epoch's fails the run, as does a NaN/inf (overflowed) step loss."""
    from kdbench.engine import loop, runner
    from kdbench.errors import NonFiniteError

    real_epoch = runner.train_members_epoch

    def epoch_2_explodes(*args, epoch, **kwargs):
        stats = real_epoch(*args, epoch=epoch, **kwargs)
        return [dataclasses.replace(s, loss=s.loss * 1e3) for s in stats] if epoch == 1 else stats

    monkeypatch.setattr(runner, "train_members_epoch", epoch_2_explodes)
    with pytest.raises(NonFiniteError, match=r"exploded: epoch 2 mean loss .* over 100x epoch 1"):
        run_trial(tiny_trial(image_folder, method="baseline", epochs=2), tmp_path / "x", progress=False, log=lambda m: None)
    assert not (tmp_path / "x" / "metrics.json").exists()
    monkeypatch.undo()

    real_losses = loop._member_losses

    def overflow(*args):
        losses, scalars, layout = real_losses(*args)
        return [loss * float("inf") for loss in losses], scalars * float("inf"), layout

    monkeypatch.setattr(loop, "_member_losses", overflow)
    with pytest.raises(NonFiniteError, match="non-finite loss at epoch 1, step 1"):
        run_trial(tiny_trial(image_folder, method="baseline", epochs=1), tmp_path / "y", progress=False, log=lambda m: None)


def test_teacher_of_other_classes_and_bad_checkpoint(image_folder, tmp_path):
    other = build_model("mobilenet_v2", 2)
    save_checkpoint(tmp_path / "other.pt", other, model_name="mobilenet_v2", classes=["x", "y"])
    proc = run_cli(
        "kdbench.train",
        "--dataset",
        f"imagefolder:{image_folder}",
        "--teacher",
        str(tmp_path / "other.pt"),
        "--resolution",
        "16",
        "--out",
        str(tmp_path / "kd"),
    )
    assert_one_line_error(proc, "same dataset")
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    proc = run_cli(
        "kdbench.train",
        "--dataset",
        f"imagefolder:{image_folder}",
        "--teacher",
        str(tmp_path / "junk.pt"),
        "--resolution",
        "16",
        "--out",
        str(tmp_path / "kd2"),
    )
    assert_one_line_error(proc, "cannot be read")


@pytest.mark.parametrize(
    "bad, needle",
    [
        (["--param", "temperature=0"], "kd_kl_cos.temperature must be > 0"),
        (["--alpha", "0", "--param", "beta=0", "--param", "gamma=0"], "all 0"),
        (["--param", "beta=-1"], "beta"),
        (["--param", "tau=2"], "kd_kl_cos has no setting 'tau': its settings are temperature, beta, gamma, on"),
        (["--param", "on=features"], "kd_kl_cos.on must be one of logits, probs"),
        (
            ["--param", "beta=big"],
            "beta must be a number, e.g. --param beta=4 (kd_kl_cos's settings: temperature, beta, gamma, on)",
        ),
        (["--model", "nonet"], "unknown model"),
        (["--lr", "nan"], "recipe.lr must be in (0, 10]"),
        (["--lr", "1e6"], "recipe.lr must be in (0, 10]"),
        (["--momentum", "5"], "recipe.momentum must be in [0, 1)"),
        (["--weight-decay", "inf"], "recipe.weight_decay must be in [0, 1)"),
        (["--val-fraction", "0.5", "--test-fraction", "0.45"], "leaves images to train on"),
        (["--alpha", "nan"], "alpha must be a finite number"),
    ],
)
def test_bad_cli_values_are_one_line(image_folder, tmp_path, capsys, bad, needle):
    torch.save({}, tmp_path / "t.pt")
    proc = call_main(
        train_main,
        [
            "--dataset",
            f"imagefolder:{image_folder}",
            "--teacher",
            str(tmp_path / "t.pt"),
            "--out",
            str(tmp_path / "o"),
            *bad,
        ],
        capsys,
    )
    assert_one_line_error(proc, needle)


def test_cached_teacher_equals_the_online_teacher_on_augmented_batches(tmp_path):
    torch.manual_seed(0)
    folder = make_image_folder(tmp_path / "d", classes=3, per_class=5, size=16)
    from kdbench.data.decode import load_images
    from kdbench.data.index import scan_folder

    images, _ = load_images(folder, scan_folder(folder).paths, 16)
    teacher = build_model("resnet18", 3).eval()
    with torch.no_grad():  # make batch-norm statistics non-trivial
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    aug = AUGMENTATIONS["d4"]
    cache = cached_teacher(teacher, tmp_path / "logits.pt", images, aug, batch_size=4, device=torch.device("cpu"), source="t")
    online = OnlineTeacher(teacher, "t")
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        positions = torch.randperm(len(images), generator=generator)[:6]
        views = aug.sample_views(6, generator)
        inputs = normalize(aug(images[positions], views, generator))
        looked_up, ran = cache(positions, views, inputs).logits, online(positions, views, inputs).logits
        torch.testing.assert_close(looked_up, ran, rtol=1e-5, atol=1e-5)
    # the file is reused, not rebuilt
    again = cached_teacher(None, tmp_path / "logits.pt", images, aug, batch_size=4, device=torch.device("cpu"), source="t")
    assert torch.equal(again.logits, cache.logits)
    assert build_logit_cache(teacher, images[:2], aug, batch_size=2, device=torch.device("cpu"), source="t").shape == (
        2,
        8,
        3,
    )
    assert torch.equal(apply_views(images[:1], torch.tensor([5]))[0], torch.rot90(images[0].flip(-1), 1, dims=(-2, -1)))


def test_a_logit_cache_on_disk_holding_nan_is_refused(tmp_path):
    from kdbench.data.decode import load_images
    from kdbench.data.index import scan_folder
    from kdbench.errors import NonFiniteError

    folder = make_image_folder(tmp_path / "d", classes=3, per_class=2, size=16)
    images, _ = load_images(folder, scan_folder(folder).paths, 16)
    teacher, aug, cpu = build_model("mobilenet_v2", 3).eval(), AUGMENTATIONS["d4"], torch.device("cpu")
    path = tmp_path / "logits.pt"
    cached_teacher(teacher, path, images, aug, batch_size=4, device=cpu, source="t")
    stored = torch.load(path, weights_only=True)
    stored["logits"][2, 5, 1] = float("nan")
    torch.save(stored, path)
    with pytest.raises(NonFiniteError, match=r"^NaN or infinite values in the teacher logit cache .*logits.pt \(1 of 6 images\)"):
        cached_teacher(teacher, path, images, aug, batch_size=4, device=cpu, source="t")


def test_continuous_augmentation_falls_back_to_the_online_teacher(image_folder, tmp_path):
    teacher = run_trial(tiny_trial(image_folder, epochs=1), tmp_path / "t", progress=False, log=lambda m: None)
    cfg = tiny_trial(
        image_folder, method="kd_kl", epochs=1, augment="d4_crop", teacher_checkpoint=str(tmp_path / "t" / "best.pt")
    )
    lines = []
    result = run_trial(cfg, tmp_path / "s", progress=False, log=lines.append)
    assert teacher.teacher is None
    assert result.teacher["mode"] == "online" and "d4_crop" in result.teacher["why"]
    assert any("running the teacher online" in line for line in lines)


def test_an_image_overwritten_in_place_gets_a_new_teacher_cache(image_folder, tmp_path):
    """The logit cache is keyed by the training images' content: a changed image is never looked up in an old cache."""
    run_trial(tiny_trial(image_folder, model="resnet18", epochs=1), tmp_path / "t", progress=False, log=lambda m: None)
    cfg = tiny_trial(image_folder, method="kd_kl", epochs=1, teacher_checkpoint=str(tmp_path / "t" / "best.pt"))
    first = run_trial(cfg, tmp_path / "s1", progress=False, log=lambda m: None)
    train = [
        row.split(",")[0] for row in (tmp_path / "s1" / "manifest.csv").read_text().splitlines()[1:] if row.endswith("train")
    ]
    target = image_folder / train[0]
    stamp = target.stat()
    pixels = torch.flip(decode_image(target, 24), dims=(1,)).permute(1, 2, 0).numpy()  # another scene, same file name
    Image.fromarray(pixels).save(target)
    os.utime(target, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    cfg = dataclasses.replace(cfg, dataset_fingerprint=None)
    second = run_trial(cfg, tmp_path / "s2", progress=False, log=lambda m: None)
    assert second.teacher["cache"] != first.teacher["cache"]
    cache = torch.load(second.teacher["cache"], weights_only=True)["logits"]
    teacher = load_model_checkpoint(tmp_path / "t" / "best.pt")[0].eval()
    with torch.no_grad():
        online = teacher(normalize(decode_image(target, 16).unsqueeze(0)))[0]
    torch.testing.assert_close(cache[0, 0], online, rtol=1e-4, atol=1e-4 * float(online.abs().max()))


def test_logit_cache_and_online_teacher_give_the_same_trial(image_folder, tmp_path, monkeypatch, float64):
    """End to end on CPU: a KD run with the teacher-logit cache equals the same run with the teacher online.

    The cache runs the teacher on batches of ``eval_batch_size`` images, the online teacher on the
    training batches: other shapes, so other kernels and rounding (about 1e-7 in float32), which two
    training trajectories amplify to 1e-3 (an Intel AVX-512 VM: train_loss 19.5104 vs 19.5442).  So
    this runs in float64 (the ``float64`` fixture), where the same amplification leaves about 1e-12
    against the 1e-8 tolerance; the per-batch agreement in float32 is
    ``test_cached_teacher_equals_the_online_teacher_on_augmented_batches``.  Checked passing with
    ``ATEN_CPU_CAPABILITY`` = default, avx2 and avx512, each with 1 and 2 threads (BENCHMARKS.md).
    """
    run_trial(tiny_trial(image_folder, model="resnet18", epochs=1), tmp_path / "t", progress=False, log=lambda m: None)
    cfg = tiny_trial(image_folder, method="kd_kl_cos", epochs=2, teacher_checkpoint=str(tmp_path / "t" / "best.pt"))
    cached = run_trial(cfg, tmp_path / "cached", progress=False, log=lambda m: None)
    # the same d4 augmentation (same batches and views), declared not cacheable: teacher_source runs the teacher online
    monkeypatch.setattr(type(AUGMENTATIONS["d4"]), "cacheable", property(lambda self: False))
    online = run_trial(cfg, tmp_path / "online", progress=False, log=lambda m: None)
    assert cached.teacher["mode"] == "cache" and online.teacher["mode"] == "online"
    assert cached.key == online.key
    assert torch.load(cached.teacher["cache"], weights_only=True)["logits"].dtype == torch.float64
    for a, b in zip(cached.history, online.history):
        for k in ("train_loss", "term_ce", "term_kl", "term_cos", "val_loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-8, abs=1e-10), k
    for which in ("best", "last"):
        assert getattr(cached, which).test.accuracy == getattr(online, which).test.accuracy
        assert getattr(cached, which).test.confusion_matrix == getattr(online, which).test.confusion_matrix


def test_a_student_of_a_replaced_teacher_checkpoint_trains_again(image_folder, tmp_path):
    """A student's key names its teacher by trial key in a sweep; the checkpoint's content decides reuse.

    A finished result (metrics.json) or a resume state (state.pt) from another teacher checkpoint at
    the same path is never reused: the worker trains the student again, from scratch.
    """
    from kdbench.data.select import data_fingerprint
    from kdbench.sweep.plan import PlannedTrial
    from kdbench.sweep.worker import SweepContext, execute_trial, trial_dir

    out = tmp_path / "sweep"
    teacher = tiny_trial(image_folder, model="resnet18", epochs=1)
    run_trial(teacher, trial_dir(out, "T"), progress=False, log=lambda m: None)
    student = tiny_trial(image_folder, method="kd_kl", epochs=1, teacher_id="T")
    student = dataclasses.replace(student, dataset_fingerprint=data_fingerprint(student.data))
    planned = PlannedTrial(student.key(), student, teacher_key="T")
    ctx = SweepContext(str(out), threads=1)
    first = execute_trial(planned, ctx)
    assert first.status == "done" and not first.recovered, first.error
    assert execute_trial(planned, ctx).recovered  # the same teacher: the finished result is reused
    run_trial(dataclasses.replace(teacher, seed=1), tmp_path / "t2", progress=False, log=lambda m: None)
    (trial_dir(out, "T") / "best.pt").write_bytes((tmp_path / "t2" / "best.pt").read_bytes())  # re-trained in place
    again = execute_trial(planned, ctx)
    assert again.status == "done" and not again.recovered, again.error
    assert again.result.teacher["digest"] != first.result.teacher["digest"]
    log = (trial_dir(out, planned.key) / "train.log").read_text()
    assert "trained from another teacher checkpoint (same trial): starting this trial from scratch" in log


def test_a_rerun_at_a_fixed_thread_count_is_bitwise_equal_and_records_it(image_folder, tmp_path):
    """What kdbench promises (README, Reproducibility): at one thread count, teacher source and machine, a rerun gives
    bitwise the same history and metrics; the thread count (not in the key) is in the result's environment."""
    torch.set_num_threads(1)  # the conftest fixture restores the count
    cfg = tiny_trial(image_folder, method="baseline", epochs=2)
    a = run_trial(cfg, tmp_path / "a", progress=False, log=lambda m: None)
    b = run_trial(cfg, tmp_path / "b", progress=False, log=lambda m: None)
    same = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")
    assert [{k: h[k] for k in same} for h in a.history] == [{k: h[k] for k in same} for h in b.history]
    assert (a.best, a.last) == (b.best, b.last) and a.key == b.key
    assert a.environment["torch_threads"] == 1 and a.environment["memory_format"] == "channels_last"
