"""K compatible student trials as one packed network (the GPU fast path of :mod:`kdbench.engine.runner`).

A small student is launch-bound on a GPU.  K sweep trials that differ only in
their method and loss settings (same data, recipe, seed and teacher) see exactly
the same batches, so they train together as one
:class:`~kdbench.packing.PackedMobileNetV2` (forward ``[B, 3, H, W] -> [K, B, C]``),
by the same runner as a trial alone, with only the model differing:

* init: member ``i`` is built as its separate trial would be
  (``torch.manual_seed(seed)``, then ``build_model``), then the K models are packed
  (:func:`init_pack`);
* batches: the shuffling, views and crops of
  :func:`~kdbench.engine.loop.train_members_epoch` for the shared seed
  (``epoch_seed(seed, epoch)``), and ONE teacher lookup per batch (the logit cache
  where the augmentation is finite, the teacher online otherwise);
* loss: ``L = sum_i L_i`` with ``L_i = method_i.loss(out[i], teacher_logits, y, loss_i)``.
  Member ``i``'s parameters ``theta_i`` are disjoint slices of the packed tensors
  and ``out[i]`` depends on ``theta_i`` only, so ``dL/dtheta_i = dL_i/dtheta_i``
  (a mean would scale every member's gradient by ``1/K``);
* optimiser: a trial's (:func:`~kdbench.engine.loop.make_optimizer`: SGD with
  momentum or AdamW) over the packed parameters; its update is elementwise, so it
  acts as K separate optimisers sharing the trial's LR schedule.

Results equal K separate trials trained alone up to float rounding, except the dropout
masks: drawn per member and sample from the same distribution, but not the same masks
(see :mod:`kdbench.packing`); so ``packed`` is part of a trial's key.  Files, the one
resume state and a member that goes non-finite (it fails alone; the others restart as a
smaller pack): :mod:`kdbench.engine.runner`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from kdbench.config import TrialConfig
from kdbench.engine.loop import EpochStats, MemberLoss, train_members_epoch
from kdbench.models import build_model
from kdbench.packing import PackedMobileNetV2


def init_pack(cfgs: Sequence[TrialConfig], num_classes: int) -> PackedMobileNetV2:
    """Member ``i`` initialised as its separate trial: ``torch.manual_seed(seed_i)``, then ``build_model``."""
    members = []
    for cfg in cfgs:
        torch.manual_seed(cfg.seed)
        members.append(build_model(cfg.recipe.model, num_classes, cfg.recipe.pretrained))
    return PackedMobileNetV2.from_members(members)


def train_pack_epoch(packed: nn.Module, members: Sequence[MemberLoss], *args, **kwargs) -> list[EpochStats]:
    """One epoch of :func:`~kdbench.engine.loop.train_members_epoch` for K members at once; one EpochStats per member.

    The batches (order, views, crops) are a trial's for ``seed`` and ``epoch``; the step
    minimises ``sum_i L_i``.  Timings and images/s are the pack's: each image trains K members.
    """
    return train_members_epoch(packed, members, *args, stacked=True, **kwargs)
