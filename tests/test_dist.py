"""DIST (kdbench.methods.dist) against an independent float64 re-derivation of the paper's formulas."""

import pytest
import torch

from kdbench.config import LossConfig
from kdbench.errors import UserError
from kdbench.methods import Outputs, get_method
from kdbench.methods.dist import dist_loss, pearson_distance


def pearson(u, v):
    """Pearson's correlation by its definition: covariance over the product of standard deviations."""
    du, dv = u - u.mean(), v - v.mean()
    return (du * dv).sum() / torch.sqrt((du * du).sum() * (dv * dv).sum())


def reference(s, t, beta, gamma, tau):
    """Paper eqs. 5-7 written out, one row (inter-class) and one column (intra-class) at a time."""
    y_s, y_t = torch.softmax(s / tau, 1), torch.softmax(t / tau, 1)
    b, c = y_s.shape
    inter = sum(1 - pearson(y_s[i], y_t[i]) for i in range(b)) / b
    intra = sum(1 - pearson(y_s[:, j], y_t[:, j]) for j in range(c)) / c
    return tau**2 * (beta * inter + gamma * intra)


CASES = [(8, 10, 2.0, 2.0, 4.0), (4, 2, 1.0, 1.0, 1.0), (5, 7, 1.0, 0.0, 2.0), (3, 6, 0.0, 3.0, 4.0)]


@pytest.mark.parametrize(("batch", "classes", "beta", "gamma", "tau"), CASES)
def test_value_and_gradient_match_the_paper_formula(batch, classes, beta, gamma, tau):
    torch.manual_seed(batch + classes)
    s = (3 * torch.randn(batch, classes, dtype=torch.float64)).requires_grad_()
    t = 3 * torch.randn(batch, classes, dtype=torch.float64)
    ours, _ = dist_loss(s, t, beta=beta, gamma=gamma, temperature=tau)
    ref = reference(s, t, beta, gamma, tau)
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-12)
    (g_ours,) = torch.autograd.grad(ours, s)
    (g_ref,) = torch.autograd.grad(ref, s)
    assert torch.allclose(g_ours, g_ref, rtol=1e-7, atol=1e-10)
    assert torch.autograd.gradcheck(lambda x: dist_loss(x, t, beta=beta, gamma=gamma, temperature=tau)[0], (s,))


