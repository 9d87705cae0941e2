"""ReviewKD (kdbench.methods.reviewkd) against mdistiller's ReviewKD on the same tensors and module weights, in float64.

The reference below is a short re-derivation that mirrors mdistiller commit a08d46f10d6102bd6e3f258ca5ac880b020ea259,
mdistiller/distillers/ReviewKD.py: ``hcl_loss``, ``ABF`` (its ``forward`` with ``shape`` / ``out_shape``) and
``ReviewKD.forward_train`` (the student's levels plus ``pooled_feat`` as a 1x1 map, reversed, through ``abfs``
deepest first; the teacher's levels plus its ``pooled_feat``; ``CE_WEIGHT`` times the cross-entropy plus
``REVIEWKD_WEIGHT * min(epoch / WARMUP_EPOCHS, 1)`` times the HCL, here at an epoch past the warm-up, which kdbench
leaves out); defaults from mdistiller/engine/cfg.py (``REVIEWKD.CE_WEIGHT = 1.0``, ``REVIEWKD_WEIGHT = 1.0``,
``WARMUP_EPOCHS = 20``, ``MAX_MID_CHANNEL = 512``; its ``ReviewKD`` builds ``mid = min(512, IN_CHANNELS[-1])``).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.config import LossConfig
from kdbench.errors import UserError
from kdbench.methods import Outputs, get_method
from kdbench.methods.reviewkd import LEVELS, ReviewKDParams


def hcl_loss(fstudent, fteacher):
    loss_all = 0.0
    for fs, ft in zip(fstudent, fteacher):
        n, c, h, w = fs.shape
        loss = F.mse_loss(fs, ft, reduction="mean")
        cnt, tot = 1.0, 1.0
        for l in [4, 2, 1]:  # noqa: E741 (mdistiller's name)
            if l >= h:
                continue
            tmpfs = F.adaptive_avg_pool2d(fs, (l, l))
            tmpft = F.adaptive_avg_pool2d(ft, (l, l))
            cnt /= 2.0
            loss += F.mse_loss(tmpfs, tmpft, reduction="mean") * cnt
            tot += cnt
        loss = loss / tot
        loss_all = loss_all + loss
    return loss_all


class ABF(nn.Module):
    def __init__(self, in_channel, mid_channel, out_channel, fuse):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False), nn.BatchNorm2d(mid_channel))
        self.conv2 = nn.Sequential(
            nn.Conv2d(mid_channel, out_channel, kernel_size=3, stride=1, padding=1, bias=False), nn.BatchNorm2d(out_channel)
        )
        self.att_conv = nn.Sequential(nn.Conv2d(mid_channel * 2, 2, kernel_size=1), nn.Sigmoid()) if fuse else None

    def forward(self, x, y=None, shape=None, out_shape=None):
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(y, (shape, shape), mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
        y = self.conv2(x)
        return y, x


def reference(logits, target, feats_s, pooled_s, feats_t, pooled_t, abfs, shapes, out_shapes, weight=1.0, epoch=20, warmup=20):
    """The total loss and the unweighted HCL; ``abfs``, ``shapes`` and ``out_shapes`` deepest first, as mdistiller's."""
    x = (feats_s + [pooled_s.unsqueeze(-1).unsqueeze(-1)])[::-1]
    results = []
    out_features, res_features = abfs[0](x[0], out_shape=out_shapes[0])
    results.append(out_features)
    for features, abf, shape, out_shape in zip(x[1:], abfs[1:], shapes[1:], out_shapes[1:]):
        out_features, res_features = abf(features, res_features, shape, out_shape)
        results.insert(0, out_features)
    hcl = hcl_loss(results, feats_t + [pooled_t.unsqueeze(-1).unsqueeze(-1)])
    return F.cross_entropy(logits, target) + weight * min(epoch / warmup, 1.0) * hcl, hcl


