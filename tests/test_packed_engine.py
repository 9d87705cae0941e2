"""Packed students (kdbench.engine.packed, trained by kdbench.engine.runner) against separate run_trial runs, on tiny
synthetic data (CPU)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torchvision
from conftest import loss_config, make_image_folder

from kdbench.config import DataConfig, LossConfig, Recipe, TrialConfig
from kdbench.data.presets import AUGMENTATIONS
from kdbench.engine import packed as packed_engine
from kdbench.engine import runner
from kdbench.engine import trial as trial_engine
from kdbench.engine.pack_rules import check_pack, compatible_key
from kdbench.engine.packed import MemberLoss, init_pack, train_pack_epoch
from kdbench.engine.runner import run_trial, run_trials
from kdbench.errors import NonFiniteError
from kdbench.methods import Outputs, get_method
from kdbench.models import build_model, load_model_checkpoint

QUIET = lambda message: None  # noqa: E731
KD_LOSSES = {
    "kd_kl": loss_config(temperature=2.0, beta=1.0),
    "kd_cos": loss_config(gamma=0.5),
    "kd_kl_cos": loss_config(temperature=4.0, beta=0.5, gamma=1.0),
}
# a pack mixing methods with their own hyperparameters and one of the paper's
MIXED_LOSSES = {
    "dkd": LossConfig(params=(("beta", 4.0),)),
    "dist": LossConfig(),
    "kd_kl_cos": loss_config(temperature=4.0, beta=0.5, gamma=1.0),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Models this tiny gain nothing from more threads, and lose a lot on a busy shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny image folder and a resnet18 teacher trained on it for one epoch with run_trial.

    3 classes x 10 images give 21 training images, fewer than a batch (32): every epoch is one step.
    """
    root = tmp_path_factory.mktemp("packed")
    with pytest.MonkeyPatch.context() as mp:  # conftest's cache isolation is per test and starts after this fixture
        mp.setenv("KDBENCH_CACHE", str(tmp_path_factory.getbasetemp() / "kdbench-cache"))
        mp.setenv("KDBENCH_NO_DOWNLOAD", "1")
        folder = make_image_folder(root / "data", classes=3, per_class=10, size=16)
        run_trial(
            _cfg(folder, "baseline", model="resnet18", epochs=1, role="teacher"), root / "teacher", progress=False, log=QUIET
        )
    return folder, str(root / "teacher" / "best.pt")


def _cfg(folder, method, *, model="mobilenet_v2", epochs=2, loss=None, teacher=None, seed=0, role="student") -> TrialConfig:
    return TrialConfig(
        method=method,
        role=role,
        data=DataConfig(dataset=f"imagefolder:{folder}", resolution=16),
        recipe=Recipe(model=model, epochs=epochs, batch_size=32, lr=0.05),
        loss=loss or LossConfig(),
        seed=seed,
        teacher_checkpoint=teacher if get_method(method).needs_teacher else None,
        teacher_id=f"id of {teacher}" if get_method(method).needs_teacher else None,
        device="cpu",
    )


def run_packed_trials(cfgs, out_dirs, **kwargs):
    """``cfgs`` trained as one pack (planned packed, as the sweep plans them)."""
    return run_trials([dataclasses.replace(cfg, packed=True) for cfg in cfgs], out_dirs, **kwargs)


def _no_dropout(monkeypatch) -> None:
    """Members without dropout (its masks differ between packed and separate models); init RNG use is unchanged."""
    real = runner.build_model

    def build(name, num_classes, pretrained="none"):
        model = real(name, num_classes, pretrained)
        model.classifier[0].p = 0.0
        return model

    monkeypatch.setattr(runner, "build_model", build)
    monkeypatch.setattr(packed_engine, "build_model", build)


def _update(checkpoint, init: dict) -> torch.Tensor:
    """All parameters of ``checkpoint`` minus ``init``, flattened."""
    model, _ = load_model_checkpoint(checkpoint)
    return torch.cat([(p - init[name]).detach().flatten() for name, p in model.named_parameters()])


