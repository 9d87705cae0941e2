"""Model building and weight loading with state dicts saved in the test (ImageNet weights cannot be downloaded here)."""

import urllib.error

import pytest
import torch
import torchvision

from kdbench import models
from kdbench.errors import UserError
from kdbench.models import build_model, load_model_checkpoint, save_checkpoint


def test_heads_are_sized_to_the_dataset():
    assert build_model("mobilenet_v2", 21).classifier[-1].out_features == 21
    assert build_model("vgg16", 7).classifier[-1].out_features == 7
    assert build_model("resnet18", 10).fc.out_features == 10


def test_unknown_model_is_a_user_error():
    with pytest.raises(UserError, match="unknown model 'mobilenet_v9'"):
        build_model("mobilenet_v9", 10)


def test_model_names_checked_without_torchvision_are_torchvision_models():
    from kdbench.config import COMMON_MODELS, Recipe, check_recipe

    assert set(models.available_models()) >= COMMON_MODELS
    with pytest.raises(UserError, match="unknown model 'resnet_18'"):  # any other name: torchvision's registry
        check_recipe(Recipe(model="resnet_18"), "student")
    check_recipe(Recipe(model="regnet_y_400mf"), "student")


def test_local_state_dict_loads_backbone_and_reinitialises_a_different_head(tmp_path):
    source = torchvision.models.mobilenet_v2(num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "imagenet_like.pth")
    model = build_model("mobilenet_v2", 10, pretrained=str(tmp_path / "imagenet_like.pth"))
    assert torch.equal(model.features[0][0].weight, source.features[0][0].weight)
    assert model.classifier[-1].weight.shape == (10, 1280)
    same = build_model("mobilenet_v2", 1000, pretrained=str(tmp_path / "imagenet_like.pth"))
    assert torch.equal(same.classifier[-1].weight, source.classifier[-1].weight)


def test_weights_of_another_architecture_are_refused(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(UserError, match="share no parameter"):
        build_model("mobilenet_v2", 10, pretrained=str(tmp_path / "r18.pth"))


def test_imagenet_offline_gives_a_clear_message(monkeypatch):
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(UserError, match=r"could not load ImageNet weights for mobilenet_v2 .*Offline\?.*checkpoints"):
        build_model("mobilenet_v2", 10, pretrained="imagenet")


def test_imagenet_path_uses_torchvision_weights(monkeypatch):
    reference = torchvision.models.mobilenet_v2()
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", lambda self, *a, **k: reference.state_dict())
    model = build_model("mobilenet_v2", 10, pretrained="imagenet")
    assert torch.equal(model.features[1].conv[0][0].weight, reference.features[1].conv[0][0].weight)


def test_checkpoint_round_trip_and_bad_files(tmp_path):
    model = build_model("mobilenet_v2", 3)
    save_checkpoint(tmp_path / "best.pt", model, model_name="mobilenet_v2", classes=["a", "b", "c"])
    loaded, ckpt = load_model_checkpoint(tmp_path / "best.pt")
    assert ckpt["classes"] == ["a", "b", "c"]
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    (tmp_path / "broken.pt").write_bytes((tmp_path / "best.pt").read_bytes()[:1000])
    with pytest.raises(UserError, match="truncated, corrupt"):
        load_model_checkpoint(tmp_path / "broken.pt")
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(UserError, match="not a kdbench checkpoint"):
        load_model_checkpoint(tmp_path / "plain.pt")
    with pytest.raises(UserError, match="does not exist"):
        models.load_checkpoint_file(tmp_path / "nope.pt")


def test_checkpoints_and_weight_files_holding_nan_or_inf_are_refused_naming_the_tensor(tmp_path):
    from kdbench.errors import NonFiniteError

    model = build_model("resnet18", 3)
    with torch.no_grad():
        model.layer2[0].bn1.running_var[1] = float("inf")
        model.fc.weight[0, 0] = float("nan")
    save_checkpoint(tmp_path / "best.pt", model, model_name="resnet18", classes=["a", "b", "c"], extra={"epoch": 4})
    with pytest.raises(NonFiniteError) as err:
        load_model_checkpoint(tmp_path / "best.pt")
    assert str(err.value) == (
        f"NaN or infinite values in layer2.0.bn1.running_var (and 1 more tensor) of checkpoint {tmp_path / 'best.pt'} "
        "(epoch 4): its weights are broken: re-train it, or pass another checkpoint"
    )
    torch.save(model.state_dict(), tmp_path / "pretrained.pth")
    with pytest.raises(NonFiniteError, match=r"^NaN or infinite values in layer2.0.bn1.running_var .* of the weights file"):
        build_model("resnet18", 10, pretrained=str(tmp_path / "pretrained.pth"))
