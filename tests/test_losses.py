"""The distillation losses against hand-computed values and independent formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.losses import cosine_term, cross_entropy_term, distillation_loss, kl_term


def test_equal_logits_give_zero_kl_and_cosine():
    z = torch.randn(5, 7)
    assert kl_term(z, z.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_term(z, z.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_term(z, z.clone(), on="probs", temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_known_two_class_case_by_hand():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 2.0]])
    T = 2.0
    # p = softmax(t/T) = softmax([0, 1]); q = softmax(s/T) = softmax([0.5, 0])
    p1 = math.exp(1) / (1 + math.exp(1))
    p = [1 - p1, p1]
    q0 = math.exp(0.5) / (1 + math.exp(0.5))
    q = [q0, 1 - q0]
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert kl_term(s, t, T).item() == pytest.approx(T * T * kl, rel=1e-6)
    # cos([1, 0], [0, 2]) = 0 -> loss 1
    assert cosine_term(s, t).item() == pytest.approx(1.0, abs=1e-7)
    # CE of s for class 0: -log softmax([1, 0])[0]
    y = torch.tensor([0])
    assert cross_entropy_term(s, y).item() == pytest.approx(-math.log(math.exp(1) / (1 + math.exp(1))), rel=1e-6)
    total = distillation_loss(s, t, y, alpha=0.5, beta=2.0, gamma=3.0, temperature=T)
    expected = 0.5 * -math.log(math.exp(1) / (1 + math.exp(1))) + 2.0 * T * T * kl + 3.0 * 1.0
    assert total.item() == pytest.approx(expected, rel=1e-6)


def test_kl_is_batchmean_not_mean_over_elements():
    torch.manual_seed(0)
    s, t = torch.randn(8, 10), torch.randn(8, 10)
    p = F.softmax(t, 1)
    per_sample = (p * (p.log() - F.log_softmax(s, 1))).sum(1)
    assert kl_term(s, t, 1.0).item() == pytest.approx(per_sample.mean().item(), rel=1e-5)
    # the classic bug, reduction="mean" (a mean over all B x C elements), would be smaller by the class count
    elementwise_mean = (p * (p.log() - F.log_softmax(s, 1))).mean()
    assert kl_term(s, t, 1.0).item() == pytest.approx(10 * elementwise_mean.item(), rel=1e-5)


def test_cosine_matches_an_independent_formula_and_probs_option():
    torch.manual_seed(1)
    s, t = torch.randn(6, 4), torch.randn(6, 4)
    cos = (s * t).sum(1) / (s.norm(dim=1) * t.norm(dim=1))
    assert cosine_term(s, t).item() == pytest.approx((1 - cos).mean().item(), rel=1e-6)
    ps, pt = F.softmax(s / 3, 1), F.softmax(t / 3, 1)
    cos_p = (ps * pt).sum(1) / (ps.norm(dim=1) * pt.norm(dim=1))
    assert cosine_term(s, t, on="probs", temperature=3.0).item() == pytest.approx((1 - cos_p).mean().item(), rel=1e-6)


def test_cosine_on_logits_is_scale_invariant():
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    assert cosine_term(s * 7.0, t).item() == pytest.approx(cosine_term(s, t).item(), rel=1e-6)


def test_t_squared_keeps_kl_gradient_magnitude_roughly_constant():
    """d(T^2 KL)/ds -> (s - t)/C for large T: the gradient norm levels off instead of vanishing like 1/T^2."""
    torch.manual_seed(2)
    s0, t = torch.randn(16, 10), torch.randn(16, 10)
    norms = {}
    for T in (2.0, 4.0, 8.0, 16.0):
        s = s0.clone().requires_grad_(True)
        kl_term(s, t, T).backward()
        norms[T] = s.grad.norm().item()
    assert max(norms.values()) / min(norms.values()) < 1.6
    # without the T^2 factor the gradient shrinks ~ 1/T^2: 64x between T=2 and T=16
    s = s0.clone().requires_grad_(True)
    (kl_term(s, t, 16.0) / 256).backward()
    assert norms[16.0] / s.grad.norm().item() == pytest.approx(256, rel=1e-4)


def test_zero_weight_terms_do_not_need_a_teacher():
    s, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    loss = distillation_loss(s, None, y, alpha=1.0, beta=0.0, gamma=0.0, temperature=4.0)
    assert loss.item() == pytest.approx(F.cross_entropy(s, y).item())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alpha=1, beta=1, gamma=1, temperature=0.0), "temperature"),
        (dict(alpha=1, beta=1, gamma=1, temperature=-1.0), "temperature"),
        (dict(alpha=-0.1, beta=1, gamma=1, temperature=4.0), "alpha"),
        (dict(alpha=1, beta=float("nan"), gamma=1, temperature=4.0), "beta"),
        (dict(alpha=0, beta=0, gamma=0, temperature=4.0), "all 0"),
        (dict(alpha=1, beta=1, gamma=1, temperature=4.0, cosine_on="features"), "cosine_on"),
    ],
)
def test_bad_arguments_raise_clear_value_errors(kwargs, message):
    s, t, y = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=message):
        distillation_loss(s, t, y, **kwargs)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        distillation_loss(torch.randn(2, 3), torch.randn(2, 4), torch.tensor([0, 1]), alpha=1, beta=1, gamma=0, temperature=2)
    with pytest.raises(ValueError, match="targets"):
        distillation_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1, 2]), alpha=1, beta=1, gamma=0, temperature=2)