def test_initial_members_equal_fresh_separate_models(setup):
    folder, teacher = setup
    cfgs = [_cfg(folder, m, loss=loss, teacher=teacher) for m, loss in KD_LOSSES.items()]
    members = init_pack(cfgs, 3).unpack()
    torch.manual_seed(0)
    fresh = build_model("mobilenet_v2", 3).state_dict()
    for state in members:
        assert state.keys() == fresh.keys()
        assert all(torch.equal(state[k], fresh[k]) for k in fresh)


@pytest.mark.parametrize("losses", [KD_LOSSES, MIXED_LOSSES], ids=["paper", "dkd-dist-kl_cos"])
def test_first_step_matches_separate_trials_and_outputs_are_trial_outputs(setup, tmp_path, monkeypatch, losses, float64):
    """The pack's first step is K separate trials' first steps, compared in float64 (the ``float64`` fixture).

    Grouped and plain convolutions round differently; in float32 the first SGD update differed by
    0.3-0.6 % of its norm under ``ATEN_CPU_CAPABILITY=default`` (0.01 % with AVX-512), in float64 by
    about 1e-12.  Checked with ``ATEN_CPU_CAPABILITY`` = default, avx2 and avx512, 1 and 2 threads.
    """
    folder, teacher = setup
    _no_dropout(monkeypatch)
    cfgs = [_cfg(folder, m, loss=loss, teacher=teacher, epochs=1) for m, loss in losses.items()]
    pack = run_packed_trials(cfgs, [tmp_path / "pack" / m for m in losses], progress=False, log=QUIET)
    torch.manual_seed(0)
    init = dict(build_model("mobilenet_v2", 3).named_parameters())
    for cfg, result in zip(cfgs, pack):
        alone = run_trial(cfg, tmp_path / "alone" / cfg.method, progress=False, log=QUIET)
        p, a = result.history[0], alone.history[0]
        assert p.keys() == a.keys()
        for term in [k for k in a if k == "train_loss" or k.startswith("term_")]:  # the first (only) step, before any update
            assert p[term] == pytest.approx(a[term], rel=1e-9), term
        # the SGD step: a mean over members instead of the sum would give 2/3 here, rounding in float64 ~1e-12
        step_pack, step_alone = (_update(tmp_path / run / cfg.method / "best.pt", init) for run in ("pack", "alone"))
        assert (step_pack - step_alone).norm() <= 1e-8 * step_alone.norm()
        assert result.pack is not None and alone.pack is None
        for field in ("effective_loss", "classes", "data"):
            assert getattr(result, field) == getattr(alone, field), field
        assert result.config == {**alone.config, "packed": True} and result.key != alone.key  # packed is keyed
        for field in ("environment", "teacher"):
            assert set(getattr(result, field)) == set(getattr(alone, field)), field
        assert result.teacher["mode"] == "cache"
        assert result.pack == {"k": 3, "members": [r.key for r in pack]}
        model, ckpt = load_model_checkpoint(tmp_path / "pack" / cfg.method / "best.pt")
        assert ckpt["model"] == "mobilenet_v2" and isinstance(model, torchvision.models.MobileNetV2)
        on_disk = json.loads((tmp_path / "pack" / cfg.method / "metrics.json").read_text())
        assert on_disk["key"] == result.key and (tmp_path / "pack" / cfg.method / "manifest.csv").exists()


