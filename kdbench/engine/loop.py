"""One training epoch and one evaluation pass over in-memory uint8 tensors."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from kdbench.config import LossConfig, Recipe
from kdbench.data.presets import Augmentation, normalize
from kdbench.engine.features import FeatureTap
from kdbench.engine.metrics import confusion_matrix, summarize
from kdbench.engine.runtime import autocast, full_precision, memory_format
from kdbench.errors import NonFiniteError
from kdbench.finite import check_finite_logits
from kdbench.methods import INDEX, Method, Outputs


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float
    terms: dict[str, float]

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


SYNC_EVERY = 25


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of an epoch's shuffling, views and dropout: a resumed run replays the same epoch."""
    return seed * 100_003 + epoch


def make_optimizer(params, recipe: Recipe) -> torch.optim.Optimizer:
    """SGD with momentum (the land-use recipe) or AdamW (steadier for from-scratch low-resolution VGG)."""
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, betas=(recipe.momentum, 0.999), weight_decay=recipe.weight_decay)
    return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches only (the partial last batch is dropped: batch norm on a handful of
    samples at low resolution gives exploding gradients); one batch when ``n < batch_size``."""
    return max(n // batch_size, 1 if n >= 2 else 0)


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Multiplier of the base LR at ``step``.

    A linear warm-up over ``warmup_steps`` (from 1/25 of the base LR), then ``cosine``
    decay to 0, ``onecycle`` (warm-up over 30% of the steps, then cosine down; it
    ignores ``warmup_steps``) or ``constant``.
    """
    if schedule == "onecycle":
        warmup_steps = int(0.3 * total_steps)
    if step < warmup_steps:
        return 0.04 + 0.96 * step / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * progress))


class MemberLoss(NamedTuple):
    """One model's loss in an epoch: ``method.loss(student outputs, teacher outputs, y, cfg)``; ``label`` names it in errors."""

    label: str
    method: Method
    cfg: LossConfig


def train_one_epoch(
    model: nn.Module,
    method: Method,
    loss_cfg: LossConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    aug: Augmentation,
    teacher,
    **kwargs,
) -> EpochStats:
    """Train ``model`` over ``images`` (uint8, already on the device) once; see :func:`train_members_epoch`."""
    member = MemberLoss(method.name, method, loss_cfg)
    return train_members_epoch(model, [member], optimizer, scheduler, images, labels, aug, teacher, stacked=False, **kwargs)[0]


