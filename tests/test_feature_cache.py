"""The teacher's feature cache (kdbench.engine.feature_cache): equal to the online teacher, fp16 where that is harmless,
made once, refused where it would not fit."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from test_engine import tiny_trial

from kdbench.data.decode import load_images
from kdbench.data.index import scan_folder
from kdbench.data.presets import AUGMENTATIONS, normalize
from kdbench.engine import feature_cache
from kdbench.engine.feature_cache import feature_arrays, feature_path, needs_fp32
from kdbench.engine.features import FeatureTap, feature_shapes
from kdbench.engine.runner import run_trial
from kdbench.engine.teacher import CachedTeacher, OnlineTeacher
from kdbench.errors import UserError
from kdbench.losses import LossConfig
from kdbench.methods import INDEX, Outputs, get_method
from kdbench.models import build_model
from kdbench.stages import POOLED, STAGE_NEEDS

CPU = torch.device("cpu")
EVERY = ("embedding", POOLED, *STAGE_NEEDS)
FEATURE_METHODS = ("fitnet", "at", "rkd", "crd", "reviewkd")


def teacher_with_statistics(name: str = "resnet18", classes: int = 3) -> torch.nn.Module:
    """An untrained model in eval mode whose batch-norm statistics are not the identity (so eval differs from train)."""
    torch.manual_seed(0)
    model = build_model(name, classes).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.to(memory_format=torch.channels_last)


def images_of(tmp_path, size: int = 32, per_class: int = 4) -> torch.Tensor:
    folder = make_image_folder(tmp_path / "d", classes=3, per_class=per_class, size=size)
    return load_images(folder, scan_folder(folder).paths, size)[0]


def lookups(cached, online, images: torch.Tensor, batches: int = 3):
    """The cached and the online teacher's outputs on the same random augmented batches."""
    aug = AUGMENTATIONS["d4"]
    generator = torch.Generator().manual_seed(1)
    for _ in range(batches):
        positions = torch.randperm(len(images), generator=generator)[:5]
        views = aug.sample_views(5, generator)
        inputs = normalize(aug(images[positions], views, generator)).contiguous(memory_format=torch.channels_last)
        yield cached(positions, views, inputs), online(positions, views, inputs)


def cached_teacher_of(teacher, images, tmp_path, names=EVERY) -> CachedTeacher:
    aug = AUGMENTATIONS["d4"]
    arrays = feature_arrays(
        teacher, "resnet18", tmp_path / "logits-x.pt", names, images, aug, batch_size=4, device=CPU, source="t"
    )
    return CachedTeacher(torch.zeros(len(images), len(aug.views), 3), aug.views, arrays)


def test_cached_features_equal_the_online_teacher_on_augmented_batches(tmp_path, float64):
    """In float64 the cache stores float64 and a lookup equals the online teacher (other batch shapes, same values)."""
    images = images_of(tmp_path)
    teacher = teacher_with_statistics().double()
    cached = cached_teacher_of(teacher, images, tmp_path)
    assert {str(a.dtype) for a in cached.features.values()} == {"float64"}
    for looked_up, ran in lookups(cached, OnlineTeacher(teacher, "t", frozenset(EVERY), "resnet18"), images):
        assert sorted(looked_up.features) == sorted(EVERY)
        for name in EVERY:
            torch.testing.assert_close(looked_up.features[name], ran.features[name], rtol=1e-10, atol=1e-12)


def test_in_fp32_training_features_are_stored_in_fp16_within_its_rounding(tmp_path):
    images = images_of(tmp_path)
    teacher = teacher_with_statistics()
    cached = cached_teacher_of(teacher, images, tmp_path)
    assert {str(a.dtype) for a in cached.features.values()} == {"float16"}
    for looked_up, ran in lookups(cached, OnlineTeacher(teacher, "t", frozenset(EVERY), "resnet18"), images):
        for name in EVERY:
            value = looked_up.features[name]
            assert value.dtype == torch.float32
            # fp16 keeps 11 significant bits: half a unit in the last place is 2^-11 of a value (4.9e-4)
            torch.testing.assert_close(value, ran.features[name], rtol=2**-11, atol=1e-6)