def test_pack_with_a_baseline_resumes_after_interruption_exactly(setup, tmp_path):
    folder, teacher = setup
    cfgs = [
        _cfg(folder, "baseline", teacher=teacher),
        _cfg(folder, "kd_kl_cos", loss=KD_LOSSES["kd_kl_cos"], teacher=teacher),
    ]
    full = run_packed_trials(cfgs, [tmp_path / "a" / c.method for c in cfgs], progress=False, log=QUIET)

    def crash_after_epoch_1(message):
        if message.startswith("epoch 1/2"):
            raise KeyboardInterrupt

    dirs = [tmp_path / "b" / c.method for c in cfgs]
    with pytest.raises(KeyboardInterrupt):
        run_packed_trials(cfgs, dirs, progress=False, log=crash_after_epoch_1)
    assert (dirs[0] / "state.pt").exists() and not (dirs[0] / "metrics.json").exists()
    lines = []
    resumed = run_packed_trials(cfgs, dirs, progress=False, log=lines.append)
    assert any(line.startswith("resuming pack") and "after epoch 1" in line for line in lines)
    for a, b in zip(full, resumed):
        assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
        assert a.best == b.best and a.last == b.last
    baseline, kd = full
    assert baseline.teacher is None and kd.teacher["mode"] == "cache"
    assert "term_kl" in kd.history[0] and "term_kl" not in baseline.history[0]
    for result in full:
        assert len(result.history) == 2 and result.pack["k"] == 2
        for which in ("best", "last"):
            weights = getattr(result, which)
            assert 0 <= weights.test.accuracy <= 1 and math.isfinite(weights.val.loss)
        assert all(math.isfinite(h["train_loss"]) and 0 <= h["train_accuracy"] <= 1 for h in result.history)

    # an unreadable pack state (a torn write by another tool, a bad disk) restarts the pack, with a warning
    dirs = [tmp_path / "c" / c.method for c in cfgs]
    with pytest.raises(KeyboardInterrupt):
        run_packed_trials(cfgs, dirs, progress=False, log=crash_after_epoch_1)
    (dirs[0] / "state.pt").write_bytes((dirs[0] / "state.pt").read_bytes()[:100])
    lines = []
    restarted = run_packed_trials(cfgs, dirs, progress=False, log=lines.append)
    assert any(line.startswith("warning: cannot read the pack resume state") for line in lines)
    assert not any(line.startswith("resuming pack") for line in lines)
    for a, b in zip(full, restarted):
        assert a.best == b.best and a.last == b.last


def test_non_finite_member_loss_is_named(setup):
    folder, teacher = setup
    cfgs = [_cfg(folder, "baseline"), _cfg(folder, "kd_kl", loss=KD_LOSSES["kd_kl"], teacher=teacher)]
    model = init_pack(cfgs, 3)
    members = [MemberLoss(c.method, get_method(c.method), get_method(c.method).effective_loss(c.loss)) for c in cfgs]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    images, labels = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8), torch.tensor([0, 1, 2, 0])
    nan_teacher = lambda positions, views, x: Outputs(torch.full((len(positions), 3), float("nan")))  # noqa: E731
    with pytest.raises(NonFiniteError, match=r"member\(s\) 1 kd_kl") as err:
        train_pack_epoch(
            model,
            members,
            optimizer,
            scheduler,
            images,
            labels,
            AUGMENTATIONS["d4"],
            nan_teacher,
            batch_size=4,
            seed=0,
            epoch=0,
            device=torch.device("cpu"),
            desc="",
            progress=False,
        )
    assert "baseline" not in str(err.value)


@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(seed=1), "seed"),
        (dict(method="baseline", role="teacher"), "student"),
        (dict(model="resnet18"), "mobilenet_v2"),
        (dict(epochs=3), "recipe"),
        (dict(resolution=32), "data"),
        (dict(teacher="other.pt"), "one teacher"),
        (dict(), "twice"),
    ],
)
def test_incompatible_trials_are_refused(tmp_path, change, needle):
    folder = tmp_path / "nowhere"  # refused before any data is read

    def cfg(method="kd_kl", seed=0, model="mobilenet_v2", epochs=2, resolution=16, teacher="t.pt", role="student"):
        c = _cfg(folder, method, model=model, epochs=epochs, teacher=teacher, seed=seed, role=role)
        return dataclasses.replace(c, data=dataclasses.replace(c.data, resolution=resolution))

    cfgs = [cfg(), cfg(**change)]
    with pytest.raises(ValueError, match=needle):
        run_packed_trials(cfgs, [tmp_path / "a", tmp_path / "b"], log=QUIET)


def test_the_runner_takes_one_unpacked_trial_or_trials_planned_packed(tmp_path):
    folder = tmp_path / "nowhere"  # refused before any data is read or folder made
    kd_kl, kd_cos = _cfg(folder, "kd_kl", teacher="t.pt"), _cfg(folder, "kd_cos", teacher="t.pt")
    dirs = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(ValueError, match="only trials planned packed"):
        run_trials([kd_kl, kd_cos], dirs, log=QUIET)
    with pytest.raises(ValueError, match="planned packed and unpacked"):
        run_trials([dataclasses.replace(kd_kl, packed=True), kd_cos], dirs, log=QUIET)
    assert not any(d.exists() for d in dirs)


