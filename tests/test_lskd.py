"""Logit-standardised KD (kdbench.methods.lskd) against an independent float64 re-derivation of the authors' formula.

The reference below is written from the formula, not copied: Z-score each logit row with its mean and its
*unbiased* standard deviation (1/(K-1) over the K classes), the 1e-7 added to the deviation, i.e.
``Z(z) = (z - mean(z)) / (std(z) + 1e-7)``, then Hinton's ``tau^2 * KL`` at the base temperature.  That is
how the authors' code computes it (read in github.com/sunshangquan/logit-standardization-KD,
``mdistiller/distillers/KD.py``: ``normalize`` and ``kd_loss``), and torchdistill's ``LogitStdKDLoss``
(github.com/yoshitomo-matsubara/torchdistill, ``torchdistill/losses/mid_level.py``: ``standardize``) agrees.
"""

import math

import pytest
import torch

from kdbench.config import LossConfig
from kdbench.errors import UserError
from kdbench.methods import Outputs, get_method
from kdbench.methods.lskd import lskd_loss, standardize


def z_score(z):
    """One row: centred, over the unbiased standard deviation plus 1e-7, summed by hand."""
    k = len(z)
    centred = z - z.sum() / k
    return centred / (torch.sqrt((centred**2).sum() / (k - 1)) + 1e-7)


def reference(s, t, weight, tau):
    """The authors' loss written out per sample: Z-scores, softmax at tau, KL(teacher || student), batch mean, times tau^2."""
    total = 0.0
    for i in range(len(s)):
        z_s, z_t = z_score(s[i]), z_score(t[i])
        q_s, q_t = torch.exp(z_s / tau) / torch.exp(z_s / tau).sum(), torch.exp(z_t / tau) / torch.exp(z_t / tau).sum()
        total = total + (q_t * torch.log(q_t / q_s)).sum()
    return weight * tau**2 * total / len(s)


CASES = [(8, 10, 9.0, 2.0), (1, 5, 9.0, 2.0), (4, 3, 1.0, 1.0), (3, 7, 2.0, 4.0), (6, 21, 9.0, 2.0), (2, 30, 9.0, 3.0)]


@pytest.mark.parametrize(("batch", "classes", "weight", "tau"), CASES)
def test_value_and_gradient_match_the_paper_formula(batch, classes, weight, tau):
    torch.manual_seed(batch * classes)
    s = (3 * torch.randn(batch, classes, dtype=torch.float64)).requires_grad_()
    t = 3 * torch.randn(batch, classes, dtype=torch.float64)
    ours, _ = lskd_loss(s, t, weight=weight, temperature=tau)
    ref = reference(s, t, weight, tau)
    assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-12)
    (g_ours,) = torch.autograd.grad(ours, s)
    (g_ref,) = torch.autograd.grad(ref, s)
    assert torch.allclose(g_ours, g_ref, rtol=1e-6, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: lskd_loss(x, t, weight=weight, temperature=tau)[0], (s,))


def test_the_deviation_is_the_unbiased_one_plus_its_epsilon():
    z = torch.tensor([[1.0, 2.0, 4.0, 7.0], [3.0, 3.0, 3.0, 3.0]], dtype=torch.float64)
    centred = z[0] - 3.5  # (-2.5, -1.5, 0.5, 3.5): squares sum to 21, over K - 1 = 3 classes
    assert torch.allclose(standardize(z)[0], centred / (math.sqrt(7.0) + 1e-7), rtol=1e-15)
    assert torch.equal(standardize(z)[1], torch.zeros(4, dtype=torch.float64))  # a constant row: 0 / (0 + 1e-7)
    # the population deviation (1/K), which kdbench used before, gives another loss: 3 to 17 % apart on 7 to 30 classes
    torch.manual_seed(0)
    for k in (7, 10, 21, 30):
        s, t = 3 * torch.randn(16, k, dtype=torch.float64), 3 * torch.randn(16, k, dtype=torch.float64)
        ours = float(lskd_loss(s, t, weight=1.0, temperature=2.0)[0])
        z_s, z_t = ((x - x.mean(1, keepdim=True)) / x.std(1, correction=0, keepdim=True) for x in (s, t))
        log_q, log_p = torch.log_softmax(z_s / 2.0, 1), torch.log_softmax(z_t / 2.0, 1)
        population = float(4.0 * (log_p.exp() * (log_p - log_q)).sum(1).mean())
        assert 0.02 < population / ours - 1 < 0.2