def test_each_feature_file_is_made_once_and_shared(tmp_path, monkeypatch):
    images = images_of(tmp_path)
    teacher = teacher_with_statistics()
    cached_teacher_of(teacher, images, tmp_path, names=("stage:2",))
    built = []
    real = feature_cache._build
    monkeypatch.setattr(feature_cache, "_build", lambda *a, **k: built.append(sorted(a[2])) or real(*a, **k))
    cached = cached_teacher_of(teacher, images, tmp_path, names=("stage:2", POOLED))
    assert built == [[POOLED]]  # stage 2 was on disk: only the pooled feature was computed
    cached_teacher_of(teacher, images, tmp_path, names=(POOLED, "stage:2"))
    assert built == [[POOLED]]
    assert cached.features["stage:2"].shape == (len(images), 8, 128, 4, 4)  # ResNet-18 layer2 at 32 px: stride 8
    # a damaged file is made again, never trusted
    feature_path(tmp_path / "logits-x.pt", "resnet18", POOLED).write_bytes(b"not a numpy file")
    cached_teacher_of(teacher, images, tmp_path, names=(POOLED,))
    assert built == [[POOLED], [POOLED]]


def test_a_feature_beyond_fp16_range_is_stored_in_fp32(tmp_path):
    images = images_of(tmp_path)
    teacher = teacher_with_statistics()
    with torch.no_grad():
        teacher.layer4[-1].bn2.weight.mul_(1e6)  # stage 4 (layer4) overflows fp16; the earlier stages do not
    cached = cached_teacher_of(teacher, images, tmp_path, names=("stage:3", "stage:4"))
    assert cached.features["stage:3"].dtype == np.float16 and cached.features["stage:4"].dtype == np.float32
    assert np.isfinite(cached.features["stage:4"]).all()


def test_a_feature_below_fp16_normals_is_stored_in_fp32(tmp_path):
    images = images_of(tmp_path)
    teacher = teacher_with_statistics()
    with torch.no_grad():  # every branch into stage 4 (layer4) scaled by 1e-7: its values fall below fp16's normals
        for bn in (teacher.layer4[0].bn2, teacher.layer4[0].downsample[1], teacher.layer4[1].bn2):
            bn.weight.mul_(1e-7)
            bn.bias.mul_(1e-7)
    cached = cached_teacher_of(teacher, images, tmp_path, names=("stage:3", "stage:4"))
    assert cached.features["stage:3"].dtype == np.float16 and cached.features["stage:4"].dtype == np.float32


def test_relu_zeros_and_ordinary_features_stay_fp16():
    features = torch.relu(torch.randn(64, 256))  # half exact zeros, the rest ordinary magnitudes
    assert not needs_fp32(features)
    assert needs_fp32(features * 1e-6) and needs_fp32(features * 1e5)


def test_the_file_name_carries_the_teacher_stage_table(tmp_path):
    cache = tmp_path / "logits-abc.pt"
    assert feature_path(cache, "resnet18", "stage:1") != feature_path(cache, "resnet18", "stage:2")
    assert feature_path(cache, "resnet18", "stage:1") != feature_path(cache, "resnet34", "stage:1")
    assert feature_path(cache, "resnet18", "stage:1").name.startswith("logits-abc-stage1-")