def train_members_epoch(
    model: nn.Module,
    members: Sequence[MemberLoss],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    images: torch.Tensor,
    labels: torch.Tensor,
    aug: Augmentation,
    teacher,
    *,
    stacked: bool,
    batch_size: int,
    seed: int,
    epoch: int,
    device: torch.device,
    desc: str,
    progress: bool,
    tap: FeatureTap | None = None,
) -> list[EpochStats]:
    """One epoch for one model (``stacked=False``: logits ``[B, C]``) or a pack (``[K, B, C]``).

    Each step minimises ``sum_i L_i`` with ``L_i = members[i].method.loss(logits[i], ...)``
    over the batches of :func:`epoch_batches`, with one teacher lookup per batch.  The model runs
    through ``tap`` (a :class:`FeatureTap` of it recording the features the members need; one is made
    for the epoch when None, which gives the embedding but no stages), and each member's learnable parts
    (``method.parts``) train with it.  A member needing ``"index"`` finds the batch's positions in the training
    split among the student's features (on the CPU).  The
    running sums stay on the device and are read (a sync) after every step on the CPU and
    every ``SYNC_EVERY`` steps on CUDA: a NaN/inf loss stops the epoch there with a
    NonFiniteError naming the members concerned.  Returns one EpochStats per member.
    """
    model.train()
    for m in members:
        if m.method.parts is not None:
            m.method.parts.train()
    n = len(images)
    steps = steps_per_epoch(n, batch_size)
    check_every = 1 if device.type == "cpu" else SYNC_EVERY
    sums, layout, means, seen = None, [], [{} for _ in members], 0
    start = time.perf_counter()
    bar = tqdm(total=steps * min(batch_size, n), desc=desc, unit="img", leave=False, disable=not progress, dynamic_ncols=True)
    batches = epoch_batches(images, labels, aug, batch_size=batch_size, seed=seed, epoch=epoch, device=device)
    needs = frozenset().union(*(m.method.needs_from_teacher for m in members))
    # the student's features a member needs, from its own forward pass
    with nullcontext(tap) if tap is not None else FeatureTap(model, needs) as tap:
        for step, (positions, batch_views, x, y) in enumerate(batches):
            with autocast(device):
                logits = tap(x)
            logits = full_precision(logits) if stacked else full_precision(logits).unsqueeze(0)
            features = {name: full_precision(v) for name, v in tap.take().items()}
            if INDEX in needs:
                features[INDEX] = positions  # on the CPU, as drawn
            teacher_out = teacher(positions, batch_views, x) if teacher is not None else None
            losses, scalars, layout = _member_losses(members, logits, features, teacher_out, y)
            optimizer.zero_grad(set_to_none=True)
            torch.stack(losses).sum().backward()
            optimizer.step()
            scheduler.step()
            b = len(positions)
            seen += b
            sums = scalars * b if sums is None else sums + scalars * b
            if (step + 1) % check_every == 0 or step + 1 == steps:
                means = _member_means(sums / seen, layout)
                _check_finite(members, means, epoch, step)
                bar.update(seen - bar.n)
                postfix = (
                    {"loss": f"{means[0]['loss']:.3f}", "acc": f"{means[0]['correct']:.3f}"}
                    if len(members) == 1
                    else {"k": len(members)}
                )
                bar.set_postfix(img_s=f"{seen / (time.perf_counter() - start):.0f}", **postfix)
    bar.close()
    seconds = time.perf_counter() - start
    return [
        EpochStats(
            m.get("loss", 0.0),
            m.get("correct", 0.0),
            seen,
            seconds,
            {k[len("term_") :]: v for k, v in m.items() if k.startswith("term_")},
        )
        for m in means
    ]


def _member_losses(
    members: Sequence[MemberLoss],
    logits: torch.Tensor,
    features: dict[str, torch.Tensor],
    teacher: Outputs | None,
    y: torch.Tensor,
) -> tuple[list[torch.Tensor], torch.Tensor, list[list[str]]]:
    """Each member's loss; its batch means (``loss``, ``correct`` fraction, ``term_*``) flat on the device, and their names.

    ``features`` are the student's (one model: packed members need logits only, kdbench.engine.pack_rules).
    """
    losses, scalars, layout = [], [], []
    for i, m in enumerate(members):
        student = Outputs(logits[i], features)
        loss, terms = m.method.loss(student, teacher if m.method.needs_teacher else None, y, m.cfg)
        losses.append(loss)
        present = {f"term_{k}": v.detach() for k, v in terms.items() if v is not None}
        layout.append(["loss", "correct", *present])
        scalars += [loss.detach(), (logits[i].argmax(1) == y).float().mean(), *present.values()]
    return losses, torch.stack(scalars), layout


def _member_means(flat: torch.Tensor, layout: list[list[str]]) -> list[dict[str, float]]:
    """Split the flat means back per member (reading them waits for the device)."""
    values = iter(flat.tolist())
    return [{name: next(values) for name in names} for names in layout]


class MembersNonFinite(NonFiniteError):
    """A non-finite loss in some members of a pack: ``reasons`` maps each one's index to its one-line reason."""

    def __init__(self, message: str, reasons: dict[int, str]):
        super().__init__(message)
        self.reasons = reasons


