"""RKD (kdbench.methods.rkd) against mdistiller's RKD on the same tensors, in float64.

The reference below is a short re-derivation that mirrors mdistiller commit a08d46f10d6102bd6e3f258ca5ac880b020ea259,
mdistiller/distillers/RKD.py (``_pdist``: Gram-matrix distances clamped at ``eps`` before the square root, diagonal
set to 0; ``rkd_loss``: distances over their positive mean, angles as ``bmm`` of normalised differences, both
``F.smooth_l1_loss``, the teacher's under ``no_grad``; ``FEAT_WEIGHT`` times ``distance_weight * loss_d +
angle_weight * loss_a``, plus ``CE_WEIGHT`` times the cross-entropy), on ``pooled_feat``; defaults from
mdistiller/engine/cfg.py (``RKD.DISTANCE_WEIGHT = 25``, ``ANGLE_WEIGHT = 50``, ``LOSS.CE_WEIGHT = 1.0``,
``LOSS.FEAT_WEIGHT = 1.0``, ``PDIST.EPSILON = 1e-12``, ``PDIST.SQUARED = False``).
"""

import pytest
import torch
import torch.nn.functional as F

from kdbench.config import LossConfig
from kdbench.methods import Outputs, get_method
from kdbench.methods.rkd import RKDParams


def pdist(e, eps=1e-12):
    e_square = e.pow(2).sum(dim=1)
    res = (e_square.unsqueeze(1) + e_square.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt().clone()
    res[range(len(e)), range(len(e))] = 0
    return res


def angle(e):
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).view(-1)


def reference(logits, target, f_s, f_t, distance_weight=25.0, angle_weight=50.0, ce_weight=1.0, feat_weight=1.0):
    """The total loss and the unweighted (distance, angle) terms."""
    stu, tea = f_s.view(f_s.shape[0], -1), f_t.view(f_t.shape[0], -1)
    with torch.no_grad():
        t_d = pdist(tea)
        t_d = t_d / t_d[t_d > 0].mean()
        t_angle = angle(tea)
    d = pdist(stu)
    loss_d = F.smooth_l1_loss(d / d[d > 0].mean(), t_d)
    loss_a = F.smooth_l1_loss(angle(stu), t_angle)
    total = ce_weight * F.cross_entropy(logits, target) + feat_weight * (distance_weight * loss_d + angle_weight * loss_a)
    return total, loss_d, loss_a


@pytest.mark.parametrize(
    ("batch", "d_s", "d_t", "scale"), [(8, 1280, 512, 1.0), (2, 4, 9, 0.1), (5, 32, 32, 10.0), (16, 64, 4096, 3.0)]
)
def test_value_and_gradients_match_mdistiller(batch, d_s, d_t, scale):
    torch.manual_seed(batch + d_s)
    f_s = (scale * torch.randn(batch, d_s, dtype=torch.float64)).relu().requires_grad_()
    f_t = (scale * torch.randn(batch, d_t, dtype=torch.float64)).relu()
    logits = torch.randn(batch, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (batch,))
    method = get_method("rkd")
    cfg = method.effective_loss(LossConfig())
    ours, terms = method.loss(Outputs(logits, {"pooled": f_s}), Outputs(logits.detach(), {"pooled": f_t}), y, cfg)
    ref, loss_d, loss_a = reference(logits, y, f_s, f_t)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(terms["distance"], loss_d, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(terms["angle"], loss_a, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, [logits, f_s]), torch.autograd.grad(ref, [logits, f_s]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_defaults_and_the_weights_in_the_key():
    method = get_method("rkd")
    assert RKDParams() == RKDParams(distance=25.0, angle=50.0)
    assert method.needs_from_teacher == {"logits", "pooled"}
    assert dict(method.effective_loss(LossConfig(params=(("angle", 0.0),))).params) == {"distance": 25.0, "angle": 0.0}
    with pytest.raises(Exception, match="every distillation weight is 0"):
        method.check(LossConfig(params=(("angle", 0.0), ("distance", 0.0))), "")
