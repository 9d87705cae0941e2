"""CRD: contrastive representation distillation (Tian, Krishnan and Isola, ICLR 2020, arXiv 1910.10699).

The student's and the teacher's pooled features are embedded in a common unit sphere, and each embedding is
asked to pick its own training image's embedding of the other model, kept in a memory bank of the whole
training split, out of ``K`` negatives by noise-contrastive estimation::

    L = alpha * CE(s, y) + weight * (nce(P_s) + nce(P_t))

    v_s = g_s(pooled_s) / |g_s(pooled_s)|,  v_t = g_t(pooled_t) / |g_t(pooled_t)|          [B, feat_dim]
    P_s[b, j] = exp(<M_t[c_bj], v_s[b]> / nce_t) / Z_s,  P_t[b, j] = exp(<M_s[c_bj], v_t[b]> / nce_t) / Z_t
    nce(P) = -(1/B) sum_b [ log(P[b,0] / (P[b,0] + K/N + eps)) + sum_{j=1..K} log((K/N) / (P[b,j] + K/N + eps)) ]

* ``pooled_s`` ``[B, D_s]``, ``pooled_t`` ``[B, D_t]``: the global average of stage 4 (``pooled``, kdbench.stages;
  mdistiller's ``pooled_feat``; VGG16 512-d, MobileNetV2 1280-d); ``g_s``, ``g_t``: linear layers to ``feat_dim``
  (mdistiller's ``Embed``: the norm has no epsilon).  Both embeddings train (the teacher's head too; the teacher
  itself is frozen).
* The memory bank: ``M_s``, ``M_t`` ``[N, feat_dim]``, one row per training image (``N`` images), initialised
  uniform in ``+-1/sqrt(feat_dim / 3)``; after each step row ``i`` of a batch becomes
  ``normalize(nce_m * M[i] + (1 - nce_m) * v[i])`` (momentum update, after the loss is computed, no gradient).
* ``c_b = (i_b, n_1 .. n_K)`` ``[B, K + 1]``: the image's own training index ``i_b`` (the engine's need
  ``"index"``), the positive, then ``K`` negatives drawn without replacement among the training images of the
  other classes (mdistiller's ``CRD.MODE = "exact"``, where its data loader draws them).
* ``Z_s``, ``Z_t``: the normalising constants, each ``N`` times the mean of its ``exp`` scores over the first
  batch ever (then fixed; mdistiller's ``ContrastMemory``), ``eps = 1e-7``; ``K / N``: ``K`` times the uniform
  noise probability ``1 / N`` (mdistiller's ``ContrastLoss``).
* ``weight = 0.8`` (``CRD.LOSS.FEAT_WEIGHT``), ``alpha = 1`` (``CE_WEIGHT``), ``feat_dim = 128``,
  ``nce_k = 16384``, ``nce_t = 0.07``, ``nce_m = 0.5`` (``CRD.FEAT.DIM``, ``CRD.NCE.K``, ``TEMPERATURE``,
  ``MOMENTUM``; mdistiller's defaults, which its CIFAR-100 and ImageNet configs keep; the names are the authors'
  RepDistiller options).

kdbench's own choices, and why:

* ``K = min(nce_k, N - n_max)``, ``n_max`` the largest class's training images: the smallest pool of negatives
  (a land-use training split has hundreds to a few thousand images, not CIFAR's 50,000), so every image gets
  ``K`` distinct negatives.  mdistiller draws ``nce_k`` with replacement where the pool is smaller, which on
  these sets would repeat each negative many times and cost ``B x 16385`` memory rows a step.
* The negatives come from a ``torch.Generator`` of the parts, seeded from torch's global generator when the
  engine builds them (right after the seeded student: the trial's seed fixes it) and kept, with the memory bank
  and ``Z``, in the parts' buffers: the resume state restores all three, so a resumed trial draws the same
  negatives as an uninterrupted one, and the student's own random numbers (dropout) are those of any other
  method.  mdistiller draws them in its data loader's workers, from numpy's global state.
* The memory bank is state, not parameters: ``method_parts`` counts the two linear layers only.

Reference: mdistiller commit a08d46f, mdistiller/distillers/CRD.py (``Embed``, ``ContrastMemory``,
``ContrastLoss``), mdistiller/dataset/cifar100.py (``CIFAR100InstanceSample``: the negatives) and
mdistiller/engine/cfg.py; tests/test_crd.py checks this loss, its memory and ``Z`` against a re-derivation of
them in float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kdbench.errors import UserError
from kdbench.methods import INDEX, OwnParams, Params, register
from kdbench.stages import POOLED

if TYPE_CHECKING:
    import torch
    from torch import nn

EPS = 1e-7  # mdistiller's ContrastLoss


@dataclass(frozen=True)
class CRDParams(Params):
    """mdistiller's CRD defaults: the loss weight, the embedding size and the NCE settings."""

    positive = ("nce_t",)
    integers = ("feat_dim", "nce_k")
    fractions = ("nce_m",)

    weight: float = 0.8
    feat_dim: float = 128.0  # the embedding's size
    nce_k: float = 16384.0  # negatives per image (at most N - n_max: see the module docstring)
    nce_t: float = 0.07  # temperature of the scores
    nce_m: float = 0.5  # momentum of the memory bank


def negatives_count(train_labels: torch.Tensor, nce_k: float) -> int:
    """``K = min(nce_k, N - n_max)``: as many negatives as the smallest pool (the images of the other classes) holds.

    Raises:
        UserError: the training split has a single class (no negatives).
    """
    pool = len(train_labels) - int(train_labels.bincount().max())
    if pool < 1:
        raise UserError("crd contrasts each image with images of other classes: the training split holds only one class")
    return min(int(nce_k), pool)