def _check_finite(members: Sequence[MemberLoss], means: list[dict[str, float]], epoch: int, step: int) -> None:
    """A NaN/inf in any step so far propagates into the member's mean loss."""
    pairs = enumerate(zip(members, means))
    bad = {i: f"{i} {m.label} (mean loss {s['loss']})" for i, (m, s) in pairs if not math.isfinite(s["loss"])}
    if bad:
        where = f" in packed member(s) {'; '.join(bad.values())}" if len(members) > 1 else ""
        hint = "lower the learning rate or check the teacher and data"
        at = f"non-finite loss at epoch {epoch + 1}, step {step + 1}"
        reasons = {i: f"{at} (mean loss {means[i]['loss']}): {hint}" for i in bad}
        raise MembersNonFinite(f"non-finite loss at epoch {epoch + 1}, step {step + 1}{where}: {hint}", reasons)


EXPLOSION_FACTOR = 100.0


def check_loss_growth(first_loss: float, loss: float, epoch: int, label: str = "") -> None:
    """Fail a run whose epoch mean training loss exceeds ``EXPLOSION_FACTOR`` x the first epoch's: it diverged.

    (A NaN/inf step loss, an overflow, is caught during the epoch by ``_check_finite``.)
    """
    if epoch > 1 and loss > EXPLOSION_FACTOR * first_loss:
        who = f" of {label}" if label else ""
        raise NonFiniteError(
            f"training loss{who} exploded: epoch {epoch} mean loss {loss:.4g} is over {EXPLOSION_FACTOR:g}x epoch 1's "
            f"({first_loss:.4g}): lower the learning rate or add warm-up epochs"
        )


def epoch_batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    aug: Augmentation,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    device: torch.device,
):
    """Yield ``(positions, views, inputs, targets)`` for each step of an epoch.

    The order, the views, the crops and the dropout masks all follow from
    ``epoch_seed(seed, epoch)``: a resumed run, a packed run and the teacher-logit
    cache see exactly the same batches.  ``positions`` index the training images.
    """
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    torch.manual_seed(epoch_seed(seed, epoch))  # dropout masks
    n = len(images)
    order = torch.randperm(n, generator=generator)
    views = aug.sample_views(n, generator)
    fmt = memory_format(device)
    for step in range(steps_per_epoch(n, batch_size)):
        positions = order[step * batch_size : (step + 1) * batch_size]
        batch_views = views[step * batch_size : (step + 1) * batch_size]
        dev_positions = positions.to(device)
        x = normalize(aug(images[dev_positions], batch_views, generator)).contiguous(memory_format=fmt)
        yield positions, batch_views, x, labels[dev_positions]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    *,
    batch_size: int,
    device: torch.device,
    what: str = "logits",
) -> dict:
    """Metrics of ``model`` on un-augmented ``images`` plus the mean cross-entropy (``loss``); see :func:`predict`."""
    return logit_metrics(predict(model, images, batch_size=batch_size, device=device, what=what), labels, classes)


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, *, batch_size: int, device: torch.device, what: str = "logits"
) -> torch.Tensor:
    """``[N, C]`` logits of ``model`` (eval mode; fp32, or the default dtype) on un-augmented uint8 ``images``, on the CPU.

    A NaN or infinite logit raises a NonFiniteError naming ``what`` (e.g. ``validation logits at epoch 3``):
    it would still have an arg-max, so a broken model would be scored as if it predicted class 0.
    """
    model.eval()
    fmt = memory_format(device)
    chunks = []
    for lo in range(0, len(images), batch_size):
        x = normalize(images[lo : lo + batch_size].to(device)).contiguous(memory_format=fmt)
        with autocast(device):
            chunks.append(full_precision(model(x)).cpu())
    logits = torch.cat(chunks) if chunks else torch.empty(0, 0)
    check_finite_logits(logits, what)
    return logits


def logit_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """:func:`kdbench.engine.metrics.summarize` of the arg-max predictions, plus the mean cross-entropy (``loss``)."""
    labels = labels.cpu()
    pred = logits.argmax(1) if len(logits) else torch.empty(0, dtype=torch.long)
    metrics = summarize(confusion_matrix(labels, pred, len(classes)), classes)
    metrics["loss"] = float(F.cross_entropy(logits, labels, reduction="sum")) / len(labels) if len(labels) else 0.0
    return metrics
