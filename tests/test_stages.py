"""The stage table (kdbench.stages) against torchvision's traced graphs, and the features the engine reads with it."""

import pytest
import torch
from torchvision.models import get_model
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from kdbench.engine.features import FeatureTap, feature_shapes
from kdbench.errors import UserError
from kdbench.stages import N_STAGES, STAGE_NEEDS, check_pair, stage_nodes, stride

FAMILIES = ["vgg11", "vgg16", "vgg16_bn", "vgg19_bn", "resnet18", "resnet50", "mobilenet_v2"]
FAMILIES += ["mobilenet_v3_large", "mobilenet_v3_small"]
SIZE = 64


def _blocks_by_stride(model: torch.nn.Module) -> dict[int, str]:
    """The rule of kdbench.stages, found from the traced graph: the last block (a child of ``features``, or of the
    model) whose output has each stride, by running create_feature_extractor on every block."""
    trunk, prefix = (model.features, "features.") if hasattr(model, "features") else (model, "")
    blocks = [prefix + name for name, _ in trunk.named_children()]
    nodes = set(get_graph_node_names(model)[1])
    blocks = [b for b in blocks if any(n == b or n.startswith(b + ".") for n in nodes)]  # those the forward uses
    with torch.no_grad():
        out = create_feature_extractor(model.eval(), blocks)(torch.randn(1, 3, SIZE, SIZE))
    last = {}
    for block in blocks:
        if out[block].dim() == 4 and out[block].shape[-1] > 1:  # a feature map (not ResNet's global pool)
            assert out[block].shape[-1] == out[block].shape[-2]
            last[SIZE // out[block].shape[-1]] = block
    return last


@pytest.mark.parametrize("name", FAMILIES)
def test_each_stage_is_the_last_block_at_its_stride(name):
    torch.manual_seed(0)
    model = get_model(name, num_classes=3)
    last = _blocks_by_stride(model)
    assert stage_nodes(name) == tuple(last[stride(i)] for i in range(N_STAGES))
    assert max(last) == stride(N_STAGES - 1)  # nothing after stage 4 but global pooling


def test_the_engine_reads_the_stages_from_one_forward_pass_of_the_same_parameters():
    torch.manual_seed(0)
    model = get_model("mobilenet_v2", num_classes=4)
    x = torch.randn(2, 3, 64, 64)
    tap = FeatureTap(model, {"logits", "stage:0", "stage:2", "pooled", "embedding"}, "mobilenet_v2")
    model.eval()
    with torch.no_grad():
        logits = tap(x)
        got = tap.take()
        assert set(got) == {"stage:0", "stage:2", "pooled", "embedding"}
        reference = create_feature_extractor(model, {"features.1": "s0", "features.6": "s2", "features.18": "s4"})(x)
        torch.testing.assert_close(logits, model(x), rtol=0, atol=0)
    assert torch.equal(got["stage:0"], reference["s0"]) and torch.equal(got["stage:2"], reference["s2"])
    assert got["stage:2"].shape == (2, 32, 8, 8)
    torch.testing.assert_close(got["pooled"], reference["s4"].mean((2, 3)))
    torch.testing.assert_close(got["pooled"], got["embedding"])  # in eval mode: the classifier's input, dropout off
    # training through the tap trains the model's own parameters (and follows its train/eval mode)
    model.train()
    tap(x).sum().backward()
    assert tap.extractor.training and model.features[0][0].weight.grad is not None
    assert feature_shapes(tap, 32, torch.device("cpu")) == {
        "stage:0": (16, 16, 16),
        "stage:2": (32, 4, 4),
        "pooled": (1280,),
        "embedding": (1280,),
    }
    assert model.training  # the probe leaves the mode as it was
    plain = FeatureTap(model.eval(), {"logits"}, None)  # nothing asked: the model itself, no tracing
    assert plain.extractor is None and torch.equal(plain(x[:1]).detach(), model(x[:1]).detach())


@pytest.mark.parametrize(("teacher", "student"), [("vgg16", "mobilenet_v2"), ("vgg16_bn", "resnet18"), ("resnet18", "vgg16")])
def test_stages_of_any_supported_pair_have_the_same_size(teacher, student):
    check_pair("at", teacher, student, 64)
    shapes = [
        feature_shapes(FeatureTap(get_model(name, num_classes=3), STAGE_NEEDS, name), 64, torch.device("cpu"))
        for name in (teacher, student)
    ]
    for i, need in enumerate(STAGE_NEEDS):
        assert shapes[0][need][1:] == shapes[1][need][1:] == (64 // stride(i),) * 2


def test_a_pair_without_stages_or_at_another_resolution_is_refused_in_one_line():
    with pytest.raises(UserError, match="kdbench maps no stages of the teacher efficientnet_b0") as err:
        check_pair("fitnet", "efficientnet_b0", "mobilenet_v2", 32)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="kdbench maps no stages of the student densenet121"):
        check_pair("fitnet", "vgg16", "densenet121", 32)
    with pytest.raises(UserError, match="multiple of 32 .* got 48"):
        check_pair("at", "vgg16", "mobilenet_v2", 48)
    with pytest.raises(UserError, match="kdbench maps no stages of densenet121"):
        FeatureTap(get_model("densenet121", num_classes=3), {"stage:1"}, "densenet121")