def test_two_classes_only_tell_which_class_is_ahead():
    # Z-scores of two logits are ±(1, -1) / sqrt(2): the loss is piecewise constant, with no gradient
    s = torch.tensor([[2.0, -1.0], [0.5, 3.0], [4.0, 1.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[1.0, 0.0], [-2.0, 5.0], [0.0, 2.0]], dtype=torch.float64)
    loss, _ = lskd_loss(s, t, weight=9.0, temperature=2.0)
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.allclose(loss, reference(s, t, 9.0, 2.0), rtol=1e-6) and grad.abs().max() < 1e-6
    q = torch.softmax(torch.tensor([1.0, -1.0], dtype=torch.float64) / math.sqrt(2) / 2, 0)
    one_wrong = 9.0 * 4 * (q * (q / q.flip(0)).log()).sum() / 3  # only the last sample disagrees
    assert torch.allclose(loss, one_wrong, rtol=1e-6)


def test_large_and_constant_logits_stay_finite():
    s = (1e4 * torch.randn(4, 10)).requires_grad_()
    loss, _ = lskd_loss(s, 1e4 * torch.randn(4, 10), weight=9.0, temperature=2.0)
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    flat = torch.zeros(2, 6, requires_grad=True)
    loss, _ = lskd_loss(flat, torch.randn(2, 6), weight=9.0, temperature=2.0)
    (grad,) = torch.autograd.grad(loss, flat)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize(("scale", "shift"), [(1.0, 0.0), (0.5, 3.0), (7.0, -20.0)])
def test_the_minimum_is_any_positive_affine_map_of_the_teacher(scale, shift):
    t = torch.randn(5, 7, dtype=torch.float64)
    s = (scale * t + shift).requires_grad_()
    loss, _ = lskd_loss(s, t, weight=9.0, temperature=2.0)
    (grad,) = torch.autograd.grad(loss, s)
    exact = scale == 1.0 and shift == 0.0  # identical logits; otherwise STD_EPS leaves a trace of the spread
    assert abs(float(loss.detach())) < 1e-10 and grad.abs().max() < (1e-12 if exact else 1e-5)


def test_invariant_to_shifting_and_scaling_either_logit_vector():
    torch.manual_seed(5)
    s, t = torch.randn(6, 9, dtype=torch.float64), torch.randn(6, 9, dtype=torch.float64)
    base, _ = lskd_loss(s, t, weight=9.0, temperature=2.0)
    a_s, a_t = torch.rand(6, 1, dtype=torch.float64) * 10 + 0.5, torch.rand(6, 1, dtype=torch.float64) * 10 + 0.5
    b_s, b_t = 50 * torch.randn(6, 1, dtype=torch.float64), 50 * torch.randn(6, 1, dtype=torch.float64)
    moved, _ = lskd_loss(a_s * s + b_s, a_t * t + b_t, weight=9.0, temperature=2.0)
    assert math.isclose(float(moved), float(base), rel_tol=1e-6)
    flipped, _ = lskd_loss(-s, t, weight=9.0, temperature=2.0)  # a negative factor reverses the ranking: no invariance
    assert not math.isclose(float(flipped), float(base), rel_tol=1e-3)


def test_method_defaults_and_errors():
    lskd = get_method("lskd")
    cfg = lskd.effective_loss(LossConfig())
    assert cfg.params == (("weight", 9.0), ("temperature", 2.0))
    s, t, y = torch.randn(4, 6), torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    total, terms = lskd.loss(Outputs(s), Outputs(t), y, cfg)
    assert set(terms) == {"ce", "kl"} and torch.allclose(total, terms["ce"] + 9.0 * terms["kl"])
    with pytest.raises(UserError, match="lskd.temperature must be > 0"):
        lskd.check(LossConfig(params=(("temperature", 0.0),)), "")
    with pytest.raises(UserError, match="every distillation weight is 0"):
        lskd.check(LossConfig(params=(("weight", 0.0),)), "")
