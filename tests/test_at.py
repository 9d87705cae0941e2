"""AT (kdbench.methods.at) against mdistiller's AT on the same tensors, in float64.

The reference below is a short re-derivation that mirrors mdistiller commit a08d46f10d6102bd6e3f258ca5ac880b020ea259,
mdistiller/distillers/AT.py (``single_stage_at_loss``: ``F.normalize(f.pow(p).mean(1).reshape(B, -1))``, the larger
map average-pooled to the smaller's height first; ``at_loss`` summed over ``feats[1:]``; ``FEAT_WEIGHT`` times that
plus ``CE_WEIGHT`` times the cross-entropy); defaults from mdistiller/engine/cfg.py (``AT.P = 2``,
``AT.LOSS.CE_WEIGHT = 1.0``, ``AT.LOSS.FEAT_WEIGHT = 1000.0``).
"""

import pytest
import torch
import torch.nn.functional as F

from kdbench.config import LossConfig
from kdbench.methods import Outputs, get_method
from kdbench.methods.at import STAGES, ATParams


def single_stage(f_s, f_t, p):
    def at(feat):
        return F.normalize(feat.pow(p).mean(1).reshape(feat.size(0), -1))

    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return (at(f_s) - at(f_t)).pow(2).mean()


def reference(logits, target, g_s, g_t, p, ce_weight=1.0, feat_weight=1000.0):
    """The total loss and the unweighted attention term (mdistiller's ``feats[1:]``: the four maps passed here)."""
    term = sum(single_stage(f_s, f_t, p) for f_s, f_t in zip(g_s, g_t))
    return ce_weight * F.cross_entropy(logits, target) + feat_weight * term, term


# (batch, student channels, teacher channels, student sizes, teacher sizes of stages 1-4, p)
CASES = [
    (4, (24, 32, 96, 1280), (128, 256, 512, 512), (8, 4, 2, 1), (8, 4, 2, 1), 2.0),
    (2, (8, 8, 8, 8), (16, 16, 16, 16), (16, 8, 4, 2), (16, 8, 4, 2), 4.0),
    (3, (8, 16, 16, 32), (16, 16, 64, 64), (8, 4, 4, 2), (16, 8, 2, 2), 2.0),  # other sizes: pooled as mdistiller
]


@pytest.mark.parametrize(("batch", "c_s", "c_t", "h_s", "h_t", "p"), CASES)
def test_value_and_gradients_match_mdistiller(batch, c_s, c_t, h_s, h_t, p):
    torch.manual_seed(batch)
    g_s = [torch.randn(batch, c, h, h, dtype=torch.float64, requires_grad=True) for c, h in zip(c_s, h_s)]
    g_t = [torch.randn(batch, c, h, h, dtype=torch.float64) for c, h in zip(c_t, h_t)]
    logits = torch.randn(batch, 7, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (batch,))
    method = get_method("at")
    cfg = method.effective_loss(LossConfig(params=(("p", p),)))
    ours, terms = method.loss(Outputs(logits, dict(zip(STAGES, g_s))), Outputs(logits.detach(), dict(zip(STAGES, g_t))), y, cfg)
    ref, ref_term = reference(logits, y, g_s, g_t, p)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(terms["at"], ref_term, rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, [logits, *g_s]), torch.autograd.grad(ref, [logits, *g_s]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_defaults_and_stages():
    method = get_method("at")
    assert ATParams() == ATParams(p=2.0, weight=1000.0)
    assert method.needs_from_teacher == {"logits", "stage:1", "stage:2", "stage:3", "stage:4"}  # mdistiller's feats[1:]
    assert method.make_parts({}, {}, method.effective_loss(LossConfig())) is None
    with pytest.raises(Exception, match="at.p must be > 0"):
        method.check(LossConfig(params=(("p", 0.0),)), "")
