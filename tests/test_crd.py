"""CRD (kdbench.methods.crd) against mdistiller's CRD on the same tensors, memory and negatives, in float64.

The reference below is a short re-derivation that mirrors mdistiller commit a08d46f10d6102bd6e3f258ca5ac880b020ea259,
mdistiller/distillers/CRD.py: ``Normalize`` and ``Embed`` (linear, then ``x / x.pow(2).sum(1).pow(1/2)``),
``ContrastMemory.forward`` with the sampled indices given (as its training always gives them: the data loader of
mdistiller/dataset/cifar100.py, ``CIFAR100InstanceSample``, draws the positive and the negatives; its alias sampler
is left out), the normalising constants ``Z`` set on the first call, the momentum update of both memories,
``ContrastLoss`` (``eps = 1e-7``, noise ``m * Pn``, ``Pn = 1 / num_data``) and ``CRD.crd_loss`` /
``forward_train`` (``CE_WEIGHT`` times the cross-entropy plus ``FEAT_WEIGHT`` times ``crd_loss`` of
``pooled_feat``); defaults from mdistiller/engine/cfg.py (``CRD.FEAT.DIM = 128``, ``LOSS.CE_WEIGHT = 1.0``,
``LOSS.FEAT_WEIGHT = 0.8``, ``NCE.K = 16384``, ``NCE.MOMENTUM = 0.5``, ``NCE.TEMPERATURE = 0.07``).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.config import LossConfig
from kdbench.errors import UserError
from kdbench.methods import Outputs, get_method
from kdbench.methods.crd import CRDParams, draw_negatives, negatives_count


class Embed(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        x = self.linear(x.reshape(x.shape[0], -1))
        return x.div(x.pow(2).sum(1, keepdim=True).pow(1.0 / 2))


def contrast_loss(x, num_data, eps=1e-7):
    bsz, m = x.shape[0], x.size(1) - 1
    pn = 1 / float(num_data)
    p_pos = x.select(1, 0)
    log_d1 = torch.div(p_pos, p_pos.add(m * pn + eps)).log_()
    p_neg = x.narrow(1, 1, m)
    log_d0 = torch.div(p_neg.clone().fill_(m * pn), p_neg.add(m * pn + eps)).log_()
    return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0)) / bsz


class ContrastMemory(nn.Module):
    def __init__(self, memory_v1, memory_v2, k, t=0.07, momentum=0.5):
        super().__init__()
        self.register_buffer("params", torch.tensor([k, t, -1, -1, momentum], dtype=torch.float64))
        self.register_buffer("memory_v1", memory_v1.clone())
        self.register_buffer("memory_v2", memory_v2.clone())

    def forward(self, v1, v2, y, idx):
        k, t = int(self.params[0].item()), self.params[1].item()
        z_v1, z_v2, momentum = self.params[2].item(), self.params[3].item(), self.params[4].item()
        batch, output_size, input_size = v1.size(0), self.memory_v1.size(0), self.memory_v1.size(1)
        weight_v1 = torch.index_select(self.memory_v1, 0, idx.view(-1)).detach().view(batch, k + 1, input_size)
        out_v2 = torch.exp(torch.div(torch.bmm(weight_v1, v2.view(batch, input_size, 1)), t))
        weight_v2 = torch.index_select(self.memory_v2, 0, idx.view(-1)).detach().view(batch, k + 1, input_size)
        out_v1 = torch.exp(torch.div(torch.bmm(weight_v2, v1.view(batch, input_size, 1)), t))
        if z_v1 < 0:
            self.params[2] = out_v1.mean() * output_size
            z_v1 = self.params[2].clone().detach().item()
        if z_v2 < 0:
            self.params[3] = out_v2.mean() * output_size
            z_v2 = self.params[3].clone().detach().item()
        out_v1 = torch.div(out_v1, z_v1).contiguous()
        out_v2 = torch.div(out_v2, z_v2).contiguous()
        with torch.no_grad():
            for memory, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
                pos = torch.index_select(memory, 0, y.view(-1))
                pos.mul_(momentum)
                pos.add_(torch.mul(v, 1 - momentum))
                memory.index_copy_(0, y, pos.div(pos.pow(2).sum(1, keepdim=True).pow(0.5)))
        return out_v1, out_v2


def reference(logits, target, f_s, f_t, index, contrast_index, embed_s, embed_t, memory, num_data, ce=1.0, feat=0.8):
    """The total loss and the unweighted CRD term (``crd_loss``)."""
    out_s, out_t = memory(embed_s(f_s), embed_t(f_t), index, contrast_index)
    crd = contrast_loss(out_s.squeeze(-1), num_data) + contrast_loss(out_t.squeeze(-1), num_data)
    return ce * F.cross_entropy(logits, target) + feat * crd, crd


def labels_of(n, classes, seed=0):
    return (torch.arange(n) % classes)[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize(
    ("batch", "d_s", "d_t", "n", "classes", "feat_dim", "nce_k", "nce_t", "nce_m"),
    [
        (8, 1280, 512, 60, 4, 128, 16384, 0.07, 0.5),  # the defaults, MobileNetV2 -> VGG16
        (4, 16, 24, 30, 3, 8, 5, 0.2, 0.3),
        (5, 32, 32, 41, 7, 16, 20, 0.07, 0.9),
    ],
)
def test_value_gradients_memory_and_z_match_mdistiller_over_two_steps(batch, d_s, d_t, n, classes, feat_dim, nce_k, nce_t, nce_m):
    torch.manual_seed(batch + n)
    labels = labels_of(n, classes)
    method = get_method("crd")
    settings = (("feat_dim", feat_dim), ("nce_k", nce_k), ("nce_t", nce_t), ("nce_m", nce_m))
    cfg = method.effective_loss(LossConfig(params=settings))
    method.parts = method.make_parts({"pooled": (d_s,)}, {"pooled": (d_t,)}, cfg, train_labels=labels).double()
    bank = method.parts["bank"]
    k = negatives_count(labels, nce_k)
    assert k == min(nce_k, n - int(labels.bincount().max()))
    embed_s, embed_t = Embed(d_s, feat_dim).double(), Embed(d_t, feat_dim).double()
    embed_s.linear.load_state_dict(method.parts["embed_s"].state_dict())
    embed_t.linear.load_state_dict(method.parts["embed_t"].state_dict())
    memory = ContrastMemory(bank.student, bank.teacher, k, nce_t, nce_m)
    for _ in range(2):  # the first sets Z and moves the memory; the second uses both
        index = torch.randperm(n)[:batch]
        y = labels[index]
        f_s = torch.randn(batch, d_s, dtype=torch.float64).relu().requires_grad_()
        f_t = torch.randn(batch, d_t, dtype=torch.float64).relu()
        logits = torch.randn(batch, classes, dtype=torch.float64, requires_grad=True)
        before = copy.deepcopy(bank)  # the same negatives: drawn from the generator state the loss starts from
        contrast_index = torch.cat([index[:, None], draw_negatives(before, index, k)], 1)
        ours, terms = method.loss(
            Outputs(logits, {"pooled": f_s, "index": index}), Outputs(logits.detach(), {"pooled": f_t}), y, cfg
        )
        ref, ref_crd = reference(logits, y, f_s, f_t, index, contrast_index, embed_s, embed_t, memory, n)
        torch.testing.assert_close(ours, ref.squeeze(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(terms["crd"], ref_crd.squeeze(), rtol=1e-6, atol=1e-6)
        ours_grads = torch.autograd.grad(ours, [logits, f_s, *method.parts.parameters()])
        ref_grads = torch.autograd.grad(ref.squeeze(), [logits, f_s, *embed_s.parameters(), *embed_t.parameters()])
        for a, b in zip(ours_grads, ref_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(bank.z, memory.params[2:4], rtol=1e-12, atol=0)
        torch.testing.assert_close(bank.student, memory.memory_v1, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bank.teacher, memory.memory_v2, rtol=1e-12, atol=1e-12)
        assert torch.equal(bank.rng, before.rng)  # the loss drew once, what the reference was given


def test_negatives_are_distinct_images_of_other_classes_and_reproducible_from_the_saved_state():
    labels = labels_of(50, 5)  # 10 images a class: 40 negatives at most
    assert negatives_count(labels, 16384) == 40 and negatives_count(labels, 7) == 7
    method = get_method("crd")
    cfg = method.effective_loss(LossConfig())
    torch.manual_seed(3)
    parts = method.make_parts({"pooled": (6,)}, {"pooled": (4,)}, cfg, train_labels=labels)
    torch.manual_seed(3)
    same = method.make_parts({"pooled": (6,)}, {"pooled": (4,)}, cfg, train_labels=labels)
    index = torch.tensor([0, 7, 19, 33])
    drawn = draw_negatives(parts["bank"], index, 40)
    assert all(len(set(row.tolist())) == 40 for row in drawn)  # without replacement
    assert not (labels[drawn] == labels[index][:, None]).any()  # never the image's own class
    assert torch.equal(drawn, draw_negatives(same["bank"], index, 40))  # the same seed: the same negatives
    saved = copy.deepcopy(parts.state_dict())  # a resume state: the next draw continues where it stopped
    following = draw_negatives(parts["bank"], index, 12)
    torch.manual_seed(99)
    resumed = method.make_parts({"pooled": (6,)}, {"pooled": (4,)}, cfg, train_labels=labels)
    resumed.load_state_dict(saved)
    assert torch.equal(draw_negatives(resumed["bank"], index, 12), following)
    with pytest.raises(UserError, match="only one class"):
        negatives_count(torch.zeros(5, dtype=torch.long), 10)


def test_defaults_parts_and_checks():
    method = get_method("crd")
    assert CRDParams() == CRDParams(weight=0.8, feat_dim=128.0, nce_k=16384.0, nce_t=0.07, nce_m=0.5)
    assert method.needs_from_teacher == {"logits", "pooled", "index"}
    cfg = method.effective_loss(LossConfig())
    # MobileNetV2's pooled feature is 1280-d, VGG16's 512-d: two linear heads; the memory bank is buffers, not counted
    parts = method.make_parts({"pooled": (1280,)}, {"pooled": (512,)}, cfg, train_labels=labels_of(30, 3))
    assert sum(p.numel() for p in parts.parameters()) == 1280 * 128 + 128 + 512 * 128 + 128
    bank = parts["bank"]
    assert bank.student.shape == bank.teacher.shape == (30, 128) and bank.z.tolist() == [-1.0, -1.0]
    assert bank.student.abs().max() <= 1 / math.sqrt(128 / 3)
    assert {"bank.student", "bank.teacher", "bank.z", "bank.rng"} <= set(parts.state_dict())
    for params, needle in [
        ((("feat_dim", 12.5),), "crd.feat_dim must be a whole number >= 1"),
        ((("nce_k", 0.0),), "crd.nce_k must be a whole number >= 1"),
        ((("nce_m", 1.0),), r"crd.nce_m must be in \[0, 1\)"),
        ((("nce_t", 0.0),), "crd.nce_t must be > 0"),
        ((("weight", 0.0),), "every distillation weight is 0"),
    ]:
        with pytest.raises(UserError, match=needle):
            method.check(LossConfig(params=params), "")
    with pytest.raises(ValueError, match="train_labels"):
        method.make_parts({"pooled": (4,)}, {"pooled": (4,)}, cfg)
