"""FitNet (kdbench.methods.fitnet) against mdistiller's FitNet on the same tensors, in float64.

The reference below is a short re-derivation that mirrors mdistiller commit a08d46f10d6102bd6e3f258ca5ac880b020ea259,
mdistiller/distillers/FitNet.py (``forward_train``: ``FEAT_WEIGHT * F.mse_loss(conv_reg(f_s), f_t)`` plus
``CE_WEIGHT * F.cross_entropy``) and mdistiller/distillers/_common.py (``ConvReg``, its equal-or-larger-student
branch: a ``(1 + H_s - H_t) x (1 + W_s - W_t)`` convolution, batch norm, ReLU); defaults from
mdistiller/engine/cfg.py (``FITNET.HINT_LAYER = 2``, ``LOSS.CE_WEIGHT = 1.0``, ``LOSS.FEAT_WEIGHT = 100.0``).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.config import LossConfig
from kdbench.methods import Outputs, get_method
from kdbench.methods.fitnet import FitNetParams


class ConvReg(nn.Module):
    """mdistiller's ConvReg for a student map at least as large as the teacher's (``use_relu=True``)."""

    def __init__(self, s_shape, t_shape):
        super().__init__()
        _, s_c, s_h, s_w = s_shape
        _, t_c, t_h, t_w = t_shape
        self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


def reference(logits, target, f_s, f_t, conv_reg, ce_weight=1.0, feat_weight=100.0):
    """The total loss and the unweighted hint term."""
    hint = F.mse_loss(conv_reg(f_s), f_t)
    return ce_weight * F.cross_entropy(logits, target) + feat_weight * hint, hint


@pytest.mark.parametrize(("batch", "c_s", "c_t", "size"), [(4, 32, 512, 4), (2, 8, 16, 1), (6, 24, 64, 7), (3, 16, 16, 2)])
def test_value_and_gradients_match_mdistiller(batch, c_s, c_t, size):
    torch.manual_seed(batch + c_s + size)
    method = get_method("fitnet")
    cfg = method.effective_loss(LossConfig())
    method.parts = method.make_parts({"stage:2": (c_s, size, size)}, {"stage:2": (c_t, size, size)}, cfg).double()
    conv_reg = ConvReg((batch, c_s, size, size), (batch, c_t, size, size)).double()
    with torch.no_grad():  # random batch-norm affine weights, the same in both
        method.parts[1].weight.uniform_(0.5, 1.5)
        method.parts[1].bias.uniform_(-0.5, 0.5)
    conv_reg.load_state_dict({k.replace("0.", "conv.").replace("1.", "bn."): v for k, v in method.parts.state_dict().items()})
    f_s = torch.randn(batch, c_s, size, size, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(batch, c_t, size, size, dtype=torch.float64).relu()
    logits = torch.randn(batch, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (batch,))
    ours, terms = method.loss(Outputs(logits, {"stage:2": f_s}), Outputs(logits.detach(), {"stage:2": f_t}), y, cfg)
    ref, ref_hint = reference(logits, y, f_s, f_t, conv_reg)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(terms["hint"], ref_hint, rtol=1e-6, atol=1e-6)
    ours_grads = torch.autograd.grad(ours, [logits, f_s, *method.parts.parameters()])
    ref_grads = torch.autograd.grad(ref, [logits, f_s, *conv_reg.parameters()])
    for a, b in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # batch-norm statistics moved the same way (one train-mode pass each)
    torch.testing.assert_close(method.parts[1].running_mean, conv_reg.bn.running_mean, rtol=1e-6, atol=1e-6)


def test_defaults_hint_stage_and_regressor_of_vgg16_to_mobilenet_v2():
    method = get_method("fitnet")
    assert FitNetParams() == FitNetParams(weight=100.0)
    assert method.needs_from_teacher == {"logits", "stage:2"} and method.parts is None
    cfg = method.effective_loss(LossConfig())
    assert dict(cfg.params) == {"weight": 100.0}
    # VGG16's stage 2 (features.22) has 512 channels, MobileNetV2's (features.6) 32: a 1x1 conv, BN, ReLU
    parts = method.make_parts({"stage:2": (32, 4, 4)}, {"stage:2": (512, 4, 4)}, cfg)
    assert [type(m).__name__ for m in parts] == ["Conv2d", "BatchNorm2d", "ReLU"]
    assert parts[0].kernel_size == (1, 1) and sum(p.numel() for p in parts.parameters()) == 32 * 512 + 512 + 2 * 512
    with pytest.raises(ValueError, match="must be equal"):
        method.make_parts({"stage:2": (32, 4, 4)}, {"stage:2": (512, 2, 2)}, cfg)
    with pytest.raises(ValueError, match="make_parts"):  # the loss without its regressor
        f = torch.zeros(2, 32, 4, 4)
        method.loss(
            Outputs(torch.zeros(2, 3), {"stage:2": f}), Outputs(torch.zeros(2, 3), {"stage:2": f}), torch.zeros(2).long(), cfg
        )