def test_batch_of_one_has_a_constant_intra_class_term():
    s = torch.randn(1, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(1, 5, dtype=torch.float64)
    loss, terms = dist_loss(s, t, beta=0.0, gamma=1.0, temperature=4.0)
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.allclose(terms["intra"], torch.tensor(16.0, dtype=torch.float64)) and torch.equal(grad, torch.zeros_like(s))
    inter, _ = dist_loss(s, t, beta=1.0, gamma=0.0, temperature=4.0)
    y_s, y_t = torch.softmax(s / 4.0, 1), torch.softmax(t / 4.0, 1)
    assert torch.allclose(inter, 16.0 * (1 - pearson(y_s[0], y_t[0])), rtol=1e-10)


def test_a_constant_student_row_has_a_steep_gradient_unless_the_teacher_row_is_constant_too():
    # Pearson's rho of a constant vector is undefined; the cosine's eps (1e-8) makes d_p = 1 there, flat only
    # where the teacher's vector is constant as well
    torch.manual_seed(4)
    b, c, beta, tau, eps = 4, 10, 2.0, 4.0, 1e-8
    t = 3 * torch.randn(b, c, dtype=torch.float64)
    s = torch.randn(b, c, dtype=torch.float64)
    s[1] = 0.7  # image 1: equal logits, a uniform student prediction
    s.requires_grad_()
    loss, terms = dist_loss(s, t, beta=beta, gamma=0.0, temperature=tau)
    y_s, y_t = torch.softmax(s / tau, 1), torch.softmax(t / tau, 1)
    rows = [1.0 if i == 1 else 1 - pearson(y_s[i], y_t[i]) for i in range(b)]
    assert torch.allclose(terms["inter"], tau**2 * sum(rows) / b, rtol=1e-10)  # d_p = 1 on the constant row
    (grad,) = torch.autograd.grad(loss, s)
    # the gradient on that row: beta * tau^2 / B * softmax Jacobian (uniform: (I - 1/C) / (C tau)) of -v / (eps |v|)
    v = y_t[1] - y_t[1].mean()
    assert torch.allclose(grad[1], -beta * tau / (b * c * eps) * v / v.norm(), rtol=1e-6)
    assert grad[1].abs().max() > 1e6 and grad[[0, 2, 3]].abs().max() < 10  # the other rows: ordinary gradients
    # both rows constant, or only the teacher's: no gradient reaches the student row
    for student_row in (0.7, None):
        t_flat, s_other = t.clone(), s.detach().clone()
        t_flat[1] = -1.5
        if student_row is None:
            s_other[1] = torch.randn(c, dtype=torch.float64)
        s_other.requires_grad_()
        loss, terms = dist_loss(s_other, t_flat, beta=beta, gamma=0.0, temperature=tau)
        (grad,) = torch.autograd.grad(loss, s_other)
        assert torch.equal(grad[1], torch.zeros(c, dtype=torch.float64)) and grad.abs().max() < 10
    # a student that predicts the same for every image: every class column is constant, L_intra is just as steep
    same = torch.randn(1, c, dtype=torch.float64).repeat(b, 1).requires_grad_()
    loss, _ = dist_loss(same, t, beta=0.0, gamma=1.0, temperature=tau)
    (grad,) = torch.autograd.grad(loss, same)
    assert torch.isfinite(grad).all() and grad.abs().max() > 1e5


def test_large_logits_stay_finite_with_finite_gradients():
    s = (1e4 * torch.randn(6, 10)).requires_grad_()
    loss, _ = dist_loss(s, 1e4 * torch.randn(6, 10), beta=2.0, gamma=2.0, temperature=4.0)
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_identical_student_and_teacher_is_the_minimum():
    t = torch.randn(6, 7, dtype=torch.float64)
    s = t.clone().requires_grad_()
    loss, _ = dist_loss(s, t, beta=2.0, gamma=2.0, temperature=4.0)
    (grad,) = torch.autograd.grad(loss, s)
    assert abs(float(loss.detach())) < 1e-12 and grad.abs().max() < 1e-10


def test_invariances_that_hold_and_one_that_does_not():
    torch.manual_seed(3)
    s, t = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    base, _ = dist_loss(s, t, beta=2.0, gamma=2.0, temperature=4.0)
    # a constant added to each image's logits (along the class axis) leaves the predictions, so the loss, unchanged
    shift_s, shift_t = 10 * torch.randn(6, 1, dtype=torch.float64), 10 * torch.randn(6, 1, dtype=torch.float64)
    assert torch.allclose(dist_loss(s + shift_s, t + shift_t, beta=2.0, gamma=2.0, temperature=4.0)[0], base, rtol=1e-10)
    # the paper's invariance: Pearson's distance ignores a positive affine map a * Y + b of the predictions
    y_s, y_t = torch.softmax(s / 4, 1), torch.softmax(t / 4, 1)
    for dim in (0, 1):
        moved = pearson_distance(3.0 * y_s + 0.7, 0.2 * y_t - 5.0, dim)
        assert torch.allclose(moved, pearson_distance(y_s, y_t, dim), rtol=1e-10, atol=1e-12)
    # scaling the logits at a fixed tau changes the predictions non-linearly: not an invariance of DIST
    assert not torch.allclose(dist_loss(3.0 * s, t, beta=2.0, gamma=2.0, temperature=4.0)[0], base, rtol=1e-3)


def test_method_defaults_and_errors():
    dist = get_method("dist")
    cfg = dist.effective_loss(LossConfig())
    assert cfg.params == (("beta", 2.0), ("gamma", 2.0), ("temperature", 4.0))
    s, t, y = torch.randn(4, 6), torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    total, terms = dist.loss(Outputs(s), Outputs(t), y, cfg)
    assert set(terms) == {"ce", "inter", "intra"}
    assert torch.allclose(total, terms["ce"] + 2.0 * terms["inter"] + 2.0 * terms["intra"])
    with pytest.raises(UserError, match="dist.temperature must be > 0"):
        dist.check(LossConfig(params=(("temperature", -1.0),)), "")