def test_compatible_key_ignores_method_and_loss_and_a_baselines_teacher(tmp_path):
    kd = [_cfg(tmp_path, m, loss=loss, teacher="t.pt") for m, loss in KD_LOSSES.items()]
    assert len({compatible_key(c) for c in kd}) == 1
    baseline = _cfg(tmp_path, "baseline")
    assert compatible_key(baseline)[:4] == compatible_key(kd[0])[:4] and compatible_key(baseline)[4] is None
    check_pack([baseline, *kd], [tmp_path / str(i) for i in range(4)])
    with pytest.raises(ValueError, match="output folders"):
        check_pack(kd, [tmp_path / "a"])


def test_a_diverging_member_fails_alone_and_the_others_match_a_pack_without_it(setup, tmp_path):
    folder, teacher = setup
    healthy = [_cfg(folder, "baseline", teacher=teacher), _cfg(folder, "kd_cos", loss=KD_LOSSES["kd_cos"], teacher=teacher)]
    diverging = _cfg(folder, "kd_kl", loss=loss_config(alpha=1e30, temperature=2.0, beta=1.0), teacher=teacher)
    cfgs = [healthy[0], diverging, healthy[1]]
    lines = []
    three = run_packed_trials(cfgs, [tmp_path / "three" / c.method for c in cfgs], progress=False, log=lines.append)
    two = run_packed_trials(healthy, [tmp_path / "two" / c.method for c in healthy], progress=False, log=QUIET)
    # its first step makes its (finite) weights so large that its epoch-1 validation logits are NaN (before: its best.pt)
    assert isinstance(three[1], runner.MemberFailed)
    assert str(three[1]).startswith("NaN or infinite values in validation logits at epoch 1 ")
    assert any(line.startswith("dropping kd_kl") for line in lines)
    assert not (tmp_path / "three" / "kd_kl" / "metrics.json").exists()

    def timeless(history):
        return [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")} for h in history]

    for a, b in zip((three[0], three[2]), two):  # exactly the pack of the healthy two
        assert timeless(a.history) == timeless(b.history)
        assert a.best == b.best and a.last == b.last
        assert a.pack["dropped"] == [a.pack["members"][1]] and a.pack["members"][1] not in {r.key for r in two}
    # a rerun of the pack (e.g. after a kill) drops it again from its state, without retraining
    lines.clear()
    again = run_packed_trials(cfgs, [tmp_path / "three" / c.method for c in cfgs], progress=False, log=lines.append)
    assert isinstance(again[1], runner.MemberFailed) and again[0].best == three[0].best
    assert any("resuming pack" in line for line in lines) and not any(line.startswith("dropping") for line in lines)


def test_a_member_with_non_finite_weights_or_logits_fails_alone_and_the_others_match_a_pack_without_it(
    setup, tmp_path, monkeypatch
):
    """A member whose batch-norm statistics go inf in training, or whose best weights give NaN logits at final
    scoring, is dropped with one line naming the tensor and epoch; the others equal the pack without it."""
    folder, teacher = setup
    healthy = [_cfg(folder, "baseline", teacher=teacher), _cfg(folder, "kd_cos", loss=KD_LOSSES["kd_cos"], teacher=teacher)]
    cfgs = [healthy[0], _cfg(folder, "kd_kl", loss=KD_LOSSES["kd_kl"], teacher=teacher), healthy[1]]
    two = run_packed_trials(healthy, [tmp_path / "two" / c.method for c in healthy], progress=False, log=QUIET)
    name = "features.3.conv.1.1.running_var"
    real_epoch, real_load = runner.train_members_epoch, trial_engine.load_model_checkpoint

    def inf_in_training(packed, members, *args, epoch, **kwargs):  # kd_kl's slice of the packed buffer, after epoch 2
        stats = real_epoch(packed, members, *args, epoch=epoch, **kwargs)
        kd_kl = [i for i, m in enumerate(members) if m.label.split()[0] == "kd_kl"]
        if epoch == 1 and kd_kl:
            packed.get_buffer(name).unflatten(0, (len(members), -1))[kd_kl[0]].fill_(float("inf"))
        return stats

    def nan_when_scored(path):  # kd_kl's best.pt, reloaded for final scoring, gives NaN logits
        model, ckpt = real_load(path)
        if path.parent.name == "kd_kl":
            model.register_forward_hook(lambda module, inputs, out: out * float("nan"))
        return model, ckpt

    def timeless(history):
        return [{k: v for k, v in h.items() if k not in ("seconds", "images_per_s")} for h in history]

    cases = {
        "training": (
            lambda mp: mp.setattr(runner, "train_members_epoch", inf_in_training),
            f"NaN or infinite values in {name} of the model after training epoch 2: "
            "lower the learning rate or check the teacher and data",
        ),
        "scoring": (
            lambda mp: mp.setattr(trial_engine, "load_model_checkpoint", nan_when_scored),
            "NaN or infinite values in validation logits of the best-on-validation weights (epoch ",
        ),
    }
    for case, (patch, message) in cases.items():
        lines = []
        dirs = [tmp_path / case / c.method for c in cfgs]
        with monkeypatch.context() as mp:
            patch(mp)
            three = run_packed_trials(cfgs, dirs, progress=False, log=lines.append)
        assert isinstance(three[1], runner.MemberFailed) and str(three[1]).startswith(message), str(three[1])
        assert "\n" not in str(three[1]) and not (dirs[1] / "metrics.json").exists()
        assert any(line.startswith("dropping kd_kl") for line in lines)
        for a, b in zip((three[0], three[2]), two):  # exactly the pack of the healthy two
            assert timeless(a.history) == timeless(b.history)
            assert a.best == b.best and a.last == b.last
            assert a.pack["dropped"] == [a.pack["members"][1]]
    # a pack resume state whose kd_cos slice holds inf (saved by a kdbench without this check): kd_cos fails alone
    dirs = [tmp_path / "two" / c.method for c in healthy]
    state = torch.load(dirs[0] / "state.pt", weights_only=True)
    state["state_dict"][name].unflatten(0, (2, -1))[1, 0] = float("inf")
    torch.save(state, dirs[0] / "state.pt")
    lines = []
    resumed = run_packed_trials(healthy, dirs, progress=False, log=lines.append)
    assert isinstance(resumed[1], runner.MemberFailed) and not isinstance(resumed[0], Exception)
    expected = f"NaN or infinite values in {name} of the pack resume state {dirs[0] / 'state.pt'} (epoch 2)"
    assert str(resumed[1]).startswith(expected), str(resumed[1])
    assert any(line.startswith("dropping kd_cos") for line in lines) and len(resumed[0].history) == 2


def test_a_pack_killed_between_its_state_and_a_best_checkpoint_repairs_it_on_resume(setup, tmp_path, monkeypatch):
    folder, teacher = setup
    cfgs = [_cfg(folder, "baseline", teacher=teacher), _cfg(folder, "kd_cos", loss=KD_LOSSES["kd_cos"], teacher=teacher)]
    full = run_packed_trials(cfgs, [tmp_path / "a" / c.method for c in cfgs], progress=False, log=QUIET)
    real = runner.save_best

    def killed(*args, **kwargs):  # state.pt of epoch 1 is on disk, no best.pt yet
        raise KeyboardInterrupt

    dirs = [tmp_path / "b" / c.method for c in cfgs]
    monkeypatch.setattr(runner, "save_best", killed)
    with pytest.raises(KeyboardInterrupt):
        run_packed_trials(cfgs, dirs, progress=False, log=QUIET)
    assert (dirs[0] / "state.pt").exists() and not (dirs[0] / "best.pt").exists()
    monkeypatch.setattr(runner, "save_best", real)
    lines = []
    resumed = run_packed_trials(cfgs, dirs, progress=False, log=lines.append)
    assert any(line.startswith("repairing") for line in lines)
    for a, b in zip(full, resumed):
        assert a.best == b.best and a.last == b.last