def make_contrast_parts(d_s: int, d_t: int, train_labels: torch.Tensor, p: CRDParams) -> nn.ModuleDict:
    """The embeddings ``g_s``, ``g_t`` and the memory bank of ``len(train_labels)`` rows.

    ``bank`` holds the buffers ``student`` and ``teacher`` (``M_s``, ``M_t``), ``z`` (``Z_s``, ``Z_t``; -1 until the
    first batch), ``rng`` (the negatives' generator state), and, as a plain CPU attribute (derived from the data,
    not state), ``labels``.
    """
    import torch
    from torch import nn

    dim, n = int(p.feat_dim), len(train_labels)
    heads = {"embed_s": nn.Linear(d_s, dim), "embed_t": nn.Linear(d_t, dim)}
    bank = nn.Module()
    stdv = 1.0 / math.sqrt(dim / 3)
    for name in ("student", "teacher"):
        bank.register_buffer(name, torch.rand(n, dim).mul_(2 * stdv).add_(-stdv))
    bank.register_buffer("z", torch.full((2,), -1.0))
    seed = int(torch.randint(2**62, ()))  # the global generator, seeded with the trial's seed just before
    bank.register_buffer("rng", torch.Generator().manual_seed(seed).get_state())
    bank.labels = train_labels.cpu()
    return nn.ModuleDict({**heads, "bank": bank})


def draw_negatives(bank: nn.Module, index: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, K]`` training indices, for each image of ``index`` ``[B]`` ``K`` distinct ones of other classes, drawn
    from (and advancing) the bank's generator."""
    import torch

    generator = torch.Generator()
    generator.set_state(bank.rng.cpu())
    labels = bank.labels
    other = labels[None, :] != labels[index.cpu()][:, None]  # [B, N]
    drawn = torch.multinomial(other.float(), k, replacement=False, generator=generator)
    bank.rng.copy_(generator.get_state())
    return drawn


def embed(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``g(x) / |g(x)|`` ``[B, feat_dim]`` of ``x`` ``[B, D]`` (no epsilon, as mdistiller's ``Normalize``)."""
    v = linear(x.flatten(1))
    return v / v.pow(2).sum(1, keepdim=True).sqrt()


def nce_loss(p: torch.Tensor, noise: float) -> torch.Tensor:
    """``nce(P)`` of ``[B, 1 + K]`` probabilities (the positive first), ``noise = K / N``."""
    positive = (p[:, 0] / (p[:, 0] + noise + EPS)).log()
    negative = (noise / (p[:, 1:] + noise + EPS)).log()
    return -(positive.sum() + negative.sum()) / len(p)


def crd_loss(parts: nn.ModuleDict, f_s: torch.Tensor, f_t: torch.Tensor, contrast: torch.Tensor, p: CRDParams) -> torch.Tensor:
    """``nce(P_s) + nce(P_t)`` for pooled features ``f_s`` ``[B, D_s]``, ``f_t`` ``[B, D_t]`` and training indices
    ``contrast`` ``[B, 1 + K]`` (each image's own first); then sets ``Z`` if unset and updates the memory rows of
    ``contrast[:, 0]``."""
    import torch

    bank = parts["bank"]
    v_s, v_t = embed(parts["embed_s"], f_s), embed(parts["embed_t"], f_t)
    # scores of each embedding against the other model's memory rows (copies: the update below leaves them)
    s = (bank.teacher[contrast] @ v_s[:, :, None]).squeeze(2).div(p.nce_t).exp()  # [B, 1 + K]
    t = (bank.student[contrast] @ v_t[:, :, None]).squeeze(2).div(p.nce_t).exp()
    n = len(bank.student)
    with torch.no_grad():
        first = torch.stack([s.mean(), t.mean()]) * n
        bank.z.copy_(torch.where(bank.z < 0, first, bank.z))  # set once, by the first batch (no device sync)
        z = bank.z.clone()
    noise = (contrast.shape[1] - 1) / n
    loss = nce_loss(s / z[0], noise) + nce_loss(t / z[1], noise)
    with torch.no_grad():
        own = contrast[:, 0]
        for memory, v in ((bank.student, v_s), (bank.teacher, v_t)):
            row = memory[own] * p.nce_m + v * (1 - p.nce_m)
            memory.index_copy_(0, own, row / row.pow(2).sum(1, keepdim=True).sqrt())
    return loss


@register
class CRD(OwnParams):
    """CRD: ``alpha * CE + weight * (nce(P_s) + nce(P_t))``, NCE of pooled-feature embeddings against a memory bank."""

    name = "crd"
    label = "CRD"
    rank = 95
    params = CRDParams
    needs = frozenset({"logits", POOLED, INDEX})

    def make_parts(
        self,
        student: Mapping[str, tuple[int, ...]],
        teacher: Mapping[str, tuple[int, ...]],
        cfg,
        *,
        train_labels: torch.Tensor | None = None,
    ):
        """The two embeddings and the memory bank (:func:`make_contrast_parts`), from the pooled features' sizes."""
        if train_labels is None:
            raise ValueError("crd keeps a memory bank of the training split: make_parts needs its train_labels")
        return make_contrast_parts(student[POOLED][0], teacher[POOLED][0], train_labels, self.own(cfg))

    def distill(self, student, teacher, targets, p: CRDParams):
        import torch

        parts = self.built_parts("embeddings and a memory bank")
        bank = parts["bank"]
        index = student.features[INDEX]
        negatives = draw_negatives(bank, index, negatives_count(bank.labels, p.nce_k))
        contrast = torch.cat([index.cpu()[:, None], negatives], 1).to(bank.student.device)
        term = crd_loss(parts, student.features[POOLED], teacher.features[POOLED], contrast, p)
        return p.weight * term, {"crd": term}
