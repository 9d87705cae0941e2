"""One training epoch and one evaluation pass over in-memory uint8 tensors."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from kdbench.config import LossConfig, Recipe
from kdbench.data.presets import Augmentation, normalize
from kdbench.engine.metrics import confusion_matrix, summarize
from kdbench.engine.runtime import autocast, memory_format
from kdbench.errors import NonFiniteError
from kdbench.methods import Method


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
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    device: torch.device,
    desc: str,
    progress: bool,
) -> EpochStats:
    """Train over ``images`` (uint8, already on ``device``) once; stops with NonFiniteError on a NaN/inf loss."""
    model.train()
    n = len(images)
    steps = steps_per_epoch(n, batch_size)
    # running sums stay on the device; reading them syncs, so CUDA checks every SYNC_EVERY steps
    check_every = 1 if device.type == "cpu" else SYNC_EVERY
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    term_sums: dict[str, torch.Tensor] = {}
    seen = 0
    start = time.perf_counter()
    bar = tqdm(total=steps * min(batch_size, n), desc=desc, unit="img", leave=False, disable=not progress, dynamic_ncols=True)
    batches = epoch_batches(images, labels, aug, batch_size=batch_size, seed=seed, epoch=epoch, device=device)
    for step, (positions, batch_views, x, y) in enumerate(batches):
        with autocast(device):
            logits = model(x)
        logits = logits.float()
        teacher_logits = teacher(positions, batch_views, x) if teacher is not None else None
        loss, terms = method.loss(logits, teacher_logits, y, loss_cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        b = len(positions)
        seen += b
        loss_sum += loss.detach() * b
        correct += (logits.argmax(1) == y).sum()
        for name, value in terms._asdict().items():
            if value is not None:
                term_sums[name] = term_sums.get(name, 0.0) + value.detach() * b
        if (step + 1) % check_every == 0 or step + 1 == steps:
            mean_loss = loss_sum.item() / seen  # NaN or inf in any step propagates into the sum
            if not math.isfinite(mean_loss):
                raise NonFiniteError(
                    f"non-finite loss at epoch {epoch + 1}, step {step + 1}: lower the learning rate or check the teacher and data"
                )
            bar.update(seen - bar.n)
            bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{correct.item() / seen:.3f}", img_s=f"{seen / (time.perf_counter() - start):.0f}")
    bar.close()
    seconds = time.perf_counter() - start
    seen = max(seen, 1)
    terms_mean = {k: float(v) / seen for k, v in term_sums.items()}
    return EpochStats(loss_sum.item() / seen, correct.item() / seen, seen, seconds, terms_mean)


def epoch_batches(images: torch.Tensor, labels: torch.Tensor, aug: Augmentation, *, batch_size: int, seed: int, epoch: int, device: torch.device):
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
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, classes: list[str], *, batch_size: int, device: torch.device) -> dict:
    """Metrics of ``model`` on un-augmented ``images`` plus the mean cross-entropy (``loss``)."""
    model.eval()
    predictions, loss_sum = [], 0.0
    fmt = memory_format(device)
    for lo in range(0, len(images), batch_size):
        x = normalize(images[lo : lo + batch_size].to(device)).contiguous(memory_format=fmt)
        with autocast(device):
            logits = model(x).float()
        y = labels[lo : lo + batch_size].to(device)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        predictions.append(logits.argmax(1).cpu())
    pred = torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)
    metrics = summarize(confusion_matrix(labels.cpu(), pred, len(classes)), classes)
    metrics["loss"] = loss_sum / max(len(images), 1)
    return metrics