@pytest.mark.parametrize("method", FEATURE_METHODS)
def test_fp16_teacher_features_change_each_feature_method_loss_by_under_1e_3(method):
    """The storage rule of the cache: the loss with fp16-rounded teacher features is within 1e-3 (relative) of fp32's."""
    torch.manual_seed(0)
    teacher = teacher_with_statistics("vgg16", classes=4)
    student = build_model("mobilenet_v2", 4).train()
    impl = get_method(method)
    cfg = impl.effective_loss(LossConfig())
    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 3] * 2)
    with (
        FeatureTap(teacher, impl.needs_from_teacher, "vgg16") as t_tap,
        FeatureTap(student, impl.needs_from_teacher, "mobilenet_v2") as s_tap,
    ):
        shapes = feature_shapes(s_tap, 32, CPU), feature_shapes(t_tap, 32, CPU)
        with torch.no_grad():
            t_logits = t_tap(x)
        t_features = t_tap.take()
        s_logits = s_tap(x)
        s_features = s_tap.take()
    labels = {"train_labels": torch.arange(64) % 4} if INDEX in impl.needs_from_teacher else {}
    if INDEX in impl.needs_from_teacher:
        s_features[INDEX] = torch.arange(8)
    torch.manual_seed(1)
    parts = impl.make_parts(*shapes, cfg, **labels)
    values = []
    for rounded in (False, True):
        impl.parts = copy.deepcopy(parts)  # CRD updates its memory bank in place: each call starts from the same state
        features = {k: v.half().float() if rounded else v for k, v in t_features.items()}
        torch.manual_seed(2)  # CRD draws its negatives
        total, _ = impl.loss(Outputs(s_logits, s_features), Outputs(t_logits, features), y, cfg)
        values.append(float(total.detach()))
    assert values[1] == pytest.approx(values[0], rel=1e-3), method


def at_32(cfg):
    """A tiny trial at 32 px: stage features (and the pooled one) pair up at a multiple of 32 px."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, resolution=32))


def test_a_cache_over_the_limit_runs_the_teacher_online(image_folder, tmp_path, monkeypatch):
    run_trial(at_32(tiny_trial(image_folder, model="resnet18", epochs=1)), tmp_path / "t", progress=False, log=lambda m: None)
    monkeypatch.setenv(feature_cache.LIMIT_ENV, "0")
    cfg = at_32(tiny_trial(image_folder, method="rkd", epochs=1, teacher_checkpoint=str(tmp_path / "t" / "best.pt")))
    lines = []
    result = run_trial(cfg, tmp_path / "s", progress=False, log=lines.append)
    assert result.teacher["mode"] == "online"
    assert "over the 0 GB limit (KDBENCH_FEATURE_CACHE_GB)" in result.teacher["why"]
    assert any("running the teacher online" in line for line in lines)
    monkeypatch.setenv(feature_cache.LIMIT_ENV, "lots")
    with pytest.raises(UserError, match="^KDBENCH_FEATURE_CACHE_GB must be a size in GB >= 0"):
        feature_cache.limit_bytes()


def test_feature_cache_and_online_teacher_give_the_same_trial(image_folder, tmp_path, monkeypatch, float64):
    """End to end on CPU (float64, as the logit cache's test): FitNet with the feature cache equals FitNet online."""

    run_trial(at_32(tiny_trial(image_folder, model="resnet18", epochs=1)), tmp_path / "t", progress=False, log=lambda m: None)
    cfg = at_32(tiny_trial(image_folder, method="fitnet", epochs=2, teacher_checkpoint=str(tmp_path / "t" / "best.pt")))
    cached = run_trial(cfg, tmp_path / "cached", progress=False, log=lambda m: None)
    monkeypatch.setenv(feature_cache.LIMIT_ENV, "0")
    online = run_trial(cfg, tmp_path / "online", progress=False, log=lambda m: None)
    assert cached.teacher["mode"] == "cache" and online.teacher["mode"] == "online"
    assert cached.teacher["features"]["stage:2"]["dtype"] == "float64"
    for a, b in zip(cached.history, online.history):
        for k in ("train_loss", "term_ce", "term_hint", "val_loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-8, abs=1e-10), k
    assert cached.best.test.confusion_matrix == online.best.test.confusion_matrix
