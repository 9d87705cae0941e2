"""PackedMobileNetV2 equals K separate torchvision MobileNetV2s (CPU; fp32 except the SGD-step test)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from kdbench.packing import PackedMobileNetV2, pack_state_dicts, unpack_state_dict

K, CLASSES, TOL = 3, 5, 1e-5


def _members(dropout: float = 0.2) -> list[nn.Module]:
    """K torchvision students with different seeds and non-trivial BN statistics."""
    models = []
    for seed in range(K):
        torch.manual_seed(seed)
        model = torchvision.models.mobilenet_v2(num_classes=CLASSES, dropout=dropout)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.8, 1.2)
                m.bias.data.normal_(0, 0.1)
                m.num_batches_tracked.fill_(7)
        model.classifier[1].weight.data.normal_(0, 0.1)
        models.append(model)
    return models


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=TOL, rtol=TOL)


def _member_loss(i: int, logits: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """A different KD-style loss for each member ``i``."""
    if i == 0:
        return F.cross_entropy(logits, y)
    if i == 1:
        kl = F.kl_div(F.log_softmax(logits / 4, 1), F.softmax(teacher / 4, 1), reduction="batchmean")
        return 0.5 * F.cross_entropy(logits, y) + 0.5 * 16 * kl
    return F.cross_entropy(logits, y, label_smoothing=0.1) + F.mse_loss(logits, teacher)


@pytest.mark.parametrize("channels_last", [False, True])
def test_eval_forward_matches_members(channels_last: bool) -> None:
    members = _members()
    packed = PackedMobileNetV2.from_members(members).eval()
    x = torch.randn(2, 3, 32, 32)
    if channels_last:
        packed, x = packed.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = packed(x)
        assert out.shape == (K, 2, CLASSES)
        for i, model in enumerate(members):
            _close(out[i], model.eval()(x))


def test_sgd_steps_match_separate_optimisers() -> None:
    """Two train-mode SGD steps equal K separate ones: gradients, weights, BN statistics.

    Runs in float64: train-mode BN over the few values left at 32x32 / batch 4 is so
    ill-conditioned that fp32 rounding differences between grouped and plain conv
    kernels grow past any tight tolerance (and bottleneck-BN bias gradients are
    mathematically zero, i.e. pure rounding noise, in fp32).
    """
    members = [model.double().train() for model in _members(dropout=0.0)]
    packed = PackedMobileNetV2.from_members(members).train()
    assert next(packed.parameters()).dtype == torch.float64
    sgd = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    packed_opt = torch.optim.SGD(packed.parameters(), **sgd)
    member_opts = [torch.optim.SGD(model.parameters(), **sgd) for model in members]
    torch.manual_seed(100)
    for _ in range(2):  # the second step exercises the momentum buffers
        x, teacher = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randn(4, CLASSES, dtype=torch.float64)
        y = torch.randint(0, CLASSES, (4,))
        packed_opt.zero_grad()
        out = packed(x)
        sum(_member_loss(i, out[i], y, teacher) for i in range(K)).backward()
        packed_opt.step()
        for i, (model, opt) in enumerate(zip(members, member_opts)):
            opt.zero_grad()
            _member_loss(i, model(x), y, teacher).backward()
            opt.step()
        grads = unpack_state_dict({n: p.grad for n, p in packed.named_parameters()}, K)
        for model, grad in zip(members, grads):
            for name, p in model.named_parameters():
                _close(grad[name], p.grad)
    for model, state in zip(members, packed.unpack()):
        for name, tensor in model.state_dict().items():  # parameters and BN running statistics
            _close(state[name], tensor)


def test_member_loss_touches_only_its_own_slices() -> None:
    packed = PackedMobileNetV2(k=K, num_classes=CLASSES).train()
    out = packed(torch.randn(4, 3, 32, 32))
    F.cross_entropy(out[1], torch.randint(0, CLASSES, (4,))).backward()
    grads = unpack_state_dict({n: p.grad for n, p in packed.named_parameters()}, K)
    for name in grads[1]:
        assert torch.count_nonzero(grads[0][name]) == 0, name
        assert torch.count_nonzero(grads[2][name]) == 0, name
    assert all(torch.count_nonzero(g) > 0 for g in grads[1].values())


def test_unpack_round_trip_loads_strict_into_torchvision() -> None:
    members = _members()
    for model, state in zip(members, PackedMobileNetV2.from_members(members).unpack()):
        fresh = torchvision.models.mobilenet_v2(num_classes=CLASSES)
        fresh.load_state_dict(state, strict=True)
        original = model.state_dict()
        assert state.keys() == original.keys()
        for name, tensor in original.items():
            assert torch.equal(fresh.state_dict()[name], tensor), name


def test_pack_rejects_members_with_different_step_counts() -> None:
    states = [model.state_dict() for model in _members()]
    states[1]["features.0.1.num_batches_tracked"] = torch.tensor(3)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        pack_state_dicts(states)


def test_default_constructor_bf16_autocast() -> None:
    packed = PackedMobileNetV2(k=2, num_classes=10).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = packed(x)
    assert out.shape == (2, 2, 10) and out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None for p in packed.parameters())