@pytest.mark.parametrize(
    ("batch", "c_s", "c_t", "sizes_s", "sizes_t"),
    [
        (4, (24, 32, 96, 1280), (256, 512, 512, 512), (8, 4, 2, 1), (8, 4, 2, 1)),  # MobileNetV2 -> VGG16 at 32 px
        (3, (4, 6, 8, 10), (5, 7, 9, 11), (16, 8, 4, 2), (16, 8, 4, 2)),  # 64 px: all three pools on stage 1
        (2, (3, 5, 6, 700), (4, 6, 8, 9), (8, 4, 2, 1), (16, 8, 4, 2)),  # a teacher twice the size; mid = 512
    ],
)
def test_fusion_loss_and_gradients_match_mdistiller(batch, c_s, c_t, sizes_s, sizes_t):
    torch.manual_seed(batch + sum(c_s))
    method = get_method("reviewkd")
    cfg = method.effective_loss(LossConfig())
    shapes_s = {name: (c, s, s) for name, c, s in zip(LEVELS, c_s, sizes_s)} | {"pooled": (c_s[-1],)}
    shapes_t = {name: (c, s, s) for name, c, s in zip(LEVELS, c_t, sizes_t)} | {"pooled": (c_t[-1],)}
    method.parts = method.make_parts(shapes_s, shapes_t, cfg).double()
    mid = min(512, c_s[-1])
    abfs = [ABF(c_in, mid, c_out, i < 4).double() for i, (c_in, c_out) in enumerate(zip([*c_s, c_s[-1]], [*c_t, c_t[-1]]))]
    with torch.no_grad():  # random batch-norm affine weights, the same in both
        for name, tensor in method.parts.named_parameters():
            if ".1." in name:
                tensor.uniform_(0.5, 1.5) if name.endswith("weight") else tensor.uniform_(-0.5, 0.5)
    for ours, ref in zip(method.parts, abfs, strict=True):
        ref.load_state_dict({k.replace("att.", "att_conv."): v for k, v in ours.state_dict().items()})
    abfs = abfs[::-1]
    feats_s = [torch.randn(batch, c, s, s, dtype=torch.float64, requires_grad=True) for c, s in zip(c_s, sizes_s)]
    pooled_s = torch.randn(batch, c_s[-1], dtype=torch.float64, requires_grad=True)
    feats_t = [torch.randn(batch, c, s, s, dtype=torch.float64).relu() for c, s in zip(c_t, sizes_t)]
    pooled_t = feats_t[-1].mean((2, 3))
    logits = torch.randn(batch, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (batch,))
    student = Outputs(logits, dict(zip(LEVELS, [*feats_s, pooled_s])))
    ours, terms = method.loss(student, Outputs(logits.detach(), dict(zip(LEVELS, [*feats_t, pooled_t]))), y, cfg)
    shapes, out_shapes = [1, *sizes_s[::-1]], [1, *sizes_t[::-1]]
    ref, ref_hcl = reference(logits, y, feats_s, pooled_s, feats_t, pooled_t, abfs, shapes, out_shapes)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(terms["hcl"], ref_hcl, rtol=1e-6, atol=1e-6)
    inputs = [logits, *feats_s, pooled_s]
    ref_params = [p for abf in abfs[::-1] for p in abf.parameters()]
    ours_grads = torch.autograd.grad(ours, [*inputs, *method.parts.parameters()])
    ref_grads = torch.autograd.grad(ref, [*inputs, *ref_params])
    for a, b in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for ours_abf, ref_abf in zip(method.parts, abfs[::-1]):  # batch-norm statistics moved the same way
        torch.testing.assert_close(ours_abf["conv2"][1].running_mean, ref_abf.conv2[1].running_mean, rtol=1e-6, atol=1e-6)


def test_defaults_and_the_fusion_modules_of_vgg16_to_mobilenet_v2():
    method = get_method("reviewkd")
    assert ReviewKDParams() == ReviewKDParams(weight=1.0, max_mid_channel=512.0)
    assert method.needs_from_teacher == {"logits", "stage:1", "stage:2", "stage:3", "stage:4", "pooled"}
    cfg = method.effective_loss(LossConfig())
    assert dict(cfg.params) == {"weight": 1.0, "max_mid_channel": 512.0}
    student = {"stage:1": (24, 8, 8), "stage:2": (32, 4, 4), "stage:3": (96, 2, 2), "stage:4": (1280, 1, 1), "pooled": (1280,)}
    teacher = {"stage:1": (256, 8, 8), "stage:2": (512, 4, 4), "stage:3": (512, 2, 2), "stage:4": (512, 1, 1), "pooled": (512,)}
    parts = method.make_parts(student, teacher, cfg)
    assert [sorted(m) for m in parts] == [["att", "conv1", "conv2"]] * 4 + [["conv1", "conv2"]]  # the deepest fuses nothing
    assert [m["conv1"][0].out_channels for m in parts] == [512] * 5  # mid = min(512, 1280)
    assert [m["conv2"][0].out_channels for m in parts] == [256, 512, 512, 512, 512]
    narrow = method.make_parts(student, teacher, method.effective_loss(LossConfig(params=(("max_mid_channel", 64),))))
    assert narrow[0]["conv1"][0].out_channels == 64
    with pytest.raises(UserError, match="reviewkd.max_mid_channel must be a whole number >= 1"):
        method.check(LossConfig(params=(("max_mid_channel", 0.5),)), "")
    with pytest.raises(ValueError, match="make_parts"):
        method.loss(Outputs(torch.zeros(2, 3)), Outputs(torch.zeros(2, 3)), torch.zeros(2).long(), cfg)
