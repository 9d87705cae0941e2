"""DKD (kdbench.methods.dkd) against an independent float64 re-derivation of the paper's formulas."""

import pytest
import torch

from kdbench.config import LossConfig
from kdbench.errors import UserError
from kdbench.losses import kl_term
from kdbench.methods import Outputs, get_method
from kdbench.methods.dkd import decoupled_terms, dkd_loss


def reference(s, t, y, alpha, beta, T):
    """Paper eqs. 1-4 written out: b = [p_y, 1 - p_y], p^_i = p_i / (1 - p_y), KL by definition, times T^2."""
    total = 0.0
    for i in range(len(y)):
        p_s, p_t = torch.softmax(s[i] / T, 0), torch.softmax(t[i] / T, 0)
        k = int(y[i])
        b_s = torch.stack([p_s[k], 1 - p_s[k]])
        b_t = torch.stack([p_t[k], 1 - p_t[k]])
        tckd = (b_t * torch.log(b_t / b_s)).sum()
        keep = [j for j in range(len(p_s)) if j != k]
        h_s, h_t = p_s[keep] / (1 - p_s[k]), p_t[keep] / (1 - p_t[k])
        nckd = (h_t * torch.log(h_t / h_s)).sum()
        total = total + alpha * tckd + beta * nckd
    return T**2 * total / len(y)


CASES = [(8, 10, 1.0, 8.0, 4.0), (1, 5, 1.0, 8.0, 4.0), (4, 2, 0.5, 2.0, 1.0), (3, 7, 2.0, 0.0, 2.0)]


@pytest.mark.parametrize(("batch", "classes", "alpha", "beta", "T"), CASES)
def test_value_and_gradient_match_the_paper_formula(batch, classes, alpha, beta, T):
    torch.manual_seed(batch * classes)
    s = (3 * torch.randn(batch, classes, dtype=torch.float64)).requires_grad_()
    t = 3 * torch.randn(batch, classes, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,))
    ours, _ = dkd_loss(s, t, y, alpha=alpha, beta=beta, temperature=T)
    ref = reference(s, t, y, alpha, beta, T)
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-12)
    (g_ours,) = torch.autograd.grad(ours, s)
    (g_ref,) = torch.autograd.grad(ref, s)
    assert torch.allclose(g_ours, g_ref, rtol=1e-8, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: dkd_loss(x, t, y, alpha=alpha, beta=beta, temperature=T)[0], (s,))


def test_two_classes_have_no_non_target_knowledge():
    s, t, y = torch.randn(6, 2, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64), torch.randint(0, 2, (6,))
    _, nckd = decoupled_terms(s, t, y, 4.0)
    assert torch.equal(nckd, torch.zeros(6, dtype=torch.float64))


def test_large_logits_stay_finite_with_finite_gradients():
    s = (1e4 * torch.randn(4, 10)).requires_grad_()
    t, y = 1e4 * torch.randn(4, 10), torch.tensor([0, 3, 5, 9])
    loss, _ = dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=4.0)
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    ref, _ = dkd_loss(s.detach().double(), t.double(), y, alpha=1.0, beta=8.0, temperature=4.0)
    assert torch.allclose(loss.double(), ref, rtol=1e-4)


def test_identical_student_and_teacher_is_the_minimum():
    t = torch.randn(5, 7, dtype=torch.float64)
    s = t.clone().requires_grad_()
    loss, _ = dkd_loss(s, t, torch.tensor([0, 1, 2, 3, 6]), alpha=1.0, beta=8.0, temperature=4.0)
    (grad,) = torch.autograd.grad(loss, s)
    assert abs(float(loss.detach())) < 1e-12 and grad.abs().max() < 1e-12


def test_tckd_alone_is_the_binary_kl_and_kd_is_their_coupled_sum():
    # alpha = 1, beta = 0: DKD is TCKD alone, the KL between the binary target / non-target distributions (paper eq. 2)
    torch.manual_seed(1)
    s, t, y, T = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 5, (6,)), 2.0
    p_s, p_t = torch.softmax(s / T, 1).gather(1, y[:, None]), torch.softmax(t / T, 1).gather(1, y[:, None])
    b_s, b_t = torch.cat([p_s, 1 - p_s], 1), torch.cat([p_t, 1 - p_t], 1)
    binary_kl = T**2 * (b_t * (b_t / b_s).log()).sum(1).mean()
    assert torch.allclose(dkd_loss(s, t, y, alpha=1.0, beta=0.0, temperature=T)[0], binary_kl, rtol=1e-12)
    # and classical KD is TCKD + (1 - p_y^teacher) * NCKD per sample (paper eq. 3)
    tckd, nckd = decoupled_terms(s, t, y, T)
    assert torch.allclose(kl_term(s, t, T), T**2 * (tckd + (1 - p_t.squeeze(1)) * nckd).mean(), rtol=1e-12)


def test_method_uses_its_own_hyperparameters_and_the_shared_ce_weight():
    dkd = get_method("dkd")
    cfg = dkd.effective_loss(LossConfig(alpha=1.0, params=(("beta", 2.0),)))
    assert cfg == LossConfig(alpha=1.0, params=(("alpha", 1.0), ("beta", 2.0), ("temperature", 4.0)))
    s, t, y = torch.randn(4, 6), torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    total, terms = dkd.loss(Outputs(s), Outputs(t), y, cfg)
    assert set(terms) == {"ce", "tckd", "nckd"}
    assert torch.allclose(total, terms["ce"] + terms["tckd"] + 2.0 * terms["nckd"])
    assert dkd.needs_teacher and dkd.resolve(cfg) == (dkd, cfg)


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ((("temperature", 0.0),), "dkd.temperature must be > 0"),
        ((("beta", -1.0),), "dkd.beta must be >= 0"),
        ((("alpha", 0.0), ("beta", 0.0)), "every distillation weight is 0"),
        ((("gamma", 1.0),), "dkd has no hyperparameter gamma"),
    ],
)
def test_bad_hyperparameters_are_one_line_user_errors(params, needle):
    dkd = get_method("dkd")
    with pytest.raises(UserError, match=needle) as err:
        dkd.check(LossConfig(params=params), "")
    assert "\n" not in str(err.value)
